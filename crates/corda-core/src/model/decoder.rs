//! One decoder layer of the Llama family (Llama 2/3, Mistral, Qwen2): RMSNorm, rotary
//! embeddings, grouped-query attention with a causal + padding mask, SwiGLU MLP.
//!
//! Only ops with a backward pass are used (candle's own, or ours: the fused masked attention,
//! RMSNorm, the rotary embedding, the SwiGLU gate; not candle's fused rms_norm /
//! softmax_last_dim / rope, which have none), so LoRA factors on any target receive gradients.
//! An [`Observer`] sees the input of every target linear, which is how covariances are
//! collected.

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::linear::TargetLinear;
pub use super::rms_norm::RmsNorm;
use super::rotary::rope;
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

/// Per-forward constants shared by every layer: rotary tables and the attention mask.
pub struct AttnContext {
    /// (1 or batch, 1, seq, head_dim) rotary tables for the queries and keys of this forward.
    cos: Tensor,
    sin: Tensor,
    /// (batch, 1, seq, past + seq) float32 added to the attention scores: 0 where a query may
    /// attend to a key, the most negative float elsewhere (finite, so no row can become NaN).
    mask: Tensor,
}

impl AttnContext {
    /// A whole-sequence forward: positions 0..seq; `attention_mask` is (batch, seq) with 1 for
    /// real tokens (right padding).
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
        attention_mask: Option<&[Vec<u8>]>,
        device: &Device,
    ) -> Result<Self> {
        let positions = vec![(0..seq as u32).collect::<Vec<u32>>()];
        let keys: Vec<Vec<u8>> = match attention_mask {
            Some(rows) => rows
                .iter()
                .map(|r| {
                    (0..seq)
                        .map(|j| u8::from(r.get(j).copied().unwrap_or(0) != 0))
                        .collect()
                })
                .collect(),
            None => vec![vec![1; seq]; batch],
        };
        Self::build(cfg, &positions, &keys, seq, device)
    }

    /// A forward of `seq` new tokens after `past` cached ones (see [`super::KvCache`]):
    /// `positions` is (batch, seq), each row's rotary positions (left-padded rows start later);
    /// `key_mask` is (batch, past + seq), 1 for every real token in the cache and the new ones.
    pub fn incremental(
        cfg: &ModelConfig,
        positions: &[Vec<u32>],
        key_mask: &[Vec<u8>],
        device: &Device,
    ) -> Result<Self> {
        let seq = positions.first().map_or(0, Vec::len);
        if positions.len() != key_mask.len()
            || positions.iter().any(|p| p.len() != seq)
            || key_mask
                .iter()
                .any(|k| k.len() != key_mask[0].len() || k.len() < seq)
        {
            return Err(crate::CordaError::Invalid(format!(
                "incremental attention needs (batch, seq) positions and (batch, past + seq) key \
                 masks of one length per batch; got {} position rows and {} mask rows",
                positions.len(),
                key_mask.len()
            )));
        }
        Self::build(cfg, positions, key_mask, seq, device)
    }

    fn build(
        cfg: &ModelConfig,
        positions: &[Vec<u32>],
        key_mask: &[Vec<u8>],
        seq: usize,
        device: &Device,
    ) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let dim = 2 * inv.len();
        let rows = positions.len();
        let mut cos = Vec::with_capacity(rows * seq * dim);
        let mut sin = Vec::with_capacity(rows * seq * dim);
        for row in positions {
            for &p in row {
                // Match transformers: inv_freq is float32, angles are float32 products, and
                // the table is the half-dim table twice (rotate_half layout).
                let (c, s): (Vec<f32>, Vec<f32>) = inv
                    .iter()
                    .map(|f| {
                        let ang = (p as f32) * (*f as f32);
                        (ang.cos(), ang.sin())
                    })
                    .unzip();
                cos.extend_from_slice(&c);
                cos.extend_from_slice(&c);
                sin.extend_from_slice(&s);
                sin.extend_from_slice(&s);
            }
        }
        let cos = Tensor::from_vec(cos, (rows, 1, seq, dim), device)?;
        let sin = Tensor::from_vec(sin, (rows, 1, seq, dim), device)?;
        let batch = key_mask.len();
        let total = key_mask.first().map_or(seq, Vec::len);
        let past = total - seq;
        // mask[b, 0, i, j] = (j <= past + i) && (past + i - j < window) && key j of b is real
        let qi = Tensor::arange(past as u32, total as u32, device)?.reshape((seq, 1))?;
        let kj = Tensor::arange(0u32, total as u32, device)?.reshape((1, total))?;
        let mut allowed = kj.broadcast_le(&qi)?;
        if let Some(w) = cfg.sliding_window {
            let within = (kj + (w as f64))?.broadcast_gt(&qi)?;
            allowed = (allowed * within)?;
        }
        let flat: Vec<u8> = key_mask
            .iter()
            .flat_map(|r| r.iter().map(|&m| u8::from(m != 0)))
            .collect();
        let keys = Tensor::from_vec(flat, (batch, 1, 1, total), device)?;
        let allowed = allowed.reshape((1, 1, seq, total))?.broadcast_mul(&keys)?;
        let mask = ((allowed.to_dtype(DType::F32)? - 1.0)? * -(f32::MIN as f64))?;
        Ok(Self { cos, sin, mask })
    }
}

