//! Covariance of a linear layer's input, as PEFT's `calib_cov_distribution` defines it:
//! `C = (1/N) Σ_n (X_n/|max X_n|)ᵀ (X_n/|max X_n|)` over N calibration samples, where
//! `max X_n` is the signed maximum of all entries of sample n (PEFT's `torch.max(input).abs()`).
//!
//! Several samples arrive per forward pass (right-padded): each sample's real tokens are scaled
//! by its own factor and stacked; the stacked rows of several forward passes are flushed
//! together (at least [`FLUSH_ROWS`] rows), so one symmetric rank-k update (lower triangle
//! only) and one pass over the float64 sum serve many samples, and padded tokens never enter C.

use candle_core::{DType, Tensor};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};

use crate::{CordaError, Result};

/// Storage of the running sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CovariancePrecision {
    /// float32 products summed in float64 (default; at least as exact as PEFT's float32 sum).
    Float32,
    /// The running sum held in half precision (PEFT's `use_float16_for_covariance`), half the
    /// memory; an overflow is detected and reported instead of silently becoming inf.
    Half(DType),
    /// [`Self::Half`] in the model's half dtype (float16 for a float32 model), resolved by
    /// [`Self::resolve`] once the storage dtype is known.
    ModelHalf,
}

impl CovariancePrecision {
    /// [`Self::ModelHalf`] as the half dtype of a model stored in `dtype`.
    pub fn resolve(self, dtype: DType) -> Self {
        match (self, dtype) {
            (Self::ModelHalf, DType::F16 | DType::BF16) => Self::Half(dtype),
            (Self::ModelHalf, _) => Self::Half(DType::F16),
            (other, _) => other,
        }
    }
}

/// Accumulates `Σ Xᵀ X` for one input site.
pub struct CovarianceAccumulator {
    dim: usize,
    precision: CovariancePrecision,
    /// Lower triangle, column-major `dim × dim` (float64 mode).
    sum: Option<Mat<f64>>,
    /// Lower triangle, row-major, half precision (half mode).
    half: Vec<half::f16>,
    half_bf: Vec<half::bf16>,
    /// Number of samples (PEFT's `sample_count`: one per forward of a batch-1 sample).
    pub samples: usize,
    scratch: Mat<f32>,
    /// Scaled rows (row-major, `dim` wide) waiting for the next rank-k update.
    pending: Vec<f32>,
}

/// Rows gathered before a rank-k update: enough to keep the product compute-bound and to make
/// the pass over the float64 sum (memory-bound) rare.
pub const FLUSH_ROWS: usize = 2048;

