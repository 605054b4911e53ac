//! The CorDA method: covariance of each target's input, the covariance-oriented SVD, and the
//! layer-by-layer preprocessing that writes the residual model plus the initial adapter.
//!
//! - [`covariance`]: `C = (1/N) Σ (X_n/|max X_n|)ᵀ (X_n/|max X_n|)`.
//! - [`decompose`]: damping, `svd(W·Cf)`, KPM/IPM cropping, A/B and the residual.
//! - [`files`]: covariance and decomposition-cache files.
//! - [`pipeline`]: one decoder layer at a time.

pub mod covariance;
pub mod decompose;
pub mod files;
pub mod pipeline;

pub use covariance::{CovarianceAccumulator, CovariancePrecision};
pub use decompose::{
    corda_eigens, corda_eigens_damped, corda_eigens_parallel, corda_init, damp_covariance,
    CordaEigens, CordaInit, CordaMode, Damped,
};
pub use pipeline::{preprocess, ModuleReport, PreprocessOptions, PreprocessReport};
