//! A check that the CUDA driver and libraries can be loaded, run before a CUDA device is
//! created.
//!
//! The CUDA build opens libcuda, cuBLAS, cuBLASLt, cuRAND and NVRTC at run time (cudarc's
//! dynamic loading, so that one binary builds without a GPU and runs wherever a driver is).
//! When one of them is missing, cudarc panics at its first call; probing them here first turns
//! that into an error that says what to do.

use std::ffi::CString;

use crate::{CordaError, Result};

/// The libraries a CUDA device needs: cudarc's name (no `lib` prefix, no `.so`) and what it is.
pub const CUDA_LIBRARIES: [(&str, &str); 5] = [
    (
        "cuda",
        "the NVIDIA driver library (libcuda, installed with the driver)",
    ),
    ("cublas", "cuBLAS"),
    ("cublasLt", "cuBLASLt"),
    ("curand", "cuRAND"),
    ("nvrtc", "NVRTC"),
];

/// The outcome of trying to load one library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryProbe {
    pub name: String,
    pub what: String,
    /// The file name that loaded, if any.
    pub loaded: Option<String>,
    /// The file names tried, in order.
    pub tried: Vec<String>,
    /// The dynamic loader's message for the last name tried, when none loaded.
    pub error: Option<String>,
}

/// Try to load `name` under each of `candidates` (file names resolved by the dynamic loader,
/// i.e. through `LD_LIBRARY_PATH`, the ld.so cache and the default directories); the library
/// is unloaded again.
pub fn probe_library(name: &str, what: &str, candidates: Vec<String>) -> LibraryProbe {
    let mut error = None;
    for file in &candidates {
        let Ok(c) = CString::new(file.as_str()) else {
            continue;
        };
        // SAFETY: dlopen/dlclose/dlerror with a valid C string; the handle is only closed.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            unsafe { libc::dlclose(handle) };
            return LibraryProbe {
                name: name.into(),
                what: what.into(),
                loaded: Some(file.clone()),
                tried: candidates,
                error: None,
            };
        }
        let msg = unsafe { libc::dlerror() };
        if !msg.is_null() {
            error = Some(
                unsafe { std::ffi::CStr::from_ptr(msg) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    LibraryProbe {
        name: name.into(),
        what: what.into(),
        loaded: None,
        tried: candidates,
        error,
    }
}

/// The error for the libraries that did not load, or `None` when all did. Says where the
/// libraries usually are and what to do: fix `LD_LIBRARY_PATH` / the driver, or run on the CPU.
pub fn missing_libraries_message(
    probes: &[LibraryProbe],
    ld_library_path: Option<&str>,
) -> Option<String> {
    let missing: Vec<&LibraryProbe> = probes.iter().filter(|p| p.loaded.is_none()).collect();
    if missing.is_empty() {
        return None;
    }
    let mut msg = String::from("cannot use the CUDA device: ");
    let names: Vec<String> = missing
        .iter()
        .map(|p| {
            format!(
                "{} (lib{}.so*, {} names tried)",
                p.what,
                p.name,
                p.tried.len()
            )
        })
        .collect();
    msg.push_str(&format!("could not load {}. ", names.join("; ")));
    if missing.iter().any(|p| p.name == "cuda") {
        msg.push_str("No NVIDIA driver is installed or visible on this machine: install the driver (it provides libcuda.so.1; `nvidia-smi` should list the GPU), or ");
    } else {
        msg.push_str("The driver is there but the CUDA libraries are not on the loader's path: add their folder to LD_LIBRARY_PATH (a CUDA toolkit's lib64, or PyTorch's site-packages/nvidia/cu13/lib and nvidia/*/lib), or ");
    }
    msg.push_str("run on the CPU with --device cpu.");
    match ld_library_path {
        Some(p) if !p.is_empty() => msg.push_str(&format!(" LD_LIBRARY_PATH is {p}.")),
        _ => msg.push_str(" LD_LIBRARY_PATH is not set."),
    }
    if let Some(e) = missing.iter().find_map(|p| p.error.as_deref()) {
        msg.push_str(&format!(" (loader: {e})"));
    }
    Some(msg)
}

/// The file names cudarc tries for `name`.
#[cfg(feature = "cuda")]
fn candidates(name: &str) -> Vec<String> {
    candle_core::cuda_backend::cudarc::get_lib_name_candidates(name)
}

/// Check that every library of [`CUDA_LIBRARIES`] loads; the error says what to do. Without the
/// `cuda` feature there is nothing to load and the answer is a rebuild.
pub fn check_cuda_libraries() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let probes: Vec<LibraryProbe> = CUDA_LIBRARIES
            .iter()
            .map(|(name, what)| probe_library(name, what, candidates(name)))
            .collect();
        let ld = std::env::var("LD_LIBRARY_PATH").ok();
        match missing_libraries_message(&probes, ld.as_deref()) {
            Some(msg) => Err(CordaError::Device(msg)),
            None => Ok(()),
        }
    }
    #[cfg(not(feature = "cuda"))]
    Err(CordaError::Device(
        "this build has no CUDA support; rebuild with scripts/cuda/build.sh (cargo build --release --features cuda) or use --device cpu".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(name: &str, loaded: bool) -> LibraryProbe {
        LibraryProbe {
            name: name.into(),
            what: format!("lib {name}"),
            loaded: loaded.then(|| format!("lib{name}.so")),
            tried: vec![
                format!("lib{name}.so"),
                format!("lib{name}.so.13"),
                format!("lib{name}.so.12"),
                format!("lib{name}.so.1"),
            ],
            error: (!loaded).then(|| format!("lib{name}.so.1: cannot open shared object file")),
        }
    }

    #[test]
    fn all_loaded_is_no_error() {
        let p: Vec<_> = ["cuda", "cublas"].iter().map(|n| probe(n, true)).collect();
        assert_eq!(missing_libraries_message(&p, None), None);
    }

    #[test]
    fn missing_driver_says_install_driver_or_use_cpu() {
        let p = vec![probe("cuda", false), probe("cublas", false)];
        let m = missing_libraries_message(&p, None).unwrap();
        assert!(m.contains("lib cuda (libcuda.so*, 4 names tried)"), "{m}");
        assert!(m.contains("lib cublas"), "{m}");
        assert!(m.contains("install the driver"), "{m}");
        assert!(m.contains("--device cpu"), "{m}");
        assert!(m.contains("LD_LIBRARY_PATH is not set"), "{m}");
        assert!(m.contains("cannot open shared object file"), "{m}");
    }

    #[test]
    fn missing_toolkit_library_points_at_ld_library_path() {
        let p = vec![probe("cuda", true), probe("cublas", false)];
        let m = missing_libraries_message(&p, Some("/opt/x")).unwrap();
        assert!(!m.contains("install the driver"), "{m}");
        assert!(m.contains("add their folder to LD_LIBRARY_PATH"), "{m}");
        assert!(m.contains("LD_LIBRARY_PATH is /opt/x."), "{m}");
        assert!(!m.contains("lib cuda "), "{m}");
    }

    #[test]
    fn probe_finds_a_present_library_and_reports_an_absent_one() {
        let ok = probe_library(
            "c",
            "libc",
            vec!["libc-absent.so.9".into(), "libc.so.6".into()],
        );
        assert_eq!(ok.loaded.as_deref(), Some("libc.so.6"));
        let bad = probe_library("x", "X", vec!["libcorda-no-such-library.so".into()]);
        assert_eq!(bad.loaded, None);
        assert!(bad.error.unwrap().contains("libcorda-no-such-library.so"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_the_check_says_rebuild() {
        let e = check_cuda_libraries().unwrap_err().to_string();
        assert!(
            e.contains("--features cuda") && e.contains("--device cpu"),
            "{e}"
        );
    }
}
