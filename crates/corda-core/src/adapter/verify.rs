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
    if let Some(why) = degenerate_logits(&reference)? {
        return Err(CordaError::Numerics(format!(
            "the trained adapter on {} gives degenerate logits ({why}); the adapter is broken, typically by a diverged training run: retrain with a lower learning rate",
            residual_dir.display()
        )));
    }
    let ours = logits_with_adapter(base_dir, converted, input_ids, device)?;
    if let Some(why) = degenerate_logits(&ours)? {
        return Err(CordaError::Numerics(format!(
            "the converted LoRA on {} gives degenerate logits ({why})",
            base_dir.display()
        )));
    }
    let max_abs_diff = crate::util::tensor::max_abs_diff(&ours, &reference)? as f64;
    let max_abs_logit = crate::util::tensor::max_abs(&reference)? as f64;
    Ok(VerifyReport {
        max_abs_diff,
        max_abs_logit,
        tokens: input_ids.len(),
    })
}

/// Why `logits` (seq, vocab) cannot come from a working model: non-finite values, a position
/// whose logits are all equal (a uniform prediction), or every position predicting the same
/// distribution (the output ignores the input). `None` when they look like a model's.
pub fn degenerate_logits(logits: &Tensor) -> Result<Option<String>> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let bad = rows.iter().flatten().filter(|x| !x.is_finite()).count();
    if bad > 0 {
        return Ok(Some(format!("{bad} non-finite values")));
    }
    let scale = rows
        .iter()
        .flatten()
        .fold(0.0f32, |m, x| m.max(x.abs()))
        .max(1.0);
    let tol = 1e-6 * scale;
    for (i, row) in rows.iter().enumerate() {
        let (lo, hi) = row
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| {
                (l.min(x), h.max(x))
            });
        if row.len() > 1 && hi - lo <= 1e-6 * lo.abs().max(hi.abs()).max(1.0) {
            return Ok(Some(format!(
                "all logits of position {i} are equal: a uniform prediction"
            )));
        }
    }
    if rows.len() > 1 {
        let same = rows[1..]
            .iter()
            .all(|r| r.iter().zip(&rows[0]).all(|(a, b)| (a - b).abs() <= tol));
        if same {
            return Ok(Some(
                "every position has the same logits: the output ignores the input".into(),
            ));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degenerate_logits_are_recognised() {
        let dev = candle_core::Device::Cpu;
        let ok = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.1, -1.0, 3.0]], &dev).unwrap();
        assert_eq!(degenerate_logits(&ok).unwrap(), None);
        let nan = Tensor::new(&[[1.0f32, f32::NAN, 0.5], [0.1, -1.0, 3.0]], &dev).unwrap();
        assert!(degenerate_logits(&nan)
            .unwrap()
            .unwrap()
            .contains("non-finite"));
        let flat = Tensor::new(&[[1.0f32, 2.0, 0.5], [3e6, 3e6, 3e6]], &dev).unwrap();
        assert!(degenerate_logits(&flat)
            .unwrap()
            .unwrap()
            .contains("position 1"));
        let same = Tensor::new(&[[1.0f32, 2.0, 0.5], [1.0, 2.0, 0.5]], &dev).unwrap();
        assert!(degenerate_logits(&same)
            .unwrap()
            .unwrap()
            .contains("ignores"));
    }
}
