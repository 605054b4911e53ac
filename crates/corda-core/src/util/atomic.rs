//! Outputs are written into a temporary directory beside the target and renamed into place only
//! when complete, so an error or an interrupt never leaves a half-written output behind.
//!
//! Names: process PID writes `NAME` as `.NAME.tmp-PID`; replacing an existing `NAME` moves it
//! to `.NAME.old-PID` for the instant between the two renames. A run killed in between leaves
//! these behind; the next write of `NAME` removes those of dead processes and, when `NAME`
//! itself is gone, puts the old one back ([`clean_leftovers`]). Files are fsynced before the
//! rename that publishes them and the directory after it, so a power loss cannot publish an
//! empty or partial file.

use std::path::{Path, PathBuf};

use super::process::{pid_alive, register_temp, split_target, TempGuard};
use crate::{CordaError, Result};

/// A directory being written. `commit` renames it to its target; dropping it uncommitted
/// removes the temporary directory.
pub struct AtomicDir {
    tmp: PathBuf,
    target: PathBuf,
    parent: PathBuf,
    name: String,
    overwrite: bool,
    committed: bool,
    _cleanup: TempGuard,
}

impl AtomicDir {
    /// Prepare to write `target`. An existing non-empty target is refused unless `overwrite`.
    pub fn create(target: impl AsRef<Path>, overwrite: bool) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let (parent, name) = split_target(&target)?;
        create_dir_all(&parent)?;
        clean_leftovers(&parent, &name)?;
        if let Ok(meta) = std::fs::symlink_metadata(&target) {
            if !meta.is_dir() && !target.is_dir() {
                return Err(CordaError::Invalid(format!(
                    "{} exists and is not a directory; remove it or choose another path",
                    target.display()
                )));
            }
            let non_empty = std::fs::read_dir(&target)
                .map_err(|e| CordaError::io(&target, e))?
                .next()
                .is_some();
            if non_empty && !overwrite {
                return Err(CordaError::OutputExists { path: target });
            }
        }
        let tmp = parent.join(temp_dir_name(&name, std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| CordaError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| CordaError::io(&tmp, e))?;
        let cleanup = register_temp(&tmp);
        Ok(Self {
            tmp,
            target,
            parent,
            name,
            overwrite,
            committed: false,
            _cleanup: cleanup,
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
        sync_tree(&self.tmp)?;
        let _publishing = super::process::publishing();
        let published = |e: std::io::Error| self.rename_error(e);
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
            let old = self
                .parent
                .join(old_dir_name(&self.name, std::process::id()));
            std::fs::rename(&self.target, &old).map_err(published)?;
            std::fs::rename(&self.tmp, &self.target).map_err(published)?;
            sync_dir(&self.parent)?;
            remove_path(&old)?;
        } else {
            std::fs::rename(&self.tmp, &self.target).map_err(published)?;
            sync_dir(&self.parent)?;
        }
        self.committed = true;
        Ok(self.target.clone())
    }

    /// A failed publishing rename in the user's terms (the temporary names mean nothing to
    /// them, and "File exists" does not say what to do).
    fn rename_error(&self, e: std::io::Error) -> CordaError {
        let taken = matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY));
        if taken {
            CordaError::Invalid(format!(
                "{} was created by something else while this run was writing it; nothing was replaced, remove it or choose another path and run again",
                self.target.display()
            ))
        } else {
            CordaError::io(&self.target, e)
        }
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// The hidden name `.NAME.tmp-PID` under which process `pid` writes `NAME`.
pub fn temp_dir_name(name: &str, pid: u32) -> String {
    format!(".{name}.tmp-{pid}")
}

/// The hidden name `.NAME.old-PID` under which process `pid` keeps the `NAME` it replaces.
pub fn old_dir_name(name: &str, pid: u32) -> String {
    format!(".{name}.old-{pid}")
}

/// The target name and writer pid of a [`temp_dir_name`], or `None` for any other name.
pub fn parse_temp_dir_name(name: &str) -> Option<(&str, u32)> {
    let (stem, pid) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    Some((stem, pid.parse().ok()?))
}

/// What a leftover of an interrupted write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leftover {
    /// `.NAME.tmp-PID`: an unfinished write.
    Temp,
    /// `.NAME.old-PID` (or `.NAME.old` from older versions): a replaced output.
    Old,
}

