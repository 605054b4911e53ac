//! Final answers of math solutions. MetaMathQA teaches "The answer is: N", GSM8K's references
//! end with "#### N", MATH's solutions put the answer in `\boxed{…}`; a free-form solution
//! falls back to its last number. Answers compare as numbers where both parse, else as strings
//! normalised the way the MATH benchmark's `strip_string` does.

/// The text after the last "The answer is" (with or without a colon), up to the line's end.
fn answer_is(text: &str) -> Option<&str> {
    let lower = text.to_ascii_lowercase();
    let at = lower.rfind("the answer is")?;
    let rest = &text[at + "the answer is".len()..];
    let rest = rest.strip_prefix(':').unwrap_or(rest);
    let line = rest.lines().next().unwrap_or("").trim();
    (!line.is_empty()).then_some(line)
}

/// The text after the last `#### ` marker (GSM8K's reference answers).
fn after_hashes(text: &str) -> Option<&str> {
    let at = text.rfind("####")?;
    let line = text[at + 4..].lines().next().unwrap_or("").trim();
    (!line.is_empty()).then_some(line)
}

/// Every number in `text` (with optional sign, thousands commas and decimals), in order.
fn numbers(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit()
            || (chars[i] == '-' && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()));
        if !starts {
            i += 1;
            continue;
        }
        let mut s = String::new();
        s.push(chars[i]);
        i += 1;
        while i < chars.len() {
            let c = chars[i];
            let next_digit = chars.get(i + 1).is_some_and(|c| c.is_ascii_digit());
            if c.is_ascii_digit() || ((c == ',' || c == '.') && next_digit) {
                if c != ',' {
                    s.push(c);
                }
                i += 1;
            } else {
                break;
            }
        }
        out.push(s);
    }
    out
}

