//! `--device cuda` where it cannot work must be a clear error, never a panic: in a build without
//! the `cuda` feature it says to rebuild; in a CUDA build on a machine without a driver (CI, this
//! CPU-only machine) it says the driver or libraries are missing and to use `--device cpu`.

use std::process::Command;

use corda_testdata::peft_tiny_llama as fixtures;

/// A GPU machine, where `--device cuda` is expected to work.
fn has_driver() -> bool {
    std::path::Path::new("/dev/nvidiactl").exists()
}

#[test]
fn device_cuda_without_a_usable_gpu_is_a_clear_error() {
    if cfg!(feature = "cuda") && has_driver() {
        eprintln!("skipped: a GPU driver is present");
        return;
    }
    let f = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_corda-preprocess"))
        .args(["--quiet", "--device", "cuda", "--model_id"])
        .arg(f.join("base-model"))
        .args(["--r", "8", "--save_model", "--save_path"])
        .arg(tmp.path().join("out"))
        .args(["--calib_dataset"])
        .arg(f.join("data/qa.jsonl"))
        .args(["--calib_template", "{question}", "--calib_loader_size", "2"])
        // No CUDA library directory may make the driver appear.
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert_ne!(o.status.code(), Some(101), "a panic: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("--device cpu"), "{err}");
    if cfg!(feature = "cuda") {
        assert!(
            err.contains("cannot use the CUDA device") && err.contains("NVIDIA driver"),
            "{err}"
        );
    } else {
        assert!(err.contains("--features cuda"), "{err}");
    }
    assert!(!tmp.path().join("out").exists(), "nothing written");
}
