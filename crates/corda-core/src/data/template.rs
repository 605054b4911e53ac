//! Text templates that turn a dataset row into one string.
//!
//! Calibration and fine-tuning both need "which columns, glued how": `{question}` for nq_open,
//! `{query} {response}` for MetaMathQA, `{conversation[0].human}` for WizardLM's nested rows.
//! Placeholders are field paths; `{{` and `}}` stand for literal braces, as in Python's
//! `str.format`.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use crate::{CordaError, Result};

/// One step of a field path: an object key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathStep {
    Key(String),
    Index(usize),
}

/// A path into a row such as `conversation[0].human`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    text: String,
    steps: Vec<PathStep>,
}

impl FieldPath {
    /// Parses `a`, `a.b`, `a[0]`, `a[0].b[2]`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            CordaError::Data(format!(
                "invalid field path `{text}`: {why}; write columns as `name`, nested fields as \
                 `name.inner` and list items as `name[0]`"
            ))
        };
        let mut steps = Vec::new();
        let mut rest = text.trim();
        let mut expect_key = true;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('[') {
                let close = after.find(']').ok_or_else(|| bad("`[` is never closed"))?;
                let index = after[..close]
                    .trim()
                    .parse()
                    .map_err(|_| bad("a list index must be a non-negative integer"))?;
                steps.push(PathStep::Index(index));
                rest = &after[close + 1..];
                expect_key = false;
            } else {
                if !expect_key {
                    rest = rest
                        .strip_prefix('.')
                        .ok_or_else(|| bad("expected `.` or `[` after `]`"))?;
                }
                let end = rest.find(['.', '[', ']']).unwrap_or(rest.len());
                let key = &rest[..end];
                if key.is_empty() {
                    return Err(bad("a field name is empty"));
                }
                steps.push(PathStep::Key(key.to_string()));
                rest = &rest[end..];
                if rest.starts_with(']') {
                    return Err(bad("`]` without `[`"));
                }
                if let Some(after) = rest.strip_prefix('.') {
                    if after.is_empty() {
                        return Err(bad("the path ends with `.`"));
                    }
                    rest = after;
                    expect_key = true;
                } else {
                    expect_key = false;
                }
            }
        }
        if steps.is_empty() {
            return Err(bad("the path is empty"));
        }
        if !matches!(steps[0], PathStep::Key(_)) {
            return Err(bad("the path must start with a column name"));
        }
        Ok(FieldPath {
            text: text.trim().to_string(),
            steps,
        })
    }

    /// The top-level column this path starts from.
    pub fn column(&self) -> &str {
        match &self.steps[0] {
            PathStep::Key(k) => k,
            PathStep::Index(_) => unreachable!("parse guarantees a leading key"),
        }
    }

    pub fn steps(&self) -> &[PathStep] {
        &self.steps
    }

    /// The value at this path, if every step exists (a JSON `null` counts as present).
    pub fn get<'a>(&self, row: &'a Value) -> Option<&'a Value> {
        self.steps.iter().try_fold(row, |v, step| match step {
            PathStep::Key(k) => v.as_object()?.get(k),
            PathStep::Index(i) => v.as_array()?.get(*i),
        })
    }

    /// Like [`FieldPath::get`], but explains which step failed and what was there instead.
    pub fn lookup<'a>(&self, row: &'a Value) -> Result<&'a Value> {
        let mut current = row;
        let mut walked = String::new();
        for step in &self.steps {
            let next = match step {
                PathStep::Key(k) => match current.as_object() {
                    Some(obj) => obj.get(k).ok_or_else(|| {
                        let available = describe_keys(obj);
                        if walked.is_empty() {
                            CordaError::Data(format!(
                                "the template names column `{k}`, which this dataset lacks; \
                                 available columns: {available}"
                            ))
                        } else {
                            CordaError::Data(format!(
                                "`{walked}` has no field `{k}` (for `{}`); its fields: {available}",
                                self.text
                            ))
                        }
                    })?,
                    None => {
                        return Err(CordaError::Data(format!(
                            "`{}` expects an object at `{}` but found {}",
                            self.text,
                            if walked.is_empty() {
                                "the row"
                            } else {
                                &walked
                            },
                            kind(current)
                        )))
                    }
                },
                PathStep::Index(i) => match current.as_array() {
                    Some(items) => items.get(*i).ok_or_else(|| {
                        CordaError::Data(format!(
                            "`{}`: `{walked}` has {} items, so index {i} does not exist",
                            self.text,
                            items.len()
                        ))
                    })?,
                    None => {
                        return Err(CordaError::Data(format!(
                            "`{}` expects a list at `{walked}` but found {}",
                            self.text,
                            kind(current)
                        )))
                    }
                },
            };
            match step {
                PathStep::Key(k) if walked.is_empty() => walked.push_str(k),
                PathStep::Key(k) => {
                    walked.push('.');
                    walked.push_str(k);
                }
                PathStep::Index(i) => walked.push_str(&format!("[{i}]")),
            }
            current = next;
        }
        Ok(current)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(FieldPath),
}

