//! One decoder layer of the Llama family (Llama 2/3, Mistral, Qwen2): RMSNorm, rotary
//! embeddings, grouped-query attention with a causal + padding mask, SwiGLU MLP.
//!
//! Only ops with a backward pass are used (candle's own, or ours: the masked attention softmax;
//! not candle's fused rms_norm / softmax_last_dim / rope, which have none), so LoRA factors on
//! any target receive gradients. An [`Observer`] sees the input of
//! every target linear, which is how covariances are collected.

use candle_core::{DType, Device, Tensor, D};

use super::config::ModelConfig;
use super::linear::TargetLinear;
use super::weights::Weights;
use crate::Result;

/// Where a target linear reads its input. Modules at one site share the same input and hence
/// the same covariance (q/k/v; gate/up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputSite {
    /// Normed hidden states entering attention: q_proj, k_proj, v_proj.
    Attention,
    /// Attention heads output: o_proj.
    AttentionOutput,
    /// Normed hidden states entering the MLP: gate_proj, up_proj.
    Mlp,
    /// SwiGLU activations: down_proj.
    MlpDown,
}

impl InputSite {
    pub const ALL: [InputSite; 4] = [
        Self::Attention,
        Self::AttentionOutput,
        Self::Mlp,
        Self::MlpDown,
    ];

    /// The site a projection reads from.
    pub fn of(proj: &str) -> Option<Self> {
        Some(match proj {
            "q_proj" | "k_proj" | "v_proj" => Self::Attention,
            "o_proj" => Self::AttentionOutput,
            "gate_proj" | "up_proj" => Self::Mlp,
            "down_proj" => Self::MlpDown,
            _ => return None,
        })
    }
}

/// Sees the input (batch, seq, d_in) of each target site during a forward pass.
pub trait Observer {
    fn observe(&mut self, layer: usize, site: InputSite, input: &Tensor) -> Result<()>;
}

/// RMSNorm as in transformers: `w * x / sqrt(mean(x²) + eps)`, computed in float32.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// Per-forward constants shared by every layer: rotary tables and the attention mask.
pub struct AttnContext {
    cos: Tensor,
    sin: Tensor,
    /// (batch, 1, seq, seq) float32 added to the attention scores: 0 where a query may attend
    /// to a key, the most negative float elsewhere (finite, so no row can become NaN).
    mask: Tensor,
}

impl AttnContext {
    /// `attention_mask` is (batch, seq) with 1 for real tokens (right padding).
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
        attention_mask: Option<&[Vec<u8>]>,
        device: &Device,
    ) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let half = inv.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for p in 0..seq {
            for f in &inv {
                // Match transformers: inv_freq is float32, angles are float32 products.
                let ang = (p as f32) * (*f as f32);
                cos.push(ang.cos());
                sin.push(ang.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (seq, half), device)?;
        let sin = Tensor::from_vec(sin, (seq, half), device)?;
        // mask[b, 0, i, j] = (j <= i) && (i - j < window) && key j of sample b is real
        let pos = Tensor::arange(0u32, seq as u32, device)?;
        let (qi, kj) = (pos.reshape((seq, 1))?, pos.reshape((1, seq))?);
        let mut allowed = kj.broadcast_le(&qi)?;
        if let Some(w) = cfg.sliding_window {
            let within = (kj + (w as f64))?.broadcast_gt(&qi)?;
            allowed = (allowed * within)?;
        }
        let keys = match attention_mask {
            Some(rows) => {
                let flat: Vec<u8> = rows
                    .iter()
                    .flat_map(|r| (0..seq).map(|j| u8::from(r.get(j).copied().unwrap_or(0) != 0)))
                    .collect();
                Tensor::from_vec(flat, (batch, 1, 1, seq), device)?
            }
            None => Tensor::ones((batch, 1, 1, seq), DType::U8, device)?,
        };
        let allowed = allowed.reshape((1, 1, seq, seq))?.broadcast_mul(&keys)?;
        let mask = ((allowed.to_dtype(DType::F32)? - 1.0)? * -(f32::MIN as f64))?;
        Ok(Self { cos, sin, mask })
    }
}

/// Grouped-query self-attention.
#[derive(Clone)]
pub struct Attention {
    pub q_proj: TargetLinear,
    pub k_proj: TargetLinear,
    pub v_proj: TargetLinear,
    pub o_proj: TargetLinear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        ctx: &AttnContext,
        layer: usize,
        obs: &mut Option<&mut dyn Observer>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if let Some(o) = obs.as_deref_mut() {
            o.observe(layer, InputSite::Attention, x)?;
        }
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads(self.q_proj.forward(x)?, self.num_heads)?;
        let k = heads(self.k_proj.forward(x)?, self.num_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let q = candle_nn::rotary_emb::rope_slow(&q, &ctx.cos, &ctx.sin)?;
        let k = candle_nn::rotary_emb::rope_slow(&k, &ctx.cos, &ctx.sin)?;
        let rep = self.num_heads / self.num_kv_heads;
        let repeat = |y: Tensor| -> Result<Tensor> {
            if rep == 1 {
                return Ok(y);
            }
            Ok(y.unsqueeze(2)?
                .broadcast_as((b, self.num_kv_heads, rep, t, self.head_dim))?
                .reshape((b, self.num_heads, t, self.head_dim))?)
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scores = q.matmul(&k.t()?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let probs = super::attn_softmax::masked_softmax(&scores, &ctx.mask, scale)?;
        let out =
            probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, self.num_heads * self.head_dim))?;
        if let Some(o) = obs.as_deref_mut() {
            o.observe(layer, InputSite::AttentionOutput, &out)?;
        }
        self.o_proj.forward(&out)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Clone)]