/// A number as written in an answer (`$1,234.50`, `72.`, `-3`), if it is one.
pub fn parse_number(text: &str) -> Option<f64> {
    let t: String = text
        .trim()
        .trim_end_matches('.')
        .chars()
        .filter(|c| !matches!(c, ',' | '$' | ' '))
        .collect();
    let t = t.trim_end_matches('%');
    t.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// The final numeric answer of a GSM8K-style solution: "The answer is: N", else "#### N",
/// else the last number in the text.
pub fn extract_gsm8k_answer(text: &str) -> Option<String> {
    for marked in [answer_is(text), after_hashes(text)].into_iter().flatten() {
        if let Some(n) = numbers(marked).into_iter().next() {
            return Some(n);
        }
    }
    numbers(text).pop()
}

/// Whether two GSM8K answers are the same number.
pub fn gsm8k_equal(prediction: &str, gold: &str) -> bool {
    match (parse_number(prediction), parse_number(gold)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs().max(1.0),
        _ => false,
    }
}

/// The contents of the last `\boxed{…}` (or `\fbox{…}`), braces balanced.
pub fn last_boxed(text: &str) -> Option<String> {
    let at = text.rfind("\\boxed").or_else(|| text.rfind("\\fbox"))?;
    let rest = &text[at..];
    let open = rest.find('{')?;
    let mut depth = 0usize;
    for (i, c) in rest[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(rest[open + 1..open + i].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// The final answer of a MATH-style solution: "The answer is: X" (as MetaMathQA trains),
/// else the last `\boxed{X}`, else the last number.
pub fn extract_math_answer(text: &str) -> Option<String> {
    if let Some(a) = answer_is(text) {
        let a = a.trim_end_matches('.').trim();
        return Some(last_boxed(a).unwrap_or_else(|| a.to_string()));
    }
    last_boxed(text).or_else(|| numbers(text).pop())
}

/// The gold answer of a MATH row: its boxed answer when the text is a whole solution,
/// else the text itself.
pub fn math_gold(answer: &str) -> String {
    last_boxed(answer).unwrap_or_else(|| answer.trim().to_string())
}

/// `\frac12` → `\frac{1}{2}`, `\frac1b` → `\frac{1}{b}` (MATH's `fix_fracs`).
fn fix_fracs(s: &str) -> String {
    let mut parts = s.split("\\frac");
    let mut out = parts.next().unwrap_or("").to_string();
    for part in parts {
        out.push_str("\\frac");
        let chars: Vec<char> = part.chars().collect();
        if chars.first() == Some(&'{') || chars.len() < 2 {
            out.push_str(part);
            continue;
        }
        let (a, b) = (chars[0], chars[1]);
        let rest: String = chars[2..].iter().collect();
        if b == '{' {
            out.push_str(&format!("{{{a}}}{b}{rest}"));
        } else {
            out.push_str(&format!("{{{a}}}{{{b}}}{rest}"));
        }
    }
    out
}

/// MATH's `strip_string`: the answer without LaTeX spacing, `\left`/`\right`, degrees, dollars,
/// percent signs, units in `\text{}` at the end, `x = ` prefixes and spaces; `dfrac`/`tfrac`
/// as `frac`; `0.5` as `\frac{1}{2}`; a leading `.5` as `0.5`.
pub fn strip_math(answer: &str) -> String {
    let mut s = answer
        .replace('\n', "")
        .replace("\\!", "")
        .replace("\\\\", "\\");
    for (from, to) in [
        ("tfrac", "frac"),
        ("dfrac", "frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
        ("$", ""),
        ("\\%", ""),
        ("%", ""),
    ] {
        s = s.replace(from, to);
    }
    if let Some(at) = s.rfind("\\text{ ") {
        if s.ends_with('}') {
            s.truncate(at);
        }
    }
    s = s.replace(" .", " 0.").replace("{.", "{0.");
    if s.starts_with('.') {
        s.insert(0, '0');
    }
    if let Some((lhs, rhs)) = s.split_once('=') {
        if lhs.trim().len() <= 2 {
            s = rhs.to_string();
        }
    }
    s = fix_fracs(&s).replace(' ', "");
    if s == "0.5" {
        s = "\\frac{1}{2}".into();
    }
    // `\frac{a}{b}` written `a/b` with integers.
    if let Some((a, b)) = s.split_once('/') {
        if a.parse::<i64>().is_ok() && b.parse::<i64>().is_ok() {
            s = format!("\\frac{{{a}}}{{{b}}}");
        }
    }
    s
}

/// Whether two MATH answers are equivalent: equal numbers, else equal after [`strip_math`].
pub fn math_equal(prediction: &str, gold: &str) -> bool {
    if let (Some(a), Some(b)) = (parse_number(prediction), parse_number(gold)) {
        return (a - b).abs() <= 1e-6 * b.abs().max(1.0);
    }
    strip_math(prediction) == strip_math(gold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_answers_come_from_the_marker_else_the_last_number() {
        let metamath = "She has 3 + 4 = 7 apples.\nThe answer is: 7";
        assert_eq!(extract_gsm8k_answer(metamath).as_deref(), Some("7"));
        let gold = "Natalia sold 48/2 = 24 clips.\n#### 1,072";
        assert_eq!(extract_gsm8k_answer(gold).as_deref(), Some("1072"));
        assert_eq!(
            extract_gsm8k_answer("so it costs $18.50 in total, not 3").as_deref(),
            Some("3")
        );
        assert_eq!(
            extract_gsm8k_answer("The answer is: -2.5.").as_deref(),
            Some("-2.5")
        );
        assert_eq!(extract_gsm8k_answer("no digits here"), None);
        assert!(gsm8k_equal("1072", "1,072") && gsm8k_equal("18.00", "18"));
        assert!(!gsm8k_equal("17", "18") && !gsm8k_equal("x", "18"));
    }

    #[test]
    fn math_answers_from_boxes_and_markers() {
        let sol = "We get $\\boxed{\\frac{1}{2}}$, and \\boxed{\\sqrt{3}} at last.";
        assert_eq!(last_boxed(sol).as_deref(), Some("\\sqrt{3}"));
        assert_eq!(
            extract_math_answer("so x=2.\nThe answer is: \\frac{3}{4}").as_deref(),
            Some("\\frac{3}{4}")
        );
        assert_eq!(math_gold("Thus $\\boxed{10}$."), "10");
        assert_eq!(math_gold(" 10 "), "10");
        assert!(math_equal("\\dfrac{1}{2}", "\\frac12"));
        assert!(math_equal("0.5", "\\frac{1}{2}"));
        assert!(math_equal("x = 5", "5"));
        assert!(math_equal("90^\\circ", "90"));
        assert!(math_equal("3/4", "\\frac{3}{4}"));
        assert!(!math_equal("\\frac{3}{4}", "\\frac{4}{3}"));
    }
}
