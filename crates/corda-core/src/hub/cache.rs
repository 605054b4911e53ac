//! The Hugging Face hub cache on disk, in the layout Python's `huggingface_hub` uses, so that
//! either side reuses what the other downloaded:
//!
//! ```text
//! <cache>/models--owner--name/
//!     refs/main                      the commit sha the branch `main` pointed at
//!     blobs/<etag>                   file contents, named by their etag (sha256 for LFS files)
//!     snapshots/<sha>/config.json -> ../../blobs/<etag>
//! <cache>/.locks/models--owner--name/<etag>.lock
//! ```

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

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
    hf_home_from(&env).map(|home| home.join("hub"))
}

/// `$HF_HOME`, else `~/.cache/huggingface`: where `huggingface-cli login` keeps its token.
pub(crate) fn hf_home_from(env: &impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let non_empty = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(home) = non_empty("HF_HOME") {
        return Some(PathBuf::from(home));
    }
    non_empty("HOME").map(|home| PathBuf::from(home).join(".cache/huggingface"))
}

/// Models and datasets live side by side in the cache and on the hub, told apart by a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// The cache folder prefix (`models`, `datasets`).
    pub fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    /// The word used in messages.
    pub fn noun(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
}

/// Whether `text` has the shape of a hub repo id: `owner/name`, or (with `owner_optional`,
/// as for legacy datasets such as `nq_open`) a bare `name`.
pub fn is_repo_id(text: &str, owner_optional: bool) -> bool {
    let valid = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '-'])
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    match text.split_once('/') {
        Some((owner, name)) => valid(owner) && valid(name),
        None => owner_optional && valid(text),
    }
}

/// Whether `rev` is a full commit sha (then it names a snapshot directly, with no ref).
pub fn is_commit_sha(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One repo's folder in the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    root: PathBuf,
    dir: PathBuf,
    folder: String,
    id: String,
    kind: RepoKind,
}

impl RepoCache {
    pub fn new(cache_root: &Path, kind: RepoKind, id: &str) -> Self {
        let folder = format!("{}--{}", kind.plural(), id.replace('/', "--"));
        RepoCache {
            root: cache_root.to_path_buf(),
            dir: cache_root.join(&folder),
            folder,
            id: id.to_string(),
            kind,
        }
    }