pub struct Mlp {
    pub gate_proj: TargetLinear,
    pub up_proj: TargetLinear,
    pub down_proj: TargetLinear,
}

impl Mlp {
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        obs: &mut Option<&mut dyn Observer>,
    ) -> Result<Tensor> {
        if let Some(o) = obs.as_deref_mut() {
            o.observe(layer, InputSite::Mlp, x)?;
        }
        let h = (self.gate_proj.forward(x)?.silu()? * self.up_proj.forward(x)?)?;
        if let Some(o) = obs.as_deref_mut() {
            o.observe(layer, InputSite::MlpDown, &h)?;
        }
        self.down_proj.forward(&h)
    }
}

/// One pre-norm decoder layer.
#[derive(Clone)]
pub struct DecoderLayer {
    pub index: usize,
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// The Hugging Face module path of a projection: `model.layers.3.self_attn.q_proj`.
pub fn module_name(layer: usize, proj: &str) -> String {
    let block = if InputSite::of(proj).is_some_and(|s| s <= InputSite::AttentionOutput) {
        "self_attn"
    } else {
        "mlp"
    };
    format!("model.layers.{layer}.{block}.{proj}")
}

impl DecoderLayer {
    /// Load layer `index`, holding the projection weights in `dtype`; norms are float32.
    pub fn load(
        w: &Weights,
        cfg: &ModelConfig,
        index: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let linear = |proj: &str, has_bias: bool| -> Result<TargetLinear> {
            let name = module_name(index, proj);
            let (o, i) = cfg.target_shape(proj).expect("known projection");
            let weight = w
                .get(&format!("{name}.weight"), Some(&[o, i]), device)?
                .to_dtype(dtype)?;
            let bias = if has_bias {
                Some(
                    w.get(&format!("{name}.bias"), Some(&[o]), device)?
                        .to_dtype(DType::F32)?,
                )
            } else {
                None
            };
            Ok(TargetLinear::new(name, weight, bias))
        };
        let norm = |n: &str| -> Result<RmsNorm> {
            let weight = w
                .get(
                    &format!("model.layers.{index}.{n}.weight"),
                    Some(&[cfg.hidden_size]),
                    device,
                )?
                .to_dtype(DType::F32)?;
            Ok(RmsNorm {
                weight,
                eps: cfg.rms_norm_eps,
            })
        };
        Ok(Self {
            index,
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention {
                q_proj: linear("q_proj", cfg.qkv_bias)?,
                k_proj: linear("k_proj", cfg.qkv_bias)?,
                v_proj: linear("v_proj", cfg.qkv_bias)?,
                o_proj: linear("o_proj", cfg.o_bias)?,
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            },
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp {
                gate_proj: linear("gate_proj", cfg.mlp_bias)?,
                up_proj: linear("up_proj", cfg.mlp_bias)?,
                down_proj: linear("down_proj", cfg.mlp_bias)?,
            },
        })
    }

    /// hidden (batch, seq, hidden) float32 -> the layer's output.
    pub fn forward(
        &self,
        h: &Tensor,
        ctx: &AttnContext,
        mut obs: Option<&mut dyn Observer>,
    ) -> Result<Tensor> {
        let x = self.input_layernorm.forward(h)?;
        let h = (h + self.self_attn.forward(&x, ctx, self.index, &mut obs)?)?;
        let x = self.post_attention_layernorm.forward(&h)?;
        Ok((&h + self.mlp.forward(&x, self.index, &mut obs)?)?)
    }

    /// The seven target linears in layer order.
    pub fn targets(&self) -> [&TargetLinear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    pub fn targets_mut(&mut self) -> [&mut TargetLinear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(ctx: &AttnContext) -> Vec<Vec<Vec<u8>>> {
        let m = ctx.mask.squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        m.into_iter()
            .map(|b| {
                b.into_iter()
                    .map(|r| r.into_iter().map(|v| u8::from(v == 0.0)).collect())
                    .collect()
            })
            .collect()
    }

    fn cfg(window: Option<usize>) -> ModelConfig {
        let mut c = ModelConfig::from_value(
            serde_json::json!({"model_type": "mistral", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                               "num_hidden_layers": 1, "num_attention_heads": 2}),
            "t",
        )
        .unwrap();
        c.sliding_window = window;
        c
    }

    #[test]
    fn causal_padding_and_sliding_window_masks() {
        let rows = vec![vec![1, 1, 1, 0], vec![1, 1, 1, 1]];
        let ctx = AttnContext::new(&cfg(None), 2, 4, Some(&rows), &Device::Cpu).unwrap();
        let m = allowed(&ctx);
        assert_eq!(
            m[0],
            vec![
                vec![1, 0, 0, 0],
                vec![1, 1, 0, 0],
                vec![1, 1, 1, 0],
                vec![1, 1, 1, 0]
            ]
        );
        assert_eq!(m[1][3], vec![1, 1, 1, 1]);
        let ctx = AttnContext::new(&cfg(Some(2)), 1, 4, None, &Device::Cpu).unwrap();
        assert_eq!(
            allowed(&ctx)[0],
            vec![
                vec![1, 0, 0, 0],
                vec![1, 1, 0, 0],
                vec![0, 1, 1, 0],
                vec![0, 0, 1, 1]
            ]
        );
    }
}
