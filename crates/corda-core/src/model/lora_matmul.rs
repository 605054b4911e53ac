//! A target linear with its LoRA branch as one op: `y = x Wᵀ + s · (x Aᵀ) Bᵀ`, W frozen.
//!
//! Composed from candle ops, each LoRA linear keeps three output-sized tensors per layer alive
//! until the backward pass (`(x Aᵀ) Bᵀ`, its scaled copy, the sum) and adds the two branches'
//! input gradients into a fresh tensor. Here the LoRA product accumulates into the frozen
//! product's output, the backward writes `g W + s (g B) A` into one buffer, skips the input
//! gradient where the input needs none (the first layer's), and keeps nothing but the op's
//! inputs (`x Aᵀ`, (rows × r), is recomputed). All products go through
//! [`crate::util::product`] (AVX-512 where the CPU has it, chosen at run time).
//!
//! For a float32 copy of a bfloat16 weight ([`super::widened`]) the frozen product rounds as a
//! bfloat16 product does (input and result rounded to bfloat16) before the float32 LoRA branch
//! is added: the same numbers as the unfused widened linear, without its three extra
//! output-sized tensors (bfloat16 training measured within 1–5% of float32 speed).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use faer::{Accum, MatMut, MatRef, Par};

use super::frozen::{cpu_f32, f32_slice};
use super::widened::{round_bf16_in_place, rounded_bf16};
use crate::util::product::{matmul, product};

/// `x Wᵀ + scaling · (x Aᵀ) Bᵀ` for contiguous float32 CPU `x` (m, d_in), `w` (d_out, d_in),
/// `a` (r, d_in), `b` (d_out, r); gradients for `x`, `a` and `b`. With `bf16_base`, `w` holds
/// bfloat16 values and `x Wᵀ` is rounded as a bfloat16 product (see the module doc); the
/// gradients pass straight through the rounding, as through a cast.
pub fn lora_matmul_t(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    bf16_base: bool,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraMatmulT {
            w: w.contiguous()?,
            scaling: scaling as f32,
            bf16_base,
        },
    )
}

struct LoraMatmulT {
    /// (d_out, d_in), contiguous float32.
    w: Tensor,
    scaling: f32,
    /// Round the frozen product's input and result to bfloat16.
    bf16_base: bool,
}

fn mul(dst: MatMut<'_, f32>, accum: Accum, lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>, alpha: f32) {
    matmul(dst, accum, lhs, rhs, alpha, Par::rayon(0));
}

fn rows(s: &[f32], r: usize, c: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(s, r, c)
}

