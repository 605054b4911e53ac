//! Evaluation data: the built-in datasets (`configs/eval_datasets.toml`, embedded at build
//! time like the calibration registry) and local files or hub ids read the same way
//! ([`crate::data::RowSource`]). Perplexity needs one text; QA and math need questions with
//! gold answers, and QA also few-shot examples.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

use super::prompts::Shot;
use crate::data::registry::{find_named, parse_named, NamedEntry};
use crate::data::{FieldPath, RowSource, Split, Template};
use crate::hub::Hub;
use crate::{CordaError, Result};

/// The built-in evaluation datasets.
pub const EVAL_DATASETS_TOML: &str = include_str!("../../../../configs/eval_datasets.toml");

/// One built-in evaluation dataset.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalDatasetEntry {
    #[serde(skip)]
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub hub: String,
    pub config: Option<String>,
    #[serde(default)]
    pub files: Vec<String>,
    pub split: String,
    pub text: Option<String>,
    pub join: Option<String>,
    pub question: Option<String>,
    pub answer: Option<String>,
    pub fewshot_split: Option<String>,
}

impl NamedEntry for EvalDatasetEntry {
    fn name(&self) -> &str {
        &self.name
    }
    fn aliases(&self) -> &[String] {
        &self.aliases
    }
    fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }
}

fn builtin() -> Result<&'static BTreeMap<String, EvalDatasetEntry>> {
    static BUILTIN: OnceLock<std::result::Result<BTreeMap<String, EvalDatasetEntry>, String>> =
        OnceLock::new();
    BUILTIN
        .get_or_init(|| {
            parse_named(EVAL_DATASETS_TOML)
                .map_err(|e| format!("invalid configs/eval_datasets.toml: {e}"))
        })
        .as_ref()
        .map_err(|e| CordaError::Data(e.clone()))
}

/// The built-in entry called `name` (or aliased so; exact match first, then ignoring case), if
/// any.
pub fn lookup(name: &str) -> Result<Option<EvalDatasetEntry>> {
    Ok(find_named(builtin()?.values(), name).cloned())
}

/// The built-in dataset names.
pub fn names() -> Result<Vec<String>> {
    Ok(builtin()?.keys().cloned().collect())
}

/// Where evaluation rows come from: a built-in name, or a local file / directory / hub id
/// with explicit columns.
#[derive(Debug, Clone)]
pub struct EvalSource {
    /// The name as given (a built-in name, a path or a hub id).
    pub name: String,
    pub entry: Option<EvalDatasetEntry>,
    /// Overrides of the entry's split and columns (required where there is no entry).
    pub split: Option<String>,
    pub text_field: Option<String>,
    pub question_field: Option<String>,
    pub answer_field: Option<String>,
    pub hub: Hub,
}

impl EvalSource {
    /// `name` is a built-in dataset when one is called so and no such file exists.
    pub fn new(name: &str, hub: Hub) -> Result<Self> {
        let entry = if Path::new(name).exists() {
            None
        } else {
            lookup(name)?
        };
        Ok(Self {
            name: name.to_string(),
            entry,
            split: None,
            text_field: None,
            question_field: None,
            answer_field: None,
            hub,
        })
    }

    fn row_source(&self) -> RowSource {
        let src = match &self.entry {
            Some(e) => RowSource::new(&e.hub)
                .config(e.config.as_deref())
                .data_files(e.files.clone()),
            None => RowSource::new(&self.name),
        };
        src.hub(self.hub.clone())
    }

    fn split(&self) -> Result<Split> {
        let spec = self
            .split
            .clone()
            .or_else(|| self.entry.as_ref().map(|e| e.split.clone()))
            .unwrap_or_else(|| "train".to_string());
        Split::parse(&spec)
    }

    /// A column: the override, else the entry's, else `default` (for files).
    fn column(
        &self,
        over: &Option<String>,
        of_entry: impl Fn(&EvalDatasetEntry) -> Option<String>,
        default: &str,
    ) -> String {
        over.clone()
            .or_else(|| self.entry.as_ref().and_then(&of_entry))
            .unwrap_or_else(|| default.to_string())
    }

    /// The perplexity text: every row's text joined (a `.txt` file is read whole).
    pub fn load_text(&self) -> Result<String> {
        let path = Path::new(&self.name);
        if self.entry.is_none() && path.is_file() && self.text_field.is_none() {
            let lower = self.name.to_ascii_lowercase();
            if lower.ends_with(".txt") {
                return std::fs::read_to_string(path).map_err(|e| CordaError::io(path, e));
            }
        }
        let rows = self.row_source().load(&self.split()?)?;
        let template = match (&self.text_field, &self.entry) {
            (Some(f), _) => Template::field(f)?,
            (None, Some(e)) => Template::parse(e.text.as_deref().ok_or_else(|| {
                CordaError::Data(format!(
                    "dataset `{}` is a question set, not a text; perplexity needs wikitext2, \
                     ptb, c4 or a text file",
                    e.name
                ))
            })?)?,
            (None, None) => Template::field("text")?,
        };
        let join = self
            .entry
            .as_ref()
            .and_then(|e| e.join.clone())
            .unwrap_or_else(|| "\n\n".to_string());
        let texts = template.format_rows(&rows).map_err(|e| {
            CordaError::Data(format!(
                "dataset `{}`: {e}; name the text column (text_field)",
                self.name
            ))
        })?;
        Ok(texts.join(&join))
    }

