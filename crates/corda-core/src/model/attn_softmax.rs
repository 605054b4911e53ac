//! The attention softmax `softmax(scale · scores + mask)` over the last dimension as one op.
//!
//! Composed from candle ops (scale, add the mask, max, subtract, exp, sum, divide) it keeps
//! five (batch, heads, seq, seq) tensors alive for the backward pass and makes as many passes
//! over them; at batch 4 × 512 tokens that is ~270 MB more per layer than needed. This op keeps
//! only its input and its output and back-propagates with the output alone:
//! `dx = scale · y ⊙ (g − Σ_j g_j y_j)`. The mask is a constant (no gradient).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

use crate::{CordaError, Result};

/// `softmax(scale · x + mask)` over the last dimension: `x` (b, h, q, k) float32, `mask`
/// broadcastable to it with shape (b, 1, q, k) or (1, 1, q, k).
pub fn masked_softmax(x: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 4 {
        let y = (x * scale)?.broadcast_add(mask)?;
        return Ok(candle_nn::ops::softmax(&y, D::Minus1)?);
    }
    let (b, _, q, k) = x.dims4()?;
    let (mb, mh, mq, mk) = mask.dims4()?;
    if mh != 1 || mq != q || mk != k || (mb != b && mb != 1) {
        return Err(CordaError::Invalid(format!(
            "attention mask {:?} does not fit scores {:?}",
            mask.dims(),
            x.dims()
        )));
    }
    let op = MaskedSoftmax {
        mask: mask.to_dtype(DType::F32)?.contiguous()?,
        scale: scale as f32,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

struct MaskedSoftmax {
    mask: Tensor,
    scale: f32,
}

impl MaskedSoftmax {
    /// The mask row for row `row` of the flattened (b·h·q) scores.
    fn mask_row<'a>(&self, mask: &'a [f32], row: usize, h: usize, q: usize, k: usize) -> &'a [f32] {
        let per_batch = mask.len() / (q * k);
        let bi = (row / (h * q)) % per_batch.max(1);
        let qi = row % q;
        &mask[(bi * q + qi) * k..(bi * q + qi + 1) * k]
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("masked softmax: expected a contiguous float32 tensor"),
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (_, h, q, k) = l.shape().dims4()?;
        let x = contiguous_f32(s, l)?;
        let (ms, ml) = self.mask.storage_and_layout();
        let candle_core::Storage::Cpu(ms) = &*ms else {
            candle_core::bail!("masked softmax: the mask is not on the CPU")
        };
        let mask = contiguous_f32(ms, ml)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(k)
            .zip(x.par_chunks(k))
            .enumerate()
            .for_each(|(row, (y, xr))| {
                let m = self.mask_row(mask, row, h, q, k);
                let mut max = f32::NEG_INFINITY;
                for ((yi, &xi), &mi) in y.iter_mut().zip(xr).zip(m) {
                    *yi = xi * self.scale + mi;
                    max = max.max(*yi);
                }
                let mut sum = 0f32;
                for yi in y.iter_mut() {
                    *yi = (*yi - max).exp();
                    sum += *yi;
                }
                let inv = 1.0 / sum;
                y.iter_mut().for_each(|yi| *yi *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // dx = scale · y ⊙ (g − Σ_j g_j y_j), with the row sums kept as (…, 1).
        let g = grad.contiguous()?;
        let dot = (&g * res)?.sum_keepdim(D::Minus1)?;
        let dx = (res * g.broadcast_sub(&dot)?)?;
        Ok(Some((dx * self.scale as f64)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composed_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let (b, h, q, k) = (2, 3, 5, 5);
        let vals: Vec<f32> = (0..b * h * q * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let x = Var::from_vec(vals, (b, h, q, k), &dev).unwrap();
        // Causal mask, and the second sample's last key padded out.
        let mut m = vec![0f32; b * q * k];
        for bi in 0..b {
            for i in 0..q {
                for j in 0..k {
                    if j > i || (bi == 1 && j == k - 1) {
                        m[(bi * q + i) * k + j] = f32::MIN;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, q, k), &dev).unwrap();
        let w = Tensor::arange(0f32, (b * h * q * k) as f32, &dev)
            .unwrap()
            .reshape((b, h, q, k))
            .unwrap()
            .sin()
            .unwrap();
        let scale = 0.125;
        let fused = masked_softmax(x.as_tensor(), &mask, scale).unwrap();
        let composed = candle_nn::ops::softmax(
            &(x.as_tensor() * scale)
                .unwrap()
                .broadcast_add(&mask)
                .unwrap(),
            D::Minus1,
        )
        .unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(diff(&fused, &composed) < 1e-6);
        let gf = (&fused * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (gf, gc) = (
            gf.get(x.as_tensor()).unwrap(),
            gc.get(x.as_tensor()).unwrap(),
        );
        assert!(diff(gf, gc) < 1e-6, "gradient differs by {}", diff(gf, gc));
        assert!(
            gc.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 1e-3
        );
    }
}
