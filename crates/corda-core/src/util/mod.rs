//! Small shared pieces: atomic output directories, phase reports, progress bars.

pub mod alloc;
pub mod atomic;
pub mod cuda_runtime;
pub mod report;
pub mod tensor;

pub use atomic::AtomicDir;
pub use report::{peak_rss_bytes, progress_bar, PhaseReport};