    /// The evaluated questions (after the first `skip`) and the `shots` few-shot examples.
    /// A built-in dataset takes its shots from the first rows of its few-shot split; a file
    /// from its own first rows, which are then not evaluated.
    pub fn load_questions(&self, shots: usize) -> Result<(Vec<Question>, Vec<Shot>)> {
        let q = FieldPath::parse(&self.column(
            &self.question_field,
            |e| e.question.clone(),
            "question",
        ))?;
        let a = FieldPath::parse(&self.column(&self.answer_field, |e| e.answer.clone(), "answer"))?;
        let rows = self.row_source().load(&self.split()?)?;
        let fewshot_split = self.entry.as_ref().and_then(|e| e.fewshot_split.clone());
        let (shot_rows, eval_rows) = match fewshot_split {
            Some(split) if shots > 0 => {
                let spec = Split::parse(&format!("{split}[:{shots}]"))?;
                (self.row_source().load(&spec)?, rows)
            }
            _ => {
                if shots >= rows.len() && shots > 0 {
                    return Err(CordaError::Data(format!(
                        "dataset `{}` has {} rows, not more than the {shots} few-shot \
                         examples taken from its start; use fewer shots or more rows",
                        self.name,
                        rows.len()
                    )));
                }
                let mut rows = rows;
                let rest = rows.split_off(shots);
                (rows, rest)
            }
        };
        let columns = |e: CordaError| {
            CordaError::Data(format!(
                "dataset `{}`: {e}; name the columns (question_field, answer_field)",
                self.name
            ))
        };
        let questions = eval_rows
            .iter()
            .enumerate()
            .map(|(i, r)| question_of(r, &q, &a).map_err(|e| columns(in_row(i, e))))
            .collect::<Result<Vec<_>>>()?;
        let shots = shot_rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let x = question_of(r, &q, &a).map_err(|e| columns(in_row(i, e)))?;
                Ok(Shot {
                    question: x.question,
                    answer: x.answers.into_iter().next().unwrap_or_default(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((questions, shots))
    }
}

fn in_row(i: usize, e: CordaError) -> CordaError {
    CordaError::Data(format!("row {i}: {e}"))
}

/// A question with its gold answers (one, or a list of aliases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub question: String,
    pub answers: Vec<String>,
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn question_of(row: &Value, q: &FieldPath, a: &FieldPath) -> Result<Question> {
    let question = text_of(q.lookup(row)?).ok_or_else(|| {
        CordaError::Data(format!(
            "the question field `{q}` is not text; pick another column"
        ))
    })?;
    let answers = match a.lookup(row)? {
        Value::Array(items) => items.iter().filter_map(text_of).collect(),
        v => text_of(v).into_iter().collect(),
    };
    let answers: Vec<String> = answers;
    if answers.is_empty() {
        return Err(CordaError::Data(format!(
            "the answer field `{a}` holds no text answer; pick another column"
        )));
    }
    Ok(Question { question, answers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::HubOptions;

    fn offline() -> Hub {
        let mut o = HubOptions::from_env_fn(|_| None);
        o.offline = true;
        Hub::new(o)
    }

    #[test]
    fn builtin_entries_parse_and_resolve_aliases() {
        let names = names().unwrap();
        for n in [
            "wikitext2",
            "ptb",
            "c4",
            "nqopen",
            "trivia_qa",
            "gsm8k",
            "math",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
        }
        assert_eq!(lookup("NQ_OPEN").unwrap().unwrap().name, "nqopen");
        assert_eq!(lookup("traivia_qa").unwrap().unwrap().hub, "trivia_qa");
        assert!(lookup("nope").unwrap().is_none());
        for n in names {
            let e = lookup(&n).unwrap().unwrap();
            Split::parse(&e.split).unwrap();
            assert!(
                e.text.is_some() != e.question.is_some(),
                "{n}: a text or a question set"
            );
        }
    }

    #[test]
    fn files_give_texts_questions_and_shots() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("qa.jsonl");
        std::fs::write(
            &f,
            "{\"question\": \"q0\", \"answer\": [\"a0\", \"b0\"]}\n{\"question\": \"q1\", \"answer\": \"a1\"}\n{\"question\": \"q2\", \"answer\": [\"a2\"]}\n",
        )
        .unwrap();
        let src = EvalSource::new(f.to_str().unwrap(), offline()).unwrap();
        let (qs, shots) = src.load_questions(1).unwrap();
        assert_eq!(
            shots,
            vec![Shot {
                question: "q0".into(),
                answer: "a0".into()
            }]
        );
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0].answers, vec!["a1".to_string()]);
        assert!(src
            .load_questions(3)
            .unwrap_err()
            .to_string()
            .contains("few-shot"));
        let mut src = src;
        src.text_field = Some("question".into());
        assert_eq!(src.load_text().unwrap(), "q0\n\nq1\n\nq2");
        src.answer_field = Some("missing".into());
        assert!(src.load_questions(0).is_err());
        let t = dir.path().join("t.txt");
        std::fs::write(&t, "line one\nline two\n").unwrap();
        let src = EvalSource::new(t.to_str().unwrap(), offline()).unwrap();
        assert_eq!(src.load_text().unwrap(), "line one\nline two\n");
    }
}
