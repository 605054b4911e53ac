//! A decoder layer's bfloat16 weights as a float32 copy, for the calibration forward and for
//! fine-tuning on the CPU.
//!
//! candle has no bfloat16 matmul kernel on the CPU: it widens both operands to float32 on
//! every call. With calibration's small batches (a few hundred or only a few tokens per
//! product) widening the weight dominates: a bfloat16 model calibrated up to 3x slower than
//! float32. Calibration streams one layer at a time, so widening that layer once costs one
//! float32 layer of memory and makes its products float32 products (faer's AVX-512 kernels).
//!
//! The products keep bfloat16 semantics: the input is rounded to bfloat16, multiplied by
//! the (exactly widened) bfloat16 weight with float32 accumulation, and the result rounded
//! to bfloat16 — what a bfloat16 GEMM with float32 accumulation computes, up to the
//! summation order.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::causal_lm::CausalLM;
use super::decoder::DecoderLayer;
use super::frozen::frozen_matmul_t;
use super::linear::TargetLinear;
use crate::util::simd::vectorized;
use crate::Result;

/// `v` rounded to the nearest bfloat16 (ties to even), as float32: `half::bf16::from_f32`
/// without its branch, so the loop vectorizes. NaN stays NaN.
#[inline(always)]
pub(super) fn round_bf16(v: f32) -> f32 {
    let b = v.to_bits();
    let r = f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000);
    if v.is_nan() {
        v
    } else {
        r
    }
}

/// Elements per parallel task of the rounding loops.
const CHUNK: usize = 1 << 14;

/// Every value of `v` rounded to bfloat16 ([`round_bf16`]), in a new buffer.
pub(super) fn rounded_bf16(v: &[f32]) -> Vec<f32> {
    let mut out = v.to_vec();
    round_bf16_in_place(&mut out);
    out
}

/// Every value of `v` rounded to bfloat16 ([`round_bf16`]) in place, on rayon's threads at the
/// CPU's vector width.
pub(super) fn round_bf16_in_place(v: &mut [f32]) {
    v.par_chunks_mut(CHUNK)
        .for_each(|c| vectorized!({ c.iter_mut().for_each(|x| *x = round_bf16(*x)) }));
}

/// Rounds a float32 tensor through bfloat16 in one pass; the gradient passes straight
/// through, as through a cast to bfloat16 and back.
struct RoundBf16;

impl CustomOp1 for RoundBf16 {
    fn name(&self) -> &'static str {
        "round-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(v), Some((start, end))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("round-bf16: expected a contiguous float32 tensor")
        };
        Ok((
            CpuStorage::F32(rounded_bf16(&v[start..end])),
            l.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

/// `t` (float32) rounded to `dtype` and back to float32.
fn round_through(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::BF16 && t.device().is_cpu() && t.dtype() == DType::F32 {
        return Ok(t.contiguous()?.apply_op1(RoundBf16)?);
    }
    Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?)
}

/// `x Wᵀ` for `w`, a float32 copy of a `dtype` weight, rounded as a `dtype` product:
/// float32 result holding `dtype` values.
pub fn rounded_matmul_t(x: &Tensor, w: &Tensor, dtype: DType) -> Result<Tensor> {
    let y = frozen_matmul_t(&round_through(&x.to_dtype(DType::F32)?, dtype)?, w)?;
    round_through(&y, dtype)
}

impl TargetLinear {
    /// This linear with a float32 copy of its weight if it is bfloat16 on the CPU (see the
    /// module doc); otherwise unchanged.
    pub fn widened(&self) -> Result<Self> {
        let mut out = self.clone();
        if self.weight.dtype() == DType::BF16 && self.weight.device().is_cpu() {
            out.set_weight(self.weight.to_dtype(DType::F32)?);
            out.widened_from = Some(DType::BF16);
        }
        Ok(out)
    }
}

impl CausalLM {
    /// Every decoder layer's bfloat16 projection weights, and a bfloat16 LM head, replaced by
    /// float32 copies, for fine-tuning on the CPU: one float32 model in memory instead of a
    /// bfloat16 one plus a widened copy of each weight made on every product (the head's was
    /// 4 bytes × vocab × hidden per step), and the same products.
    pub fn widen_layers(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            *layer = layer.widened()?;
        }
        if self.lm_head.dtype() == DType::BF16 && self.lm_head.device().is_cpu() {
            self.lm_head = self.lm_head.to_dtype(DType::F32)?;
        }
        Ok(())
    }
}

impl DecoderLayer {
    /// This layer with float32 copies of its bfloat16 projection weights (calibration's
    /// per-layer copy; the same outputs up to the products' summation order).
    pub fn widened(&self) -> Result<Self> {
        let mut out = self.clone();
        for t in out.targets_mut() {
            *t = t.widened()?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Deterministic values of varied magnitude.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|k| rng.gen_range(-1.0f32..1.0) * (1 + k % 7) as f32)
            .collect()
    }