/// A parsed template such as `"{query} {response}"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses a template; `{path}` is a placeholder, `{{`/`}}` are literal braces.
    pub fn parse(source: &str) -> Result<Self> {
        let bad = |why: String| {
            CordaError::Data(format!(
                "invalid template `{source}`: {why}; write placeholders as `{{column}}` and \
                 literal braces as `{{{{` / `}}}}`"
            ))
        };
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '{' => {
                    let rest = &source[at + 1..];
                    let close = rest
                        .find('}')
                        .ok_or_else(|| bad(format!("`{{` at byte {at} is never closed")))?;
                    let inner = &rest[..close];
                    if inner.contains('{') {
                        return Err(bad(format!("nested `{{` at byte {at}")));
                    }
                    if inner.trim().is_empty() {
                        return Err(bad(format!("empty placeholder at byte {at}")));
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Field(FieldPath::parse(inner)?));
                    // Skip the placeholder body and its closing brace.
                    while let Some(&(i, _)) = chars.peek() {
                        if i > at + close + 1 {
                            break;
                        }
                        chars.next();
                    }
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => return Err(bad(format!("single `}}` at byte {at}"))),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Template {
            source: source.to_string(),
            pieces,
        })
    }

    /// A template that is just one field, e.g. `Template::field("question")`.
    pub fn field(path: &str) -> Result<Self> {
        let path = FieldPath::parse(path)?;
        Ok(Template {
            source: format!("{{{path}}}"),
            pieces: vec![Piece::Field(path)],
        })
    }

    /// The template text as given.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The field paths the template reads, in order of appearance.
    pub fn fields(&self) -> impl Iterator<Item = &FieldPath> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Field(f) => Some(f),
            Piece::Text(_) => None,
        })
    }

    /// Formats one row. Strings are inserted verbatim, numbers and booleans as text, lists
    /// joined with ", " (e.g. nq_open's `answer`); a missing field or a `null` is an error.
    pub fn format(&self, row: &Value) -> Result<String> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(path) => {
                    let value = path.lookup(row)?;
                    render_into(&mut out, value).map_err(|what| {
                        CordaError::Data(format!(
                            "field `{path}` is {what}, which cannot be put into text; drop such \
                             rows or pick another field"
                        ))
                    })?;
                }
            }
        }
        Ok(out)
    }

    /// Formats every row; an error names the row index.
    pub fn format_rows(&self, rows: &[Value]) -> Result<Vec<String>> {
        rows.iter()
            .enumerate()
            .map(|(i, row)| self.format(row).map_err(|e| in_row(i, e)))
            .collect()
    }
}

impl FromStr for Template {
    type Err = CordaError;

    fn from_str(s: &str) -> Result<Self> {
        Template::parse(s)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Renders a value as text (see [`Template::format`]).
pub fn render_value(value: &Value) -> Result<String> {
    let mut out = String::new();
    render_into(&mut out, value)
        .map_err(|what| CordaError::Data(format!("a {what} value cannot be put into text")))?;
    Ok(out)
}

/// Prefixes an error message with the row it concerns.
pub(crate) fn in_row(row: usize, err: CordaError) -> CordaError {
    match err {
        CordaError::Data(msg) => CordaError::Data(format!("row {row}: {msg}")),
        other => other,
    }
}

fn render_into(out: &mut String, value: &Value) -> std::result::Result<(), &'static str> {
    match value {
        Value::String(s) => out.push_str(s),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                render_into(out, item)?;
            }
        }
        Value::Object(_) => out.push_str(&value.to_string()),
        Value::Null => return Err("null"),
    }
    Ok(())
}

fn describe_keys(obj: &serde_json::Map<String, Value>) -> String {
    if obj.is_empty() {
        "(none)".to_string()
    } else {
        obj.keys()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_flat_columns() {
        let t = Template::parse("{query} {response}").unwrap();
        let row = json!({"query": "What is 2+2?", "response": "4"});
        assert_eq!(t.format(&row).unwrap(), "What is 2+2? 4");
        let names: Vec<_> = t.fields().map(|f| f.column().to_string()).collect();
        assert_eq!(names, ["query", "response"]);
    }

    #[test]
    fn formats_nested_paths() {
        let t =
            Template::parse("Q: {conversation[0].human}\nA: {conversation[0].assistant}").unwrap();
        let row = json!({"conversation": [{"human": "hi", "assistant": "hello"}]});
        assert_eq!(t.format(&row).unwrap(), "Q: hi\nA: hello");
        let deep = Template::parse("{a.b[1][0].c}").unwrap();
        assert_eq!(
            deep.format(&json!({"a": {"b": [[], [{"c": 7}]]}})).unwrap(),
            "7"
        );
    }

    #[test]
    fn lists_numbers_and_braces() {
        let t = Template::parse("{{{question}}} -> {answer} ({n}, {ok})").unwrap();
        let row = json!({"question": "q", "answer": ["a", "b"], "n": 3, "ok": true});
        assert_eq!(t.format(&row).unwrap(), "{q} -> a, b (3, true)");
        assert_eq!(Template::field("text").unwrap().as_str(), "{text}");
    }

    #[test]
    fn non_ascii_text_survives() {
        let t = Template::parse("é {x} ü").unwrap();
        assert_eq!(t.format(&json!({"x": "日本"})).unwrap(), "é 日本 ü");
    }

    #[test]
    fn missing_column_lists_the_available_ones() {
        let t = Template::parse("{question}").unwrap();
        let err = t
            .format_rows(&[json!({"query": "q", "response": "r"})])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("row 0:"), "{err}");
        assert!(err.contains("`question`"), "{err}");
        assert!(err.contains("`query`, `response`"), "{err}");
    }

    #[test]
    fn nested_failures_say_where() {
        let t = Template::parse("{conversation[1].human}").unwrap();
        let err = t
            .format(&json!({"conversation": [{"human": "x"}]}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("has 1 items"), "{err}");
        let t = Template::parse("{conversation[0].user}").unwrap();
        let err = t
            .format(&json!({"conversation": [{"human": "x"}]}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no field `user`") && err.contains("`human`"),
            "{err}"
        );
        let err = Template::parse("{x}")
            .unwrap()
            .format(&json!({"x": null}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("null"), "{err}");
    }

    #[test]
    fn malformed_templates_are_errors() {
        for bad in [
            "{", "{}", "a } b", "{a[}", "{a.}", "{[0]}", "{a]}", "{a{b}}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad} should not parse");
        }
    }
}