impl CustomOp3 for LoraMatmulT {
    fn name(&self) -> &'static str {
        "lora-matmul-t"
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
        let (m, k) = l1.shape().dims2()?;
        let (r, k2) = l2.shape().dims2()?;
        let (n, r2) = l3.shape().dims2()?;
        let (n2, k3) = self.w.dims2()?;
        if k != k2 || k != k3 || r != r2 || n != n2 {
            candle_core::bail!(
                "lora matmul: x ({m}, {k}), A ({r}, {k2}), B ({n}, {r2}), W ({n2}, {k3}) do not fit"
            );
        }
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("lora matmul: weight is not on the CPU")
        };
        let (Some(x), Some(a), Some(b), Some(w)) = (
            f32_slice(s1, l1),
            f32_slice(s2, l2),
            f32_slice(s3, l3),
            f32_slice(ws, wl),
        ) else {
            candle_core::bail!("lora matmul: expected contiguous float32 tensors")
        };
        let wt = rows(w, n, k).transpose();
        let mut y = if self.bf16_base {
            let mut y = product(&rounded_bf16(x), m, k, wt);
            round_bf16_in_place(&mut y);
            y
        } else {
            product(x, m, k, wt)
        };
        let xa = product(x, m, k, rows(a, r, k).transpose());
        mul(
            MatMut::from_row_major_slice_mut(&mut y, m, n),
            Accum::Add,
            rows(&xa, m, r),
            rows(b, n, r).transpose(),
            self.scaling,
        );
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (r, n) = (a.dim(0)?, b.dim(0)?);
        let s = self.scaling;
        let g = grad.contiguous()?;
        let ((xs, xl), (as_, al), (bs, bl), (gs, gl), (ws, wl)) = (
            x.storage_and_layout(),
            a.storage_and_layout(),
            b.storage_and_layout(),
            g.storage_and_layout(),
            self.w.storage_and_layout(),
        );
        let (xv, av, bv, g, w) = (
            cpu_f32(&xs, xl)?,
            cpu_f32(&as_, al)?,
            cpu_f32(&bs, bl)?,
            cpu_f32(&gs, gl)?,
            cpu_f32(&ws, wl)?,
        );
        // g B (m × r), then dA = s (g B)ᵀ x and dB = s gᵀ (x Aᵀ).
        let gb = product(g, m, n, rows(bv, n, r));
        let mut da = vec![0f32; r * k];
        mul(
            MatMut::from_row_major_slice_mut(&mut da, r, k),
            Accum::Replace,
            rows(&gb, m, r).transpose(),
            rows(xv, m, k),
            s,
        );
        let xa = product(xv, m, k, rows(av, r, k).transpose());
        let mut db = vec![0f32; n * r];
        mul(
            MatMut::from_row_major_slice_mut(&mut db, n, r),
            Accum::Replace,
            rows(g, m, n).transpose(),
            rows(&xa, m, r),
            s,
        );
        // dx = g W + s (g B) A, only where the input is tracked.
        let dx = if x.track_op() {
            let mut dx = product(g, m, n, rows(w, n, k));
            mul(
                MatMut::from_row_major_slice_mut(&mut dx, m, k),
                Accum::Add,
                rows(&gb, m, r),
                rows(av, r, k),
                s,
            );
            Some(Tensor::from_vec(dx, (m, k), x.device())?)
        } else {
            None
        };
        let dev = x.device();
        Ok((
            dx,
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        crate::util::tensor::max_rel_diff(a, b).unwrap()
    }

    /// The fused op on `x` (m, k) against `base + s · (x Aᵀ) Bᵀ` composed from candle ops:
    /// values within 1e-6 and gradients for x, A and B within 1e-5. Returns the fused output.
    fn check_against_composed(
        x: &Var,
        w: &Tensor,
        a: &Var,
        b: &Var,
        s: f64,
        bf16_base: bool,
        base: Tensor,
    ) -> Tensor {
        let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
        let fused = lora_matmul_t(xt, w, at, bt, s, bf16_base).unwrap();
        let composed = (base
            + (xt
                .matmul(&at.t().unwrap())
                .unwrap()
                .matmul(&bt.t().unwrap())
                .unwrap()
                * s)
                .unwrap())
        .unwrap();
        assert!(max_rel(&fused, &composed) < 1e-6);
        let g = Tensor::arange(0f32, fused.elem_count() as f32, xt.device())
            .unwrap()
            .reshape(fused.shape())
            .unwrap()
            .sin()
            .unwrap();
        crate::util::tensor::assert_same_gradients(&fused, &composed, &g, &[xt, at, bt], 1e-5);
        fused
    }

    #[test]
    fn matches_the_composed_lora_linear_and_its_gradients() {
        let dev = Device::Cpu;
        let (m, k, n, r) = (37, 24, 40, 5);
        let data = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 31.0)
                .collect()
        };
        let x = Var::from_vec(data(m * k, 1), (m, k), &dev).unwrap();
        let w = Tensor::from_vec(data(n * k, 2), (n, k), &dev).unwrap();
        let a = Var::from_vec(data(r * k, 3), (r, k), &dev).unwrap();
        let b = Var::from_vec(data(n * r, 4), (n, r), &dev).unwrap();
        let s = 2.5;
        let base = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        check_against_composed(&x, &w, &a, &b, s, false, base);
        let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
        // No input gradient where the input is a constant.
        let gf = lora_matmul_t(&xt.detach(), &w, at, bt, s, false)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(gf.get(at).is_some() && gf.get(bt).is_some());
    }

    #[test]
    fn bf16_base_matches_the_unfused_widened_linear_and_its_gradients() {
        let dev = Device::Cpu;
        let (m, k, n, r) = (29, 48, 33, 4);
        let data = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((((i * 53 + seed * 17) % 97) as f32 - 48.0) / 13.0).sin() * 3.0)
                .collect()
        };
        let x = Var::from_vec(data(m * k, 1), (m, k), &dev).unwrap();
        // A bfloat16 weight, widened exactly.
        let w = Tensor::from_vec(data(n * k, 2), (n, k), &dev)
            .unwrap()
            .to_dtype(candle_core::DType::BF16)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let a = Var::from_vec(data(r * k, 3), (r, k), &dev).unwrap();
        let b = Var::from_vec(data(n * r, 4), (n, r), &dev).unwrap();
        let s = 0.75;
        let base =
            super::super::widened::rounded_matmul_t(x.as_tensor(), &w, candle_core::DType::BF16)
                .unwrap();
        let fused = check_against_composed(&x, &w, &a, &b, s, true, base);
        // The rounding is real: the float32 product differs at bfloat16's precision.
        let plain =
            lora_matmul_t(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), s, false).unwrap();
        assert!(max_rel(&fused, &plain) > 1e-4);
    }
}
