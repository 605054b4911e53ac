//! The library's typed error. Binaries wrap it in `anyhow` with context.

use std::path::PathBuf;

/// Everything that can go wrong in the library. Messages are one line and say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum CordaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A model directory or model config that cannot be used.
    #[error("{0}")]
    Model(String),
    #[error("tensor `{name}` is missing from {location}; is this the right model directory?")]
    MissingTensor { name: String, location: String },
    #[error(
        "tensor `{name}` has shape {found:?} in the checkpoint but the config implies {expected:?}"
    )]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: cannot read safetensors ({reason}); the file may be truncated or not safetensors, re-download or re-save it")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: cannot read GGUF ({reason}); the file may be truncated or not GGUF, re-download it")]
    Gguf { path: PathBuf, reason: String },
    /// Bad or insufficient data (datasets, templates, splits).
    #[error("{0}")]
    Data(String),
    /// Adapter files that are malformed or do not belong together.
    #[error("{0}")]
    Adapter(String),
    /// A numerical failure (NaN, divergence) with advice.
    #[error("{0}")]
    Numerics(String),
    /// An output directory that exists and is not empty, where replacing it was not allowed.
    #[error("{} already exists and is not empty; choose another path or allow replacing it", path.display())]
    OutputExists { path: PathBuf },
    /// Another run holds the lock of an output path.
    #[error("{} is being written by another corda run{}; wait for it to finish or choose another path (lock file {})", target.display(), holder.map(|p| format!(" (process {p})")).unwrap_or_default(), lock.display())]
    Locked {
        target: PathBuf,
        lock: PathBuf,
        holder: Option<u32>,
    },
    /// Training stopped by SIGINT / SIGTERM after saving a resumable checkpoint.
    #[error("interrupted at step {step}; the run is saved in {}: continue it with --resume_from_checkpoint {}", checkpoint.display(), checkpoint.display())]
    Interrupted { step: u64, checkpoint: PathBuf },
    /// The Hugging Face hub: unreachable, gated, missing repo or file, failed download.
    #[error("{0}")]
    Hub(String),
    /// Invalid arguments or options.
    #[error("{0}")]
    Invalid(String),
    /// A compute device that cannot be opened (driver or libraries missing), with advice.
    #[error("{0}")]
    Device(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = CordaError> = std::result::Result<T, E>;

impl CordaError {
    /// An I/O error tagged with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CordaError::Io {
            path: path.into(),
            source,
        }
    }
}
