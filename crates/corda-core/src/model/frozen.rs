//! Matrix product with a frozen right operand.
//!
//! candle's matmul backward always computes (and stores) the gradient of both operands, so a
//! frozen base weight costs a full-size weight gradient per layer in every backward pass.
//! Fine-tuning only needs the gradient with respect to the activations; the custom op here
//! computes `x Wᵀ` and back-propagates `grad · W` only.

use candle_core::{CustomOp1, DType, Layout, Shape, Tensor};

use crate::Result;

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
        let g = grad_res.to_dtype(self.w.dtype())?.matmul(&self.w)?;
        Ok(Some(g))
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
