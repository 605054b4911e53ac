//! Rotary embedding in transformers' rotate_half layout, `x·cos + rotate_half(x)·sin`, with its
//! own backward on the CPU.
//!
//! Composed from candle ops it is a narrow, a negation, a concatenation, two broadcast products
//! and a sum forward, about as many passes backward, each a fresh tensor the size of the
//! queries or keys, all on one thread (candle's element-wise ops run on one in fine-tuning).
//! Here each direction is one parallel pass.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use super::frozen::{f32_slice, with_host_f32};
use crate::util::simd::vectorized;
use crate::Result;

/// `x·cos + rotate_half(x)·sin` for `x` (batch, heads, seq, head_dim) and tables (1 or batch,
/// 1, seq, head_dim).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && [x, cos, sin].iter().all(|t| t.dtype() == DType::F32) {
        let op = FusedRope {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
        };
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    composed(x, cos, sin)
}

/// The same function from candle's ops (other devices and dtypes; the fused op's reference).
fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(
        &[
            &x.narrow(D::Minus1, half, half)?.neg()?,
            &x.narrow(D::Minus1, 0, half)?,
        ],
        D::Minus1,
    )?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

struct FusedRope {
    cos: Tensor,
    sin: Tensor,
}

/// How `y = x·c + rotate_half(x)·s` runs over one (seq × head_dim) block, forward or backward.
#[derive(Clone, Copy)]
enum Direction {
    /// `y₁ = x₁c₁ − x₂s₁`, `y₂ = x₂c₂ + x₁s₂`.
    Forward,
    /// The transpose: `dx₁ = g₁c₁ + g₂s₂`, `dx₂ = g₂c₂ − g₁s₁`.
    Backward,
}

impl FusedRope {
    /// Applies the rotation (or its transpose) to contiguous `x` of `shape`.
    fn apply(&self, x: &[f32], shape: &Shape, dir: Direction) -> candle_core::Result<Vec<f32>> {
        let (b, _heads, t, hd) = shape.dims4()?;
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (Storage::Cpu(cs), Storage::Cpu(ss)) = (&*cs, &*ss) else {
            candle_core::bail!("rope: tables are not on the CPU")
        };
        let (Some(cos), Some(sin)) = (f32_slice(cs, cl), f32_slice(ss, sl)) else {
            candle_core::bail!("rope: expected contiguous float32 tables")
        };
        let rows = self.cos.dim(0)?;
        if hd % 2 != 0
            || self.cos.dims() != self.sin.dims()
            || self.cos.dims() != [rows, 1, t, hd]
            || (rows != 1 && rows != b)
        {
            candle_core::bail!(
                "rope: input {shape:?} and tables {:?} do not fit",
                self.cos.shape()
            );
        }
        let (half, block) = (hd / 2, t * hd);
        let heads = shape.elem_count() / (b * block).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(block.max(1))
            .zip(x.par_chunks(block.max(1)))
            .enumerate()
            .for_each(|(i, (o, x))| {
                let table = if rows == 1 { 0 } else { i / heads } * block;
                let (cos, sin) = (&cos[table..table + block], &sin[table..table + block]);
                vectorized!({
                    for ((o, x), (c, s)) in o
                        .chunks_mut(hd)
                        .zip(x.chunks(hd))
                        .zip(cos.chunks(hd).zip(sin.chunks(hd)))
                    {
                        let (o1, o2) = o.split_at_mut(half);
                        let (x1, x2) = x.split_at(half);
                        for j in 0..half {
                            let (c1, c2, s1, s2) = (c[j], c[half + j], s[j], s[half + j]);
                            match dir {
                                Direction::Forward => {
                                    o1[j] = x1[j] * c1 + -x2[j] * s1;
                                    o2[j] = x2[j] * c2 + x1[j] * s2;
                                }
                                Direction::Backward => {
                                    o1[j] = x1[j] * c1 + x2[j] * s2;
                                    o2[j] = x2[j] * c2 - x1[j] * s1;
                                }
                            }
                        }
                    }
                })
            });
        Ok(out)
    }
}

impl CustomOp1 for FusedRope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some(x) = f32_slice(s, l) else {
            candle_core::bail!("rope: expected a contiguous float32 input")
        };
        let y = self.apply(x, l.shape(), Direction::Forward)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = with_host_f32([grad], |[g]| self.apply(g, x.shape(), Direction::Backward))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::tensor::assert_same_gradients;
    use candle_core::{Device, Var};

    /// The fused op equals the composed ops, values bitwise and gradients within 1e-6, with one
    /// table for the batch and with one table per row.
    #[test]
    fn matches_the_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let (b, h, t, hd) = (2, 3, 5, 8);
        let vals = |n: usize, m: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * m % 101) as f32 / 101.0 - 0.5) * 4.0)
                .collect()
        };
        for rows in [1, b] {
            let cos = Tensor::from_vec(vals(rows * t * hd, 7), (rows, 1, t, hd), &dev).unwrap();
            let sin = Tensor::from_vec(vals(rows * t * hd, 13), (rows, 1, t, hd), &dev).unwrap();
            let probe = Tensor::from_vec(vals(b * h * t * hd, 31), (b, h, t, hd), &dev).unwrap();
            let x = Var::from_vec(vals(b * h * t * hd, 17), (b, h, t, hd), &dev).unwrap();
            let xt = x.as_tensor();
            let fused = rope(xt, &cos, &sin).unwrap();
            let composed = composed(xt, &cos, &sin).unwrap();
            assert_eq!(
                fused.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                composed.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "values, {rows} table rows"
            );
            assert_same_gradients(&fused, &composed, &probe, &[xt], 1e-6);
        }
    }
}