impl CovarianceAccumulator {
    pub fn new(dim: usize, precision: CovariancePrecision) -> Self {
        // The pipeline resolves ModelHalf first; on its own it means float16.
        let precision = precision.resolve(DType::F32);
        let (sum, half, half_bf) = match precision {
            CovariancePrecision::Float32 => (Some(Mat::zeros(dim, dim)), vec![], vec![]),
            CovariancePrecision::Half(DType::BF16) => {
                (None, vec![], vec![half::bf16::ZERO; dim * dim])
            }
            _ => (None, vec![half::f16::ZERO; dim * dim], vec![]),
        };
        Self {
            dim,
            precision,
            sum,
            half,
            half_bf,
            samples: 0,
            scratch: Mat::zeros(dim, dim),
            pending: vec![],
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Add a batch `x` of shape (batch, seq, dim) where sample b has `lengths[b]` real tokens.
    /// `module` names the site in errors.
    pub fn add_batch(&mut self, x: &Tensor, lengths: &[usize], module: &str) -> Result<()> {
        let (b, t, d) = x.dims3()?;
        if d != self.dim || lengths.len() != b {
            return Err(CordaError::Invalid(format!(
                "{module}: covariance input has shape ({b}, {t}, {d}) for {} lengths and dim {}",
                lengths.len(),
                self.dim
            )));
        }
        let data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for (i, &len) in lengths.iter().enumerate() {
            let rows = &data[i * t * d..(i * t + len.min(t)) * d];
            if rows.is_empty() {
                continue;
            }
            // PEFT: input / torch.max(input).abs(), the signed maximum.
            let m = rows.iter().copied().fold(f32::NEG_INFINITY, f32::max).abs();
            if !m.is_finite() || m == 0.0 || rows.iter().any(|v| !v.is_finite()) {
                return Err(CordaError::Numerics(format!(
                    "invalid value in the input of {module} for a calibration sample (max = {m}); the model produces NaN/inf or all-zero activations: check the model weights and the dtype (float16 models may overflow: use float32 or bfloat16)"
                )));
            }
            self.pending.extend(rows.iter().map(|v| v / m));
            self.samples += 1;
        }
        if self.pending.len() / d >= FLUSH_ROWS {
            self.flush(module)?;
        }
        Ok(())
    }

    /// Add the pending rows' `XᵀX` to the running sum.
    fn flush(&mut self, module: &str) -> Result<()> {
        let d = self.dim;
        let n = self.pending.len() / d;
        if n == 0 {
            return Ok(());
        }
        let stacked = std::mem::take(&mut self.pending);
        let xm = MatRef::from_row_major_slice(&stacked, n, d);
        triangular::matmul(
            self.scratch.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Replace,
            xm.transpose(),
            BlockStructure::Rectangular,
            xm,
            BlockStructure::Rectangular,
            1.0f32,
            Par::rayon(0),
        );
        match self.precision {
            CovariancePrecision::Float32 => {
                let sum = self.sum.as_mut().expect("float32 mode");
                for j in 0..d {
                    for i in j..d {
                        sum[(i, j)] += self.scratch[(i, j)] as f64;
                    }
                }
            }
            half_precision => {
                let bf16 = half_precision == CovariancePrecision::Half(DType::BF16);
                let mut overflow = false;
                for j in 0..d {
                    for i in j..d {
                        let add = self.scratch[(i, j)];
                        let v = if bf16 {
                            let s = &mut self.half_bf[i * d + j];
                            *s = half::bf16::from_f32(s.to_f32() + add);
                            s.to_f32()
                        } else {
                            let s = &mut self.half[i * d + j];
                            *s = half::f16::from_f32(s.to_f32() + add);
                            s.to_f32()
                        };
                        overflow |= !v.is_finite();
                    }
                }
                if overflow {
                    return Err(CordaError::Numerics(format!(
                        "the half-precision covariance of {module} overflowed after {} samples; drop use_float16_for_covariance (float32 needs twice the memory) or use fewer/shorter calibration samples",
                        self.samples
                    )));
                }
            }
        }
        Ok(())
    }

    /// The finished covariance, divided by the sample count, as a full symmetric float32 matrix.
    pub fn finish(&mut self, module: &str) -> Result<Mat<f32>> {
        self.flush(module)?;
        if self.samples == 0 {
            return Err(CordaError::Data(format!(
                "{module} saw no calibration tokens; the calibration set is empty"
            )));
        }
        let n = self.samples as f64;
        let d = self.dim;
        let get = |i: usize, j: usize| -> f64 {
            match self.precision {
                CovariancePrecision::Float32 => self.sum.as_ref().expect("float32")[(i, j)],
                CovariancePrecision::Half(DType::BF16) => self.half_bf[i * d + j].to_f64(),
                _ => self.half[i * d + j].to_f64(),
            }
        };
        Ok(Mat::from_fn(d, d, |i, j| {
            let v = if i >= j { get(i, j) } else { get(j, i) };
            (v / n) as f32
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_definition_and_ignores_padding() {
        // Two samples of different lengths, the second padded with garbage.
        let d = 3;
        let s1 = [[1.0f32, -2.0, 0.5], [0.25, 2.0, -1.0]]; // signed max 2.0
        let s2 = [[-4.0f32, 1.0, 0.5], [9.0, 9.0, 9.0]]; // one real row: signed max 1.0
        let mut flat = vec![];
        for r in s1.iter().chain(s2.iter()) {
            flat.extend_from_slice(r);
        }
        let x = Tensor::from_vec(flat, (2, 2, d), &Device::Cpu).unwrap();
        let mut acc = CovarianceAccumulator::new(d, CovariancePrecision::Float32);
        acc.add_batch(&x, &[2, 1], "m").unwrap();
        let c = acc.finish("m").unwrap();
        for i in 0..d {
            for j in 0..d {
                let mut e = 0.0f64;
                for r in &s1 {
                    e += (r[i] / 2.0) as f64 * (r[j] / 2.0) as f64;
                }
                e += s2[0][i] as f64 * s2[0][j] as f64;
                e /= 2.0;
                assert!(
                    (c[(i, j)] as f64 - e).abs() < 1e-6,
                    "({i},{j}) {} vs {e}",
                    c[(i, j)]
                );
            }
        }
    }

    #[test]
    fn half_precision_overflow_is_reported() {
        let x = Tensor::from_vec(vec![-200.0f32, 1.0, 1.0, 1.0], (1, 2, 2), &Device::Cpu).unwrap();
        let mut acc = CovarianceAccumulator::new(2, CovariancePrecision::Half(DType::F16));
        for _ in 0..10 {
            acc.add_batch(&x, &[2], "m").unwrap();
        }
        let err = acc.finish("m").expect_err("overflow detected").to_string();
        assert!(
            err.contains("overflowed") && err.contains("use_float16_for_covariance"),
            "{err}"
        );
    }

    #[test]
    fn nan_input_is_an_error() {
        let x = Tensor::from_vec(vec![f32::NAN, 1.0], (1, 1, 2), &Device::Cpu).unwrap();
        let mut acc = CovarianceAccumulator::new(2, CovariancePrecision::Float32);
        assert!(acc
            .add_batch(&x, &[1], "m")
            .unwrap_err()
            .to_string()
            .contains("NaN"));
    }
}
