//! Small tensor measures shared by the built-in checks (identity check, `--verify`) and tests.

use candle_core::{DType, Tensor};

use crate::Result;

/// The largest |entry| of `t`, in float32.
pub fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?)
}

/// The largest |a − b| over entries of two tensors of the same shape, in float32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    max_abs(&(a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?)
}

/// The largest |a − b| relative to the largest |b|.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(max_abs_diff(a, b)? / max_abs(b)?.max(1e-30))
}

/// For a fused op's tests: the gradients of `Σ weight ⊙ fused` and of `Σ weight ⊙ composed`
/// (the same function built from candle's ops) agree within `tol` relative for every input.
#[cfg(test)]
pub(crate) fn assert_same_gradients(
    fused: &Tensor,
    composed: &Tensor,
    weight: &Tensor,
    inputs: &[&Tensor],
    tol: f32,
) {
    let grads = |out: &Tensor| {
        (out * weight)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let (gf, gc) = (grads(fused), grads(composed));
    for t in inputs {
        let (f, c) = (gf.get(t).unwrap(), gc.get(t).unwrap());
        let rel = max_rel_diff(f, c).unwrap();
        assert!(rel < tol, "gradient differs by {rel}");
    }
}
