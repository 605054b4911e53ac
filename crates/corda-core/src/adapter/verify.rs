//! `--verify`: the converted LoRA must behave on the original base model exactly like the trained
//! CorDA adapter on its residual model. Both are run on a probe text and their logits compared.
//! The models are loaded one after the other (in f32), so peak memory is one model.

use std::path::Path;

use candle_core::{DType, Tensor};

use super::Adapter;
use crate::model::{CausalLM, LoadOptions};
use crate::{CordaError, Result};

/// The outcome of a verification.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// Largest |logit(base + converted) - logit(residual + trained)| over all positions.
    pub max_abs_diff: f64,
    /// Largest |logit| seen, to judge the difference against.
    pub max_abs_logit: f64,
    /// Number of probe tokens.
    pub tokens: usize,
}

/// Logits (seq, vocab), f32, of the model in `model_dir` with `adapter` attached, for one
/// sequence of token ids. The model is computed in f32 whatever its storage dtype.
pub fn logits_with_adapter(
    model_dir: &Path,
    adapter: &Adapter,
    input_ids: &[u32],
    device: &candle_core::Device,
) -> Result<Tensor> {
    if input_ids.is_empty() {
        return Err(CordaError::Invalid(
            "the probe text tokenizes to no tokens; use a non-empty probe text".to_string(),
        ));
    }
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        device: device.clone(),
    };
    let mut model = CausalLM::load(model_dir, &opts)?;
    adapter.attach_to(&mut model)?;
    let ids = Tensor::from_vec(input_ids.to_vec(), (1, input_ids.len()), device)?;
    Ok(model
        .forward(&ids, None)?
        .squeeze(0)?
        .to_dtype(DType::F32)?)
}

/// Compare base + `converted` against residual + `trained` on `input_ids`.
pub fn verify_conversion(
    base_dir: &Path,
    converted: &Adapter,
    residual_dir: &Path,
    trained: &Adapter,
    input_ids: &[u32],
    device: &candle_core::Device,
) -> Result<VerifyReport> {
    let reference = logits_with_adapter(residual_dir, trained, input_ids, device)?;
    let ours = logits_with_adapter(base_dir, converted, input_ids, device)?;
    let max_abs_diff = crate::util::tensor::max_abs_diff(&ours, &reference)? as f64;
    let max_abs_logit = crate::util::tensor::max_abs(&reference)? as f64;
    Ok(VerifyReport {
        max_abs_diff,
        max_abs_logit,
        tokens: input_ids.len(),
    })
}