/// (target name, writer pid, kind) of a leftover's file name.
fn parse_leftover(name: &str) -> Option<(&str, Option<u32>, Leftover)> {
    if let Some((stem, pid)) = parse_temp_dir_name(name) {
        return Some((stem, Some(pid), Leftover::Temp));
    }
    let rest = name.strip_prefix('.')?;
    if let Some((stem, pid)) = rest.rsplit_once(".old-") {
        return Some((stem, Some(pid.parse().ok()?), Leftover::Old));
    }
    let stem = rest.strip_suffix(".old")?;
    (!stem.is_empty()).then_some((stem, None, Leftover::Old))
}

/// Remove the leftovers in `dir` of writes by dead processes, for target names `ours` accepts;
/// an old output whose replacement never arrived is put back. Only on Linux-like systems where
/// `kill(pid, 0)` tells which processes exist.
pub fn remove_stale_temp_dirs(dir: &Path, ours: impl Fn(&str) -> bool) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| CordaError::io(dir, e))? {
        let entry = entry.map_err(|e| CordaError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((stem, pid, kind)) = parse_leftover(&name) else {
            continue;
        };
        if !ours(stem) || pid.is_some_and(pid_alive) {
            continue;
        }
        found.push((stem.to_string(), kind, entry.path()));
    }
    // Old outputs after temporaries: a restored output must not be removed as a leftover.
    found.sort_by_key(|(_, kind, _)| *kind == Leftover::Old);
    for (stem, kind, path) in found {
        let target = dir.join(&stem);
        if kind == Leftover::Old && std::fs::symlink_metadata(&target).is_err() {
            tracing::warn!(
                "restoring {} from {}, left by a run killed while replacing it",
                target.display(),
                path.display()
            );
            std::fs::rename(&path, &target).map_err(|e| CordaError::io(&target, e))?;
            sync_dir(dir)?;
        } else {
            tracing::info!("removing {} left by an interrupted run", path.display());
            remove_path(&path)?;
        }
    }
    Ok(())
}

/// [`remove_stale_temp_dirs`] for the one target name `name` in `dir`.
pub fn clean_leftovers(dir: &Path, name: &str) -> Result<()> {
    remove_stale_temp_dirs(dir, |stem| stem == name)
}

/// `create_dir_all` whose error names a file standing where a directory must be (the system's
/// "File exists" / "Not a directory" do not say which path or what to do).
pub fn create_dir_all(dir: &Path) -> Result<()> {
    let Err(e) = std::fs::create_dir_all(dir) else {
        return Ok(());
    };
    let blocker = dir
        .ancestors()
        .find(|a| std::fs::metadata(a).is_ok_and(|m| !m.is_dir()));
    match blocker {
        Some(file) if file == dir => Err(CordaError::Invalid(format!(
            "{} exists and is not a directory; remove it or choose another path",
            dir.display()
        ))),
        Some(file) => Err(CordaError::Invalid(format!(
            "{} is a file, so {} cannot be created; remove it or choose another path",
            file.display(),
            dir.display()
        ))),
        None => Err(CordaError::io(dir, e)),
    }
}

fn remove_path(path: &Path) -> Result<()> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return Ok(()),
    };
    r.map_err(|e| CordaError::io(path, e))
}

/// fsync a directory, so that the renames and creations in it survive a power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(|e| CordaError::io(dir, e))?;
    match f.sync_all() {
        Ok(()) => Ok(()),
        // Some file systems cannot sync directories; nothing more can be done there.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP)) => Ok(()),
        Err(e) => Err(CordaError::io(dir, e)),
    }
}

