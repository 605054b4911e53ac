//! `config.json` of a Hugging Face causal LM, in both the transformers-4 layout (`rope_theta`,
//! `torch_dtype`, `rope_scaling`) and the transformers-5 layout (`rope_parameters`, `dtype`).
//! Missing optional fields take the transformers defaults of the architecture.

use std::path::Path;

use candle_core::DType;
use serde_json::Value;

use crate::{CordaError, Result};

/// The decoder families this crate can run: they share one forward (RMSNorm, rotary
/// embeddings, GQA attention, SwiGLU MLP) and differ only in defaults and biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2";

    fn parse(model_type: &str) -> Result<Self> {
        match model_type {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(CordaError::Model(format!(
                "unsupported model_type `{other}`; supported: {}",
                Self::SUPPORTED
            ))),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// Rotary-embedding frequency scaling (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3 / 3.1 wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The parsed model configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (always on for Qwen2) and on o_proj (only with `attention_bias`).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Mistral's sliding attention window, when it applies.
    pub sliding_window: Option<usize>,
    /// The checkpoint's declared dtype (`torch_dtype` / `dtype`), if any.
    pub dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The raw JSON, kept so that written model directories preserve every field.
    pub raw: Value,
}

fn req_usize(v: &Value, key: &str, ctx: &str) -> Result<usize> {
    match v.get(key) {
        Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| {
            CordaError::Model(format!(
                "{ctx}: `{key}` must be a non-negative integer, found {x}"
            ))
        }),
        None => Err(CordaError::Model(format!(
            "{ctx}: required field `{key}` is missing; is this a causal-LM config.json?"
        ))),
    }
}

fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn opt_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

/// `float32` / `float16` / `bfloat16` (also `torch.float16` style) to a candle dtype.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim_start_matches("torch.") {
        "float32" | "fp32" | "f32" | "float" => Ok(DType::F32),
        "float16" | "fp16" | "f16" | "half" => Ok(DType::F16),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        other => Err(CordaError::Model(format!(
            "unknown dtype `{other}`; use float32, float16 or bfloat16"
        ))),
    }
}

