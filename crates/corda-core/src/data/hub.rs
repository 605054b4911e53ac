//! Hugging Face hub datasets: read from the local cache when it holds the wanted config and
//! split, else (unless `HF_HUB_OFFLINE` is set) downloaded into it.
//!
//! Two cached revisions are searched: `main` (what `huggingface-cli download --repo-type
//! dataset` fetches) and `refs/convert/parquet`, the hub's parquet conversion of every dataset
//! (`<config>/<split>/0000.parquet`), which is what we download: it exists for script-based
//! datasets too and is laid out by config and split. Datasets without a conversion, and
//! explicit data files (c4's `en/c4-train.00000-of-01024.json.gz`), come from `main`.

use std::path::{Path, PathBuf};

use crate::data::files::{is_data_file, list_data_files, select_files, FileSelection};
use crate::hub::{is_repo_id, Hub, RepoCache, RepoKind};
use crate::{CordaError, Result};

pub use crate::hub::{cache_root, cache_root_from};

/// The branch where the hub keeps its parquet conversion of a dataset.
pub const PARQUET_REVISION: &str = "refs/convert/parquet";

/// Whether `text` has the shape of a hub dataset id (`name` or `owner/name`).
pub fn looks_like_hub_id(text: &str) -> bool {
    let has_data_extension = [".json", ".jsonl", ".parquet", ".txt", ".gz"]
        .iter()
        .any(|ext| text.to_ascii_lowercase().ends_with(ext));
    !has_data_extension && is_repo_id(text, true)
}

/// The snapshot directory of dataset `id` in the cache at `cache_root` (revision `main`).
///
/// If `refs/main` is missing but the cache holds exactly one snapshot (a download pinned to a
/// revision), that snapshot is used.
pub fn resolve_snapshot(cache_root: &Path, id: &str) -> Result<PathBuf> {
    let cache = RepoCache::new(cache_root, RepoKind::Dataset, id);
    let repo_dir = cache.dir();
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
    let sha = match cache.commit_of("main")? {
        Some(sha) => sha,
        None => {
            let mut found = cache.snapshots()?;
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
    };
    let snapshot = cache.snapshot_dir(&sha);
    if !snapshot.is_dir() {
        return Err(CordaError::Data(format!(
            "the cache entry of dataset `{id}` is incomplete ({} is missing); re-download it \
             with `huggingface-cli download --repo-type dataset {id}`",
            snapshot.display()
        )));
    }
    Ok(snapshot)
}

/// The files of hub dataset `id` that `sel` picks, from the cache if a cached snapshot has
/// them, else downloaded (the parquet conversion, or `main` for explicit files and datasets
/// the hub has not converted).
pub fn dataset_files(hub: &Hub, id: &str, sel: &FileSelection<'_>) -> Result<Vec<PathBuf>> {
    let what = format!("hub dataset `{id}`");
    let cache = hub.repo_cache(RepoKind::Dataset, id)?;
    let mut snapshots = Vec::new();
    if cache.dir().is_dir() {
        match resolve_snapshot(hub.cache_root()?, id) {
            Ok(snap) => snapshots.push(snap),
            Err(CordaError::Data(_)) => {}
            Err(e) => return Err(e),
        }
        if sel.data_files.is_empty() {
            snapshots.extend(cache.snapshot(PARQUET_REVISION)?);
        }
    }
    let mut cached_error = None;
    for snap in snapshots {
        let all = list_data_files(&snap)?;
        if all.is_empty() {
            continue;
        }
        match select_files(&all, sel, &what) {
            Ok(files) => return Ok(files.into_iter().map(|f| snap.join(f)).collect()),
            Err(e) => cached_error = cached_error.or(Some(e)),
        }
    }
    if hub.offline() {
        return Err(cached_error
            .unwrap_or_else(|| hub.offline_error(RepoKind::Dataset, id, "the data files")));
    }
    let converted = if sel.data_files.is_empty() {
        hub.revision_info_if_exists(RepoKind::Dataset, id, PARQUET_REVISION)?
            .map(|info| (PARQUET_REVISION, info))
    } else {
        None
    };
    let (revision, info) = match converted {
        Some(found) => found,
        None => ("main", hub.revision_info(RepoKind::Dataset, id, "main")?),
    };
    let mut listed: Vec<PathBuf> = info
        .files
        .iter()
        .map(PathBuf::from)
        .filter(|f| is_data_file(f) && !hidden(f))
        .collect();
    listed.sort();
    let what = format!(
        "{what} (revision `{revision}` on {})",
        hub.options().endpoint
    );
    let picked = select_files(&listed, sel, &what)?;
    let names: Vec<String> = picked
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let snap = hub.download(RepoKind::Dataset, id, revision, &info.sha, &names)?;
    Ok(picked.into_iter().map(|f| snap.join(f)).collect())
}

/// Files [`list_data_files`] would skip on disk (`.` or `_` in front of a path component).
fn hidden(path: &Path) -> bool {
    path.components().any(|c| {
        c.as_os_str()
            .to_str()
            .is_some_and(|s| s.starts_with(['.', '_']))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