/// fsync every file and directory under `dir` (before the rename that publishes it).
pub fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| CordaError::io(dir, e))? {
        let entry = entry.map_err(|e| CordaError::io(dir, e))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(|e| CordaError::io(&path, e))?;
        if ty.is_dir() {
            sync_tree(&path)?;
        } else if ty.is_file() {
            let f = std::fs::File::open(&path).map_err(|e| CordaError::io(&path, e))?;
            f.sync_all().map_err(|e| CordaError::io(&path, e))?;
        }
    }
    sync_dir(dir)
}

/// Write `bytes` to `path` atomically and durably: a temporary `.NAME.tmp-PID` in the same
/// directory, fsynced, renamed into place, and the directory fsynced.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let (parent, name) = split_target(path)?;
    clean_leftovers(&parent, &name)?;
    let tmp = parent.join(temp_dir_name(&name, std::process::id()));
    let _cleanup = register_temp(&tmp);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(CordaError::io(path, e));
    }
    let publishing = super::process::publishing();
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(CordaError::io(path, e));
    }
    drop(publishing);
    sync_dir(&parent)
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

/// Helpers for the tests of the modules that leave or clean temporaries.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    /// The pid of a process that has exited.
    pub fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    /// The entries of `dir`, sorted.
    pub fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{dead_pid, names};
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

    /// Issue 14 case 4: a run killed between the two renames of an overwrite left the old
    /// output in `.NAME.old` and nothing at NAME; later overwrites failed with "Directory not
    /// empty". The next write restores the old output, and every later overwrite works.
    #[test]
    fn a_kill_inside_the_overwrite_rename_is_recovered() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let dead = dead_pid();
        let old = root.path().join(old_dir_name("out", dead));
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("model"), b"previous").unwrap();
        std::fs::create_dir(root.path().join(temp_dir_name("out", dead))).unwrap();
        // Without --overwrite the restored output is refused like any existing one.
        let err = AtomicDir::create(&target, false).err().unwrap();
        assert!(matches!(err, CordaError::OutputExists { .. }), "{err}");
        assert_eq!(std::fs::read(target.join("model")).unwrap(), b"previous");
        assert_eq!(names(root.path()), ["out"]);
        for round in 0..3 {
            let d = AtomicDir::create(&target, true).unwrap();
            std::fs::write(d.path().join("model"), format!("{round}")).unwrap();
            d.commit().unwrap();
            assert_eq!(
                std::fs::read_to_string(target.join("model")).unwrap(),
                round.to_string()
            );
            assert_eq!(names(root.path()), ["out"]);
        }
        // With the target present, an old copy of a dead run is removed, and one of the older
        // naming (`.out.old`) too; a live process's leftovers are left alone.
        std::fs::create_dir(root.path().join(old_dir_name("out", dead))).unwrap();
        std::fs::create_dir(root.path().join(".out.old")).unwrap();
        std::fs::create_dir(root.path().join(temp_dir_name("out", 1))).unwrap();
        std::fs::create_dir(root.path().join(temp_dir_name("other", dead))).unwrap();
        let d = AtomicDir::create(&target, true).unwrap();
        d.commit().unwrap();
        assert_eq!(
            names(root.path()),
            [
                ".other.tmp-".to_string() + &dead.to_string(),
                ".out.tmp-1".into(),
                "out".into()
            ]
        );
    }

    #[test]
    fn a_file_in_the_way_is_named_clearly() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        std::fs::write(&target, b"x").unwrap();
        let err = AtomicDir::create(&target, true).err().unwrap().to_string();
        assert!(
            err.contains("is not a directory") && !err.contains("os error"),
            "{err}"
        );
    }

    #[test]
    fn atomic_files_leave_no_temporaries_and_clean_dead_ones() {
        let root = tempfile::tempdir().unwrap();
        let f = root.path().join("state.json");
        let stale = root.path().join(temp_dir_name("state.json", dead_pid()));
        std::fs::write(&stale, b"half").unwrap();
        write_file_atomic(&f, b"{}").unwrap();
        assert_eq!(names(root.path()), ["state.json"]);
        let err = write_file_atomic(&root.path().join("missing/x.json"), b"{}")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing/x.json") && !err.contains(".tmp-"),
            "{err}"
        );
    }
}
