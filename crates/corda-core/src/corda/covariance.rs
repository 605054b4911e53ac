//! Covariance of a linear layer's input, as PEFT's `calib_cov_distribution` defines it:
//! `C = (1/N) Σ_n (X_n/|max X_n|)ᵀ (X_n/|max X_n|)` over N calibration samples, where
//! `max X_n` is the signed maximum of all entries of sample n (PEFT's `torch.max(input).abs()`).
//!
//! Several samples arrive per forward pass (right-padded): each sample's real tokens are scaled
//! by its own factor and stacked; the stacked rows of several forward passes are flushed
//! together (at least [`FLUSH_ROWS`] rows), so one symmetric rank-k update (lower triangle
//! only) and one pass over the float64 sum serve many samples, and padded tokens never enter C.

use candle_core::{DType, Device, Tensor};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};

use super::covariance_tensor::{TensorSum, TENSOR_FLUSH_ROWS};
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
    /// Number of samples (PEFT's `sample_count`: one per forward of a batch-1 sample).
    pub samples: usize,
    sum: Sum,
}

/// Where the running sum lives.
enum Sum {
    /// On the host with faer (the faster choice for a CPU model: a triangular rank-k update
    /// with AVX-512 kernels, summed in float64).
    Host(HostSum),
    /// On the model's device as candle tensor ops (cuBLAS on a GPU); only the finished d×d
    /// matrix moves to the host.
    Tensor(TensorSum),
}

/// The host sum (see [`Sum::Host`]).
struct HostSum {
    precision: CovariancePrecision,
    /// Lower triangle, column-major `dim × dim` (float64 mode).
    sum: Option<Mat<f64>>,
    /// Lower triangle, row-major, half precision (half mode).
    half: Vec<half::f16>,
    half_bf: Vec<half::bf16>,
    scratch: Mat<f32>,
    /// Scaled rows (row-major, `dim` wide) waiting for the next rank-k update.
    pending: Vec<f32>,
}

/// Rows gathered before a rank-k update: enough to keep the product compute-bound and to make
/// the pass over the float64 sum (memory-bound) rare.
pub const FLUSH_ROWS: usize = 2048;

impl CovarianceAccumulator {
    /// An accumulator on the host (faer), for a model on the CPU.
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
            samples: 0,
            sum: Sum::Host(HostSum {
                precision,
                sum,
                half,
                half_bf,
                scratch: Mat::zeros(dim, dim),
                pending: vec![],
            }),
        }
    }

    /// An accumulator whose sum is candle tensor ops on `device` (any device, the CPU
    /// included): float32, or the half dtype of [`CovariancePrecision::Half`].
    pub fn on_device(dim: usize, precision: CovariancePrecision, device: &Device) -> Result<Self> {
        Ok(Self {
            dim,
            samples: 0,
            sum: Sum::Tensor(TensorSum::new(dim, precision.resolve(DType::F32), device)?),
        })
    }

    /// The faster accumulator for inputs on `device`: faer on the CPU, tensor ops elsewhere.
    pub fn for_device(dim: usize, precision: CovariancePrecision, device: &Device) -> Result<Self> {
        if device.is_cpu() {
            Ok(Self::new(dim, precision))
        } else {
            Self::on_device(dim, precision, device)
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
        match &mut self.sum {
            Sum::Host(h) => {
                self.samples += h.add_batch(x, lengths, module)?;
                if h.pending.len() / d >= FLUSH_ROWS {
                    h.flush(d, self.samples, module)?;
                }
            }
            Sum::Tensor(s) => {
                self.samples += s.add_batch(x, lengths, module)?;
                if s.pending_rows() >= TENSOR_FLUSH_ROWS {
                    s.flush(self.samples, module)?;
                }
            }
        }
        Ok(())
    }

    /// The finished covariance, divided by the sample count, as a full symmetric float32 matrix.
    pub fn finish(&mut self, module: &str) -> Result<Mat<f32>> {
        match &mut self.sum {
            Sum::Host(h) => h.flush(self.dim, self.samples, module)?,
            Sum::Tensor(s) => s.flush(self.samples, module)?,
        }
        if self.samples == 0 {
            return Err(CordaError::Data(format!(
                "{module} saw no calibration tokens; the calibration set is empty"
            )));
        }
        match &self.sum {
            Sum::Host(h) => Ok(h.finish(self.dim, self.samples)),
            Sum::Tensor(s) => s.finish(self.samples),
        }
    }
}

