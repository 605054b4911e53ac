//! A small regular-expression matcher for the regexes PEFT configs may hold (`target_modules` as a
//! string, regex keys of `rank_pattern` / `alpha_pattern`), so the crate needs no regex engine.
//! It supports literals, `.`, classes (`[a-z_]`, `[^.]`, `\d \w \s`), groups (`(..)`, `(?:..)`),
//! alternation, the quantifiers `* + ? {m} {m,} {m,n}` (lazy forms too) and `^ $`; anything else
//! makes [`full_match`] return `None`. Matching backtracks, which is fine for module names; a
//! step and depth budget turns a pathological pattern (`(.*)*x`, `(){100000}`) into `None`
//! instead of an exponential run or a stack overflow.

use std::cell::Cell;

#[derive(Debug, Clone)]
enum Node {
    Char(char),
    Any,
    Class {
        ranges: Vec<(char, char)>,
        negated: bool,
    },
    Group(Vec<Seq>),
    Start,
    End,
}

#[derive(Debug, Clone)]
struct Item {
    node: Node,
    min: usize,
    max: usize,
}

type Seq = Vec<Item>;

struct Parser<'a> {
    chars: &'a [char],
    pos: usize,
}

const DIGIT: &[(char, char)] = &[('0', '9')];
const WORD: &[(char, char)] = &[('a', 'z'), ('A', 'Z'), ('0', '9'), ('_', '_')];
const SPACE: &[(char, char)] = &[(' ', ' '), ('\t', '\r')];

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn alt(&mut self) -> Option<Vec<Seq>> {
        let mut alts = vec![self.seq()?];
        while self.eat('|') {
            alts.push(self.seq()?);
        }
        Some(alts)
    }

    fn seq(&mut self) -> Option<Seq> {
        let mut seq = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let node = self.atom()?;
            let (min, max) = self.quantifier()?;
            seq.push(Item { node, min, max });
        }
        Some(seq)
    }

    fn number(&mut self) -> Option<usize> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.chars[start..self.pos]
            .iter()
            .collect::<String>()
            .parse()
            .ok()
    }

    fn quantifier(&mut self) -> Option<(usize, usize)> {
        let q = match self.peek() {
            Some('*') => (0, usize::MAX),
            Some('+') => (1, usize::MAX),
            Some('?') => (0, 1),
            Some('{') => {
                self.pos += 1;
                let min = self.number()?;
                let max = if self.eat(',') {
                    if self.peek() == Some('}') {
                        usize::MAX
                    } else {
                        self.number()?
                    }
                } else {
                    min
                };
                if !self.eat('}') || max < min {
                    return None;
                }
                self.pos -= 1;
                (min, max)
            }
            _ => return Some((1, 1)),
        };
        self.pos += 1;
        // Lazy and greedy quantifiers accept the same strings under a full match.
        self.eat('?');
        Some(q)
    }

    fn escape_class(c: char) -> Option<(Vec<(char, char)>, bool)> {
        match c {
            'd' => Some((DIGIT.to_vec(), false)),
            'w' => Some((WORD.to_vec(), false)),
            's' => Some((SPACE.to_vec(), false)),
            'D' => Some((DIGIT.to_vec(), true)),
            'W' => Some((WORD.to_vec(), true)),
            'S' => Some((SPACE.to_vec(), true)),
            _ => None,
        }
    }

    fn atom(&mut self) -> Option<Node> {
        let c = self.peek()?;
        self.pos += 1;
        Some(match c {
            '.' => Node::Any,
            '^' => Node::Start,
            '$' => Node::End,
            '(' => {
                if self.eat('?') && !self.eat(':') {
                    return None;
                }
                let alts = self.alt()?;
                if !self.eat(')') {
                    return None;
                }
                Node::Group(alts)
            }
            '[' => self.class()?,
            '\\' => {
                let e = self.peek()?;
                self.pos += 1;
                match Self::escape_class(e) {
                    Some((ranges, negated)) => Node::Class { ranges, negated },
                    None if e.is_ascii_alphanumeric() => return None,
                    None => Node::Char(e),
                }
            }
            '*' | '+' | '?' | '{' | ')' | ']' => return None,
            c => Node::Char(c),
        })
    }

    fn class(&mut self) -> Option<Node> {
        let negated = self.eat('^');
        let mut ranges = Vec::new();
        let mut first = true;
        loop {
            let c = self.peek()?;
            self.pos += 1;
            if c == ']' && !first {
                break;
            }
            first = false;
            let lo = if c == '\\' {
                let e = self.peek()?;
                self.pos += 1;
                match Self::escape_class(e) {
                    Some((r, false)) => {
                        ranges.extend(r);
                        continue;
                    }
                    Some((_, true)) => return None,
                    None => e,
                }
            } else {
                c
            };
            if self.peek() == Some('-') && self.chars.get(self.pos + 1).is_some_and(|&n| n != ']') {
                self.pos += 1;
                let hi = self.peek()?;
                self.pos += 1;
                if hi == '\\' || hi < lo {
                    return None;
                }
                ranges.push((lo, hi));
            } else {
                ranges.push((lo, lo));
            }
        }
        Some(Node::Class { ranges, negated })
    }
}

type Cont<'k> = &'k mut dyn FnMut(usize) -> bool;

