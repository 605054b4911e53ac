//! The CorDA method, in the order the data flows:
//!
//! - [`plan`]: the target modules with their ranks and input sites, checked before any work.
//! - [`files`]: what an earlier run left to reuse (PEFT's covariance file and cache).
//! - [`calibration`]: hidden states layer by layer, and the covariance of every input site.
//! - [`covariance`]: `C = (1/N) Σ (X_n/|max X_n|)ᵀ (X_n/|max X_n|)`.
//! - [`decompose`]: damping, `svd(W·Cf)` in float64, KPM/IPM cropping, A/B and the residual;
//!   the PiSSA / MiLoRA baselines (`svd(W)`, no calibration) share the crop and the formulas.
//! - [`init`]: one layer's modules decomposed and initialised, with the degenerate guard.
//! - [`output`]: the residual model, covariance file, cache and `corda_init/` as they stream.
//! - [`report`]: per-module figures (δ, condition, gap, error estimate) for the user.
//! - [`pipeline`]: the driver, one decoder layer at a time.

pub mod calibration;
pub mod covariance;
mod covariance_tensor;
pub mod decompose;
pub mod files;
pub mod init;
pub mod output;
pub mod pipeline;
pub mod plan;
pub mod report;

pub use covariance::{CovarianceAccumulator, CovariancePrecision};
pub use decompose::{
    corda_eigens, corda_eigens_damped, corda_init, damp_covariance, degeneracy, weight_eigens,
    CordaEigens, CordaInit, CordaMode, Damped, InitMethod, Spectrum,
};
pub use pipeline::{preprocess, PreprocessOptions};
pub use report::{ModuleReport, PreprocessReport, REPORT_FILE};
