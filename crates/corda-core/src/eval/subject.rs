//! What is evaluated: a model (a Hugging Face directory, hub id or GGUF file) alone, or with one
//! PEFT adapter attached — the residual model with `corda_init` or a fine-tuned `ft`, the
//! original model with a converted LoRA. A merged model is a model alone.

use std::path::{Path, PathBuf};

use crate::adapter::Adapter;
use crate::hub::Hub;
use crate::model::{resolve_model, CausalLM, LoadOptions};
use crate::Result;

/// One evaluated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// Its name in tables and charts.
    pub label: String,
    /// A model directory, hub id or GGUF file.
    pub model: String,
    pub adapter: Option<PathBuf>,
}

/// The last `n` components of a path, for a short label.
fn tail(path: &str, n: usize) -> String {
    let parts: Vec<&str> = path
        .trim_end_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    parts[parts.len().saturating_sub(n)..].join("/")
}

impl Subject {
    pub fn model(model: &str) -> Self {
        Self {
            label: tail(model, 2),
            model: model.to_string(),
            adapter: None,
        }
    }

    pub fn with_adapter(model: &str, adapter: &Path) -> Self {
        Self {
            label: format!(
                "{} + {}",
                tail(model, 1),
                tail(&adapter.to_string_lossy(), 2)
            ),
            model: model.to_string(),
            adapter: Some(adapter.to_path_buf()),
        }
    }

    /// The model directory (resolving a hub id, downloading what the cache lacks).
    pub fn model_dir(&self, revision: &str, hub: &Hub) -> Result<PathBuf> {
        resolve_model(&self.model, revision, hub)
    }

    /// The adapter's files, if any (read before the model: the cheap failure first).
    pub fn load_adapter(&self) -> Result<Option<Adapter>> {
        self.adapter.as_deref().map(Adapter::load).transpose()
    }

    /// The model with the adapter attached.
    pub fn load(&self, revision: &str, hub: &Hub, opts: &LoadOptions) -> Result<CausalLM> {
        let adapter = self.load_adapter()?;
        let mut model = CausalLM::load(&self.model_dir(revision, hub)?, opts)?;
        if let Some(a) = adapter {
            a.attach_to(&mut model)?;
        }
        Ok(model)
    }
}

/// The subjects of a run: `model` alone when `include_base` (or when there is nothing else),
/// `model` with each adapter, then each other model alone. Labels are made unique.
pub fn subjects(
    model: &str,
    adapters: &[PathBuf],
    include_base: bool,
    others: &[String],
) -> Vec<Subject> {
    let mut out = Vec::new();
    if include_base || (adapters.is_empty() && others.is_empty()) {
        out.push(Subject::model(model));
    }
    out.extend(adapters.iter().map(|a| Subject::with_adapter(model, a)));
    out.extend(others.iter().map(|m| Subject::model(m)));
    for i in 0..out.len() {
        if out[..i].iter().any(|s| s.label == out[i].label) {
            out[i].label = format!("{} ({})", out[i].label, i + 1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_labels() {
        let s = subjects(
            "out/res",
            &[PathBuf::from("out/res/corda_init"), PathBuf::from("ft/ft")],
            false,
            &[],
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label, "res + res/corda_init");
        assert_eq!(s[1].adapter.as_deref(), Some(Path::new("ft/ft")));
        let s = subjects("org/model", &[], false, &[]);
        assert_eq!(s, vec![Subject::model("org/model")]);
        assert_eq!(s[0].label, "org/model");
        let s = subjects("a/m", &[], true, &["b/m".into(), "a/m".into()]);
        assert_eq!(
            s.iter().map(|x| x.label.as_str()).collect::<Vec<_>>(),
            ["a/m", "b/m", "a/m (3)"]
        );
    }
}
