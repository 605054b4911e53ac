//! Processes, output locks and interrupts, shared by the three binaries.
//!
//! - [`pid_alive`]: whether the process that left a temporary file behind still runs, so that
//!   only leftovers of dead runs are removed.
//! - [`OutputLock`]: one writer per output path. Two runs into one directory would otherwise
//!   both succeed with one run's output lost.
//! - [`install_interrupt_handler`]: SIGINT / SIGTERM remove this process's temporary files
//!   before it exits (or, for training, first ask the loop to stop after the current step).
//!
//! Signals are taken by a dedicated thread with `sigwait` (libc only, no extra crate): the
//! signals are blocked in every thread, so no code runs in signal context and the clean-up may
//! allocate and touch the file system.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::{CordaError, Result};

/// Whether process `pid` exists (`kill(pid, 0)`; a process of another user counts as alive).
pub fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(p, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The directory holding `target` and its file name, resolving `.`, `..` and a trailing `/`
/// so that every spelling of one path gives the same pair.
pub fn split_target(target: &Path) -> Result<(PathBuf, String)> {
    let name = target
        .file_name()
        .filter(|n| *n != "..")
        .map(|n| n.to_string_lossy().into_owned());
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if let Some(name) = name {
        return Ok((parent, name));
    }
    let abs = target
        .canonicalize()
        .map_err(|e| CordaError::io(target, e))?;
    match (abs.parent(), abs.file_name()) {
        (Some(p), Some(n)) => Ok((p.to_path_buf(), n.to_string_lossy().into_owned())),
        _ => Err(CordaError::Invalid(format!(
            "{}: cannot write the file-system root; choose a directory below it",
            target.display()
        ))),
    }
}

/// The lock file of `target`: `.NAME.lock` beside it.
pub fn lock_file_for(target: &Path) -> Result<PathBuf> {
    let (parent, name) = split_target(target)?;
    Ok(parent.join(format!(".{name}.lock")))
}

/// An exclusive `flock` on `.NAME.lock` beside an output, holding the owner's PID. The kernel
/// drops the lock when its process dies, so a lock file left by a killed run is simply taken
/// over. Dropping the lock removes the file.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: File,
    _cleanup: TempGuard,
}

impl OutputLock {
    /// Lock `target` for writing, or fail with [`CordaError::Locked`] naming the holder.
    pub fn acquire(target: &Path) -> Result<Self> {
        let path = lock_file_for(target)?;
        if let Some(dir) = path.parent() {
            crate::util::atomic::create_dir_all(dir)?;
        }
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| CordaError::io(&path, e))?;
            if !try_flock(&file).map_err(|e| CordaError::io(&path, e))? {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                return Err(CordaError::Locked {
                    target: target.to_path_buf(),
                    lock: path,
                    holder,
                });
            }
            // The previous holder may have removed the file between our open and our lock:
            // then we hold a lock on a file nobody else can see, so start again.
            if !same_file(&file, &path) {
                continue;
            }
            file.set_len(0).map_err(|e| CordaError::io(&path, e))?;
            writeln!(file, "{}", std::process::id()).map_err(|e| CordaError::io(&path, e))?;
            let cleanup = register_temp(&path);
            return Ok(Self {
                path,
                file,
                _cleanup: cleanup,
            });
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so no other process can lock this file and then lose it.
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.file;
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another process holds it.
fn try_flock(file: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor we own; it is released when the file closes.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Signals received (SIGINT or SIGTERM) since [`install_interrupt_handler`].
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);
/// Files and directories of this process to remove when a signal ends it.
static TEMPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// What the first SIGINT / SIGTERM does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// Remove the temporary files and exit (status 128 + signal).
    Exit,
    /// Only record it ([`interrupt_requested`]); a long loop stops at its next safe point.
    /// A second signal exits as with `Exit`.
    Request,
}

