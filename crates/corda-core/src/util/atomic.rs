//! Outputs are written into a temporary directory beside the target and renamed into place only
//! when complete, so an error or an interrupt never leaves a half-written output behind.

use std::path::{Path, PathBuf};

use crate::{CordaError, Result};

/// A directory being written. `commit` renames it to its target; dropping it uncommitted
/// removes the temporary directory.
pub struct AtomicDir {
    tmp: PathBuf,
    target: PathBuf,
    overwrite: bool,
    committed: bool,
}

impl AtomicDir {
    /// Prepare to write `target`. An existing non-empty target is refused unless `overwrite`.
    pub fn create(target: impl AsRef<Path>, overwrite: bool) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        if target.exists() {
            let non_empty = std::fs::read_dir(&target)
                .map_err(|e| CordaError::io(&target, e))?
                .next()
                .is_some();
            if non_empty && !overwrite {
                return Err(CordaError::Invalid(format!(
                    "{} already exists and is not empty; choose another path or pass --overwrite",
                    target.display()
                )));
            }
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| CordaError::io(&parent, e))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| CordaError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| CordaError::io(&tmp, e))?;
        Ok(Self {
            tmp,
            target,
            overwrite,
            committed: false,
        })
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final location.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Move the finished directory into place (replacing an existing target when allowed).
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            if !self.overwrite {
                let empty = std::fs::read_dir(&self.target)
                    .map_err(|e| CordaError::io(&self.target, e))?
                    .next()
                    .is_none();
                if !empty {
                    return Err(CordaError::Invalid(format!(
                        "{} appeared while writing; pass --overwrite to replace it",
                        self.target.display()
                    )));
                }
            }
            let old = self.tmp.with_extension("old");
            std::fs::rename(&self.target, &old).map_err(|e| CordaError::io(&self.target, e))?;
            std::fs::rename(&self.tmp, &self.target)
                .map_err(|e| CordaError::io(&self.target, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| CordaError::io(&old, e))?;
        } else {
            std::fs::rename(&self.tmp, &self.target)
                .map_err(|e| CordaError::io(&self.target, e))?;
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Write `bytes` to `path` atomically (temporary file in the same directory, then rename).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| CordaError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| CordaError::io(path, e))
}

/// Give a written file the usual `rw-r--r--` mode (temporary-file writers create 0600, and
/// copies keep a read-only source's mode).
pub fn make_readable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| CordaError::io(path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_dir_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        {
            let d = AtomicDir::create(&target, false).unwrap();
            std::fs::write(d.path().join("x"), b"1").unwrap();
        }
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn refuses_non_empty_target_without_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"1").unwrap();
        let err = AtomicDir::create(&target, false).err().unwrap().to_string();
        assert!(err.contains("--overwrite"), "{err}");
        let d = AtomicDir::create(&target, true).unwrap();
        std::fs::write(d.path().join("new"), b"2").unwrap();
        d.commit().unwrap();
        assert!(target.join("new").exists() && !target.join("keep").exists());
    }
}