/// One layer's cached keys and values (batch, kv_heads, past, head_dim), after rotary
/// embedding and before the grouped-query repeat.
#[derive(Clone, Default)]
pub struct LayerCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

impl LayerCache {
    /// Append this step's keys and values; returns the whole sequence's.
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match (self.k.take(), self.v.take()) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            _ => (k, v),
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
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
        cache: Option<&mut LayerCache>,
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
        let q = rope(&q, &ctx.cos, &ctx.sin)?;
        let k = rope(&k, &ctx.cos, &ctx.sin)?;
        let (k, v) = match cache {
            Some(c) => c.append(k, v)?,
            None => (k, v),
        };
        let tk = k.dim(2)?;
        let rep = self.num_heads / self.num_kv_heads;
        let repeat = |y: Tensor| -> Result<Tensor> {
            if rep == 1 {
                return Ok(y);
            }
            Ok(y.unsqueeze(2)?
                .broadcast_as((b, self.num_kv_heads, rep, tk, self.head_dim))?
                .reshape((b, self.num_heads, tk, self.head_dim))?)
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = super::attention::attention(&q, &k, &v, &ctx.mask, scale)?
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
        let h = super::swiglu::swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
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

    /// Keep transposed copies of the projection weights for forward-only passes over a few
    /// rows at a time (the calibration; see [`TargetLinear::keep_transposed`]).
    pub fn keep_transposed_weights(&mut self) -> Result<()> {
        self.targets_mut()
            .into_iter()
            .try_for_each(TargetLinear::keep_transposed)
    }

    /// hidden (batch, seq, hidden) float32 -> the layer's output.
    pub fn forward(
        &self,
        h: &Tensor,
        ctx: &AttnContext,
        obs: Option<&mut dyn Observer>,
    ) -> Result<Tensor> {
        self.forward_with(h, ctx, obs, None)
    }

    /// [`Self::forward`] of new tokens after those in `cache`, which the step extends.
    pub fn forward_cached(
        &self,
        h: &Tensor,
        ctx: &AttnContext,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        self.forward_with(h, ctx, None, Some(cache))
    }

    fn forward_with(
        &self,
        h: &Tensor,
        ctx: &AttnContext,
        mut obs: Option<&mut dyn Observer>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let h = self.attention_block(h, ctx, &mut obs, cache)?;
        self.mlp_block(&h, &mut obs)
    }

    /// The first residual block, `h + self_attn(input_layernorm(h))`. The layer is two such
    /// blocks; gradient checkpointing recomputes them one at a time.
    pub fn attention_block(
        &self,
        h: &Tensor,
        ctx: &AttnContext,
        obs: &mut Option<&mut dyn Observer>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let x = self.input_layernorm.forward(h)?;
        Ok((h + self.self_attn.forward(&x, ctx, self.index, obs, cache)?)?)
    }

    /// The second residual block, `h + mlp(post_attention_layernorm(h))`.
    pub fn mlp_block(&self, h: &Tensor, obs: &mut Option<&mut dyn Observer>) -> Result<Tensor> {
        let x = self.post_attention_layernorm.forward(h)?;
        Ok((h + self.mlp.forward(&x, self.index, obs)?)?)
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
