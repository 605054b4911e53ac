//! Open-domain QA scoring as SQuAD's evaluation script and the common harnesses do it: both the
//! prediction and each gold alias are normalised (lower case, punctuation and the articles
//! a/an/the removed, whitespace collapsed) and compared for equality.

/// SQuAD's `normalize_answer`: lower case, drop ASCII punctuation, drop the articles
/// `a`/`an`/`the` as words, collapse whitespace.
pub fn normalize_answer(text: &str) -> String {
    let lower = text.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `prediction` equals any of `golds` after [`normalize_answer`].
pub fn exact_match(prediction: &str, golds: &[String]) -> bool {
    let p = normalize_answer(prediction);
    golds.iter().any(|g| normalize_answer(g) == p)
}

/// The answer part of a generated continuation: the text before the first stop string (a QA
/// prompt stops at a newline), trimmed.
pub fn cut_at_stop<'a>(generated: &'a str, stops: &[String]) -> &'a str {
    let end = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| generated.find(s.as_str()))
        .min()
        .unwrap_or(generated.len());
    generated[..end].trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_follows_squad() {
        assert_eq!(normalize_answer("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(normalize_answer("An apple, a day"), "apple day");
        assert_eq!(normalize_answer("Theodore"), "theodore");
        assert_eq!(normalize_answer("U.S.A."), "usa");
    }

    #[test]
    fn exact_match_against_any_alias() {
        let golds = vec!["Paris".to_string(), "City of Light".to_string()];
        assert!(exact_match(" paris.", &golds));
        assert!(exact_match("the city of light", &golds));
        assert!(!exact_match("Paris, France", &golds));
        assert!(!exact_match("", &golds));
    }

    #[test]
    fn the_answer_ends_at_the_first_stop() {
        let stops = vec!["\n".to_string()];
        assert_eq!(cut_at_stop(" Paris\nQ: next", &stops), "Paris");
        assert_eq!(cut_at_stop(" Paris", &stops), "Paris");
        assert_eq!(cut_at_stop("a.b\nc", &["\n".into(), ".".into()]), "a");
    }
}