    /// The widened product and candle's bfloat16 product of `x` (m, k) and the bfloat16 `w`
    /// (n, k) are bfloat16 values within a bfloat16 rounding of the float64 truth.
    fn check_against_truth(x: &Tensor, w: &Tensor) {
        let bf16 = TargetLinear::new("model.layers.0.mlp.up_proj".into(), w.clone(), None);
        let wide = bf16.widened().unwrap();
        assert_eq!(wide.weight.dtype(), DType::F32);
        assert_eq!(wide.widened_from, Some(DType::BF16));
        let got = wide.forward(x).unwrap().to_vec2::<f32>().unwrap();
        let old = bf16.forward(x).unwrap().to_vec2::<f32>().unwrap();
        // float64 truth of the rounded operands.
        let xr = x
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let xr = xr.to_vec2::<f32>().unwrap();
        let wr = w.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let k = wr[0].len();
        for (i, xi) in xr.iter().enumerate() {
            for (j, wj) in wr.iter().enumerate() {
                let exact: f64 = (0..k).map(|c| xi[c] as f64 * wj[c] as f64).sum();
                let abs: f64 = (0..k).map(|c| (xi[c] as f64 * wj[c] as f64).abs()).sum();
                // Rounding to bfloat16 (half an ulp, 2^-8 relative) of a float32 sum.
                let tol = exact.abs() * 2f64.powi(-8) + 2.0 * k as f64 * 2f64.powi(-24) * abs;
                for (name, v) in [("widened", got[i][j]), ("candle bf16", old[i][j])] {
                    assert_eq!(v, half::bf16::from_f32(v).to_f32(), "{name} is bf16-valued");
                    assert!(
                        (v as f64 - exact).abs() <= tol,
                        "{name} ({i},{j}): {v} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn widened_product_is_the_bf16_product_within_summation_order() {
        let (m, k, n) = (13, 160, 24);
        let dev = Device::Cpu;
        let x = Tensor::from_vec(values(m * k, 1), (m, k), &dev).unwrap();
        let w = Tensor::from_vec(values(n * k, 2), (n, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        check_against_truth(&x, &w);
    }

    /// The same on real weights (SmolLM2-135M layer 11, ../shared/fixtures/real-layer).
    #[test]
    fn widened_product_on_real_weights() {
        let Some(path) = corda_testdata::shared(
            "fixtures/real-layer/smollm2-layer11.safetensors",
            "the widened bfloat16 product on real weights",
        ) else {
            return;
        };
        let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        for name in ["q_proj.weight", "down_proj.weight"] {
            let w = t[name].to_dtype(DType::BF16).unwrap();
            let k = w.dim(1).unwrap();
            let x = Tensor::from_vec(values(5 * k, 4), (5, k), &Device::Cpu).unwrap();
            check_against_truth(&x, &w);
        }
    }

    #[test]
    fn rounding_is_half_crates_bf16_rounding() {
        let mut v = values(4096, 3);
        v.extend([
            0.0,
            -0.0,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE / 3.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        for k in 0..2000u32 {
            v.push(f32::from_bits(0x3f80_0000 + k * 0x10 + (k % 3) * 0x7fff));
        }
        for x in v {
            assert_eq!(
                round_bf16(x).to_bits(),
                half::bf16::from_f32(x).to_f32().to_bits(),
                "{x:e}"
            );
        }
        assert!(round_bf16(f32::NAN).is_nan());
        let t = Tensor::from_vec(vec![1.0f32 + 2f32.powi(-9), 3.0], (2, 1), &Device::Cpu).unwrap();
        let r = round_through(&t.t().unwrap(), DType::BF16).unwrap();
        assert_eq!(r.dims(), &[1, 2]);
        assert_eq!(r.to_vec2::<f32>().unwrap(), vec![vec![1.0, 3.0]]);
    }

    #[test]
    fn float32_weights_are_not_copied() {
        let w = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        let t = TargetLinear::new("model.layers.0.mlp.up_proj".into(), w, None);
        let wide = t.widened().unwrap();
        assert_eq!(wide.widened_from, None);
        assert_eq!(wide.weight.dtype(), DType::F32);
    }

    /// Fine-tuning back-propagates through the rounded product: the gradient of
    /// `sum(x Wᵀ)` with respect to `x` is every row `1ᵀ W` (the rounding passes it through).
    #[test]
    fn gradients_pass_through_the_rounded_product() {
        let dev = Device::Cpu;
        let (m, k, n) = (3, 5, 4);
        let w = Tensor::from_vec(values(n * k, 3), (n, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let t = TargetLinear::new("model.layers.0.mlp.up_proj".into(), w.clone(), None);
        let wide = t.widened().unwrap();
        let x = candle_core::Var::from_vec(values(m * k, 4), (m, k), &dev).unwrap();
        let grads = wide
            .forward(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let wf = w.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let col: Vec<f32> = (0..k).map(|c| wf.iter().map(|r| r[c]).sum()).collect();
        for row in got {
            for (g, want) in row.iter().zip(&col) {
                assert!(
                    (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{g} vs {want}"
                );
            }
        }
    }
}
