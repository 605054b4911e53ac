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
