//! What a preprocessing run reports per module, so a user sees when a module's selection is
//! ill-determined (KPM with tiny gaps) instead of trusting noise: δ, the condition of the damped
//! covariance, the gap at the cut, the error and sensitivity estimates, the smallest kept
//! singular value. Written next to the adapter as [`REPORT_FILE`].

use std::path::Path;

use candle_core::DType;
use serde::Serialize;

use super::decompose::{InitMethod, Spectrum};
use crate::util::PhaseReport;
use crate::{CordaError, Result};

/// The per-module report's file name inside the adapter directory.
pub const REPORT_FILE: &str = "corda_report.json";

/// A module whose kept subspace a float32-sized perturbation could turn this far is reported as
/// ill-determined.
pub const ILL_DETERMINED: f64 = 0.1;

/// What happened to one module.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    pub name: String,
    pub rank: usize,
    pub scaling: f64,
    /// Damping δ accepted by the inverse check (None when read from the cache, and for PiSSA /
    /// MiLoRA, which have no covariance).
    pub damp: Option<f64>,
    /// Estimated condition number of the damped covariance (None likewise).
    pub condition: Option<f64>,
    /// Singular-value figures of the cut (None when read from the cache).
    pub spectrum: Option<Spectrum>,
    /// Why the adapter is degenerate, when it is (and was allowed).
    pub degenerate: Option<String>,
    /// max|W − (W_res + s·B·A)| / max|W| as written (every method, every path).
    pub weight_deviation: f64,
}

impl ModuleReport {
    /// Whether the kept components are ill-determined by the data ([`ILL_DETERMINED`]).
    pub fn ill_determined(&self) -> bool {
        self.spectrum
            .is_some_and(|s| s.sensitivity > ILL_DETERMINED)
    }
}

/// The outcome of a preprocessing run.
#[derive(Debug, Clone)]
pub struct PreprocessReport {
    pub init: InitMethod,
    pub modules: Vec<ModuleReport>,
    /// Largest |layer output with residual + adapter − original layer output| over the check
    /// batch, relative to the largest |original output|, per layer.
    pub layer_deviation: Vec<f64>,
    pub phases: PhaseReport,
    pub num_samples: usize,
    pub num_tokens: usize,
    pub dtype: DType,
}

fn fold(values: impl Iterator<Item = f64>, f: fn(f64, f64) -> f64, init: f64) -> Option<f64> {
    let mut any = false;
    let v = values.fold(init, |a, b| {
        any = true;
        f(a, b)
    });
    any.then_some(v)
}

impl PreprocessReport {
    pub fn max_deviation(&self) -> f64 {
        self.layer_deviation.iter().copied().fold(0.0, f64::max)
    }

    /// Largest weight-level identity deviation over the modules.
    pub fn max_weight_deviation(&self) -> f64 {
        self.modules
            .iter()
            .map(|m| m.weight_deviation)
            .fold(0.0, f64::max)
    }

    /// Largest estimated relative error of a module's kept subspace.
    pub fn max_error_estimate(&self) -> Option<f64> {
        fold(
            self.modules
                .iter()
                .filter_map(|m| m.spectrum.map(|s| s.error_estimate)),
            f64::max,
            0.0,
        )
    }

    /// The smallest kept singular value relative to its module's largest, over all modules.
    pub fn min_relative_kept(&self) -> Option<f64> {
        fold(
            self.modules
                .iter()
                .filter_map(|m| m.spectrum.map(|s| s.smallest_kept / s.sigma_max)),
            f64::min,
            f64::INFINITY,
        )
    }

    /// The modules whose selection is ill-determined.
    pub fn ill_determined(&self) -> impl Iterator<Item = &ModuleReport> {
        self.modules.iter().filter(|m| m.ill_determined())
    }

    /// The per-module report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "init_method": self.init.as_str(),
            "corda_method": self.init.corda_mode().map(|m| m.as_str()),
            "dtype": crate::model::dtype_name(self.dtype),
            "samples": self.num_samples,
            "tokens": self.num_tokens,
            // No layer check without calibration inputs (a reused cache, PiSSA, MiLoRA).
            "max_layer_deviation": (!self.layer_deviation.is_empty()).then(|| self.max_deviation()),
            "max_weight_deviation": self.max_weight_deviation(),
            "max_error_estimate": self.max_error_estimate(),
            "min_relative_kept_singular_value": self.min_relative_kept(),
            "ill_determined_threshold": ILL_DETERMINED,
            "modules": self.modules,
        })
    }

    /// Write [`Self::to_json`] as `dir/corda_report.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(REPORT_FILE);
        let text = serde_json::to_string_pretty(&self.to_json())
            .map_err(|e| CordaError::Invalid(format!("cannot serialise the report: {e}")))?;
        std::fs::write(&path, text).map_err(|e| CordaError::io(path, e))
    }
}
