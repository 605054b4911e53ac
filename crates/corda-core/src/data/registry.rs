//! The calibration dataset registry (`--calib_dataset wikitext2`, `MetaMATH`, …).
//!
//! The entries mirror the reference's `get_calib_data` and live in `configs/datasets.toml`,
//! which is embedded at build time so the registry works from any directory, and parsed at
//! run time so the file stays the single place to read or change them.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::data::calibration::CalibSampling;
use crate::data::source::RowSource;
use crate::data::split::Split;
use crate::data::template::Template;
use crate::{CordaError, Result};

/// The built-in registry file.
pub const DATASETS_TOML: &str = include_str!("../../../../configs/datasets.toml");

/// The reference's `llama_chat_format` for instruction datasets. The literal `<s>` comes on
/// top of the tokenizer's own BOS, so Llama samples start with two BOS tokens, as in PEFT.
pub const LLAMA_CHAT_TEMPLATE: &str = "<s>[INST] <<SYS>>\n\"Below is an instruction that describes a task. Write a response that appropriately completes the request.\"\n<</SYS>>\n\n{instruction} [/INST] {response} </s>\n";

/// The Llama-2 chat template with `instruction` and `response` (template texts such as
/// `{query}`) in place of its two slots.
pub fn llama_chat_template(instruction: &str, response: &str) -> Result<Template> {
    let (head, rest) = LLAMA_CHAT_TEMPLATE
        .split_once("{instruction}")
        .unwrap_or((LLAMA_CHAT_TEMPLATE, ""));
    let (middle, tail) = rest.split_once("{response}").unwrap_or((rest, ""));
    Template::parse(&format!("{head}{instruction}{middle}{response}{tail}"))
}

/// An entry of a built-in TOML table of datasets (`[datasets.NAME]`), known by its table name
/// and its aliases: the calibration registry and the evaluation datasets share this shape.
pub(crate) trait NamedEntry {
    fn name(&self) -> &str;
    fn aliases(&self) -> &[String];
    fn set_name(&mut self, name: &str);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedTables<E> {
    datasets: BTreeMap<String, E>,
}

/// The `[datasets.NAME]` tables of `text`, each entry told its table name.
pub(crate) fn parse_named<E: NamedEntry + DeserializeOwned>(
    text: &str,
) -> std::result::Result<BTreeMap<String, E>, toml::de::Error> {
    let file: NamedTables<E> = toml::from_str(text)?;
    Ok(file
        .datasets
        .into_iter()
        .map(|(name, mut e)| {
            e.set_name(&name);
            (name, e)
        })
        .collect())
}

/// The entry called `name` or having it as an alias; exact match first, then ignoring case.
pub(crate) fn find_named<'a, E: NamedEntry + 'a>(
    entries: impl Iterator<Item = &'a E> + Clone,
    name: &str,
) -> Option<&'a E> {
    let matches = |eq: &dyn Fn(&str) -> bool| {
        entries
            .clone()
            .find(|e| eq(e.name()) || e.aliases().iter().any(|a| eq(a)))
    };
    matches(&|n| n == name).or_else(|| matches(&|n| n.eq_ignore_ascii_case(name)))
}

/// One calibration dataset.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    /// The registry name (the TOML table name).
    #[serde(skip)]
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Hugging Face dataset id (from the local cache, else downloaded).
    pub hub: String,
    pub config: Option<String>,
    /// Explicit data files, relative to the dataset repo.
    #[serde(default)]
    pub files: Vec<String>,
    pub split: String,
    pub sampling: CalibSampling,
    /// Row text for `windows` (and `rows`) sampling.
    pub template: Option<String>,
    /// Instruction text for `chat` sampling.
    pub instruction: Option<String>,
    /// Response text for `chat` sampling.
    pub response: Option<String>,
    /// Columns that must be empty or absent for a row to be kept.
    #[serde(default)]
    pub require_empty: Vec<String>,
}

impl NamedEntry for RegistryEntry {
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

impl RegistryEntry {
    /// The template that turns a row into calibration text (the chat template for `chat`).
    pub fn template(&self) -> Result<Template> {
        let missing = |field: &str| {
            CordaError::Data(format!(
                "calibration dataset `{}` ({} sampling) needs `{field}` in configs/datasets.toml",
                self.name, self.sampling
            ))
        };
        match self.sampling {
            CalibSampling::Chat => llama_chat_template(
                self.instruction
                    .as_deref()
                    .ok_or_else(|| missing("instruction"))?,
                self.response
                    .as_deref()
                    .ok_or_else(|| missing("response"))?,
            ),
            CalibSampling::Rows | CalibSampling::Windows => Template::parse(
                self.template
                    .as_deref()
                    .ok_or_else(|| missing("template"))?,
            ),
        }
    }

