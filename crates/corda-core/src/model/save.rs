//! Writing a Hugging Face model directory: config (with the written dtype, in the source's
//! layout), generation config and tokenizer files copied over, weights through
//! [`super::ShardWriter`].

use std::path::Path;

use candle_core::DType;
use serde_json::Value;

use super::config::dtype_name;
use crate::{CordaError, Result};

/// Files besides config and weights that make a directory loadable by transformers.
pub const SUPPORT_FILES: [&str; 7] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
];

/// Copy the tokenizer and generation files that exist in `src` into `dst`. For a GGUF model
/// they are taken from beside the `.gguf`, and what is missing there (tokenizer, generation
/// config) is written from its metadata, so `dst` is a complete Hugging Face directory.
pub fn copy_support_files(src: &Path, dst: &Path) -> Result<()> {
    if let Some(file) = super::gguf::find_gguf(src)? {
        let gguf = super::GgufModel::open(&file)?;
        let beside = gguf.dir();
        copy_existing(&beside, dst)?;
        if !beside.join("tokenizer.json").is_file() {
            gguf.write_tokenizer_files(dst)?;
        }
        if !beside.join("generation_config.json").is_file() {
            gguf.write_generation_config(dst)?;
        }
        return Ok(());
    }
    copy_existing(src, dst)
}

fn copy_existing(src: &Path, dst: &Path) -> Result<()> {
    for f in SUPPORT_FILES {
        let from = src.join(f);
        if from.is_file() {
            let to = dst.join(f);
            std::fs::copy(&from, &to).map_err(|e| CordaError::io(&to, e))?;
            crate::util::atomic::make_readable(&to)?;
        }
    }
    Ok(())
}

/// Write `config.json` from the source's raw JSON, recording `dtype` under the key the
/// source layout uses (`torch_dtype` for transformers 4, `dtype` for 5).
pub fn write_config(raw: &Value, dtype: DType, dst: &Path) -> Result<()> {
    let mut v = raw.clone();
    if let Some(o) = v.as_object_mut() {
        let key = if o.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        o.insert(
            key.to_string(),
            Value::String(dtype_name(dtype).to_string()),
        );
    }
    let path = dst.join("config.json");
    let text = serde_json::to_string_pretty(&v).expect("json value");
    std::fs::write(&path, text + "\n").map_err(|e| CordaError::io(&path, e))
}
