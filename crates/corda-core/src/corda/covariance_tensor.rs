//! The covariance sum as candle tensor ops on the device the inputs are on (cuBLAS on a GPU),
//! so that a GPU model's activations never leave the GPU: only the per-sample maxima (one
//! small read per batch) and the finished d×d matrix come to the host.
//!
//! Same semantics as the host sum: each sample's real tokens are divided by the absolute value
//! of their signed maximum, padded tokens are left out, and `Σ XᵀX` is kept in float32, or in
//! the half dtype (products and sum, like PEFT's `use_float16_for_covariance`) with an overflow
//! check at every flush.

use candle_core::{DType, Device, Tensor, D};
use faer::Mat;

use super::covariance::{half_overflow, invalid_input, CovariancePrecision};
use crate::Result;

/// Rows gathered before one `XᵀX` product: a GPU product this tall is compute-bound.
pub const TENSOR_FLUSH_ROWS: usize = 4096;

pub struct TensorSum {
    device: Device,
    /// The dtype of the scaled rows, the products and the sum.
    dtype: DType,
    /// `dim × dim` on `device`.
    sum: Tensor,
    /// Scaled real rows, each `(n_i, dim)` in `dtype`, waiting for the next product.
    pending: Vec<Tensor>,
    pending_rows: usize,
}

impl TensorSum {
    /// `precision` must be resolved ([`CovariancePrecision::resolve`]).
    pub fn new(dim: usize, precision: CovariancePrecision, device: &Device) -> Result<Self> {
        let dtype = match precision {
            CovariancePrecision::Half(dt) => dt,
            _ => DType::F32,
        };
        Ok(Self {
            device: device.clone(),
            dtype,
            sum: Tensor::zeros((dim, dim), dtype, device)?,
            pending: vec![],
            pending_rows: 0,
        })
    }

    pub fn pending_rows(&self) -> usize {
        self.pending_rows
    }

    /// Scale and keep the batch's real rows; returns the number of samples added.
    pub fn add_batch(&mut self, x: &Tensor, lengths: &[usize], module: &str) -> Result<usize> {
        let (b, t, d) = x.dims3()?;
        let dev = &self.device;
        let x = x.to_device(dev)?.to_dtype(DType::F32)?;
        let real: Vec<u8> = lengths
            .iter()
            .flat_map(|&l| (0..t).map(move |j| u8::from(j < l)))
            .collect();
        let mask = Tensor::from_vec(real, (b, t, 1), dev)?.broadcast_as((b, t, d))?;
        let fill = |v: f32| -> Result<Tensor> { Ok(Tensor::new(v, dev)?.broadcast_as((b, t, d))?) };
        // The signed maximum over each sample's real tokens (padding reads as -inf), and the
        // sum of their magnitudes, non-finite exactly when an input is NaN or inf.
        let maxes = mask
            .where_cond(&x, &fill(f32::NEG_INFINITY)?)?
            .flatten_from(1)?
            .max(D::Minus1)?;
        let magnitudes = mask
            .where_cond(&x, &fill(0.0)?)?
            .abs()?
            .flatten_from(1)?
            .sum(D::Minus1)?;
        let stats = Tensor::stack(&[maxes, magnitudes], 0)?.to_vec2::<f32>()?;
        let mut scales = vec![0f32; b];
        let mut rows = vec![];
        let mut added = 0;
        for (i, &len) in lengths.iter().enumerate() {
            if len.min(t) == 0 {
                continue;
            }
            let m = stats[0][i].abs();
            if !m.is_finite() || m == 0.0 || !stats[1][i].is_finite() {
                return Err(invalid_input(module, m));
            }
            scales[i] = 1.0 / m;
            rows.extend((0..len.min(t)).map(|j| (i * t + j) as u32));
            added += 1;
        }
        if rows.is_empty() {
            return Ok(0);
        }
        let n = rows.len();
        let scales = Tensor::from_vec(scales, (b, 1, 1), dev)?;
        let index = Tensor::from_vec(rows, n, dev)?;
        let scaled = x
            .broadcast_mul(&scales)?
            .reshape((b * t, d))?
            .index_select(&index, 0)?
            .to_dtype(self.dtype)?;
        self.pending.push(scaled);
        self.pending_rows += n;
        Ok(added)
    }

    /// Add the pending rows' `XᵀX` to the sum; `samples` so far, for the overflow message.
    pub fn flush(&mut self, samples: usize, module: &str) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let x = Tensor::cat(&std::mem::take(&mut self.pending), 0)?;
        self.pending_rows = 0;
        self.sum = (&self.sum + x.t()?.matmul(&x)?)?;
        if self.dtype != DType::F32 {
            let peak = self
                .sum
                .abs()?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            if !peak.is_finite() {
                return Err(half_overflow(module, samples));
            }
        }
        Ok(())
    }

    /// The flushed sum divided by `samples`, on the host, symmetric (lower triangle mirrored).
    pub fn finish(&self, samples: usize) -> Result<Mat<f32>> {
        let d = self.sum.dim(0)?;
        let c = (self.sum.to_dtype(DType::F32)? / samples as f64)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Mat::from_fn(d, d, |i, j| {
            if i >= j {
                c[i * d + j]
            } else {
                c[j * d + i]
            }
        }))
    }
}
