//! Cross-entropy of selected rows as one op with its own backward.
//!
//! Composed from candle ops, `-log_softmax(z)[y]` makes five full passes over the (tokens ×
//! vocab) logits forward and as many backward, each allocating a tensor of that size; with a
//! 32k vocabulary that dominates a small model's step. This op reads the logits once forward
//! (one row at a time: max, log-sum-exp, pick) and once backward (`softmax(z) − onehot(y)`,
//! scaled by the incoming gradient), and stores nothing but the logits it was given.
//!
//! [`head_cross_entropy_rows`] goes one step further and takes the LM head into the op: the
//! (tokens × vocab) logits then exist only one block of rows × vocabulary entries at a time
//! (an online softmax across the vocabulary blocks), and the backward keeps
//! just the (tokens × hidden) gradient, computed in the forward pass while each block of
//! logits is at hand. With a 32k–50k vocabulary the logits and their gradient are the largest
//! tensors of a small model's step.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::model::frozen::{f32_slice, frozen_matmul_t};
use crate::util::exp;
use crate::util::product::matmul;
use crate::Result;

struct CrossEntropyRows {
    /// Target class of each row.
    targets: Vec<u32>,
}

fn row_logsumexp(row: &[f32]) -> f32 {
    let max = exp::max(row);
    let sum: f32 = row.iter().map(|v| exp::exp(v - max)).sum();
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
                *d = exp::exp(z - lse) * g[i];
            }
            dst[self.targets[i] as usize] -= g[i];
        }
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}

/// The kept gradient's lock was poisoned by a panic elsewhere: an error, not a second panic.
fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("head cross-entropy: the kept gradient's lock is poisoned".into())
}

/// Rows of logits computed at once by [`HeadCrossEntropy`]: tall enough for full-rate products
/// (the gemm crate's `h Wᵀ` at 256 rows ran at 188 GFLOP/s against 306 at 1024 on an Intel
/// Xeon; one fine-tuning step 5% faster).
const HEAD_BLOCK_ROWS: usize = 1024;

/// Vocabulary entries per block of logits: 1024 × 8192 float32 is 32 MiB whatever the
/// vocabulary (a whole 1024-row block was 128 MiB at 32k entries, 500 MiB at Llama 3's 128k,
/// and set the peak of a checkpointed step), still wide enough for full-rate products.
const HEAD_BLOCK_COLS: usize = 8192;

/// One row's running log-sum-exp over the vocabulary blocks seen so far.
#[derive(Clone, Copy)]
struct RowStats {
    max: f32,
    /// Σ exp(z − max) over the blocks seen.
    sum: f32,
    /// The target's logit, once its block has been seen.
    target_logit: f32,
}

