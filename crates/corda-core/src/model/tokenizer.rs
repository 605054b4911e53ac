//! `tokenizer.json` through the tokenizers crate, with BOS/EOS/pad taken from
//! `tokenizer_config.json`, `generation_config.json` and `config.json`, in that order.

use std::path::Path;

use serde_json::Value;

use crate::{CordaError, Result};

/// A tokenizer plus the special tokens the pipeline needs.
pub struct TokenizerInfo {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub eos_token: Option<String>,
    pub pad_id: Option<u32>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| CordaError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| CordaError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn first_id(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|x| x as u32),
        _ => None,
    }
}

impl TokenizerInfo {
    /// Load from a model directory. For a GGUF model: the `tokenizer.json` beside the file
    /// (special ids it leaves unset come from the GGUF metadata), else one rebuilt from the
    /// metadata.
    pub fn load(dir: &Path) -> Result<Self> {
        if let Some(file) = super::gguf::find_gguf(dir)? {
            let gguf = super::GgufModel::open(&file)?;
            let beside = gguf.dir();
            if !beside.join("tokenizer.json").is_file() {
                return gguf.tokenizer_from_metadata();
            }
            let mut info = Self::load_dir(&beside)?;
            gguf.fill_special_ids(&mut info);
            return Ok(info);
        }
        Self::load_dir(dir)
    }

    /// Whether [`Self::load`] finds a tokenizer for this model path without looking elsewhere.
    pub fn available(dir: &Path) -> bool {
        dir.join("tokenizer.json").is_file() || matches!(super::gguf::find_gguf(dir), Ok(Some(_)))
    }

    fn load_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(CordaError::Model(format!(
                "{} is missing; the model directory needs a fast tokenizer (save it with transformers' tokenizer.save_pretrained)",
                path.display()
            )));
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
            CordaError::Model(format!("{}: cannot load tokenizer: {e}", path.display()))
        })?;
        let tok_cfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let gen_cfg = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let model_cfg = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let id_of = |key: &str| -> Option<u32> {
            token_text(tok_cfg.get(format!("{key}_token")))
                .and_then(|t| tokenizer.token_to_id(&t))
                .or_else(|| first_id(gen_cfg.get(format!("{key}_token_id"))))
                .or_else(|| first_id(model_cfg.get(format!("{key}_token_id"))))
        };
        let bos_id = id_of("bos");
        let eos_id = id_of("eos");
        let pad_id = id_of("pad");
        let eos_token = eos_id.and_then(|id| tokenizer.id_to_token(id));
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            eos_token,
            pad_id,
        })
    }

    /// Encode with the tokenizer's special tokens (e.g. Llama's BOS), like `tokenizer(text)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| CordaError::Data(format!("cannot tokenize text: {e}")))
    }
}