    /// `models--owner--name` (or `datasets--…`) under the cache root.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn snapshot_dir(&self, sha: &str) -> PathBuf {
        self.dir.join("snapshots").join(sha)
    }

    pub fn blob_path(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    /// Where huggingface_hub (filelock) takes its per-blob lock; we lock the same file.
    pub fn lock_path(&self, etag: &str) -> PathBuf {
        self.root
            .join(".locks")
            .join(&self.folder)
            .join(format!("{etag}.lock"))
    }

    fn ref_path(&self, revision: &str) -> Result<PathBuf> {
        let rel = Path::new(revision);
        let safe =
            !revision.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !safe {
            return Err(CordaError::Invalid(format!(
                "`{revision}` is not a revision name (a branch, tag or commit such as main, v1.0 \
                 or a 40-character sha)"
            )));
        }
        Ok(self.dir.join("refs").join(rel))
    }

    /// The commit `revision` points at in the cache: the sha itself for a commit, else the
    /// content of `refs/<revision>`; `None` when the ref was never written.
    pub fn commit_of(&self, revision: &str) -> Result<Option<String>> {
        if is_commit_sha(revision) {
            return Ok(Some(revision.to_ascii_lowercase()));
        }
        let path = self.ref_path(revision)?;
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let sha = text.trim().to_string();
                if sha.is_empty() || sha.contains(['/', '\\']) || sha.starts_with('.') {
                    return Err(CordaError::Hub(format!(
                        "{} does not hold a commit id; delete it and download {} `{}` again",
                        path.display(),
                        self.kind.noun(),
                        self.id
                    )));
                }
                Ok(Some(sha))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CordaError::io(path, e)),
        }
    }

    /// The snapshot directory of `revision`, if the cache has one.
    pub fn snapshot(&self, revision: &str) -> Result<Option<PathBuf>> {
        Ok(self
            .commit_of(revision)?
            .map(|sha| self.snapshot_dir(&sha))
            .filter(|dir| dir.is_dir()))
    }

    /// Records that `revision` points at `sha` (nothing to record when it is the sha).
    pub fn write_ref(&self, revision: &str, sha: &str) -> Result<()> {
        if is_commit_sha(revision) {
            return Ok(());
        }
        let path = self.ref_path(revision)?;
        if std::fs::read_to_string(&path).is_ok_and(|old| old.trim() == sha) {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| CordaError::io(parent, e))?;
        }
        std::fs::write(&path, sha).map_err(|e| CordaError::io(&path, e))
    }

    /// The names of the snapshot directories in the cache, sorted.
    pub fn snapshots(&self) -> Result<Vec<String>> {
        let dir = self.dir.join("snapshots");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(CordaError::io(dir, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| CordaError::io(&dir, e))?;
            if entry.path().is_dir() {
                names.extend(entry.file_name().to_str().map(str::to_string));
            }
        }
        names.sort();
        Ok(names)
    }

    /// Makes `snapshots/<sha>/<file>` point at `blobs/<etag>` (a relative symlink, as
    /// huggingface_hub makes; a copy where symlinks are not possible).
    pub fn link(&self, sha: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let target = self.snapshot_dir(sha).join(file);
        let parent = target.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| CordaError::io(&parent, e))?;
        let blob = self.blob_path(etag);
        match std::fs::symlink_metadata(&target) {
            Ok(_) => std::fs::remove_file(&target).map_err(|e| CordaError::io(&target, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CordaError::io(&target, e)),
        }
        // snapshots/<sha>/<a>/<b> → ../../../blobs/<etag>: one `..` per directory below the repo.
        let depth = Path::new(file).components().count() + 1;
        let mut relative = PathBuf::new();
        for _ in 0..depth {
            relative.push("..");
        }
        relative.push("blobs");
        relative.push(etag);
        if !symlink(&relative, &target) {
            std::fs::copy(&blob, &target).map_err(|e| CordaError::io(&target, e))?;
        }
        Ok(target)
    }
}

#[cfg(unix)]
fn symlink(src: &Path, dst: &Path) -> bool {
    std::os::unix::fs::symlink(src, dst).is_ok()
}

#[cfg(not(unix))]
fn symlink(_src: &Path, _dst: &Path) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn refs_snapshots_and_links() {
        let root = tempfile::tempdir().unwrap();
        let repo = RepoCache::new(root.path(), RepoKind::Dataset, "owner/name");
        assert_eq!(repo.dir(), root.path().join("datasets--owner--name"));
        assert_eq!(repo.commit_of("main").unwrap(), None);
        let sha = "0123456789abcdef0123456789abcdef01234567";
        repo.write_ref("refs/convert/parquet", sha).unwrap();
        assert!(repo.dir().join("refs/refs/convert/parquet").is_file());
        assert_eq!(
            repo.commit_of("refs/convert/parquet").unwrap().as_deref(),
            Some(sha)
        );
        assert!(repo.commit_of("../escape").is_err());
        // A commit names its snapshot directly.
        assert_eq!(repo.commit_of(sha).unwrap().as_deref(), Some(sha));
        assert_eq!(repo.snapshot(sha).unwrap(), None);

        std::fs::create_dir_all(repo.blob_path("e").parent().unwrap()).unwrap();
        std::fs::write(repo.blob_path("e"), "rows").unwrap();
        let linked = repo.link(sha, "cfg/train/0000.parquet", "e").unwrap();
        assert_eq!(std::fs::read_to_string(&linked).unwrap(), "rows");
        assert_eq!(
            repo.snapshot("refs/convert/parquet").unwrap(),
            Some(repo.snapshot_dir(sha))
        );
        #[cfg(unix)]
        assert_eq!(
            std::fs::read_link(&linked).unwrap(),
            Path::new("../../../../blobs/e")
        );
        assert_eq!(repo.snapshots().unwrap(), vec![sha.to_string()]);
    }
}
