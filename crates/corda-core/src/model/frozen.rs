//! Matrix product with a frozen right operand.
//!
//! candle's matmul backward always computes (and stores) the gradient of both operands, so a
//! frozen base weight costs a full-size weight gradient per layer in every backward pass.
//! Fine-tuning only needs the gradient with respect to the activations; the custom op here
//! computes `x Wᵀ` and back-propagates `grad · W` only.
//!
//! On the CPU, float32 and bfloat16 products go through faer, whose kernels pick AVX-512 at run
//! time where the CPU has it. bfloat16 operands are widened to float32 first (exactly: every
//! bfloat16 is a float32) and the result is rounded back to bfloat16, so the numbers are those of
//! a bfloat16 product with float32 accumulation; the gemm crate's bfloat16 path that candle would
//! use instead has no SIMD kernel and runs several times slower than float32.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use faer::{Accum, MatMut, MatRef, Par};

use crate::Result;

/// Row-major float32 data of a contiguous CPU tensor storage.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Some(&v[start..end]),
        _ => None,
    }
}

/// Row-major data of a contiguous float32 or bfloat16 CPU storage, as float32 (bfloat16 is
/// widened, which is exact), and whether it was bfloat16.
fn widened<'a>(s: &'a CpuStorage, l: &Layout) -> Option<(std::borrow::Cow<'a, [f32]>, bool)> {
    use std::borrow::Cow;
    if let Some(v) = f32_slice(s, l) {
        return Some((Cow::Borrowed(v), false));
    }
    match (s, l.contiguous_offsets()) {
        (CpuStorage::BF16(v), Some((start, end))) => Some((
            Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
            true,
        )),
        _ => None,
    }
}

/// A float32 result, rounded to bfloat16 when the operands were bfloat16.
fn storage_of(out: Vec<f32>, bf16: bool) -> CpuStorage {
    if bf16 {
        CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect())
    } else {
        CpuStorage::F32(out)
    }
}

/// `a · b` for row-major `a` (m × k) and `b` given as a faer view (k × n); row-major result.
fn faer_product(a: &[f32], m: usize, k: usize, b: MatRef<'_, f32>) -> Vec<f32> {
    let n = b.ncols();
    let mut out = vec![0f32; m * n];
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(&mut out, m, n),
        Accum::Replace,
        MatRef::from_row_major_slice(a, m, k),
        b,
        1.0f32,
        Par::rayon(0),
    );
    out
}

/// `g · W` for the backward pass (g: m × d_out, W: d_out × d_in).
struct TimesW {
    w: Tensor,
}

impl CustomOp1 for TimesW {
    fn name(&self) -> &'static str {
        "frozen-matmul-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n) = l.shape().dims2()?;
        let (n2, k) = self.w.dims2()?;
        if n != n2 {
            candle_core::bail!(
                "frozen matmul backward: gradient has {n} columns, weight {n2} rows"
            );
        }
        let (ws, wl) = self.w.storage_and_layout();
        let (Storage::Cpu(ws), Some((g, g16))) = (&*ws, widened(s, l)) else {
            candle_core::bail!(
                "frozen matmul backward: expected contiguous float32 or bfloat16 CPU tensors"
            )
        };
        let Some((w, w16)) = widened(ws, wl) else {
            candle_core::bail!(
                "frozen matmul backward: weight must be contiguous float32 or bfloat16"
            )
        };
        let out = faer_product(&g, m, n, MatRef::from_row_major_slice(&w, n, k));
        Ok((storage_of(out, g16 || w16), Shape::from((m, k))))
    }
}

struct FrozenMatmulT {
    /// (d_out, d_in), contiguous, same dtype as the input.
    w: Tensor,
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, k) = l.shape().dims2()?;
        let (n, k2) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input has {k} features, weight expects {k2}");
        }
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen matmul: weight is not on the CPU")
        };
        if let (Some((x, x16)), Some((w, w16))) = (widened(s, l), widened(ws, wl)) {
            let out = faer_product(&x, m, k, MatRef::from_row_major_slice(&w, n, k).transpose());
            return Ok((storage_of(out, x16 || w16), Shape::from((m, n))));
        }
        let wt = wl.transpose(0, 1)?;
        let out = s.matmul(ws, (1, m, n, k), l, &wt)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, k) = l.shape().dims2()?;
        let (n, _) = self.w.dims2()?;
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("frozen matmul: weight is not on the GPU")
        };
        let wt = wl.transpose(0, 1)?;
        let out = s.matmul(ws, (1, m, n, k), l, &wt)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.to_dtype(self.w.dtype())?;
        if g.device().is_cpu() && matches!(g.dtype(), DType::F32 | DType::BF16) {
            return Ok(Some(
                g.contiguous()?
                    .apply_op1_no_bwd(&TimesW { w: self.w.clone() })?,
            ));
        }
        Ok(Some(g.matmul(&self.w)?))
    }
}

/// `x Wᵀ` with no gradient for `W`: `x` is (m, d_in), `W` (d_out, d_in); the result is float32.
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(w.dtype())?;
    let y = x
        .contiguous()?
        .apply_op1(FrozenMatmulT { w: w.contiguous()? })?;
    Ok(y.to_dtype(DType::F32)?)
}