/// `-log softmax(h Wᵀ)[y]` per row with a frozen head `W`; the gradient with respect to `h`,
/// `(softmax(h Wᵀ) − onehot(y)) · W`, is computed in the forward pass block by block (rows,
/// and vocabulary entries within them) and kept until the backward scales its rows by the
/// incoming gradient.
struct HeadCrossEntropy {
    /// (vocab, hidden), contiguous float32.
    head: Tensor,
    targets: Vec<u32>,
    /// d loss_i / d h_i, row-major (rows × hidden); taken (freed) by the backward.
    grad: Mutex<Option<Vec<f32>>>,
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = l.shape().dims2()?;
        let (v, d2) = self.head.dims2()?;
        if d != d2 || self.targets.len() != n {
            candle_core::bail!(
                "head cross-entropy: {n} rows of {d} features, head ({v}, {d2}), {} targets",
                self.targets.len()
            );
        }
        if let Some(y) = self.targets.iter().find(|&&y| y as usize >= v) {
            candle_core::bail!("head cross-entropy: label {y} is outside the vocabulary ({v})");
        }
        let (ws, wl) = self.head.storage_and_layout();
        let (Storage::Cpu(ws), Some(h)) = (&*ws, f32_slice(s, l)) else {
            candle_core::bail!("head cross-entropy: expected contiguous float32 CPU tensors")
        };
        let Some(w) = f32_slice(ws, wl) else {
            candle_core::bail!("head cross-entropy: the head must be contiguous float32")
        };
        let w = MatRef::from_row_major_slice(w, v, d);
        let mut losses = vec![0f32; n];
        let mut grad = vec![0f32; n * d];
        // One buffer for every block of logits, overwritten by each product.
        let mut block = vec![0f32; HEAD_BLOCK_ROWS.min(n) * HEAD_BLOCK_COLS.min(v)];
        for r0 in (0..n).step_by(HEAD_BLOCK_ROWS) {
            let rows = HEAD_BLOCK_ROWS.min(n - r0);
            let hb = &h[r0 * d..(r0 + rows) * d];
            let gb = &mut grad[r0 * d..(r0 + rows) * d];
            let targets = &self.targets[r0..r0 + rows];
            let mut stats = vec![
                RowStats {
                    max: f32::NEG_INFINITY,
                    sum: 0.0,
                    target_logit: 0.0,
                };
                rows
            ];
            // Online softmax over vocabulary blocks (as flash attention does over keys): the
            // unnormalized Σ exp(z − max) W accumulates in the gradient's rows, rescaled
            // whenever a block raises a row's max.
            for c0 in (0..v).step_by(HEAD_BLOCK_COLS) {
                let cols = HEAD_BLOCK_COLS.min(v - c0);
                let wc = w.subrows(c0, cols);
                let z = &mut block[..rows * cols];
                matmul(
                    MatMut::from_row_major_slice_mut(z, rows, cols),
                    Accum::Replace,
                    MatRef::from_row_major_slice(hb, rows, d),
                    wc.transpose(),
                    1.0,
                    Par::rayon(0),
                );
                z.par_chunks_mut(cols)
                    .zip(gb.par_chunks_mut(d))
                    .zip(stats.par_iter_mut())
                    .zip(targets)
                    .for_each(|(((row, g), st), &y)| {
                        let y = y as usize;
                        if (c0..c0 + cols).contains(&y) {
                            st.target_logit = row[y - c0];
                        }
                        let max = st.max.max(exp::max(row));
                        if max > st.max && st.sum > 0.0 {
                            let f = (st.max - max).exp();
                            st.sum *= f;
                            exp::scale_in_place(g, f);
                        }
                        st.max = max;
                        st.sum += exp::exp_shifted_in_place(row, max);
                    });
                matmul(
                    MatMut::from_row_major_slice_mut(gb, rows, d),
                    Accum::Add,
                    MatRef::from_row_major_slice(z, rows, cols),
                    wc,
                    1.0,
                    Par::rayon(0),
                );
            }
            // Each row becomes softmax(z) W − W[y]; its loss is lse − z[y].
            gb.par_chunks_mut(d)
                .zip(&mut losses[r0..r0 + rows])
                .zip(stats.par_iter())
                .zip(targets)
                .for_each(|(((g, loss), st), &y)| {
                    *loss = st.max + st.sum.ln() - st.target_logit;
                    exp::scale_in_place(g, 1.0 / st.sum);
                    g.iter_mut()
                        .zip(w.row(y as usize).iter())
                        .for_each(|(g, wy)| *g -= wy);
                });
        }
        *self.grad.lock().map_err(|_| poisoned())? = Some(grad);
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, d) = arg.dims2()?;
        let Some(mut grad) = self.grad.lock().map_err(|_| poisoned())?.take() else {
            candle_core::bail!("head cross-entropy: a second backward pass through one forward")
        };
        let g = grad_res.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        grad.par_chunks_mut(d)
            .zip(&g)
            .for_each(|(row, gi)| row.iter_mut().for_each(|x| *x *= gi));
        Ok(Some(Tensor::from_vec(grad, (n, d), arg.device())?))
    }
}

