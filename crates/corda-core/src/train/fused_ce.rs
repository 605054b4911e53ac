//! Cross-entropy of selected rows as one op with its own backward.
//!
//! Composed from candle ops, `-log_softmax(z)[y]` makes five full passes over the (tokens ×
//! vocab) logits forward and as many backward, each allocating a tensor of that size; with a
//! 32k vocabulary that dominates a small model's step. This op reads the logits once forward
//! (one row at a time: max, log-sum-exp, pick) and once backward (`softmax(z) − onehot(y)`,
//! scaled by the incoming gradient), and stores nothing but the logits it was given.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::Result;

struct CrossEntropyRows {
    /// Target class of each row.
    targets: Vec<u32>,
}

fn row_logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
    max + sum.ln()
}

impl CustomOp1 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("cross-entropy: logits must be float32")
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("cross-entropy: logits must be contiguous")
        };
        let data = &data[start..end];
        let out: Vec<f32> = (0..n)
            .map(|i| {
                let row = &data[i * v..(i + 1) * v];
                row_logsumexp(row) - row[self.targets[i] as usize]
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let logits = arg.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * v];
        for i in 0..n {
            let row = &logits[i * v..(i + 1) * v];
            let lse = row_logsumexp(row);
            let dst = &mut out[i * v..(i + 1) * v];
            for (d, z) in dst.iter_mut().zip(row) {
                *d = (z - lse).exp() * g[i];
            }
            dst[self.targets[i] as usize] -= g[i];
        }
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}

/// `-log softmax(logits)[targets]` per row: logits (n, vocab) float32, targets in 0..vocab.
/// On the CPU this is the fused op; elsewhere the composed (differentiable) candle ops.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    if logits.device().is_cpu() {
        return Ok(logits.apply_op1(CrossEntropyRows {
            targets: targets.to_vec(),
        })?);
    }
    let n = targets.len();
    let t = Tensor::from_vec(targets.to_vec(), (n, 1), logits.device())?;
    let max = logits.max_keepdim(candle_core::D::Minus1)?.detach();
    let diff = logits.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(candle_core::D::Minus1)?.log()?;
    Ok(diff
        .broadcast_sub(&lse)?
        .gather(&t, candle_core::D::Minus1)?
        .neg()?
        .squeeze(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composed_ops_forward_and_backward() {
        let dev = Device::Cpu;
        let z: Vec<f32> = (0..3 * 7)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect();
        let targets = [3u32, 0, 6];
        let fused = Var::from_vec(z.clone(), (3, 7), &dev).unwrap();
        let plain = Var::from_vec(z, (3, 7), &dev).unwrap();
        let w = Tensor::new(&[1.0f32, 2.0, 0.5], &dev).unwrap();
        let lf = (cross_entropy_rows(fused.as_tensor(), &targets).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap();
        let t = Tensor::new(&[[3u32], [0], [6]], &dev).unwrap();
        let lp = candle_nn::ops::log_softmax(plain.as_tensor(), candle_core::D::Minus1)
            .unwrap()
            .gather(&t, 1)
            .unwrap()
            .neg()
            .unwrap()
            .squeeze(1)
            .unwrap();
        let lp = (lp * &w).unwrap().sum_all().unwrap();
        let (a, b) = (
            lf.to_scalar::<f32>().unwrap(),
            lp.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let gf = lf
            .backward()
            .unwrap()
            .get(&fused)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gp = lp
            .backward()
            .unwrap()
            .get(&plain)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in gf.iter().zip(&gp) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }
}
