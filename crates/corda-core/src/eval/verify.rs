//! The reference's advice for half-precision covariances (`--use_float16_for_covariance`),
//! and a check of any preprocessing: the perplexity of the residual model with its initial
//! adapter must equal the original model's, since `W_res + s·B0·A0 = W` up to the storage
//! dtype's rounding. A few windows of a text are scored with both.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::perplexity::{perplexity, relative_difference, windows};
use crate::adapter::Adapter;
use crate::model::{CausalLM, LoadOptions};
use crate::{CordaError, Result};

/// Relative perplexity difference above which the check warns.
pub const DEFAULT_TOLERANCE: f64 = 1e-3;

/// The outcome of the check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerplexityCheck {
    pub dataset: String,
    pub seq_len: usize,
    pub windows: usize,
    /// Perplexity of the original model.
    pub original: f64,
    /// Perplexity of the residual model with the adapter attached.
    pub with_adapter: f64,
    pub relative_difference: f64,
    pub tolerance: f64,
}

impl PerplexityCheck {
    pub fn within_tolerance(&self) -> bool {
        self.relative_difference <= self.tolerance
    }

    /// Add this check to the per-module report (`corda_report.json`) in `adapter_dir`, as
    /// `verify_ppl`.
    pub fn add_to_report(&self, adapter_dir: &Path) -> Result<()> {
        let path = adapter_dir.join(crate::corda::REPORT_FILE);
        let mut report: Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| CordaError::Json {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Object(Default::default()),
            Err(e) => return Err(CordaError::io(path, e)),
        };
        let obj = report.as_object_mut().ok_or_else(|| {
            CordaError::Invalid(format!("{} is not a JSON object", path.display()))
        })?;
        obj.insert(
            "verify_ppl".into(),
            serde_json::to_value(self).map_err(|e| CordaError::Invalid(e.to_string()))?,
        );
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| CordaError::Invalid(format!("cannot serialise the report: {e}")))?;
        std::fs::write(&path, text).map_err(|e| CordaError::io(path, e))
    }
}

/// How to check.
#[derive(Debug, Clone)]
pub struct VerifyPplOptions {
    /// The text's name, for the report.
    pub dataset: String,
    pub seq_len: usize,
    /// Windows scored (the first ones).
    pub max_windows: usize,
    /// Relative difference above which [`PerplexityCheck::within_tolerance`] is false.
    pub tolerance: f64,
    pub device: candle_core::Device,
    pub progress: bool,
}

/// Score the first windows of `ids` with the original model, then with the residual model
/// plus `adapter` (one model in memory at a time, each in its stored dtype).
pub fn verify_perplexity(
    original_dir: &Path,
    residual_dir: &Path,
    adapter: &Adapter,
    ids: &[u32],
    o: &VerifyPplOptions,
) -> Result<PerplexityCheck> {
    let (seq_len, max_windows) = (o.seq_len, o.max_windows);
    let n = windows(ids, seq_len, Some(max_windows))?.len();
    let opts = LoadOptions {
        dtype: None,
        device: o.device.clone(),
    };
    let bar = if o.progress {
        crate::util::progress_bar(2 * n as u64, "verify ppl")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let original = {
        let model = CausalLM::load(original_dir, &opts)?;
        perplexity(&model, ids, seq_len, Some(max_windows), 1, &mut |k| {
            bar.inc(k as u64)
        })?
    };
    let with_adapter = {
        let mut model = CausalLM::load(residual_dir, &opts)?;
        adapter.attach_to(&mut model)?;
        perplexity(&model, ids, seq_len, Some(max_windows), 1, &mut |k| {
            bar.inc(k as u64)
        })?
    };
    bar.finish_and_clear();
    Ok(PerplexityCheck {
        dataset: o.dataset.clone(),
        seq_len,
        windows: n,
        original: original.perplexity,
        with_adapter: with_adapter.perplexity,
        relative_difference: relative_difference(with_adapter.perplexity, original.perplexity),
        tolerance: o.tolerance,
    })
}