/// The error for a calibration sample whose input is unusable (max = `m`).
pub(super) fn invalid_input(module: &str, m: f32) -> CordaError {
    CordaError::Numerics(format!(
        "invalid value in the input of {module} for a calibration sample (max = {m}); the model produces NaN/inf or all-zero activations: check the model weights and the dtype (float16 models may overflow: use float32 or bfloat16)"
    ))
}

/// The error for a half-precision sum that overflowed after `samples` samples.
pub(super) fn half_overflow(module: &str, samples: usize) -> CordaError {
    CordaError::Numerics(format!(
        "the half-precision covariance of {module} overflowed after {samples} samples; drop use_float16_for_covariance (float32 needs twice the memory) or use fewer/shorter calibration samples"
    ))
}

impl HostSum {
    /// Scale and stack the batch's real rows; returns the number of samples added.
    fn add_batch(&mut self, x: &Tensor, lengths: &[usize], module: &str) -> Result<usize> {
        let (_, t, d) = x.dims3()?;
        let data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut added = 0;
        for (i, &len) in lengths.iter().enumerate() {
            let rows = &data[i * t * d..(i * t + len.min(t)) * d];
            if rows.is_empty() {
                continue;
            }
            // PEFT: input / torch.max(input).abs(), the signed maximum.
            let m = rows.iter().copied().fold(f32::NEG_INFINITY, f32::max).abs();
            if !m.is_finite() || m == 0.0 || rows.iter().any(|v| !v.is_finite()) {
                return Err(invalid_input(module, m));
            }
            self.pending.extend(rows.iter().map(|v| v / m));
            added += 1;
        }
        Ok(added)
    }

