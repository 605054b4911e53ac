//! Masked scaled dot-product attention `softmax(scale · q kᵀ + mask) · v` as one op with its own
//! backward pass.
//!
//! Composed from candle ops, every layer keeps its (batch, heads, seq, seq) scores and
//! probabilities alive until the backward pass (134 MB per layer at batch 4 × 512, 16 heads);
//! PyTorch keeps neither. This op works per (batch, head) block of 64 query rows at a time,
//! keeps only each row's softmax maximum and inverse sum, and recomputes the probabilities in
//! the backward (flash-attention style), so only (rows × keys) scratch per thread is ever alive.
//! Columns past a row block's last allowed key (the causal upper triangle, right padding) are
//! skipped: their probabilities are exactly 0 in float32 as long as the row allows some key.
//! Blocks run in parallel on rayon; the small products go through faer (AVX-512 where the CPU
//! has it, chosen at run time). The mask is a constant (no gradient).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use faer::{Accum, MatMut, MatRef, Par};

use crate::util::exp;
use crate::util::simd::vectorized;
use crate::{CordaError, Result};

/// Query rows per block: the scratch is `ROWS × keys` floats per thread.
const ROWS: usize = 64;

/// `softmax(scale · q kᵀ + mask) · v`: `q` (b, h, tq, d), `k` and `v` (b, h, tk, d) float32,
/// `mask` additive with shape (b, 1, tq, tk) or (1, 1, tq, tk) (0 where a query may attend a
/// key, the most negative float elsewhere). The result is (b, h, tq, d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let fused = q.device().is_cpu()
        && [q, k, v]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.rank() == 4);
    if !fused {
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        return Ok(probs.matmul(v)?);
    }
    let (b, h, tq, d) = q.dims4()?;
    let (mb, mh, mq, tk) = mask.dims4()?;
    if k.dims4()? != (b, h, tk, d)
        || v.dims4()? != (b, h, tk, d)
        || mh != 1
        || mq != tq
        || (mb != b && mb != 1)
    {
        return Err(CordaError::Invalid(format!(
            "attention: q {:?}, k {:?}, v {:?} and mask {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.dims()
        )));
    }
    let mask = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let extent = key_extents(&mask, tk);
    let op = FusedAttention {
        mask,
        dims: Dims { h, tq, tk, mb },
        extent,
        scale: scale as f32,
        stats: Mutex::new(Vec::new()),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// For each mask row, one past its last allowed key (a value above the most negative float);
/// the whole row where none is allowed (the softmax is then uniform, as in the composed form).
fn key_extents(mask: &[f32], tk: usize) -> Vec<usize> {
    mask.chunks(tk.max(1))
        .map(|row| match row.iter().rposition(|&m| m > f32::MIN) {
            Some(j) => j + 1,
            None => tk,
        })
        .collect()
}

struct FusedAttention {
    /// (1 or b, 1, tq, tk), row-major float32.
    mask: Vec<f32>,
    dims: Dims,
    /// Per mask row (mask batch × tq): the keys that can have a nonzero probability.
    extent: Vec<usize>,
    scale: f32,
    /// Per query row (b × h × tq): the softmax maximum and inverse sum, for the backward.
    stats: Mutex<Vec<[f32; 2]>>,
}

/// The shapes of one call, read from the layouts.
#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    tq: usize,
    tk: usize,
    /// Batches in the mask (1 or b).
    mb: usize,
}

/// The contiguous float32 data of an input, or the error that says it is not.
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    super::frozen::f32_slice(s, l).ok_or_else(|| {
        candle_core::Error::Msg("attention: expected a contiguous float32 tensor".into())
    })
}

/// Row-major (rows × cols) views of slices.
fn view(s: &[f32], rows: usize, cols: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(s, rows, cols)
}

fn view_mut(s: &mut [f32], rows: usize, cols: usize) -> MatMut<'_, f32> {
    MatMut::from_row_major_slice_mut(s, rows, cols)
}

/// `dst (+)= lhs · rhs` on this thread (the blocks already run in parallel).
fn product(dst: MatMut<'_, f32>, accum: Accum, lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>) {
    crate::util::product::matmul(dst, accum, lhs, rhs, 1.0f32, Par::Seq);
}

