//! Which data files of a dataset directory make up a config and a split.
//!
//! A Hugging Face dataset snapshot (or a local copy of one) holds several configs and splits
//! side by side: `data/train-00000-of-00001.parquet`, `rc/validation-00000-of-00002.parquet`,
//! `wikitext-2-raw-v1/train/0000.parquet`. We follow the `datasets` conventions: a split is
//! named by a path component or a file-name token (`train`, `train-0000…`, `c4-train.000…`), a
//! config by the first directory, and files with no split name at all form the `train` split.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::{CordaError, Result};

/// File extensions we can read as rows.
const DATA_EXTENSIONS: &[&str] = &["parquet", "jsonl", "json", "txt"];
/// Extensions we recognise as data but cannot read (so they are reported, not ignored).
const COMPRESSED_EXTENSIONS: &[&str] = &["gz", "bz2", "xz", "zst", "zip"];
/// JSON files that describe a dataset rather than hold rows.
const METADATA_FILES: &[&str] = &[
    "dataset_infos.json",
    "dataset_info.json",
    "dataset_dict.json",
    "state.json",
];

/// Split names and the aliases `datasets` also recognises in file names.
const SPLIT_ALIASES: &[(&str, &[&str])] = &[
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "val", "dev"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// The data files under `root`, relative to it and sorted by path, skipping hidden entries
/// and metadata. Symlinks (the HF cache's snapshot layout) are followed.
pub fn list_data_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out, 0)?;
    out.sort();
    Ok(out)
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    // Datasets nest a few levels at most; the bound guards against symlink loops.
    if depth > 8 {
        return Ok(());
    }
    let dir = root.join(rel);
    let entries = std::fs::read_dir(&dir).map_err(|e| CordaError::io(&dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| CordaError::io(&dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        let rel_path = rel.join(name);
        let full = root.join(&rel_path);
        let meta = std::fs::metadata(&full).map_err(|e| CordaError::io(&full, e))?;
        if meta.is_dir() {
            walk(root, &rel_path, out, depth + 1)?;
        } else if is_data_file(&rel_path) {
            out.push(rel_path);
        }
    }
    Ok(())
}

/// Whether the path names a data file (readable or compressed), not metadata.
pub fn is_data_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if METADATA_FILES.contains(&name) {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    let mut parts = lower.rsplit('.');
    let last = parts.next().unwrap_or_default();
    if DATA_EXTENSIONS.contains(&last) {
        return last != "txt" || !matches!(name, "LICENSE.txt" | "README.txt" | "requirements.txt");
    }
    COMPRESSED_EXTENSIONS.contains(&last)
        && parts
            .next()
            .is_some_and(|inner| DATA_EXTENSIONS.contains(&inner))
}

/// What to pick among a dataset directory's files.
#[derive(Debug, Clone, Default)]
pub struct FileSelection<'a> {
    /// The config (first-level directory), if the dataset has several.
    pub config: Option<&'a str>,
    /// The split name (`train`).
    pub split: &'a str,
    /// Explicit files (relative paths or directory prefixes); overrides config and split.
    pub data_files: &'a [String],
}

/// Picks the files of one config and split from `files` (relative paths, sorted).
/// `what` names the dataset in error messages.
pub fn select_files(
    files: &[PathBuf],
    sel: &FileSelection<'_>,
    what: &str,
) -> Result<Vec<PathBuf>> {
    if files.is_empty() {
        return Err(CordaError::Data(format!(
            "{what} holds no data files (.parquet, .jsonl, .json, .txt); download the data files \
             or point at the directory that holds them"
        )));
    }
    if !sel.data_files.is_empty() {
        return select_explicit(files, sel.data_files, what);
    }

    let in_config: Vec<&PathBuf> = match sel.config {
        Some(config) => {
            let picked: Vec<_> = files
                .iter()
                .filter(|f| first_dir(f) == Some(config))
                .collect();
            if !picked.is_empty() {
                picked
            } else if config == "default" {
                // The default config lives in `data/` or at the top level.
                files
                    .iter()
                    .filter(|f| matches!(first_dir(f), None | Some("data")))
                    .collect()
            } else {
                return Err(CordaError::Data(format!(
                    "{what} has no config `{config}`; available configs: {}",
                    list_or_none(&configs(files))
                )));
            }
        }
        None => {
            let found = configs(files);
            if found.len() > 1 {
                return Err(CordaError::Data(format!(
                    "{what} has several configs ({}); choose one with the config option",
                    list_or_none(&found)
                )));
            }
            files.iter().collect()
        }
    };

    let aliases = split_aliases(sel.split);
    let mut picked: Vec<PathBuf> = in_config
        .iter()
        .filter(|f| path_tokens(f).iter().any(|t| aliases.contains(&t.as_str())))
        .map(|f| (*f).clone())
        .collect();
    if picked.is_empty() {
        let named: BTreeSet<&str> = in_config.iter().filter_map(|f| split_of(f)).collect();
        if named.is_empty() && sel.split == "train" {
            // No file names a split: `datasets` calls all of them `train`.
            picked = in_config.iter().map(|f| (*f).clone()).collect();
        } else {
            let available = if named.is_empty() {
                "train (all files)".to_string()
            } else {
                named.into_iter().collect::<Vec<_>>().join(", ")
            };
            return Err(CordaError::Data(format!(
                "{what} has no files for split `{}`; available splits: {available}",
                sel.split
            )));
        }
    }
    // When both are present (a parquet export next to the original JSON), prefer parquet.
    if picked.iter().any(|f| has_extension(f, "parquet")) {
        picked.retain(|f| has_extension(f, "parquet"));
    }
    Ok(picked)
}