    /// Add the pending rows' `XᵀX` to the running sum.
    fn flush(&mut self, d: usize, samples: usize, module: &str) -> Result<()> {
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
                    return Err(half_overflow(module, samples));
                }
            }
        }
        Ok(())
    }

    /// The flushed sum divided by `samples`, full and symmetric.
    fn finish(&self, d: usize, samples: usize) -> Mat<f32> {
        let n = samples as f64;
        let get = |i: usize, j: usize| -> f64 {
            match self.precision {
                CovariancePrecision::Float32 => self.sum.as_ref().expect("float32")[(i, j)],
                CovariancePrecision::Half(DType::BF16) => self.half_bf[i * d + j].to_f64(),
                _ => self.half[i * d + j].to_f64(),
            }
        };
        Mat::from_fn(d, d, |i, j| {
            let v = if i >= j { get(i, j) } else { get(j, i) };
            (v / n) as f32
        })
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

    /// Three batches of right-padded samples with varied scales (the padding is garbage).
    fn batches(d: usize) -> Vec<(Tensor, Vec<usize>)> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let shapes = [(2, 9, vec![9, 4]), (3, 5, vec![1, 5, 3]), (1, 7, vec![7])];
        shapes
            .into_iter()
            .map(|(b, t, lengths)| {
                let v: Vec<f32> = (0..b * t * d)
                    .map(|k| rng.gen_range(-1.0f32..1.0) * (1 + k % 5) as f32)
                    .collect();
                (
                    Tensor::from_vec(v, (b, t, d), &Device::Cpu).unwrap(),
                    lengths,
                )
            })
            .collect()
    }

    fn accumulate(mut acc: CovarianceAccumulator, d: usize) -> Mat<f32> {
        for (x, lengths) in batches(d) {
            acc.add_batch(&x, &lengths, "m").unwrap();
        }
        assert_eq!(acc.samples, 6);
        acc.finish("m").unwrap()
    }

    fn max_rel_diff(a: &Mat<f32>, b: &Mat<f32>) -> f64 {
        let scale = (0..a.nrows())
            .map(|i| a[(i, i)].abs() as f64)
            .fold(0.0, f64::max);
        let mut worst = 0.0f64;
        for i in 0..a.nrows() {
            for j in 0..a.ncols() {
                worst = worst.max((a[(i, j)] - b[(i, j)]).abs() as f64 / scale);
                assert_eq!(b[(i, j)], b[(j, i)], "symmetric");
            }
        }
        worst
    }

    #[test]
    fn tensor_ops_on_the_cpu_match_the_host_sum() {
        // The device-generic path (what a GPU runs) against the faer path, same inputs.
        let d = 24;
        let host = accumulate(
            CovarianceAccumulator::new(d, CovariancePrecision::Float32),
            d,
        );
        let dev = accumulate(
            CovarianceAccumulator::on_device(d, CovariancePrecision::Float32, &Device::Cpu)
                .unwrap(),
            d,
        );
        let err = max_rel_diff(&host, &dev);
        assert!(err < 1e-6, "float32: {err:e}");
        for (dtype, tol) in [(DType::F16, 4e-3), (DType::BF16, 3e-2)] {
            let p = CovariancePrecision::Half(dtype);
            let host_half = accumulate(CovarianceAccumulator::new(d, p), d);
            let dev_half = accumulate(
                CovarianceAccumulator::on_device(d, p, &Device::Cpu).unwrap(),
                d,
            );
            let err = max_rel_diff(&host, &dev_half);
            assert!(err < tol, "{dtype:?} vs float32: {err:e}");
            let err = max_rel_diff(&host_half, &dev_half);
            assert!(err < tol, "{dtype:?} host vs tensor: {err:e}");
            assert!(
                max_rel_diff(&host, &dev_half) > 0.0,
                "{dtype:?} really is half"
            );
        }
    }

    #[test]
    fn tensor_path_checks_inputs_and_overflow() {
        let nan = Tensor::from_vec(vec![f32::NAN, 1.0, 5.0, 5.0], (2, 1, 2), &Device::Cpu).unwrap();
        let mut acc =
            CovarianceAccumulator::on_device(2, CovariancePrecision::Float32, &Device::Cpu)
                .unwrap();
        let e = acc.add_batch(&nan, &[1, 1], "m").unwrap_err().to_string();
        assert!(e.contains("NaN"), "{e}");
        // A NaN in the padding is ignored.
        let mut acc =
            CovarianceAccumulator::on_device(2, CovariancePrecision::Float32, &Device::Cpu)
                .unwrap();
        let padded =
            Tensor::from_vec(vec![-3.0f32, 1.0, f32::NAN, 2.0], (1, 2, 2), &Device::Cpu).unwrap();
        acc.add_batch(&padded, &[1], "m").unwrap();
        let c = acc.finish("m").unwrap();
        // Signed max 1 → rows unchanged: [[9, -3], [-3, 1]].
        assert_eq!((c[(0, 0)], c[(0, 1)], c[(1, 1)]), (9.0, -3.0, 1.0));
        let big =
            Tensor::from_vec(vec![-200.0f32, 1.0, 1.0, 1.0], (1, 2, 2), &Device::Cpu).unwrap();
        let mut acc = CovarianceAccumulator::on_device(
            2,
            CovariancePrecision::Half(DType::F16),
            &Device::Cpu,
        )
        .unwrap();
        for _ in 0..10 {
            acc.add_batch(&big, &[2], "m").unwrap();
        }
        let err = acc.finish("m").expect_err("overflow detected").to_string();
        assert!(err.contains("overflowed"), "{err}");
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

/// Which accumulator is faster on the CPU (the reason `for_device` keeps faer there):
/// `cargo test --release -p corda-core --lib -- --ignored covariance_speed --nocapture`.
#[cfg(test)]
mod speed {
    use super::*;
    use candle_core::Device;

    #[test]
    #[ignore = "timing, run by hand"]
    fn covariance_speed_host_vs_tensor_on_cpu() {
        let (d, t, b) = (576, 512, 4);
        let x = Tensor::randn(0f32, 1.0, (b, t, d), &Device::Cpu).unwrap();
        let lengths = vec![t; b];
        for (name, mut acc) in [
            (
                "faer",
                CovarianceAccumulator::new(d, CovariancePrecision::Float32),
            ),
            (
                "tensor",
                CovarianceAccumulator::on_device(d, CovariancePrecision::Float32, &Device::Cpu)
                    .unwrap(),
            ),
        ] {
            let start = std::time::Instant::now();
            for _ in 0..8 {
                acc.add_batch(&x, &lengths, "m").unwrap();
            }
            acc.finish("m").unwrap();
            let s = start.elapsed().as_secs_f64();
            let flop = 2.0 * (8 * b * t) as f64 * (d * d) as f64;
            eprintln!(
                "{name}: {:.3} s for {} rows of width {d} ({:.1} GFLOP/s of full XᵀX)",
                s,
                8 * b * t,
                flop / s / 1e9
            );
        }
    }
}
