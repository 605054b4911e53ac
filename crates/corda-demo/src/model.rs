//! Random Llama models in the Hugging Face layout, of any shape, written with the project's
//! own [`ShardWriter`] — the same code path as a residual model — so the quickstart, tests and
//! benchmarks exercise real model directories without a download.
//!
//! The directory holds `config.json` (transformers-4 or -5 layout), the weights (one
//! `model.safetensors`, or shards plus `model.safetensors.index.json`),
//! `generation_config.json` and the demo tokenizer. transformers loads it as a
//! `LlamaForCausalLM`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::init::{normal_f32, INIT_STD};
use super::tokenizer::{write_tokenizer, BOS_ID, EOS_ID};
use corda_core::model::{dtype_name, ShardWriter};
use corda_core::{CordaError, Result};

/// Which transformers version's `config.json` layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigStyle {
    /// transformers 4: `torch_dtype`, top-level `rope_theta` and `rope_scaling`.
    V4,
    /// transformers 5: `dtype`, `rope_parameters` holding `rope_theta` and `rope_type`.
    V5,
}

impl std::str::FromStr for ConfigStyle {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "v4" | "4" => Ok(Self::V4),
            "v5" | "5" => Ok(Self::V5),
            other => Err(format!("`{other}` is not a config style; use v4 or v5")),
        }
    }
}

/// The shape and storage of a random demo model.
#[derive(Debug, Clone)]
pub struct DemoModelSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Rows of the embedding and LM head; `None` = the demo tokenizer's vocabulary size.
    /// Larger values (e.g. Llama-2's 32000) give realistic LM-head costs in benchmarks.
    pub vocab_size: Option<usize>,
    pub dtype: DType,
    pub seed: u64,
    /// Largest shard in bytes; `None` = a single `model.safetensors`.
    pub max_shard_bytes: Option<u64>,
    pub config_style: ConfigStyle,
    pub tie_word_embeddings: bool,
    /// Standard deviation of every linear and embedding weight (`initializer_range`;
    /// transformers' default is 0.02).
    pub initializer_range: f32,
}

impl Default for DemoModelSpec {
    /// The quickstart's model: small enough to preprocess and fine-tune in seconds on a CPU,
    /// big enough (4 layers, grouped-query attention) to exercise every code path.
    fn default() -> Self {
        Self {
            hidden_size: 128,
            intermediate_size: 352,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            vocab_size: None,
            dtype: DType::F32,
            seed: 42,
            max_shard_bytes: None,
            config_style: ConfigStyle::V4,
            tie_word_embeddings: false,
            initializer_range: INIT_STD,
        }
    }
}

impl DemoModelSpec {
    /// Check the shape the way the decoder will need it, with a message that names the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CordaError::Invalid(m));
        if self.hidden_size == 0 || self.intermediate_size == 0 || self.num_layers == 0 {
            return bad("--hidden, --intermediate and --layers must be positive".into());
        }
        if self.hidden_size.checked_rem(self.num_heads) != Some(0) {
            return bad(format!(
                "--hidden ({}) must be a multiple of --heads ({})",
                self.hidden_size, self.num_heads
            ));
        }
        if self.head_dim() % 2 == 1 {
            return bad(format!(
                "the head size --hidden / --heads = {} must be even for rotary embeddings",
                self.hidden_size / self.num_heads
            ));
        }
        if self.num_heads.checked_rem(self.num_kv_heads) != Some(0) {
            return bad(format!(
                "--heads ({}) must be a multiple of --kv_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range > 0.0) {
            return bad(format!(
                "--initializer_range must be positive, got {}",
                self.initializer_range
            ));
        }
        if !matches!(self.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return bad(format!(
                "dtype {:?} is not supported; use float32, float16 or bfloat16",
                self.dtype
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// (name, (d_out, d_in) or (len,), is a norm) of every tensor, in model order.
    pub fn tensors(&self, vocab_size: usize) -> Vec<(String, Vec<usize>, bool)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (q, kv) = (self.num_heads * hd, self.num_kv_heads * hd);
        let mut t = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![vocab_size, h],
            false,
        )];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h], true));
            t.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h], false));
            t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h], false));
            t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h], false));
            t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q], false));
            t.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                true,
            ));
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h], false));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h], false));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i], false));
        }
        t.push(("model.norm.weight".to_string(), vec![h], true));
        if !self.tie_word_embeddings {
            t.push(("lm_head.weight".to_string(), vec![vocab_size, h], false));
        }
        t
    }

    /// `config.json` for this shape, in the chosen transformers layout.
    pub fn config_json(&self, vocab_size: usize) -> Value {
        let mut c = json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            // Through the shortest decimal form, so 0.02 is written as 0.02, not 0.019999999552965164.
            "initializer_range": self.initializer_range.to_string().parse::<f64>().unwrap_or(0.02),
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 2048,
            "mlp_bias": false,
            "model_type": "llama",
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-6,
        });
        let o = c.as_object_mut().expect("object");
        match self.config_style {
            ConfigStyle::V4 => {
                o.insert("rope_scaling".into(), Value::Null);
                o.insert("rope_theta".into(), json!(10000.0));
            }
            ConfigStyle::V5 => {
                o.insert(
                    "rope_parameters".into(),
                    json!({"rope_theta": 10000.0, "rope_type": "default"}),
                );
            }
        }
        o.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        let dtype_key = match self.config_style {
            ConfigStyle::V4 => "torch_dtype",
            ConfigStyle::V5 => "dtype",
        };
        o.insert(dtype_key.into(), json!(dtype_name(self.dtype)));
        o.insert(
            "transformers_version".into(),
            json!(self.transformers_version()),
        );
        o.insert("use_cache".into(), json!(true));
        o.insert("vocab_size".into(), json!(vocab_size));
        // transformers writes the keys sorted; so do we, whatever the layout.
        let sorted: std::collections::BTreeMap<String, Value> =
            std::mem::take(o).into_iter().collect();
        Value::Object(sorted.into_iter().collect())
    }

    fn transformers_version(&self) -> &'static str {
        match self.config_style {
            ConfigStyle::V4 => "4.46.0",
            ConfigStyle::V5 => "5.0.0",
        }
    }
}

