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
                return Err(CordaError::OutputExists { path: target });
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
        let tmp = parent.join(temp_dir_name(&name, std::process::id()));
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
                    // It appeared while this directory was being written.
                    return Err(CordaError::OutputExists {
                        path: self.target.clone(),
                    });
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

/// The hidden name `.NAME.tmp-PID` under which process `pid` writes the directory `NAME`.
pub fn temp_dir_name(name: &str, pid: u32) -> String {
    format!(".{name}.tmp-{pid}")
}

/// The target name and writer pid of a [`temp_dir_name`], or `None` for any other name.
pub fn parse_temp_dir_name(name: &str) -> Option<(&str, u32)> {
    let (stem, pid) = name.strip_prefix('.')?.split_once(".tmp-")?;
    Some((stem, pid.parse().ok()?))
}

/// Remove the temporary directories in `dir` whose writer process is gone (a run killed
/// mid-write), for target names `ours` accepts. Only on Linux, where `/proc` tells which
/// processes exist; elsewhere nothing is removed.
pub fn remove_stale_temp_dirs(dir: &Path, ours: impl Fn(&str) -> bool) -> Result<()> {
    if !dir.is_dir() || !Path::new("/proc/self").exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(|e| CordaError::io(dir, e))? {
        let entry = entry.map_err(|e| CordaError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((stem, pid)) = parse_temp_dir_name(&name) else {
            continue;
        };
        if !ours(stem) {
            continue;
        }
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            let path = entry.path();
            tracing::info!("removing {} left by an interrupted save", path.display());
            std::fs::remove_dir_all(&path).map_err(|e| CordaError::io(&path, e))?;
        }
    }
    Ok(())
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
    fn temp_names_round_trip() {
        let n = temp_dir_name("checkpoint-3", 17);
        assert_eq!(n, ".checkpoint-3.tmp-17");
        assert_eq!(parse_temp_dir_name(&n), Some(("checkpoint-3", 17)));
        assert_eq!(parse_temp_dir_name("checkpoint-3"), None);
        assert_eq!(parse_temp_dir_name(".x.tmp-abc"), None);
    }

    #[test]
    fn refuses_non_empty_target_without_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"1").unwrap();
        let err = AtomicDir::create(&target, false).err().unwrap();
        assert!(
            matches!(&err, CordaError::OutputExists { path } if path == &target),
            "{err}"
        );
        let d = AtomicDir::create(&target, true).unwrap();
        std::fs::write(d.path().join("new"), b"2").unwrap();
        d.commit().unwrap();
        assert!(target.join("new").exists() && !target.join("keep").exists());
    }
}
