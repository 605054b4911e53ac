//! What the script tests share: where the checkout and the built binaries are.

use std::path::{Path, PathBuf};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Where Cargo put the workspace's binaries for this test run (it honours `CARGO_TARGET_DIR`):
/// next to the corda-demo binary it built for these tests.
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_corda-demo"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The last `n` lines of a command's output, for failure messages.
pub fn tail(bytes: &[u8], n: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
