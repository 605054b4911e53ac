//! Matrix product with a frozen right operand.
//!
//! candle's matmul backward always computes (and stores) the gradient of both operands, so a
//! frozen base weight costs a full-size weight gradient per layer in every backward pass.
//! Fine-tuning only needs the gradient with respect to the activations; the custom op here
//! computes `x Wᵀ` and back-propagates `grad · W` only.
//!
//! On the CPU, float32 products go through [`crate::util::product`] (faer's or the gemm crate's
//! kernels, whichever is faster on the CPU; AVX-512 where it has it). bfloat16 products stay on candle's matmul: widening a bfloat16
//! weight to float32 for faer on every call measured 10–20% slower in calibration on a Zen 5.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use faer::MatRef;

use crate::util::product::product;
use crate::Result;

/// Row-major float32 data of a contiguous CPU tensor storage.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Some(&v[start..end]),
        _ => None,
    }
}

/// The float32 data of a contiguous CPU tensor, borrowed from its storage guard.
pub(crate) fn cpu_f32<'a>(
    guard: &'a (impl std::ops::Deref<Target = Storage> + 'a),
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    match &**guard {
        Storage::Cpu(s) => f32_slice(s, l)
            .ok_or_else(|| candle_core::Error::Msg("expected contiguous float32 tensors".into())),
        _ => candle_core::bail!("expected CPU tensors"),
    }
}

/// Runs `f` on the flat float32 values of `tensors` (a custom op's backward inputs), borrowed
/// in place: a copy of each would add its size to the peak of the backward pass (three
/// (tokens × intermediate) copies in SwiGLU's, for one).
pub(crate) fn with_host_f32<const N: usize, R>(
    tensors: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let tensors = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(s, l)| cpu_f32(s, l))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let slices: [&[f32]; N] = slices
        .try_into()
        .map_err(|_| candle_core::Error::Msg("host values: count mismatch".into()))?;
    f(slices)
}

/// `a · M` for a row-major float32 matrix `M` (k × n) on the CPU, read in place: the frozen
/// backward `g · W`, and the forward `x · Wᵀ` from a kept transposed weight. No backward of its
/// own (a gradient through it is an error, never a silent zero).
struct TimesMatrix {
    m: Tensor,
}

impl CustomOp1 for TimesMatrix {
    fn name(&self) -> &'static str {
        "frozen-matmul-times-matrix"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = l.shape().dims2()?;
        let (k2, n) = self.m.dims2()?;
        if k != k2 {
            candle_core::bail!(
                "frozen matmul: the left factor has {k} columns, the matrix {k2} rows"
            );
        }
        let (ms, ml) = self.m.storage_and_layout();
        let (Storage::Cpu(ms), Some(a)) = (&*ms, f32_slice(s, l)) else {
            candle_core::bail!("frozen matmul: expected contiguous float32 CPU tensors")
        };
        let Some(m) = f32_slice(ms, ml) else {
            candle_core::bail!("frozen matmul: the matrix must be contiguous float32")
        };
        let out = product(a, rows, k, MatRef::from_row_major_slice(m, k, n));
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
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
        if let (Some(x), Some(w)) = (f32_slice(s, l), f32_slice(ws, wl)) {
            let out = product(x, m, k, MatRef::from_row_major_slice(w, n, k).transpose());
            return Ok((CpuStorage::F32(out), Shape::from((m, n))));
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
        if g.device().is_cpu() && g.dtype() == DType::F32 {
            return Ok(Some(
                g.contiguous()?
                    .apply_op1_no_bwd(&TimesMatrix { m: self.w.clone() })?,
            ));
        }
        Ok(Some(g.matmul(&self.w)?))
    }
}

/// `x Wᵀ` from the transposed weight `wt` = `Wᵀ` (d_in, d_out), contiguous float32 on the CPU:
/// faer then streams the weight as it lies instead of packing it for every product, which
/// dominates when `x` has only a few rows. Forward only (a backward pass is an error).
pub fn frozen_matmul_forward(x: &Tensor, wt: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    Ok(x.apply_op1(TimesMatrix { m: wt.clone() })?)
}

/// `x Wᵀ` with no gradient for `W`: `x` is (m, d_in), `W` (d_out, d_in); the result is float32.
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(w.dtype())?;
    let y = x
        .contiguous()?
        .apply_op1(FrozenMatmulT { w: w.contiguous()? })?;
    Ok(y.to_dtype(DType::F32)?)
}
