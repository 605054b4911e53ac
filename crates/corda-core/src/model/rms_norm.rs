//! RMSNorm as in transformers, `w ⊙ x / sqrt(mean(x²) + eps)` per row, with its own backward.
//!
//! Composed from candle ops it is six element-wise ops forward and about twice as many
//! backward, each a fresh (tokens × hidden) tensor, plus candle's gradient accumulation (a
//! zeroed tensor and an add per edge), all on one thread: on the benchmark model those passes
//! were most of the time a fine-tuning step ran on one core of two (Intel Xeon profile,
//! docs/benchmarks.md). Here each direction is one parallel pass over the rows.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::frozen::{f32_slice, with_host_f32};
use crate::util::simd::vectorized;
use crate::Result;

/// RMSNorm over the last dimension, in float32.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            let op = FusedRmsNorm { eps: self.eps };
            return Ok(x.contiguous()?.apply_op2(&self.weight.contiguous()?, op)?);
        }
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

struct FusedRmsNorm {
    eps: f64,
}

impl FusedRmsNorm {
    /// `1 / sqrt(mean(x²) + eps)` of one row. The squares and their mean are float32 values as
    /// in transformers (the sum is taken in float64), so a row whose squares overflow float32
    /// normalizes to zeros there and here alike: that is how a diverged adapter shows as
    /// degenerate logits rather than as plausible ones.
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ss: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let var = ss as f32 / row.len() as f32;
        (1.0 / (var as f64 + self.eps).sqrt()) as f32
    }
}

fn f32_data<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    f32_slice(s, l)
        .ok_or_else(|| candle_core::Error::Msg("rms norm: expected contiguous float32".into()))
}

impl CustomOp2 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let d = w.len();
        if l1.shape().dims().last() != Some(&d) {
            candle_core::bail!("rms norm: input {:?}, weight of {d}", l1.shape());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d.max(1))
            .zip(x.par_chunks(d.max(1)))
            .for_each(|(o, x)| {
                let r = self.inv_rms(x);
                vectorized!({
                    for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                        *o = x * r * w;
                    }
                })
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With `r = 1/rms(x)`: `dx = r (w ⊙ g) − x r³ mean(w ⊙ g ⊙ x)`, `dw = Σ_rows g ⊙ x r`
    /// (only when the weight is trained).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        with_host_f32([x, w, grad], |[xv, wv, g]| {
            let d = wv.len().max(1);
            let mut dx = vec![0f32; xv.len()];
            let rs: Vec<f32> = dx
                .par_chunks_mut(d)
                .zip(xv.par_chunks(d).zip(g.par_chunks(d)))
                .map(|(dx, (x, g))| {
                    let r = self.inv_rms(x);
                    let dot: f64 = (0..x.len())
                        .map(|i| (wv[i] * g[i]) as f64 * x[i] as f64)
                        .sum();
                    let c = (dot / d as f64) as f32 * r * r * r;
                    vectorized!({
                        for i in 0..x.len() {
                            dx[i] = r * wv[i] * g[i] - x[i] * c;
                        }
                    });
                    r
                })
                .collect();
            let dw = if w.track_op() {
                let mut dw = vec![0f64; d];
                for ((x, g), r) in xv.chunks(d).zip(g.chunks(d)).zip(&rs) {
                    for i in 0..x.len() {
                        dw[i] += (g[i] * x[i] * r) as f64;
                    }
                }
                let dw: Vec<f32> = dw.into_iter().map(|v| v as f32).collect();
                Some(Tensor::from_vec(dw, w.shape(), w.device())?)
            } else {
                None
            };
            Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), dw))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op equals the composed candle ops, values and both gradients, on rows with an
    /// outlier feature (as real activations have).
    #[test]
    fn matches_the_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let (rows, d) = (37, 48);
        let xs: Vec<f32> = (0..rows * d)
            .map(|i| {
                let v = ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 3.0;
                if i % d == 5 {
                    v * 300.0
                } else {
                    v
                }
            })
            .collect();
        let ws: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 * 0.2).collect();
        let probe = Tensor::arange(0f32, (rows * d) as f32, &dev)
            .unwrap()
            .reshape((1, rows, d))
            .unwrap()
            .sin()
            .unwrap();
        let run = |fused: bool| {
            let x = Var::from_vec(xs.clone(), (1, rows, d), &dev).unwrap();
            let w = Var::from_vec(ws.clone(), d, &dev).unwrap();
            let norm = RmsNorm {
                weight: w.as_tensor().clone(),
                eps: 1e-5,
            };
            let y = if fused {
                norm.forward(x.as_tensor()).unwrap()
            } else {
                let var = x
                    .as_tensor()
                    .sqr()
                    .unwrap()
                    .mean_keepdim(D::Minus1)
                    .unwrap();
                let r = (var + 1e-5).unwrap().sqrt().unwrap();
                x.as_tensor()
                    .broadcast_div(&r)
                    .unwrap()
                    .broadcast_mul(w.as_tensor())
                    .unwrap()
            };
            let grads = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (v(&y), v(grads.get(&x).unwrap()), v(grads.get(&w).unwrap()))
        };
        let (a, b) = (run(true), run(false));
        for (x, y, tol) in [(&a.0, &b.0, 2e-6), (&a.1, &b.1, 2e-5), (&a.2, &b.2, 2e-5)] {
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (p, q) in x.iter().zip(y.iter()) {
                assert!((p - q).abs() <= tol * scale, "{p} vs {q} (scale {scale})");
            }
        }
    }

    /// Rows beyond float32's range normalize to zeros, as the composed ops (and transformers)
    /// give; ordinary rows beside them are unaffected.
    #[test]
    fn overflowing_rows_normalize_to_zeros() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3e19f32, 1.0, -2.0], [1.0, 2.0, 2.0]], &dev).unwrap();
        let w = Tensor::new(&[1f32, 1.0, 1.0], &dev).unwrap();
        let y = RmsNorm {
            weight: w,
            eps: 0.0,
        }
        .forward(&x)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        assert_eq!(y[0], vec![0.0, 0.0, -0.0]);
        let r = 1.0 / 3f32.sqrt();
        assert!(
            (y[1][0] - r).abs() < 1e-6 && (y[1][2] - 2.0 * r).abs() < 1e-6,
            "{:?}",
            y[1]
        );
    }

    /// A frozen weight gets no gradient computed.
    #[test]
    fn frozen_weight_has_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![1f32, -2.0, 3.0, 0.5, 0.0, 4.0], (2, 3), &dev).unwrap();
        let w = Tensor::new(&[1f32, 2.0, 0.5], &dev).unwrap();
        let norm = RmsNorm {
            weight: w.clone(),
            eps: 1e-6,
        };
        let grads = norm
            .forward(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&w).is_none());
        assert!(grads.get(&x).is_some());
    }
}