fn match_alt(alts: &[Seq], s: &[char], i: usize, b: &Budget, k: Cont) -> bool {
    alts.iter().any(|seq| match_seq(seq, s, i, b, k))
}

fn match_seq(seq: &[Item], s: &[char], i: usize, b: &Budget, k: Cont) -> bool {
    match seq.split_first() {
        None => k(i),
        Some((item, rest)) => match_repeat(item, 0, s, i, b, &mut |j| match_seq(rest, s, j, b, k)),
    }
}

/// Greedy repetition: try one more occurrence first, then stop if `min` is reached. An occurrence
/// that consumes nothing ends the repetition (otherwise `(a*)*` would loop).
fn match_repeat(item: &Item, n: usize, s: &[char], i: usize, b: &Budget, k: Cont) -> bool {
    if !b.tick() {
        return false;
    }
    b.depth.set(b.depth.get() + 1);
    let more = n < item.max
        && match_node(&item.node, s, i, b, &mut |j| {
            (j != i || n < item.min) && match_repeat(item, n + 1, s, j, b, k)
        });
    b.depth.set(b.depth.get() - 1);
    if more {
        return true;
    }
    n >= item.min && !b.exhausted.get() && k(i)
}

fn match_node(node: &Node, s: &[char], i: usize, b: &Budget, k: Cont) -> bool {
    if !b.tick() {
        return false;
    }
    match node {
        Node::Char(c) => s.get(i) == Some(c) && k(i + 1),
        Node::Any => s.get(i).is_some_and(|&c| c != '\n') && k(i + 1),
        Node::Class { ranges, negated } => {
            s.get(i)
                .is_some_and(|&c| ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated)
                && k(i + 1)
        }
        Node::Group(alts) => match_alt(alts, s, i, b, k),
        Node::Start => i == 0 && k(i),
        Node::End => i == s.len() && k(i),
    }
}

/// Python's `re.fullmatch(pattern, text) is not None`, or `None` when the pattern uses syntax
/// this matcher does not support (or is not a valid regex).
pub fn full_match(pattern: &str, text: &str) -> Option<bool> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut p = Parser {
        chars: &chars,
        pos: 0,
    };
    let alts = p.alt()?;
    if p.pos != chars.len() {
        return None;
    }
    let s: Vec<char> = text.chars().collect();
    let b = Budget::default();
    let matched = match_alt(&alts, &s, 0, &b, &mut |j| j == s.len());
    (!b.exhausted.get()).then_some(matched)
}

/// Matching steps and nested repetitions allowed for one [`full_match`]; module names need a
/// few thousand steps at most.
const MAX_STEPS: usize = 1_000_000;
const MAX_DEPTH: usize = 1_000;

#[derive(Default)]
struct Budget {
    steps: Cell<usize>,
    depth: Cell<usize>,
    exhausted: Cell<bool>,
}

impl Budget {
    /// Count a step; `false` once the budget is spent (every caller then fails the match).
    fn tick(&self) -> bool {
        let n = self.steps.get() + 1;
        self.steps.set(n);
        if n > MAX_STEPS || self.depth.get() > MAX_DEPTH {
            self.exhausted.set(true);
        }
        !self.exhausted.get()
    }
}

/// Characters that mark a config string as a regex rather than a module name (a '.' alone is
/// taken literally: module paths are full of them).
pub fn looks_like_regex(s: &str) -> bool {
    s.chars().any(|c| "*+?()[]{}|^$\\".contains(c))
}

#[cfg(test)]
mod tests {
    use super::full_match;

    /// Found by the fuzz tests: exponential backtracking and unbounded recursion.
    #[test]
    fn pathological_patterns_give_up_quickly() {
        let name = "model.layers.10.self_attn.q_proj.lora_A.default.weight";
        let t = std::time::Instant::now();
        for p in ["(.*)*x", "(.*.*)*(.*.*)*y", "(){100000}", "(|){5000}z"] {
            assert_eq!(full_match(p, name), None, "{p}");
        }
        assert!(t.elapsed().as_secs() < 10, "{:?}", t.elapsed());
        assert_eq!(full_match("(.*)*weight", name), Some(true));
    }

    #[test]
    fn matches_like_python_re_fullmatch() {
        let m = "model.layers.0.self_attn.q_proj";
        assert_eq!(full_match(r".*\.(q_proj|v_proj)", m), Some(true));
        assert_eq!(full_match(r".*\.(k_proj|v_proj)", m), Some(false));
        assert_eq!(full_match(r".*layers\.[0-2]\..*(q|v)_proj$", m), Some(true));
        assert_eq!(
            full_match(r"^model\.layers\.\d+\.self_attn\.\w+", m),
            Some(true)
        );
        assert_eq!(full_match(r"model\.layers\.\d{2}\..*", m), Some(false));
        assert_eq!(full_match(r"(?:.*\.)?(q_proj)", m), Some(true));
        assert_eq!(full_match(r"[^.]*\.q_proj", m), Some(false));
        assert_eq!(full_match(r"(a*)*b", "aaab"), Some(true));
        assert_eq!(full_match(r"a.*?c", "abcbc"), Some(true));
        assert_eq!(full_match(r"(?P<x>a)", "a"), None);
        assert_eq!(full_match(r"(a", "a"), None);
        assert_eq!(full_match(r"\bq", "q"), None);
    }
}