/// Take SIGINT and SIGTERM on a dedicated thread. Call first thing in `main`, before any
/// other thread starts: threads inherit the blocked signal mask from the one creating them.
pub fn install_interrupt_handler(mode: OnInterrupt) -> Result<()> {
    // SAFETY: plain libc signal-set manipulation on local, initialised sets.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(CordaError::Invalid(format!(
                "cannot block SIGINT/SIGTERM: {}",
                std::io::Error::from_raw_os_error(rc)
            )));
        }
        set
    };
    std::thread::Builder::new()
        .name("corda-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid, initialised signal set; `sig` receives the signal.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            let n = INTERRUPTS.fetch_add(1, Ordering::SeqCst) + 1;
            if mode == OnInterrupt::Request && n == 1 {
                eprintln!(
                    "\ninterrupted: finishing the current step and saving a checkpoint (interrupt again to stop at once)"
                );
                continue;
            }
            remove_temps();
            eprintln!("\ninterrupted: stopped, temporary files removed");
            // SAFETY: ends the process without running destructors that other threads may
            // be using; the clean-up above is all that must happen.
            unsafe { libc::_exit(128 + sig) };
        })
        .map_err(|e| CordaError::Invalid(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived (only after [`install_interrupt_handler`]).
pub fn interrupt_requested() -> bool {
    INTERRUPTS.load(Ordering::SeqCst) > 0
}

/// Held while an output is renamed into place, so that an interrupt's clean-up never removes a
/// temporary directory half-way through its publishing rename.
static PUBLISHING: Mutex<()> = Mutex::new(());

/// Hold off the interrupt clean-up while publishing (see `PUBLISHING`).
pub fn publishing() -> std::sync::MutexGuard<'static, ()> {
    PUBLISHING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Remove every registered temporary path (what a signal does before exiting).
fn remove_temps() {
    let _publishing = publishing();
    let paths = match TEMPS.lock() {
        Ok(mut g) => std::mem::take(&mut *g),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    };
    for p in paths.iter().rev() {
        // Writer threads may still add files; a few tries empty the directory.
        for _ in 0..3 {
            let r = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            if r.is_ok() || !p.exists() {
                break;
            }
        }
    }
}

/// Registration of a temporary path with the interrupt clean-up; dropping it unregisters.
#[derive(Debug)]
pub struct TempGuard(PathBuf);

/// Remove `path` if a signal ends the process while the returned guard lives.
pub fn register_temp(path: &Path) -> TempGuard {
    if let Ok(mut g) = TEMPS.lock() {
        g.push(path.to_path_buf());
    }
    TempGuard(path.to_path_buf())
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Ok(mut g) = TEMPS.lock() {
            if let Some(i) = g.iter().rposition(|p| p == &self.0) {
                g.remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_and_dead_pids() {
        assert!(pid_alive(std::process::id()));
        assert!(pid_alive(1));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
        assert!(!pid_alive(crate::util::atomic::testing::dead_pid()));
    }

    #[test]
    fn targets_split_the_same_whatever_the_spelling() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let (p, n) = split_target(&out).unwrap();
        assert_eq!((p.as_path(), n.as_str()), (root.path(), "out"));
        let (_, n) = split_target(&root.path().join("out/")).unwrap();
        assert_eq!(n, "out");
        let (p, n) = split_target(&out.join("..")).unwrap();
        assert_eq!(n, root.path().file_name().unwrap().to_str().unwrap());
        assert_eq!(p, root.path().canonicalize().unwrap().parent().unwrap());
        assert!(split_target(Path::new("/")).is_err());
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_released_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let lock = OutputLock::acquire(&target).unwrap();
        assert_eq!(
            std::fs::read_to_string(lock.path()).unwrap().trim(),
            std::process::id().to_string()
        );
        // flock is per open file description: a second open in this process conflicts too.
        let err = OutputLock::acquire(&target).unwrap_err();
        match &err {
            CordaError::Locked { holder, .. } => assert_eq!(*holder, Some(std::process::id())),
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains(&std::process::id().to_string()));
        let path = lock.path().to_path_buf();
        drop(lock);
        assert!(!path.exists());
        // A stale lock file (its writer died without removing it) is taken over.
        std::fs::write(&path, "999999999\n").unwrap();
        let again = OutputLock::acquire(&target).unwrap();
        assert_eq!(
            std::fs::read_to_string(again.path()).unwrap().trim(),
            std::process::id().to_string()
        );
    }

    #[test]
    fn guards_register_and_unregister() {
        let p = PathBuf::from("/nonexistent/corda-guard-test");
        let g = register_temp(&p);
        assert!(TEMPS.lock().unwrap().contains(&p));
        drop(g);
        assert!(!TEMPS.lock().unwrap().contains(&p));
    }
}
