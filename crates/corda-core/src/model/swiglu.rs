//! The SwiGLU gate `silu(gate) ⊙ up` as one op with its own backward.
//!
//! Composed from candle ops it is a scalar libm `exp` per element and, in the backward, half a
//! dozen element-wise passes, each allocating an (tokens × intermediate) tensor: on the
//! benchmark model that was a tenth of a fine-tuning step. Here the forward is one pass (with
//! the vectorizable [`exp`]) and the backward one more, producing both
//! gradients from the two inputs, which the graph keeps anyway.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::frozen::{f32_slice, with_host_f32};
use crate::util::exp::exp;
use crate::util::simd::vectorized;
use crate::Result;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// The logistic sigmoid.
#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp(-g))
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some(gate), Some(up)) = (f32_slice(s1, l1), f32_slice(s2, l2)) else {
            candle_core::bail!("swiglu: expected contiguous float32 tensors")
        };
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "swiglu: gate {:?} and up {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| {
                vectorized!({
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        *o = g * sigmoid(g) * u;
                    }
                })
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        with_host_f32([gate, up, grad], |[g, u, dy]| {
            let mut dg = vec![0f32; g.len()];
            let mut du = vec![0f32; g.len()];
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(
                    g.par_chunks(CHUNK)
                        .zip(u.par_chunks(CHUNK))
                        .zip(dy.par_chunks(CHUNK)),
                )
                .for_each(|((dg, du), ((g, u), dy))| {
                    vectorized!({
                        for i in 0..g.len() {
                            let s = sigmoid(g[i]);
                            du[i] = dy[i] * g[i] * s;
                            dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                        }
                    })
                });
            let shape = gate.shape();
            Ok((
                Some(Tensor::from_vec(dg, shape, gate.device())?),
                Some(Tensor::from_vec(du, shape, gate.device())?),
            ))
        })
    }
}

/// `silu(gate) ⊙ up`: one op on the CPU for float32, candle's ops otherwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cpu()
        && gate.dtype() == candle_core::DType::F32
        && up.dtype() == candle_core::DType::F32
    {
        return Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?);
    }
    Ok((gate.silu()? * up)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let n = 3 * CHUNK + 17;
        let vals = |m: usize, s: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * m % 1009) as f32 / 1009.0 - 0.5) * s)
                .collect()
        };
        let (g, u, w) = (vals(7919, 24.0), vals(104_729, 3.0), vals(31, 2.0));
        let w = Tensor::from_vec(w, n, &dev).unwrap();
        let run = |fused: bool| {
            let gv = Var::from_vec(g.clone(), n, &dev).unwrap();
            let uv = Var::from_vec(u.clone(), n, &dev).unwrap();
            let y = if fused {
                swiglu(gv.as_tensor(), uv.as_tensor()).unwrap()
            } else {
                (gv.as_tensor().silu().unwrap() * uv.as_tensor()).unwrap()
            };
            let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let v = |t: &Tensor| t.to_vec1::<f32>().unwrap();
            (
                v(&y),
                v(grads.get(&gv).unwrap()),
                v(grads.get(&uv).unwrap()),
            )
        };
        let (a, b) = (run(true), run(false));
        for (x, y) in [(&a.0, &b.0), (&a.1, &b.1), (&a.2, &b.2)] {
            for (p, q) in x.iter().zip(y.iter()) {
                assert!((p - q).abs() <= 2e-6 * q.abs().max(1.0), "{p} vs {q}");
            }
        }
    }
}