/// What [`write_random_model`] wrote.
#[derive(Debug, Clone)]
pub struct DemoModelSummary {
    pub dir: PathBuf,
    pub vocab_size: usize,
    pub num_parameters: u64,
    /// Bytes of tensor data over all shards.
    pub weight_bytes: u64,
    /// Weight files written (1 = a single `model.safetensors`).
    pub num_shards: usize,
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("json value");
    std::fs::write(path, text + "\n").map_err(|e| CordaError::io(path, e))
}

/// Write a random Llama model directory into `dir` (created if needed).
///
/// Linear and embedding weights are `normal(0, 0.02)` and norms are 1, as transformers
/// initialises a fresh `LlamaForCausalLM`; the values depend only on the seed and each
/// tensor's name and size. Tensors are generated one at a time and handed to the shard
/// writer, so with `max_shard_bytes` set, memory stays near one shard.
pub fn write_random_model(dir: &Path, spec: &DemoModelSpec) -> Result<DemoModelSummary> {
    spec.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| CordaError::io(dir, e))?;
    let tokenizer_vocab = write_tokenizer(dir)?;
    let vocab_size = spec.vocab_size.unwrap_or(tokenizer_vocab);
    if vocab_size < tokenizer_vocab {
        return Err(CordaError::Invalid(format!(
            "--vocab_size {vocab_size} is smaller than the demo tokenizer's {tokenizer_vocab} tokens; pass at least {tokenizer_vocab} or leave it out"
        )));
    }
    write_json(&dir.join("config.json"), &spec.config_json(vocab_size))?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({
            "_from_model_config": true,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "transformers_version": spec.transformers_version(),
        }),
    )?;

    let mut writer = ShardWriter::new(dir, spec.max_shard_bytes.unwrap_or(u64::MAX));
    let (mut num_parameters, mut weight_bytes, mut shard_fill, mut num_shards) =
        (0u64, 0u64, 0u64, 1usize);
    let limit = spec.max_shard_bytes.unwrap_or(u64::MAX).max(1);
    for (name, shape, is_norm) in spec.tensors(vocab_size) {
        let len: usize = shape.iter().product();
        let data = if is_norm {
            vec![1f32; len]
        } else {
            normal_f32(spec.seed, &name, len, spec.initializer_range)
        };
        let t = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?.to_dtype(spec.dtype)?;
        let bytes = (len * spec.dtype.size_in_bytes()) as u64;
        // Mirror the writer's rule to report the shard count.
        if shard_fill > 0 && shard_fill + bytes > limit {
            num_shards += 1;
            shard_fill = 0;
        }
        shard_fill += bytes;
        num_parameters += len as u64;
        weight_bytes += bytes;
        writer.push(name, t)?;
    }
    writer.finish()?;
    Ok(DemoModelSummary {
        dir: dir.to_path_buf(),
        vocab_size,
        num_parameters,
        weight_bytes,
        num_shards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use corda_core::model::{CausalLM, LoadOptions, ModelConfig, TokenizerInfo, Weights};

    fn tiny() -> DemoModelSpec {
        DemoModelSpec {
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 2,
            ..Default::default()
        }
    }

    fn logits(dir: &Path) -> Vec<f32> {
        let m = CausalLM::load(dir, &LoadOptions::default()).unwrap();
        let tok = TokenizerInfo::load(dir).unwrap();
        let ids = tok.encode("what is the capital of France?").unwrap();
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
        let l = m.forward(&ids, None).unwrap();
        assert_eq!(l.dims(), &[1, n, m.config.vocab_size]);
        l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn demo_model_loads_and_gives_finite_logits() {
        let dir = tempfile::tempdir().unwrap();
        let s = write_random_model(dir.path(), &tiny()).unwrap();
        assert_eq!(s.num_shards, 1);
        assert!(dir.path().join("model.safetensors").is_file());
        let l = logits(dir.path());
        assert!(l.iter().all(|x| x.is_finite()));
        // A random LM: small, non-zero logits (near-uniform next-token distribution).
        let max = l.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max > 1e-3 && max < 5.0, "max |logit| {max}");
        let w = Weights::open(dir.path()).unwrap();
        assert_eq!(w.names().len(), tiny().tensors(s.vocab_size).len());
        assert_eq!(
            w.shape("model.layers.1.self_attn.k_proj.weight").unwrap(),
            vec![16, 32]
        );
        assert_eq!(
            w.shape("model.layers.0.mlp.down_proj.weight").unwrap(),
            vec![32, 64]
        );
        let cfg = ModelConfig::from_dir(dir.path()).unwrap();
        assert_eq!(
            (cfg.num_key_value_heads, cfg.head_dim, cfg.dtype),
            (2, 8, Some(DType::F32))
        );
    }

    #[test]
    fn demo_model_shards_when_asked() {
        let (one, many) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_random_model(one.path(), &tiny()).unwrap();
        let s = write_random_model(
            many.path(),
            &DemoModelSpec {
                max_shard_bytes: Some(40_000),
                ..tiny()
            },
        )
        .unwrap();
        assert!(s.num_shards > 2, "{} shards", s.num_shards);
        assert!(many.path().join("model.safetensors.index.json").is_file());
        let w = Weights::open(many.path()).unwrap();
        assert_eq!(w.num_files(), s.num_shards);
        assert_eq!(logits(one.path()), logits(many.path()));
    }

    #[test]
    fn demo_model_v5_config_and_half_dtypes_load() {
        for (style, dtype) in [
            (ConfigStyle::V5, DType::BF16),
            (ConfigStyle::V4, DType::F16),
        ] {
            let dir = tempfile::tempdir().unwrap();
            write_random_model(
                dir.path(),
                &DemoModelSpec {
                    config_style: style,
                    dtype,
                    tie_word_embeddings: true,
                    ..tiny()
                },
            )
            .unwrap();
            let raw: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.path().join("config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(
                raw.get("rope_parameters").is_some(),
                style == ConfigStyle::V5
            );
            assert_eq!(raw.get("torch_dtype").is_some(), style == ConfigStyle::V4);
            let cfg = ModelConfig::from_dir(dir.path()).unwrap();
            assert_eq!(
                (cfg.dtype, cfg.rope_theta, cfg.tie_word_embeddings),
                (Some(dtype), 10000.0, true)
            );
            let w = Weights::open(dir.path()).unwrap();
            assert!(!w.contains("lm_head.weight"));
            assert_eq!(w.dtype("model.embed_tokens.weight").unwrap(), dtype);
            assert!(logits(dir.path()).iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn demo_model_same_seed_same_bytes() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        write_random_model(a.path(), &tiny()).unwrap();
        write_random_model(b.path(), &tiny()).unwrap();
        write_random_model(c.path(), &DemoModelSpec { seed: 43, ..tiny() }).unwrap();
        for f in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "model.safetensors",
        ] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap(),
                "{f}"
            );
        }
        assert_ne!(
            std::fs::read(a.path().join("model.safetensors")).unwrap(),
            std::fs::read(c.path().join("model.safetensors")).unwrap()
        );
    }

    #[test]
    fn demo_model_rejects_bad_shapes_with_the_flag_name() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_random_model(
            dir.path(),
            &DemoModelSpec {
                num_kv_heads: 3,
                ..tiny()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--kv_heads"), "{e}");
        let e = write_random_model(
            dir.path(),
            &DemoModelSpec {
                vocab_size: Some(5),
                ..tiny()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--vocab_size"), "{e}");
    }
}