fn select_explicit(files: &[PathBuf], wanted: &[String], what: &str) -> Result<Vec<PathBuf>> {
    let mut picked = Vec::new();
    for pattern in wanted {
        let pattern_path = Path::new(pattern.trim_end_matches('/'));
        let matching: Vec<_> = files
            .iter()
            .filter(|f| f.starts_with(pattern_path))
            .cloned()
            .collect();
        if matching.is_empty() {
            return Err(CordaError::Data(format!(
                "{what} has no data file `{pattern}`; download it (e.g. `huggingface-cli download \
                 --repo-type dataset <id> {pattern}`) or pass a local file"
            )));
        }
        picked.extend(matching);
    }
    Ok(picked)
}

/// The config directories: first-level directories other than `data` and split names.
fn configs(files: &[PathBuf]) -> BTreeSet<String> {
    files
        .iter()
        .filter_map(|f| first_dir(f))
        .filter(|d| *d != "data" && split_name(d).is_none())
        .map(str::to_string)
        .collect()
}

fn first_dir(path: &Path) -> Option<&str> {
    let mut comps = path.components();
    let first = comps.next()?;
    comps.next()?;
    first.as_os_str().to_str()
}

fn split_aliases(split: &str) -> Vec<&str> {
    SPLIT_ALIASES
        .iter()
        .find(|(name, _)| *name == split)
        .map(|(_, aliases)| aliases.to_vec())
        .unwrap_or_else(|| vec![split])
}

/// The canonical split a token names, if any.
fn split_name(token: &str) -> Option<&'static str> {
    SPLIT_ALIASES
        .iter()
        .find(|(_, aliases)| aliases.contains(&token))
        .map(|(name, _)| *name)
}

/// The split a file belongs to by its name, if it names one.
fn split_of(path: &Path) -> Option<&'static str> {
    path_tokens(path).iter().find_map(|t| split_name(t))
}

/// Lower-cased tokens of a relative path, split at `/`, `.`, `_` and `-`.
fn path_tokens(path: &Path) -> Vec<String> {
    path.to_string_lossy()
        .to_ascii_lowercase()
        .split(['/', '\\', '.', '_', '-'])
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

fn list_or_none(items: &BTreeSet<String>) -> String {
    if items.is_empty() {
        "(none)".to_string()
    } else {
        items.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = list.iter().map(PathBuf::from).collect();
        v.sort();
        v
    }

    fn pick(files: &[&str], config: Option<&str>, split: &str) -> Result<Vec<String>> {
        let sel = FileSelection {
            config,
            split,
            data_files: &[],
        };
        Ok(select_files(&paths(files), &sel, "test dataset")?
            .into_iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect())
    }

    #[test]
    fn picks_split_files_by_name_token() {
        let files = [
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
        ];
        assert_eq!(
            pick(&files, None, "train").unwrap(),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        assert_eq!(
            pick(&files, None, "test").unwrap(),
            ["data/test-00000-of-00001.parquet"]
        );
        let err = pick(&files, None, "validation").unwrap_err().to_string();
        assert!(err.contains("available splits: test, train"), "{err}");
        // "contest" is not the `test` split.
        assert_eq!(
            pick(&["contest.jsonl"], None, "train").unwrap(),
            ["contest.jsonl"]
        );
    }

    #[test]
    fn picks_configs() {
        let files = [
            "wikitext-103-v1/train-00000-of-00002.parquet",
            "wikitext-2-raw-v1/test-00000-of-00001.parquet",
            "wikitext-2-raw-v1/train-00000-of-00001.parquet",
        ];
        assert_eq!(
            pick(&files, Some("wikitext-2-raw-v1"), "train").unwrap(),
            ["wikitext-2-raw-v1/train-00000-of-00001.parquet"]
        );
        let err = pick(&files, None, "train").unwrap_err().to_string();
        assert!(err.contains("several configs"), "{err}");
        let err = pick(&files, Some("nope"), "train").unwrap_err().to_string();
        assert!(err.contains("wikitext-2-raw-v1"), "{err}");
        // Parquet-export layout: <config>/<split>/0000.parquet.
        assert_eq!(
            pick(
                &["rc/train/0000.parquet", "rc/validation/0000.parquet"],
                Some("rc"),
                "train"
            )
            .unwrap(),
            ["rc/train/0000.parquet"]
        );
    }

    #[test]
    fn unnamed_files_are_the_train_split_and_parquet_wins() {
        assert_eq!(
            pick(&["MetaMathQA-395K.json"], None, "train").unwrap(),
            ["MetaMathQA-395K.json"]
        );
        assert!(pick(&["MetaMathQA-395K.json"], None, "test").is_err());
        assert_eq!(
            pick(&["train.jsonl", "data/train-0.parquet"], None, "train").unwrap(),
            ["data/train-0.parquet"]
        );
    }

    #[test]
    fn recognises_data_files() {
        assert!(is_data_file(Path::new("a/train.parquet")));
        assert!(is_data_file(Path::new(
            "en/c4-train.00000-of-01024.json.gz"
        )));
        assert!(!is_data_file(Path::new("dataset_infos.json")));
        assert!(!is_data_file(Path::new("README.md")));
        assert!(!is_data_file(Path::new("data.tar")));
    }
}
