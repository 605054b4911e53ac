//! Where the tests find their data, in one place.
//!
//! - The PEFT reference fixtures (3.9 MB) live in the repository, `tests/fixtures/`, so a clone
//!   tests with nothing beside it.
//! - Large real-model files (a real layer, a real model) stay outside it, in `../shared` beside
//!   the checkout. A test that needs them asks [`shared`], which returns `None` and prints a
//!   notice when they are absent, so the test can skip; `.ci/run` insists they are there, so CI
//!   always runs those tests.

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tests/fixtures/`: the vendored fixtures (see its README).
pub fn fixtures_root() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// `tests/fixtures/peft-tiny-llama/`: a tiny random Llama and PEFT 0.21's CorDA runs on it.
pub fn peft_tiny_llama() -> PathBuf {
    fixtures_root().join("peft-tiny-llama")
}

/// `tests/fixtures/peft-tiny-llama-pissa/`: PEFT 0.21's PiSSA on that model, with float64
/// PiSSA / MiLoRA references (made by `scripts/make_pissa_fixture.py`).
pub fn peft_tiny_llama_pissa() -> PathBuf {
    fixtures_root().join("peft-tiny-llama-pissa")
}

/// `../shared` beside the checkout, or `CORDA_SHARED` when set.
pub fn shared_root() -> PathBuf {
    match std::env::var_os("CORDA_SHARED") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join("../shared"),
    }
}

/// `<shared>/<relative>` when it exists; otherwise `None`, after printing that `test` is
/// skipped and why (cargo shows it with `--nocapture`, and in the output of a failed run).
pub fn shared(relative: &str, test: &str) -> Option<PathBuf> {
    let path = shared_root().join(relative);
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "skipping {test}: {} is absent (large real-model files live in ../shared beside the checkout, not in the repository; .ci/run requires them)",
            path.display()
        );
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vendored_fixtures_are_in_the_repository() {
        assert!(peft_tiny_llama().join("base-model/config.json").is_file());
        assert!(peft_tiny_llama_pissa().join("manifest.json").is_file());
        assert!(fixtures_root().join("README.md").is_file());
    }

    #[test]
    fn an_absent_shared_path_is_a_skip() {
        assert_eq!(shared("no/such/path/at/all", "this test"), None);
    }
}