impl FusedAttention {
    /// The mask rows and key extent of query rows `r0..r0 + rows` of (batch, head) block `bh`.
    fn block_mask<'a>(
        &self,
        mask: &'a [f32],
        dims: Dims,
        bh: usize,
        r0: usize,
        rows: usize,
    ) -> (&'a [f32], usize) {
        let mrow = ((bh / dims.h) % dims.mb) * dims.tq + r0;
        let m = &mask[mrow * dims.tk..(mrow + rows) * dims.tk];
        let e = self.extent[mrow..mrow + rows]
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        (m, e)
    }

    /// `s` holds `q kᵀ` (rows × e): overwrite it with `scale · s + mask` (the mask rows have
    /// `tk` columns, of which the first `e` are used).
    fn scale_and_mask(&self, s: &mut [f32], m: &[f32], e: usize, tk: usize) {
        let scale = self.scale;
        vectorized!({
            for (sr, mr) in s.chunks_mut(e).zip(m.chunks(tk)) {
                for (x, &mi) in sr.iter_mut().zip(mr) {
                    *x = *x * scale + mi;
                }
            }
        })
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (_, _, tq, d) = l1.shape().dims4()?;
        let tk = l2.shape().dims4()?.2;
        let (q, k, v) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let (mask, dims) = (&self.mask[..], self.dims);
        let mut out = vec![0f32; q.len()];
        let mut stats = vec![[0f32; 2]; q.len() / d.max(1)];
        out.par_chunks_mut(tq * d)
            .zip(stats.par_chunks_mut(tq))
            .enumerate()
            .for_each(|(bh, (o, st))| {
                let qb = &q[bh * tq * d..(bh + 1) * tq * d];
                let kb = &k[bh * tk * d..(bh + 1) * tk * d];
                let vb = &v[bh * tk * d..(bh + 1) * tk * d];
                let mut s = vec![0f32; ROWS * tk];
                for r0 in (0..tq).step_by(ROWS) {
                    let rows = ROWS.min(tq - r0);
                    let (m, e) = self.block_mask(mask, dims, bh, r0, rows);
                    let s = &mut s[..rows * e];
                    product(
                        view_mut(s, rows, e),
                        Accum::Replace,
                        view(&qb[r0 * d..(r0 + rows) * d], rows, d),
                        view(&kb[..e * d], e, d).transpose(),
                    );
                    self.scale_and_mask(s, m, e, tk);
                    for (sr, stat) in s.chunks_mut(e).zip(&mut st[r0..r0 + rows]) {
                        let max = exp::max(sr);
                        let inv = 1.0 / exp::exp_shifted_in_place(sr, max);
                        exp::scale_in_place(sr, inv);
                        *stat = [max, inv];
                    }
                    product(
                        view_mut(&mut o[r0 * d..(r0 + rows) * d], rows, d),
                        Accum::Replace,
                        view(s, rows, e),
                        view(&vb[..e * d], e, d),
                    );
                }
            });
        *self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = stats;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let (_, _, tq, d) = q.dims4()?;
        let tk = k.dim(2)?;
        let stats = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        let g = grad.contiguous()?;
        super::frozen::with_host_f32([q, k, v, &g], |[qv, kv, vv, gv]| {
            let (mask, dims, scale) = (&self.mask[..], self.dims, self.scale);
            if stats.len() * d != qv.len() {
                candle_core::bail!("attention: backward without its forward statistics");
            }
            let mut dq = vec![0f32; qv.len()];
            let mut dk = vec![0f32; kv.len()];
            let mut dv = vec![0f32; vv.len()];
            dq.par_chunks_mut(tq * d)
                .zip(dk.par_chunks_mut(tk * d))
                .zip(dv.par_chunks_mut(tk * d))
                .enumerate()
                .for_each(|(bh, ((dqb, dkb), dvb))| {
                    let qb = &qv[bh * tq * d..(bh + 1) * tq * d];
                    let kb = &kv[bh * tk * d..(bh + 1) * tk * d];
                    let vb = &vv[bh * tk * d..(bh + 1) * tk * d];
                    let gb = &gv[bh * tq * d..(bh + 1) * tq * d];
                    let st = &stats[bh * tq..(bh + 1) * tq];
                    let mut p = vec![0f32; ROWS * tk];
                    let mut dp = vec![0f32; ROWS * tk];
                    for r0 in (0..tq).step_by(ROWS) {
                        let rows = ROWS.min(tq - r0);
                        let (m, e) = self.block_mask(mask, dims, bh, r0, rows);
                        let (p, dp) = (&mut p[..rows * e], &mut dp[..rows * e]);
                        let qr = view(&qb[r0 * d..(r0 + rows) * d], rows, d);
                        let gr = view(&gb[r0 * d..(r0 + rows) * d], rows, d);
                        // The forward's probabilities, recomputed from its row statistics.
                        product(
                            view_mut(p, rows, e),
                            Accum::Replace,
                            qr,
                            view(&kb[..e * d], e, d).transpose(),
                        );
                        self.scale_and_mask(p, m, e, tk);
                        for (pr, &[max, inv]) in p.chunks_mut(e).zip(&st[r0..r0 + rows]) {
                            vectorized!({
                                pr.iter_mut().for_each(|x| *x = exp::exp(*x - max) * inv)
                            });
                        }
                        // dV += Pᵀ g; dP = g Vᵀ.
                        product(
                            view_mut(&mut dvb[..e * d], e, d),
                            Accum::Add,
                            view(p, rows, e).transpose(),
                            gr,
                        );
                        product(
                            view_mut(dp, rows, e),
                            Accum::Replace,
                            gr,
                            view(&vb[..e * d], e, d).transpose(),
                        );
                        // dS = scale · P ⊙ (dP − Σ_j dP_j P_j), in place of dP.
                        for (dpr, pr) in dp.chunks_mut(e).zip(p.chunks(e)) {
                            let dot: f32 = dpr.iter().zip(pr).map(|(a, b)| a * b).sum();
                            vectorized!({
                                for (x, &y) in dpr.iter_mut().zip(pr) {
                                    *x = y * (*x - dot) * scale;
                                }
                            });
                        }
                        // dQ = dS K; dK += dSᵀ Q.
                        product(
                            view_mut(&mut dqb[r0 * d..(r0 + rows) * d], rows, d),
                            Accum::Replace,
                            view(dp, rows, e),
                            view(&kb[..e * d], e, d),
                        );
                        product(
                            view_mut(&mut dkb[..e * d], e, d),
                            Accum::Add,
                            view(dp, rows, e).transpose(),
                            qr,
                        );
                    }
                });
            let dev = q.device();
            Ok((
                Some(Tensor::from_vec(dq, q.shape(), dev)?),
                Some(Tensor::from_vec(dk, k.shape(), dev)?),
                Some(Tensor::from_vec(dv, v.shape(), dev)?),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(mask)
            .unwrap();
        candle_nn::ops::softmax(&s, D::Minus1)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        crate::util::tensor::max_rel_diff(a, b).unwrap()
    }

    /// Causal, right padding in the second sample, `past` cached keys; more rows than one block.
    fn check(b: usize, h: usize, tq: usize, past: usize, d: usize, window: Option<usize>) {
        let dev = Device::Cpu;
        let tk = past + tq;
        let data = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 23.0)
                .collect()
        };
        let q = Var::from_vec(data(b * h * tq * d, 1), (b, h, tq, d), &dev).unwrap();
        let k = Var::from_vec(data(b * h * tk * d, 2), (b, h, tk, d), &dev).unwrap();
        let v = Var::from_vec(data(b * h * tk * d, 3), (b, h, tk, d), &dev).unwrap();
        let mut m = vec![0f32; b * tq * tk];
        for bi in 0..b {
            for i in 0..tq {
                for j in 0..tk {
                    let qi = past + i;
                    let blocked =
                        j > qi || window.is_some_and(|w| j + w <= qi) || (bi == 1 && j >= tk - 3);
                    if blocked {
                        m[(bi * tq + i) * tk + j] = f32::MIN;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, tq, tk), &dev).unwrap();
        let w = Tensor::arange(0f32, (b * h * tq * d) as f32, &dev)
            .unwrap()
            .reshape((b, h, tq, d))
            .unwrap()
            .sin()
            .unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let fused = attention(qt, kt, vt, &mask, scale).unwrap();
        let reference = composed(qt, kt, vt, &mask, scale);
        assert!(
            max_rel(&fused, &reference) < 1e-6,
            "{}",
            max_rel(&fused, &reference)
        );
        crate::util::tensor::assert_same_gradients(&fused, &reference, &w, &[qt, kt, vt], 1e-5);
    }

    #[test]
    fn matches_the_composed_attention_and_its_gradients() {
        check(2, 3, 150, 0, 16, None);
        check(2, 2, 7, 5, 8, None);
        check(2, 2, 70, 0, 8, Some(20));
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 8), DType::F32, &dev).unwrap();
        let mask = Tensor::zeros((1, 1, 4, 4), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, &mask, 1.0).is_err());
    }
}
