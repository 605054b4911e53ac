//! Small shared pieces: atomic output directories, output locks and interrupts, phase reports,
//! progress bars, SVG charts.

pub mod alloc;
pub mod atomic;
pub mod contain;
pub mod plot;
pub mod process;
pub mod report;
pub mod tensor;

pub use atomic::AtomicDir;
pub use report::{peak_rss_bytes, progress_bar, styled_progress_bar, PhaseReport};
