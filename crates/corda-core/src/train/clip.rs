//! Gradient clipping by global norm, as `torch.nn.utils.clip_grad_norm_` does it for the Trainer.
//!
//! The norm is taken over all gradients together (the 2-norm of the per-tensor 2-norms), and
//! every gradient is multiplied by `max_norm / (norm + 1e-6)` when that is below 1. The pre-clip
//! norm is returned because that is what the Trainer logs as `grad_norm`.

use candle_core::{DType, Tensor};

use crate::{CordaError, Result};

/// The global 2-norm of `grads` (missing gradients count as zero).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum_sq = 0.0f64;
    for g in grads.iter().flatten() {
        let s = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        sum_sq += s as f64;
    }
    Ok(sum_sq.sqrt())
}

/// Clip `grads` in place to a global norm of at most `max_norm`; returns the norm before
/// clipping. A `max_norm` of zero or less disables clipping (the Trainer's `max_grad_norm=0`),
/// but the norm is still computed and returned for logging.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 {
        if !norm.is_finite() {
            return Err(CordaError::Numerics(format!(
                "the gradient norm is {norm}; training diverged (lower learning_rate, or check the data for empty targets)"
            )));
        }
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = g.affine(coef, 0.0)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Option<Tensor> {
        Some(Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap())
    }

    #[test]
    fn clips_to_max_norm_and_returns_pre_clip_norm() {
        let mut grads = vec![t(&[3.0, 0.0]), None, t(&[4.0])];
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let after = global_norm(&grads).unwrap();
        assert!((after - 5.0 / (5.0 + 1e-6)).abs() < 1e-6, "{after}");
        let g0 = grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert!((g0[0] as f64 - 3.0 / (5.0 + 1e-6)).abs() < 1e-6);
    }

    #[test]
    fn small_gradients_are_left_alone() {
        let mut grads = vec![t(&[0.3, 0.4])];
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 0.5).abs() < 1e-7);
        assert_eq!(
            grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.3, 0.4]
        );
        let norm = clip_grad_norm(&mut [t(&[30.0, 40.0])], 0.0).unwrap();
        assert!((norm - 50.0).abs() < 1e-6);
    }

    #[test]
    fn non_finite_norm_is_an_error() {
        let mut grads = vec![t(&[f32::NAN])];
        assert!(clip_grad_norm(&mut grads, 1.0).is_err());
    }
}
