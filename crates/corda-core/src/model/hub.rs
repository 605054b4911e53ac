//! `--model_id`: a local directory, a `.gguf` file, or a Hugging Face hub id resolved in the local cache
//! (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`). We never download:
//! the error says how to fetch the model.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::{CordaError, Result};

/// The hub cache directory, as huggingface_hub finds it: `$HF_HUB_CACHE`, else `$HF_HOME/hub`,
/// else `~/.cache/huggingface/hub` (empty variables count as unset). Models and datasets share it.
pub fn cache_root() -> Option<PathBuf> {
    cache_root_from(|key| std::env::var_os(key))
}

/// [`cache_root`] with the environment given as a lookup function (testable without touching
/// the process environment).
pub fn cache_root_from(env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let non_empty = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("HF_HUB_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = non_empty("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    non_empty("HOME").map(|home| PathBuf::from(home).join(".cache/huggingface/hub"))
}

/// Resolve a local directory, a `.gguf` file or a cached hub model id to the model path the
/// loaders take (a directory, or the `.gguf` file; see [`super::gguf::find_gguf`]).
pub fn resolve_model_dir(id: &str) -> Result<PathBuf> {
    let root = cache_root().unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
    resolve_in(id, &root)
}

/// [`resolve_model_dir`] with an explicit cache root (testable without touching the environment).
pub fn resolve_in(id: &str, cache_root: &Path) -> Result<PathBuf> {
    let local = Path::new(id);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    if super::gguf::is_gguf_path(local) {
        return if local.is_file() {
            Ok(local.to_path_buf())
        } else {
            Err(CordaError::Model(format!(
                "GGUF file `{id}` does not exist"
            )))
        };
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
    if let Some(cfg) = repo.get("config.json") {
        return Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    // A GGUF-only repo (no config.json): its snapshot, when it holds exactly one .gguf.
    let repo_dir = cache_root.join(hf_hub::Repo::model(id.to_string()).folder_name());
    if let Ok(commit) = std::fs::read_to_string(repo_dir.join("refs").join("main")) {
        let snapshot = repo_dir.join("snapshots").join(commit.trim());
        if super::gguf::find_gguf(&snapshot)?.is_some() {
            return Ok(snapshot);
        }
    }
    Err(CordaError::Model(format!(
        "`{id}` is neither a local directory nor in the Hugging Face cache at {}; download it first (`huggingface-cli download {id}`) or pass its local directory",
        cache_root.display()
    )))
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

    #[test]
    fn finds_a_gguf_only_snapshot_and_gguf_files() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--TinyOrg--tiny-GGUF");
        let snap = repo.join("snapshots").join("def456");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "def456\n").unwrap();
        std::fs::write(snap.join("tiny.Q4_1.gguf"), b"GGUF").unwrap();
        assert_eq!(resolve_in("TinyOrg/tiny-GGUF", root.path()).unwrap(), snap);
        let file = snap.join("tiny.Q4_1.gguf");
        assert_eq!(
            resolve_in(file.to_str().unwrap(), root.path()).unwrap(),
            file
        );
        // Several quantizations in one repo: the user picks the file.
        std::fs::write(snap.join("tiny.Q8_0.gguf"), b"GGUF").unwrap();
        let e = resolve_in("TinyOrg/tiny-GGUF", root.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2 .gguf files") && e.contains("tiny.Q8_0.gguf"),
            "{e}"
        );
        let e = resolve_in("models/none.gguf", root.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GGUF file `models/none.gguf` does not exist"),
            "{e}"
        );
    }
}