/// `-log softmax(hidden · headᵀ)[targets]` per row, differentiable with respect to `hidden`
/// (n, d) only: `head` (vocab, d) is the frozen LM head. On the CPU this is one op that never
/// holds more than a block of logits (a bfloat16 head is widened to float32 for the call);
/// elsewhere the head product followed by [`cross_entropy_rows`].
pub fn head_cross_entropy_rows(hidden: &Tensor, head: &Tensor, targets: &[u32]) -> Result<Tensor> {
    if !hidden.device().is_cpu() {
        return cross_entropy_rows(&frozen_matmul_t(hidden, head)?, targets);
    }
    let hidden = hidden.to_dtype(DType::F32)?.contiguous()?;
    let head = head.to_dtype(DType::F32)?.contiguous()?;
    Ok(hidden.apply_op1(HeadCrossEntropy {
        head,
        targets: targets.to_vec(),
        grad: Mutex::new(None),
    })?)
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

    /// More rows than one block, and a vocabulary of one block and of two (targets and row
    /// maxima in either, so the online rescaling runs), against the float64 truth.
    #[test]
    fn head_op_matches_the_float64_cross_entropy() {
        for v in [37, HEAD_BLOCK_COLS + 37] {
            head_op_matches(HEAD_BLOCK_ROWS + 45, 12, v);
        }
    }

    #[test]
    fn a_label_outside_the_vocabulary_is_an_error() {
        let dev = Device::Cpu;
        let hidden = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let head = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
        let err = head_cross_entropy_rows(&hidden, &head, &[1, 5])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("label 5 is outside the vocabulary (5)"),
            "{err}"
        );
    }

    fn head_op_matches(n: usize, d: usize, v: usize) {
        let dev = Device::Cpu;
        let h: Vec<f32> = (0..n * d)
            .map(|i| ((i * 7919 % 97) as f32 / 97.0 - 0.5) * 2.0)
            .collect();
        // Later vocabulary rows are larger, so a later block raises most rows' maximum.
        let w: Vec<f32> = (0..v * d)
            .map(|i| ((i * 104729 % 89) as f32 / 89.0 - 0.5) * (1.0 + (i / d) as f32 / v as f32))
            .collect();
        let targets: Vec<u32> = (0..n).map(|i| (i * 13 % v) as u32).collect();
        let scale: Vec<f32> = (0..n).map(|i| 0.5 + (i % 3) as f32).collect();
        let head = Tensor::from_vec(w.clone(), (v, d), &dev).unwrap();
        let hidden = Var::from_vec(h.clone(), (n, d), &dev).unwrap();
        let loss = head_cross_entropy_rows(hidden.as_tensor(), &head, &targets).unwrap();
        let losses = loss.to_vec1::<f32>().unwrap();
        let grad = (loss * Tensor::from_vec(scale.clone(), n, &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(&hidden)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // The float64 truth: loss = lse(z) − z[y], gradient = scale · (softmax(z) W − W[y]).
        for i in 0..n {
            let hi = &h[i * d..(i + 1) * d];
            let z: Vec<f64> = (0..v)
                .map(|j| (0..d).map(|k| hi[k] as f64 * w[j * d + k] as f64).sum())
                .collect();
            let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|x| (x - max).exp()).sum();
            let y = targets[i] as usize;
            let want = max + sum.ln() - z[y];
            let got = losses[i] as f64;
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "loss {got} vs {want}"
            );
            for k in 0..d {
                let pw: f64 = (0..v)
                    .map(|j| (z[j] - max).exp() / sum * w[j * d + k] as f64)
                    .sum();
                let want = scale[i] as f64 * (pw - w[y * d + k] as f64);
                let got = grad[i * d + k] as f64;
                assert!(
                    (got - want).abs() < 2e-6 * scale[i] as f64,
                    "gradient {got} vs {want}"
                );
            }
        }
    }
}
