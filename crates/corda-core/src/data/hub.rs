//! Hugging Face hub dataset ids resolved through the local cache only.
//!
//! Preprocessing often runs on machines without network, and a silent download of gigabytes
//! would be worse than an error, so we only read what `huggingface-cli download` (or
//! `datasets`) already put in the cache: `datasets--{owner}--{name}/refs/main` holds a commit
//! sha and `snapshots/<sha>/` the files. hf-hub 0.5's `Cache::from_env` ignores
//! `HF_HUB_CACHE`, and it cannot list a snapshot, so this is a small resolver of our own over the
//! cache root that model ids use too ([`crate::model::hub::cache_root`]).

use std::path::{Path, PathBuf};

use crate::{CordaError, Result};

pub use crate::model::hub::{cache_root, cache_root_from};

/// Whether `text` has the shape of a hub dataset id (`name` or `owner/name`).
pub fn looks_like_hub_id(text: &str) -> bool {
    let valid = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '-'])
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    let has_data_extension = [".json", ".jsonl", ".parquet", ".txt", ".gz"]
        .iter()
        .any(|ext| text.to_ascii_lowercase().ends_with(ext));
    let mut parts = text.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), None, None) => valid(name) && !has_data_extension,
        (Some(owner), Some(name), None) => valid(owner) && valid(name) && !has_data_extension,
        _ => false,
    }
}

/// The snapshot directory of dataset `id` in the cache at `cache_root` (revision `main`).
///
/// If `refs/main` is missing but the cache holds exactly one snapshot (a download pinned to a
/// revision), that snapshot is used.
pub fn resolve_snapshot(cache_root: &Path, id: &str) -> Result<PathBuf> {
    let repo_dir = cache_root.join(format!("datasets--{}", id.replace('/', "--")));
    let not_cached = || {
        CordaError::Data(format!(
            "dataset `{id}` is not in the local Hugging Face cache (looked for {}); download it \
             with `huggingface-cli download --repo-type dataset {id}`, set HF_HUB_CACHE or \
             HF_HOME to the cache that holds it, or pass a local .jsonl/.json/.parquet file or \
             directory instead",
            repo_dir.display()
        ))
    };
    if !repo_dir.is_dir() {
        return Err(not_cached());
    }
    let snapshots = repo_dir.join("snapshots");
    let ref_file = repo_dir.join("refs").join("main");
    let sha = match std::fs::read_to_string(&ref_file) {
        Ok(text) => text.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut found = list_dirs(&snapshots)?;
            match found.len() {
                0 => return Err(not_cached()),
                1 => found.remove(0),
                _ => {
                    return Err(CordaError::Data(format!(
                        "dataset `{id}` has several cached snapshots ({}) and no refs/main; \
                         pass the snapshot directory you want as a local path",
                        found.join(", ")
                    )))
                }
            }
        }
        Err(e) => return Err(CordaError::io(ref_file, e)),
    };
    if sha.is_empty() || sha.contains(['/', '\\']) || sha.starts_with('.') {
        return Err(CordaError::Data(format!(
            "{} does not hold a commit id; re-download the dataset with `huggingface-cli \
             download --repo-type dataset {id}`",
            ref_file.display()
        )));
    }
    let snapshot = snapshots.join(&sha);
    if !snapshot.is_dir() {
        return Err(CordaError::Data(format!(
            "the cache entry of dataset `{id}` is incomplete ({} is missing); re-download it \
             with `huggingface-cli download --repo-type dataset {id}`",
            snapshot.display()
        )));
    }
    Ok(snapshot)
}

fn list_dirs(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CordaError::io(dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| CordaError::io(dir, e))?;
        if entry.path().is_dir() {
            names.extend(entry.file_name().to_str().map(str::to_string));
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn root_with(pairs: &[(&str, &str)]) -> Option<PathBuf> {
        cache_root_from(|key| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn cache_root_follows_the_hf_variables() {
        let all = [("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("HOME", "/u")];
        assert_eq!(root_with(&all), Some(PathBuf::from("/c")));
        let no_cache = [("HF_HUB_CACHE", ""), ("HF_HOME", "/h"), ("HOME", "/u")];
        assert_eq!(root_with(&no_cache), Some(PathBuf::from("/h/hub")));
        assert_eq!(
            root_with(&[("HOME", "/u")]),
            Some(PathBuf::from("/u/.cache/huggingface/hub"))
        );
        assert_eq!(root_with(&[]), None);
    }

    #[test]
    fn hub_id_shapes() {
        assert!(looks_like_hub_id("nq_open"));
        assert!(looks_like_hub_id("meta-math/MetaMathQA"));
        assert!(looks_like_hub_id("iboing/MetaMathQA-395K"));
        assert!(!looks_like_hub_id("data/qa.jsonl"));
        assert!(!looks_like_hub_id("./data"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("qa.parquet"));
    }

    #[test]
    fn resolves_refs_main() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("datasets--owner--name");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123/data")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let snap = resolve_snapshot(root.path(), "owner/name").unwrap();
        assert_eq!(snap, repo.join("snapshots/abc123"));
    }

    #[test]
    fn falls_back_to_a_single_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("datasets--nq_open");
        std::fs::create_dir_all(repo.join("snapshots/def456")).unwrap();
        let snap = resolve_snapshot(root.path(), "nq_open").unwrap();
        assert_eq!(snap, repo.join("snapshots/def456"));
    }

    #[test]
    fn missing_dataset_says_how_to_get_it() {
        let root = tempfile::tempdir().unwrap();
        let err = resolve_snapshot(root.path(), "meta-math/MetaMathQA")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("huggingface-cli download --repo-type dataset meta-math/MetaMathQA"),
            "{err}"
        );
        assert!(err.contains("local"), "{err}");
    }

    #[test]
    fn dangling_ref_is_reported() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("datasets--x");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "beef").unwrap();
        let err = resolve_snapshot(root.path(), "x").unwrap_err().to_string();
        assert!(err.contains("incomplete"), "{err}");
    }
}
