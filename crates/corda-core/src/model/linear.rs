//! The target linear layers of a decoder (`q_proj` … `down_proj`): a frozen base weight,
//! optionally with trainable LoRA factors, `y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`.

use candle_core::{DType, Tensor, Var};

use crate::Result;

/// The seven projections CorDA and PEFT target by default, in layer order.
pub const TARGET_PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Trainable low-rank factors: A is (r, d_in), B is (d_out, r), both float32.
#[derive(Clone)]
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
}

/// A frozen linear layer with an optional LoRA branch.
#[derive(Clone)]
pub struct TargetLinear {
    /// Hugging Face module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub name: String,
    /// (d_out, d_in), in the storage dtype.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    /// `Some(dtype)` when `weight` is a float32 copy of a `dtype` weight (see
    /// [`super::widened`]): products then round as `dtype` products do.
    pub widened_from: Option<DType>,
    /// `weightᵀ` (d_in, d_out), contiguous float32, for forward-only passes over a few rows at a
    /// time (calibration, one short sample per pass): faer reads it without repacking the
    /// weight on every product, 1.7–2x faster at 8 rows, the same bits. Set by
    /// [`Self::keep_transposed`], dropped by it and by [`Self::set_weight`].
    weight_t: Option<Tensor>,
}

impl TargetLinear {
    pub fn new(name: String, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            name,
            weight,
            bias,
            lora: None,
            widened_from: None,
            weight_t: None,
        }
    }

    /// Replace the base weight (and drop its transposed copy).
    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = weight;
        self.weight_t = None;
    }

    /// Keep a transposed copy of a float32 CPU weight for forward-only passes (see
    /// `weight_t`): one more copy of the weight in memory, and no gradient through the products.
    /// A widened weight has its own product ([`super::widened`]) and gets none.
    pub fn keep_transposed(&mut self) -> Result<()> {
        let applies = self.widened_from.is_none()
            && self.weight.dtype() == DType::F32
            && self.weight.device().is_cpu();
        if applies && self.weight_t.is_none() {
            self.weight_t = Some(self.weight.t()?.contiguous()?);
        }
        Ok(())
    }

    /// The short projection name (`q_proj`).
    pub fn proj(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }

    /// (d_out, d_in).
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// Apply to `x` of shape (..., d_in); the result is float32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().expect("rank >= 1");
        let rows = x.elem_count() / d_in;
        let x2 = x.reshape((rows, d_in))?;
        // A widened bfloat16 weight fuses too, its product rounded as a bfloat16 one.
        let bf16_base = self.widened_from == Some(DType::BF16);
        let fused = self.lora.as_ref().filter(|_| {
            (self.widened_from.is_none() || bf16_base)
                && x2.device().is_cpu()
                && x2.dtype() == DType::F32
                && self.weight.dtype() == DType::F32
        });
        let mut y = match (fused, self.widened_from) {
            (Some(l), _) => super::lora_matmul::lora_matmul_t(
                &x2,
                &self.weight,
                l.a.as_tensor(),
                l.b.as_tensor(),
                l.scaling,
                bf16_base,
            )?,
            (None, Some(dtype)) => super::widened::rounded_matmul_t(&x2, &self.weight, dtype)?,
            (None, None) => match &self.weight_t {
                Some(wt) => super::frozen::frozen_matmul_forward(&x2, wt)?,
                None => super::frozen::frozen_matmul_t(&x2, &self.weight)?,
            },
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
        }
        if let (Some(l), None) = (&self.lora, fused) {
            let xa = x2.to_dtype(DType::F32)?.matmul(&l.a.as_tensor().t()?)?;
            let delta = xa.matmul(&l.b.as_tensor().t()?)?;
            y = (y + (delta * l.scaling)?)?;
        }
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = self.dims().0;
        Ok(y.reshape(out)?)
    }
}
