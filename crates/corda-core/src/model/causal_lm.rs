//! The whole causal LM: embeddings, decoder layers, final norm, LM head; LoRA factors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::config::ModelConfig;
use super::decoder::{AttnContext, DecoderLayer, RmsNorm};
use super::embedding::Embeddings;
use super::linear::{Lora, TargetLinear};
use super::weights::Weights;
use crate::{CordaError, Result};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Storage dtype of the frozen weights; `None` = the checkpoint's (`config.json`, else the
    /// dtype most tensors are stored in).
    pub dtype: Option<DType>,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            device: Device::Cpu,
        }
    }
}

/// Pick the storage dtype: the requested one, else the config's, else the tensors'.
pub fn resolve_dtype(requested: Option<DType>, cfg: &ModelConfig, w: &Weights) -> DType {
    requested
        .or(cfg.dtype)
        .unwrap_or_else(|| w.dominant_dtype())
}

/// A (batch, seq) mask tensor of any dtype as rows of 0/1.
pub fn mask_rows(mask: &Tensor) -> Result<Vec<Vec<u8>>> {
    Ok(mask.to_dtype(DType::F32)?.ne(0.0)?.to_vec2::<u8>()?)
}

/// A Llama-family causal LM.
pub struct CausalLM {
    pub config: ModelConfig,
    pub dir: PathBuf,
    pub dtype: DType,
    pub device: Device,
    pub embed_tokens: Embeddings,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// (vocab, hidden); shares storage with `embed_tokens` when the embeddings are tied.
    pub lm_head: Tensor,
}

impl CausalLM {
    /// Load a model directory.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let w = Weights::open(dir)?;
        Self::from_weights(dir, config, &w, opts)
    }

    /// Build from already-opened weights.
    pub fn from_weights(
        dir: &Path,
        config: ModelConfig,
        w: &Weights,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let dtype = resolve_dtype(opts.dtype, &config, w);
        let device = opts.device.clone();
        let tied = config.tie_word_embeddings && !w.contains("lm_head.weight");
        let embed_tokens = Embeddings::load(w, &config, dtype, &device, tied)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, &config, i, dtype, &device))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm {
            weight: w
                .get("model.norm.weight", Some(&[config.hidden_size]), &device)?
                .to_dtype(DType::F32)?,
            eps: config.rms_norm_eps,
        };
        let lm_head = if let (true, Some(table)) = (tied, embed_tokens.dense()) {
            table.clone()
        } else {
            w.get(
                "lm_head.weight",
                Some(&[config.vocab_size, config.hidden_size]),
                &device,
            )?
            .to_dtype(dtype)?
        };
        Ok(Self {
            config,
            dir: dir.to_path_buf(),
            dtype,
            device,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Logits (batch, seq, vocab), float32, for `input_ids` (batch, seq) with an optional
    /// (batch, seq) attention mask (1 = real token, right padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, attention_mask)?;
        self.lm_head_logits(&h)
    }

    /// Final hidden states (after the last norm), float32.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let rows = attention_mask.map(mask_rows).transpose()?;
        let ctx = AttnContext::new(&self.config, b, t, rows.as_deref(), &self.device)?;
        let mut h = self.embed_tokens.lookup(input_ids)?;
        for layer in &self.layers {
            h = layer.forward(&h, &ctx, None)?;
        }
        self.norm.forward(&h)
    }

    /// LM head on final hidden states (batch, seq, hidden).
    pub fn lm_head_logits(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let y = super::frozen::frozen_matmul_t(&h.reshape((b * t, d))?, &self.lm_head)?;
        Ok(y.reshape((b, t, self.config.vocab_size))?)
    }

    /// Every target linear of every layer, in order.
    pub fn targets(&self) -> impl Iterator<Item = &TargetLinear> {
        self.layers.iter().flat_map(|l| l.targets())
    }

    pub fn targets_mut(&mut self) -> impl Iterator<Item = &mut TargetLinear> {
        self.layers.iter_mut().flat_map(|l| l.targets_mut())
    }

    /// Find a target by module path.
    pub fn target_mut(&mut self, module: &str) -> Result<&mut TargetLinear> {
        self.targets_mut().find(|t| t.name == module).ok_or_else(|| {
            CordaError::Adapter(format!(
                "module `{module}` is not a target linear of this model (expected names like model.layers.0.self_attn.q_proj)"
            ))
        })
    }

    /// Attach float32 LoRA factors A (r, d_in) and B (d_out, r) to one module.
    pub fn attach_lora(
        &mut self,
        module: &str,
        a: &Tensor,
        b: &Tensor,
        scaling: f64,
    ) -> Result<()> {
        let device = self.device.clone();
        let t = self.target_mut(module)?;
        let (d_out, d_in) = t.dims();
        let (ra, ai) = a.dims2()?;
        let (bo, rb) = b.dims2()?;
        if ai != d_in || bo != d_out || ra != rb {
            return Err(CordaError::Adapter(format!(
                "adapter for `{module}` has lora_A {:?} and lora_B {:?}, but the model's weight is ({d_out}, {d_in}); the adapter belongs to another model",
                a.dims(),
                b.dims()
            )));
        }
        let a = Var::from_tensor(&a.to_dtype(DType::F32)?.to_device(&device)?)?;
        let b = Var::from_tensor(&b.to_dtype(DType::F32)?.to_device(&device)?)?;
        t.lora = Some(Lora { a, b, scaling });
        Ok(())
    }

    /// Every target's (module path, d_out, d_in), in layer order: what a fresh LoRA covers.
    pub fn target_shapes(&self) -> Vec<(String, usize, usize)> {
        self.targets()
            .map(|t| {
                let (o, i) = t.dims();
                (t.name.clone(), o, i)
            })
            .collect()
    }

    /// Trainable parameters: the elements of every attached LoRA factor.
    pub fn lora_parameter_count(&self) -> usize {
        self.lora_vars()
            .iter()
            .map(|(_, a, b)| a.elem_count() + b.elem_count())
            .sum()
    }

    /// (module, A, B) for every attached LoRA, in layer order.
    pub fn lora_vars(&self) -> Vec<(String, Var, Var)> {
        self.targets()
            .filter_map(|t| {
                t.lora
                    .as_ref()
                    .map(|l| (t.name.clone(), l.a.clone(), l.b.clone()))
            })
            .collect()
    }
}