    /// The split spec.
    pub fn split(&self) -> Result<Split> {
        Split::parse(&self.split)
    }

    /// Where the rows come from (the hub id, config and files).
    pub fn source(&self) -> RowSource {
        RowSource::new(&self.hub)
            .config(self.config.as_deref())
            .data_files(self.files.clone())
    }

    /// Whether a row passes the entry's filter (`require_empty`).
    pub fn keeps(&self, row: &Value) -> bool {
        self.require_empty.iter().all(|col| match row.get(col) {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(_) => false,
        })
    }

    /// Keeps the rows that pass the filter. The reference filters after taking `n` shuffled
    /// rows (so alpaca yields fewer than `n` samples); filtering first keeps `n` samples.
    pub fn filter_rows(&self, rows: Vec<Value>) -> Result<Vec<Value>> {
        let total = rows.len();
        let kept: Vec<Value> = rows.into_iter().filter(|r| self.keeps(r)).collect();
        if kept.is_empty() && total > 0 {
            return Err(CordaError::Data(format!(
                "none of the {total} rows of calibration dataset `{}` has an empty {}; check \
                 the dataset",
                self.name,
                self.require_empty.join(", ")
            )));
        }
        Ok(kept)
    }

    /// Loads the entry's split from `source` (e.g. [`RegistryEntry::source`], or the same
    /// with an explicit cache root) and applies the filter.
    pub fn load_rows_from(&self, source: &RowSource) -> Result<Vec<Value>> {
        let rows = source.load(&self.split()?)?;
        self.filter_rows(rows)
    }

    /// Loads the entry's rows (from the Hugging Face cache, else downloaded; settings from the
    /// environment) and applies the filter.
    pub fn load_rows(&self) -> Result<Vec<Value>> {
        self.load_rows_from(&self.source())
    }

    fn validate(&self) -> Result<()> {
        self.template()?;
        self.split()?;
        Ok(())
    }
}

/// A set of calibration datasets by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    entries: BTreeMap<String, RegistryEntry>,
}

impl Registry {
    /// Parses and checks a registry in the `configs/datasets.toml` format.
    pub fn parse(text: &str) -> Result<Self> {
        let entries: BTreeMap<String, RegistryEntry> = parse_named(text).map_err(|e| {
            CordaError::Data(format!(
                "invalid dataset registry: {e}; fix configs/datasets.toml"
            ))
        })?;
        for (name, entry) in &entries {
            entry
                .validate()
                .map_err(|e| CordaError::Data(format!("dataset registry entry `{name}`: {e}")))?;
        }
        Ok(Registry { entries })
    }

    /// The registry embedded from `configs/datasets.toml`.
    pub fn builtin() -> Result<&'static Registry> {
        static BUILTIN: OnceLock<std::result::Result<Registry, String>> = OnceLock::new();
        BUILTIN
            .get_or_init(|| Registry::parse(DATASETS_TOML).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| CordaError::Data(e.clone()))
    }

    /// The entry called `name` or having it as an alias; exact match first, then ignoring
    /// case. An unknown name is an error listing the known ones.
    pub fn get(&self, name: &str) -> Result<&RegistryEntry> {
        find_named(self.entries.values(), name).ok_or_else(|| {
            CordaError::Data(format!(
                "unknown calibration dataset `{name}`; known datasets: {} (or pass a local \
                     file or a hub dataset id with a template)",
                self.names().join(", ")
            ))
        })
    }

    /// The entry names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    pub fn entries(&self) -> impl Iterator<Item = &RegistryEntry> {
        self.entries.values()
    }
}

/// Looks up a built-in calibration dataset by name (see [`Registry::get`]).
pub fn lookup(name: &str) -> Result<RegistryEntry> {
    Registry::builtin()?.get(name).cloned()
}