/// The transformers name of a dtype (`float32`, `float16`, `bfloat16`).
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Read and parse `dir/config.json`; for a GGUF model (a `.gguf` file, or a directory
    /// holding one and no safetensors) see [`super::GgufModel::config`].
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if let Some(file) = super::gguf::find_gguf(dir)? {
            return super::GgufModel::open(&file)?.config();
        }
        if !dir.is_dir() {
            return Err(CordaError::Model(format!(
                "model directory {} does not exist; pass a Hugging Face model directory or a cached hub id",
                dir.display()
            )));
        }
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(CordaError::Model(format!(
                "{} has no config.json; is it a Hugging Face model directory?",
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| CordaError::io(&path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|source| CordaError::Json {
            path: path.clone(),
            source,
        })?;
        Self::from_value(raw, &path.display().to_string())
    }

    /// Parse a config already read as JSON; `ctx` names it in errors.
    pub fn from_value(raw: Value, ctx: &str) -> Result<Self> {
        if !raw.is_object() {
            return Err(CordaError::Model(format!("{ctx}: expected a JSON object")));
        }
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                CordaError::Model(format!(
                    "{ctx}: required field `model_type` is missing; supported: {}",
                    Architecture::SUPPORTED
                ))
            })?;
        let architecture = Architecture::parse(model_type)?;
        let hidden_size = req_usize(&raw, "hidden_size", ctx)?;
        let num_attention_heads = req_usize(&raw, "num_attention_heads", ctx)?;
        if num_attention_heads == 0 || hidden_size == 0 {
            return Err(CordaError::Model(format!(
                "{ctx}: hidden_size and num_attention_heads must be positive"
            )));
        }
        let num_key_value_heads = match raw.get("num_key_value_heads") {
            Some(Value::Null) | None => num_attention_heads,
            Some(_) => req_usize(&raw, "num_key_value_heads", ctx)?,
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(CordaError::Model(format!(
                "{ctx}: num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match raw.get("head_dim") {
            Some(Value::Null) | None => hidden_size / num_attention_heads,
            Some(_) => req_usize(&raw, "head_dim", ctx)?,
        };
        if let Some(act) = raw.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" && act != "swish" {
                return Err(CordaError::Model(format!(
                    "{ctx}: hidden_act `{act}` is not supported; only silu (SwiGLU) models are"
                )));
            }
        }
        // transformers-5 keeps rope settings in `rope_parameters`; transformers-4 at top level.
        let rope = raw
            .get("rope_parameters")
            .filter(|v| v.is_object())
            .or_else(|| raw.get("rope_scaling").filter(|v| v.is_object()));
        let rope_theta = raw
            .get("rope_parameters")
            .and_then(|p| opt_f64(p, "rope_theta"))
            .or_else(|| opt_f64(&raw, "rope_theta"))
            // transformers' default for every supported architecture.
            .unwrap_or(10000.0);
        let rope_scaling = match rope {
            None => RopeScaling::Default,
            Some(r) => {
                let kind = r
                    .get("rope_type")
                    .or_else(|| r.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let factor = opt_f64(r, "factor");
                match kind {
                    "default" => RopeScaling::Default,
                    "linear" => RopeScaling::Linear {
                        factor: factor.ok_or_else(|| CordaError::Model(format!("{ctx}: linear rope scaling needs `factor`")))?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: factor.ok_or_else(|| CordaError::Model(format!("{ctx}: llama3 rope scaling needs `factor`")))?,
                        low_freq_factor: opt_f64(r, "low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: opt_f64(r, "high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: r
                            .get("original_max_position_embeddings")
                            .and_then(Value::as_u64)
                            .unwrap_or(8192) as usize,
                    },
                    other => {
                        return Err(CordaError::Model(format!(
                            "{ctx}: rope scaling `{other}` is not supported; supported: default, linear, llama3"
                        )))
                    }
                }
            }
        };
        let dtype = match raw
            .get("dtype")
            .or_else(|| raw.get("torch_dtype"))
            .and_then(Value::as_str)
        {
            Some(s) => Some(parse_dtype(s).map_err(|e| CordaError::Model(format!("{ctx}: {e}")))?),
            None => None,
        };
        let attention_bias = opt_bool(&raw, "attention_bias").unwrap_or(false);
        let qkv_bias = architecture == Architecture::Qwen2 || attention_bias;
        let sliding_window = match architecture {
            Architecture::Mistral => raw
                .get("sliding_window")
                .and_then(Value::as_u64)
                .map(|w| w as usize),
            Architecture::Qwen2 if opt_bool(&raw, "use_sliding_window").unwrap_or(false) => raw
                .get("sliding_window")
                .and_then(Value::as_u64)
                .map(|w| w as usize),
            _ => None,
        };
        Ok(Self {
            architecture,
            vocab_size: req_usize(&raw, "vocab_size", ctx)?,
            hidden_size,
            intermediate_size: req_usize(&raw, "intermediate_size", ctx)?,
            num_hidden_layers: req_usize(&raw, "num_hidden_layers", ctx)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64(&raw, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(match architecture {
                    Architecture::Llama => 2048,
                    Architecture::Mistral => 4096 * 32,
                    Architecture::Qwen2 => 32768,
                }),
            tie_word_embeddings: opt_bool(&raw, "tie_word_embeddings").unwrap_or(false),
            qkv_bias,
            o_bias: attention_bias && architecture != Architecture::Qwen2,
            mlp_bias: opt_bool(&raw, "mlp_bias").unwrap_or(false),
            sliding_window,
            dtype,
            bos_token_id: token_ids(raw.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(raw.get("eos_token_id")),
            raw,
        })
    }

    /// Output width of q_proj / of k_proj and v_proj.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// (d_out, d_in) of a target projection, by its short name.
    pub fn target_shape(&self, proj: &str) -> Option<(usize, usize)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        Some(match proj {
            "q_proj" => (self.q_dim(), h),
            "k_proj" | "v_proj" => (self.kv_dim(), h),
            "o_proj" => (h, self.q_dim()),
            "gate_proj" | "up_proj" => (i, h),
            "down_proj" => (h, i),
            _ => return None,
        })
    }

    /// Rotary inverse frequencies (head_dim / 2 of them), with the configured scaling.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        match &self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v4() -> Value {
        json!({"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    }

    #[test]
    fn both_layouts_agree() {
        let a = ModelConfig::from_value(v4(), "v4").unwrap();
        let mut v5 = v4();
        let o = v5.as_object_mut().unwrap();
        let mut rp = o.remove("rope_scaling").unwrap();
        rp["rope_theta"] = json!(500000.0);
        o.remove("rope_theta");
        o.remove("torch_dtype");
        o.insert("rope_parameters".into(), rp);
        o.insert("dtype".into(), json!("bfloat16"));
        let b = ModelConfig::from_value(v5, "v5").unwrap();
        assert_eq!(a.rope_theta, b.rope_theta);
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!(a.dtype, Some(DType::BF16));
        assert_eq!(a.rope_inv_freq(), b.rope_inv_freq());
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn defaults_follow_transformers() {
        let mut v = v4();
        let o = v.as_object_mut().unwrap();
        for k in [
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_theta",
            "rope_scaling",
            "torch_dtype",
        ] {
            o.remove(k);
        }
        let c = ModelConfig::from_value(v, "t").unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert!(!c.tie_word_embeddings && !c.qkv_bias && c.dtype.is_none());
        assert_eq!(c.max_position_embeddings, 2048);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_explicit_head_dim() {
        let mut v = v4();
        v["model_type"] = json!("qwen2");
        v["head_dim"] = json!(32);
        let c = ModelConfig::from_value(v, "t").unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.q_dim(), 128);
        assert_eq!(c.target_shape("o_proj"), Some((64, 128)));
    }

    #[test]
    fn errors_name_the_problem() {
        let mut v = v4();
        v["model_type"] = json!("gpt2");
        let e = ModelConfig::from_value(v, "c").unwrap_err().to_string();
        assert!(
            e.contains("gpt2") && e.contains("llama, mistral, qwen2"),
            "{e}"
        );
        let mut v = v4();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_value(v, "c").unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let mut v = v4();
        v["torch_dtype"] = json!("int3");
        assert!(ModelConfig::from_value(v, "c")
            .unwrap_err()
            .to_string()
            .contains("int3"));
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies() {
        let c = ModelConfig::from_value(v4(), "t").unwrap();
        let f = c.rope_inv_freq();
        assert_eq!(f[0], 1.0);
        let plain = 1.0 / 500000f64.powf(14.0 / 16.0);
        assert!((f[7] - plain / 8.0).abs() < 1e-15);
    }
}
