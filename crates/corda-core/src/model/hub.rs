//! `--model_id`: a local directory, or a Hugging Face hub id resolved in the local cache
//! (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`). We never download:
//! the error says how to fetch the model.

use std::path::{Path, PathBuf};

use crate::{CordaError, Result};

/// The hub cache root, following huggingface_hub's environment variables.
pub fn hub_cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// Resolve a local directory or a cached hub model id to a model directory.
pub fn resolve_model_dir(id: &str) -> Result<PathBuf> {
    resolve_in(id, &hub_cache_root())
}

/// [`resolve_model_dir`] with an explicit cache root (testable without touching the environment).
pub fn resolve_in(id: &str, cache_root: &Path) -> Result<PathBuf> {
    let local = Path::new(id);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    let looks_like_hub_id =
        id.split('/').count() == 2 && !id.starts_with('.') && !id.starts_with('/');
    if !looks_like_hub_id {
        return Err(CordaError::Model(format!(
            "model directory `{id}` does not exist; pass a Hugging Face model directory or a hub id such as meta-llama/Llama-2-7b-hf"
        )));
    }
    let cache = hf_hub::Cache::new(cache_root.to_path_buf());
    let repo = cache.model(id.to_string());
    match repo.get("config.json") {
        Some(cfg) => Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default()),
        None => Err(CordaError::Model(format!(
            "`{id}` is neither a local directory nor in the Hugging Face cache at {}; download it first (`huggingface-cli download {id}`) or pass its local directory",
            cache_root.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_cached_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--TinyOrg--tiny-llama");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(resolve_in("TinyOrg/tiny-llama", root.path()).unwrap(), snap);
        let e = resolve_in("TinyOrg/other", root.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("huggingface-cli download TinyOrg/other"), "{e}");
        let e = resolve_in("./no/such/dir", root.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }
}