/// The built-in calibration dataset names.
pub fn names() -> Result<Vec<&'static str>> {
    Ok(Registry::builtin()?.names())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builtin_registry_has_the_reference_datasets() {
        let expected = [
            ("nqopen", "nq_open", None, "{question}"),
            ("traivia_qa", "trivia_qa", Some("rc"), "{question}"),
            ("trivia_qa", "trivia_qa", Some("rc"), "{question}"),
            ("wikitext2", "wikitext", Some("wikitext-2-raw-v1"), "{text}"),
            ("ptb", "ptb_text_only", Some("penn_treebank"), "{sentence}"),
            ("c4", "allenai/c4", None, "{text}"),
        ];
        for (name, hub, config, template) in expected {
            let e = lookup(name).unwrap();
            assert_eq!(e.hub, hub, "{name}");
            assert_eq!(e.config.as_deref(), config, "{name}");
            assert_eq!(e.sampling, CalibSampling::Windows, "{name}");
            assert_eq!(e.template().unwrap().as_str(), template, "{name}");
            assert_eq!(e.split, "train");
        }
        let chats = [
            ("MetaMATH", "iboing/MetaMathQA-395K"),
            ("codefeedback", "iboing/CodeFeedback-Filtered-Instruction"),
            ("WizLMinstruct", "iboing/WizardLM_evol_instruct_V2_143k"),
            ("alpaca", "iboing/alpaca_data"),
        ];
        for (name, hub) in chats {
            let e = lookup(name).unwrap();
            assert_eq!(e.hub, hub);
            assert_eq!(e.sampling, CalibSampling::Chat);
        }
        assert_eq!(lookup("metamath").unwrap().name, "MetaMATH");
        let err = lookup("imagenet").unwrap_err().to_string();
        assert!(
            err.contains("wikitext2") && err.contains("MetaMATH"),
            "{err}"
        );
    }

    #[test]
    fn chat_template_is_exact() {
        let e = lookup("WizLMinstruct").unwrap();
        let row = json!({"conversation": [{"human": "Hi?", "assistant": "Hello."}]});
        assert_eq!(
            e.template().unwrap().format(&row).unwrap(),
            "<s>[INST] <<SYS>>\n\"Below is an instruction that describes a task. Write a \
             response that appropriately completes the request.\"\n<</SYS>>\n\nHi? [/INST] \
             Hello. </s>\n"
        );
        let e = lookup("codefeedback").unwrap();
        let text = e
            .template()
            .unwrap()
            .format(&json!({"query": "q {x}", "answer": "a"}))
            .unwrap();
        assert!(text.ends_with("q {x} [/INST] a </s>\n"), "{text}");
    }

    #[test]
    fn alpaca_keeps_rows_without_input() {
        let e = lookup("alpaca").unwrap();
        let rows = vec![
            json!({"instruction": "a", "input": "", "output": "x"}),
            json!({"instruction": "b", "input": "ctx", "output": "y"}),
            json!({"instruction": "c", "output": "z"}),
            json!({"instruction": "d", "input": null, "output": "w"}),
        ];
        let kept = e.filter_rows(rows).unwrap();
        let names: Vec<_> = kept.iter().map(|r| r["instruction"].clone()).collect();
        assert_eq!(names, [json!("a"), json!("c"), json!("d")]);
        assert!(e
            .filter_rows(vec![
                json!({"instruction": "b", "input": "ctx", "output": "y"})
            ])
            .is_err());
    }

    #[test]
    fn bad_registries_are_rejected() {
        let missing_template =
            "[datasets.x]\nhub = \"x\"\nsplit = \"train\"\nsampling = \"windows\"\n";
        let err = Registry::parse(missing_template).unwrap_err().to_string();
        assert!(err.contains("needs `template`"), "{err}");
        let typo = "[datasets.x]\nhub = \"x\"\nsplit = \"train\"\nsampling = \"windows\"\ntemplat = \"{a}\"\n";
        assert!(Registry::parse(typo).is_err());
        let bad_split = "[datasets.x]\nhub = \"x\"\nsplit = \"train[\"\nsampling = \"windows\"\ntemplate = \"{a}\"\n";
        assert!(Registry::parse(bad_split).is_err());
    }

    #[test]
    fn entries_load_from_an_explicit_cache() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("datasets--nq_open");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "c0ffee").unwrap();
        let data = repo.join("snapshots/c0ffee/nq_open");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(
            data.join("train-00000-of-00001.jsonl"),
            "{\"question\": \"q1\", \"answer\": [\"a\"]}\n",
        )
        .unwrap();
        std::fs::write(
            data.join("validation-00000-of-00001.jsonl"),
            "{\"question\": \"v1\", \"answer\": [\"b\"]}\n",
        )
        .unwrap();
        let e = lookup("nqopen").unwrap();
        let rows = e
            .load_rows_from(&e.source().cache_root(cache.path()))
            .unwrap();
        assert_eq!(rows, vec![json!({"question": "q1", "answer": ["a"]})]);
    }
}
