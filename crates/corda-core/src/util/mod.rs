//! Small shared pieces: atomic output directories, output locks and interrupts, phase reports,
//! progress bars, SVG charts, the CUDA library probe, a vectorizable float32 exp, element-wise loops
//! compiled for the running CPU, the float32 product kernel choice.

pub mod alloc;
pub mod atomic;
pub mod contain;
pub mod cuda_runtime;
pub mod exp;
pub mod plot;
pub mod process;
pub mod product;
pub mod report;
pub mod simd;
pub mod tensor;

pub use atomic::AtomicDir;
pub use report::{peak_rss_bytes, progress_bar, styled_progress_bar, PhaseReport};
