//! GGUF input (llama.cpp's single-file format): the weights behind [`super::Weights`], the
//! config behind [`super::ModelConfig`] and the tokenizer behind [`super::TokenizerInfo`].
//!
//! Nothing is converted on disk. The file is memory-mapped once and its header parsed by
//! candle's GGUF reader; each tensor is dequantized when it is asked for, under its Hugging Face
//! name, with llama.cpp's rotary permutation of the query and key rows undone, so the rest of
//! the crate sees the model exactly as transformers would after a float32 conversion.
//!
//! The config comes from a `config.json` beside the file when there is one (checked against
//! the GGUF metadata), else from the metadata; the tokenizer from a `tokenizer.json` beside it,
//! else it is rebuilt from the metadata (byte-level BPE with merges, or SentencePiece BPE with
//! scores) and its special tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use serde_json::{json, Value};

use super::config::ModelConfig;
use crate::{CordaError, Result};

/// The GGUF architectures (`general.architecture`) this reader maps to Hugging Face models.
pub const SUPPORTED_ARCHITECTURES: &str = "llama (Llama 1/2/3, Mistral, SmolLM), qwen2";

/// The tensor types that can be dequantized.
pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// `path` names a `.gguf` file (by extension).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The GGUF file a model path stands for: the path itself when it is a `.gguf` file, or the
/// single `.gguf` in a directory that has no safetensors weights. `None` for anything else
/// (ordinary model directories); an error for a directory with several `.gguf` files.
pub fn find_gguf(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        return Ok(is_gguf_path(path).then(|| path.to_path_buf()));
    }
    if !path.is_dir()
        || path.join("model.safetensors").is_file()
        || path.join("model.safetensors.index.json").is_file()
    {
        return Ok(None);
    }
    let entries = std::fs::read_dir(path).map_err(|e| CordaError::io(path, e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_gguf_path(p))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(CordaError::Model(format!(
            "{} holds {} .gguf files ({}); pass the path of the one you mean, e.g. {}",
            path.display(),
            found.len(),
            found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", "),
            found[0].display()
        ))),
    }
}

/// The model families a GGUF file can hold here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    /// llama.cpp permutes q/k rows of these (its rotary kernel pairs adjacent dimensions).
    Llama,
    /// NeoX-style rotary in llama.cpp: rows are stored as in transformers; q/k/v have biases.
    Qwen2,
}

/// Where one tensor lives and how to turn it into the Hugging Face tensor.
#[derive(Debug, Clone)]
struct Entry {
    gguf_name: String,
    ggml: GgmlDType,
    /// Row-major (Hugging Face) shape.
    shape: Vec<usize>,
    start: usize,
    end: usize,
    /// Undo llama.cpp's rotary permutation of the rows with this many heads.
    rotary_heads: Option<usize>,
}

/// An opened GGUF model: the memory-mapped file, its metadata, and its tensors under Hugging
/// Face names.
pub struct GgufModel {
    path: PathBuf,
    map: Mmap,
    metadata: HashMap<String, GgufValue>,
    arch: Arch,
    entries: HashMap<String, Entry>,
    /// Llama 3.1 rope scaling is stored as a tensor of factors; only a config.json can say it.
    rope_freqs: bool,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> CordaError {
    CordaError::Gguf {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// A metadata value as a non-negative integer (GGUF writers use any integer width).
fn as_u64(v: &GgufValue) -> Option<u64> {
    match *v {
        GgufValue::U8(x) => Some(x as u64),
        GgufValue::U16(x) => Some(x as u64),
        GgufValue::U32(x) => Some(x as u64),
        GgufValue::U64(x) => Some(x),
        GgufValue::I8(x) => u64::try_from(x).ok(),
        GgufValue::I16(x) => u64::try_from(x).ok(),
        GgufValue::I32(x) => u64::try_from(x).ok(),
        GgufValue::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn as_f64(v: &GgufValue) -> Option<f64> {
    match *v {
        // The shortest decimal that round-trips the f32 (1e-5 stays 1e-5, as in config.json).
        GgufValue::F32(x) => format!("{x}").parse().ok(),
        GgufValue::F64(x) => Some(x),
        _ => as_u64(v).map(|x| x as f64),
    }
}

/// The Hugging Face name of a GGUF tensor and whether its rows carry the rotary permutation
/// (`Some(true)` for q, `Some(false)` for k).
fn hf_name(gguf: &str) -> Option<(String, Option<bool>)> {
    match gguf {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), None)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), None)),
        "output.weight" => return Some(("lm_head.weight".into(), None)),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.split_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (module, rotary) = match part {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", Some(true)),
        "attn_k" => ("self_attn.k_proj", Some(false)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{module}.{kind}"), rotary))
}

impl GgufModel {
    /// Map the file, parse its header and check that every tensor can be read.
    pub fn open(path: &Path) -> Result<Self> {
        let map = super::weights::map_file(path, || {
            format!("GGUF file {} does not exist", path.display())
        })?;
        if map.len() < 4 || &map[..4] != b"GGUF" {
            return Err(corrupt(path, "no GGUF magic at the start of the file"));
        }
        // candle's reader bounds-checks lengths against the file; the unwind guard turns any
        // remaining arithmetic panic on a hostile header (e.g. alignment 0) into an error.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Content::read(&mut std::io::Cursor::new(&map[..]))
        }));
        let content = match parsed {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let msg = e.to_string();
                if let Some(id) = msg.strip_prefix("unknown dtype for tensor ") {
                    return Err(CordaError::Model(format!(
                        "{}: a tensor uses GGML type {id}, which cannot be dequantized here (supported: {SUPPORTED_TYPES}); use a file quantized with one of those",
                        path.display()
                    )));
                }
                return Err(corrupt(path, format!("invalid header: {msg}")));
            }
            Err(_) => return Err(corrupt(path, "invalid header")),
        };
        let arch_name = match content.metadata.get("general.architecture") {
            Some(GgufValue::String(s)) => s.clone(),
            _ => {
                return Err(corrupt(
                    path,
                    "the metadata has no `general.architecture` string",
                ))
            }
        };
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(CordaError::Model(format!(
                    "{}: GGUF architecture `{other}` is not supported; supported: {SUPPORTED_ARCHITECTURES}",
                    path.display()
                )))
            }
        };
        let mut model = Self {
            path: path.to_path_buf(),
            map,
            metadata: content.metadata,
            arch,
            entries: HashMap::new(),
            rope_freqs: false,
        };
        let n_head = model.meta_usize("attention.head_count")?;
        let n_kv = model.meta_usize_or("attention.head_count_kv", n_head)?;
        let data_start = content.tensor_data_offset;
        // In file order, so that the first problem reported is the same on every run.
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        for (name, info) in infos {
            if name == "rope_freqs.weight" {
                // Llama 3.1 rope scaling, precomputed; the config carries it (see `config`).
                model.rope_freqs = true;
                continue;
            }
            let Some((hf, rotary)) = hf_name(name) else {
                return Err(CordaError::Model(format!(
                    "{}: tensor `{name}` has no counterpart in a Hugging Face {arch_name} model; this GGUF is not a plain Llama-family decoder (supported: {SUPPORTED_ARCHITECTURES})",
                    path.display()
                )));
            };
            let ggml = info.ggml_dtype;
            if matches!(ggml, GgmlDType::Q8_1 | GgmlDType::Q8K) {
                return Err(CordaError::Model(format!(
                    "{}: tensor `{name}` is {}, which cannot be dequantized here (supported: {SUPPORTED_TYPES})",
                    path.display(),
                    type_name(ggml)
                )));
            }
            let shape = info.shape.dims().to_vec();
            if shape.is_empty() {
                return Err(corrupt(path, format!("tensor `{name}` has no dimensions")));
            }
            let elems = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| {
                    corrupt(
                        path,
                        format!("tensor `{name}` has an impossible shape {shape:?}"),
                    )
                })?;
            if elems % ggml.block_size() != 0 {
                return Err(corrupt(
                    path,
                    format!(
                        "tensor `{name}` has {elems} elements, not a multiple of the {} block size {}",
                        type_name(ggml),
                        ggml.block_size()
                    ),
                ));
            }
            let bytes = elems / ggml.block_size() * ggml.type_size();
            let start = data_start
                .checked_add(info.offset)
                .and_then(|s| usize::try_from(s).ok());
            let end = start.and_then(|s| s.checked_add(bytes));
            let (start, end) = match (start, end) {
                (Some(s), Some(e)) if e <= model.map.len() => (s, e),
                _ => {
                    return Err(corrupt(
                        path,
                        format!(
                            "tensor `{name}` lies beyond the end of the file ({} bytes); the file is truncated",
                            model.map.len()
                        ),
                    ))
                }
            };
            if start % 4 != 0 {
                return Err(corrupt(
                    path,
                    format!("tensor `{name}` data is not aligned (offset {start})"),
                ));
            }
            let rotary_heads = match (arch, rotary) {
                (Arch::Llama, Some(true)) => Some(n_head),
                (Arch::Llama, Some(false)) => Some(n_kv),
                _ => None,
            };
            if let Some(h) = rotary_heads {
                if h == 0 || shape[0] % (2 * h) != 0 {
                    return Err(CordaError::Model(format!(
                        "{}: tensor `{name}` has {} rows, not a multiple of 2 x {h} heads; the head counts in the metadata do not fit the weights",
                        path.display(),
                        shape[0]
                    )));
                }
            }
            model.entries.insert(
                hf,
                Entry {
                    gguf_name: name.clone(),
                    ggml,
                    shape,
                    start,
                    end,
                    rotary_heads,
                },
            );
        }
        if !model.entries.contains_key("model.embed_tokens.weight") {
            return Err(CordaError::Model(format!(
                "{}: no `token_embd.weight` tensor; this is not a complete language model",
                path.display()
            )));
        }
        Ok(model)
    }

    /// The `.gguf` file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory the file is in (where `config.json` / `tokenizer.json` are looked for).
    pub fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> &'static str {
        match self.arch {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// A raw metadata value.
    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn arch_key(&self, key: &str) -> String {
        format!("{}.{key}", self.architecture())
    }

    fn meta_usize_opt(&self, key: &str) -> Result<Option<usize>> {
        let full = self.arch_key(key);
        match self.metadata.get(&full) {
            None => Ok(None),
            Some(v) => as_u64(v).map(|x| Some(x as usize)).ok_or_else(|| {
                corrupt(
                    &self.path,
                    format!("`{full}` is not a non-negative integer"),
                )
            }),
        }
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        self.meta_usize_opt(key)?.ok_or_else(|| {
            corrupt(
                &self.path,
                format!("the metadata lacks `{}`", self.arch_key(key)),
            )
        })
    }

    fn meta_usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.meta_usize_opt(key)?.unwrap_or(default))
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        self.metadata.get(&self.arch_key(key)).and_then(as_f64)
    }

    fn meta_str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(GgufValue::String(s)) => Some(s),
            _ => None,
        }
    }

    fn token_id(&self, key: &str) -> Option<u32> {
        self.metadata
            .get(key)
            .and_then(as_u64)
            .and_then(|x| u32::try_from(x).ok())
    }

    /// Tensor names (Hugging Face), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| CordaError::MissingTensor {
                name: name.to_string(),
                location: self.path.display().to_string(),
            })
    }

    /// Shape of a tensor (Hugging Face layout).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    /// The dtype [`Self::get`] returns: float32 for quantized tensors (exact), else the stored one.
    pub fn dtype(&self, name: &str) -> Result<DType> {
        Ok(match self.entry(name)?.ggml {
            GgmlDType::F16 => DType::F16,
            GgmlDType::BF16 => DType::BF16,
            _ => DType::F32,
        })
    }

    /// The GGML storage type of a tensor (`Q4_1`, `F32`, ...).
    pub fn storage_type(&self, name: &str) -> Result<&'static str> {
        Ok(type_name(self.entry(name)?.ggml))
    }

    /// A tensor under its Hugging Face name, dequantized, rows in transformers' order.
    pub fn get(&self, name: &str, device: &Device) -> Result<Tensor> {
        let e = self.entry(name)?;
        let bytes = &self.map[e.start..e.end];
        let read = || -> candle_core::Result<Tensor> {
            let t = match e.ggml {
                GgmlDType::F32 => {
                    Tensor::from_raw_buffer(bytes, DType::F32, &e.shape, &Device::Cpu)?
                }
                GgmlDType::F16 => {
                    Tensor::from_raw_buffer(bytes, DType::F16, &e.shape, &Device::Cpu)?
                }
                GgmlDType::BF16 => {
                    Tensor::from_raw_buffer(bytes, DType::BF16, &e.shape, &Device::Cpu)?
                }
                t => qtensor_from_ggml(t, bytes, e.shape.clone(), &Device::Cpu)?
                    .dequantize(&Device::Cpu)?,
            };
            match e.rotary_heads {
                Some(h) => unpermute_rotary(&t, h),
                None => Ok(t),
            }
        };
        let t = read().map_err(|err| {
            corrupt(
                &self.path,
                format!("cannot read tensor `{}`: {err}", e.gguf_name),
            )
        })?;
        // The bytes are copied; give the mapped pages back (as the safetensors reader does).
        super::weights::release_pages(&self.map, e.start, e.end);
        Ok(t.to_device(device)?)
    }

    /// The model config: `config.json` beside the file (checked against the metadata) when
    /// there is one, else built from the metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let beside = self.dir().join("config.json");
        let from_meta = self.config_from_metadata();
        if !beside.is_file() {
            return from_meta;
        }
        let cfg = read_config_json(&beside)?;
        let meta = from_meta?;
        let pairs = [
            ("hidden_size", cfg.hidden_size, meta.hidden_size),
            (
                "intermediate_size",
                cfg.intermediate_size,
                meta.intermediate_size,
            ),
            (
                "num_hidden_layers",
                cfg.num_hidden_layers,
                meta.num_hidden_layers,
            ),
            (
                "num_attention_heads",
                cfg.num_attention_heads,
                meta.num_attention_heads,
            ),
            (
                "num_key_value_heads",
                cfg.num_key_value_heads,
                meta.num_key_value_heads,
            ),
            ("head_dim", cfg.head_dim, meta.head_dim),
            ("vocab_size", cfg.vocab_size, meta.vocab_size),
        ];
        for (key, json_v, gguf_v) in pairs {
            if json_v != gguf_v {
                return Err(CordaError::Model(format!(
                    "{} says {key} = {json_v} but {} holds a model with {gguf_v}; the config.json belongs to another model (move the .gguf to its own directory)",
                    beside.display(),
                    self.path.display()
                )));
            }
        }
        if cfg.architecture.as_str() != meta.architecture.as_str() {
            return Err(CordaError::Model(format!(
                "{} says model_type {} but {} is a {} model",
                beside.display(),
                cfg.architecture.as_str(),
                self.path.display(),
                meta.architecture.as_str()
            )));
        }
        if !self.contains("lm_head.weight") && !cfg.tie_word_embeddings {
            return Err(CordaError::Model(format!(
                "{} says tie_word_embeddings false but {} has no output.weight; the config.json belongs to another model",
                beside.display(),
                self.path.display()
            )));
        }
        Ok(cfg)
    }

    /// The model config as transformers would write it, from the GGUF metadata alone.
    pub fn config_from_metadata(&self) -> Result<ModelConfig> {
        let hidden = self.meta_usize("embedding_length")?;
        let n_head = self.meta_usize("attention.head_count")?;
        let n_kv = self.meta_usize_or("attention.head_count_kv", n_head)?;
        if n_head == 0 {
            return Err(corrupt(&self.path, "attention.head_count is 0"));
        }
        let head_dim = self.meta_usize_or("attention.key_length", hidden / n_head)?;
        let embed = self.shape("model.embed_tokens.weight")?;
        let vocab = match self.meta_usize_opt("vocab_size")? {
            Some(v) => v,
            None => embed[0],
        };
        if self.rope_freqs {
            return Err(CordaError::Model(format!(
                "{} carries Llama 3.1-style rope scaling factors (rope_freqs.weight), which cannot be turned back into rope_scaling; put the model's config.json beside the .gguf",
                self.path.display()
            )));
        }
        let rope_scaling = match self.meta_str(&self.arch_key("rope.scaling.type")) {
            None | Some("none") => Value::Null,
            Some("linear") => {
                let factor = self.meta_f64("rope.scaling.factor").ok_or_else(|| {
                    corrupt(&self.path, "linear rope scaling without rope.scaling.factor")
                })?;
                json!({"rope_type": "linear", "factor": factor})
            }
            Some(other) => {
                return Err(CordaError::Model(format!(
                    "{}: rope scaling `{other}` is not supported (supported: none, linear); put the model's config.json beside the .gguf if it is Llama 3-style",
                    self.path.display()
                )))
            }
        };
        let (model_type, class) = match self.arch {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        };
        let mut raw = json!({
            "architectures": [class],
            "model_type": model_type,
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": self.meta_usize("feed_forward_length")?,
            "num_hidden_layers": self.meta_usize("block_count")?,
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "max_position_embeddings": self.meta_usize_or("context_length", 2048)?,
            "rms_norm_eps": self.meta_f64("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            "rope_theta": self.meta_f64("rope.freq_base").unwrap_or(10000.0),
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": !self.contains("lm_head.weight"),
            "vocab_size": vocab,
            "attention_bias": false,
            "mlp_bias": false,
            "use_cache": true,
        });
        let o = raw.as_object_mut().expect("object");
        if self.arch == Arch::Llama && self.contains("model.layers.0.self_attn.q_proj.bias") {
            o.insert("attention_bias".into(), true.into());
        }
        if self.arch == Arch::Qwen2 {
            o.insert("use_sliding_window".into(), false.into());
        }
        o.extend(self.special_token_ids());
        ModelConfig::from_value(raw, &format!("{} (GGUF metadata)", self.path.display()))
    }
}

/// Llama 3's pre-tokenizer split (its `tokenizer.json`), llama.cpp pre type `llama-bpe`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer split: like Llama 3's, one digit at a time.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(trim_offsets: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim_offsets, "use_regex": use_regex})
}

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

const REBUILD_FIX: &str = "put the model's tokenizer.json beside the .gguf";

/// Control and unknown tokens as special added tokens, user-defined ones as plain added
/// tokens (matched whole in the text, as llama.cpp does).
fn added_tokens(tokens: &[&str], types: &[i64]) -> Vec<Value> {
    tokens
        .iter()
        .enumerate()
        .filter_map(|(id, tok)| {
            let ty = types.get(id).copied().unwrap_or(1);
            let special = ty == TOKEN_CONTROL || ty == TOKEN_UNKNOWN;
            (special || ty == TOKEN_USER_DEFINED).then(|| {
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special})
            })
        })
        .collect()
}

impl GgufModel {
    fn string_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(a)) => a
                .iter()
                .map(|v| match v {
                    GgufValue::String(s) => Ok(s.as_str()),
                    _ => Err(corrupt(&self.path, format!("`{key}` holds a non-string"))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(corrupt(&self.path, format!("`{key}` is not an array"))),
        }
    }

    fn flag(&self, key: &str) -> Option<bool> {
        match self.metadata.get(key) {
            Some(GgufValue::Bool(b)) => Some(*b),
            Some(v) => as_u64(v).map(|x| x != 0),
            None => None,
        }
    }

    fn token_text(&self, key: &str) -> Result<Option<String>> {
        let tokens = self
            .string_array("tokenizer.ggml.tokens")?
            .unwrap_or_default();
        Ok(self
            .token_id(key)
            .and_then(|id| tokens.get(id as usize).map(|t| t.to_string())))
    }

    /// A `tokenizer.json` document rebuilt from the metadata (`tokenizer.ggml.*`): byte-level
    /// BPE (`gpt2`: vocabulary, merges, llama.cpp's pre-tokenizer type) or SentencePiece BPE
    /// (`llama`: pieces and scores), control tokens as special tokens, BOS/EOS insertion as
    /// `add_bos_token` / `add_eos_token` say.
    pub fn tokenizer_json(&self) -> Result<Value> {
        let kind = self.meta_str("tokenizer.ggml.model").ok_or_else(|| {
            CordaError::Model(format!(
                "{} has no tokenizer in its metadata (tokenizer.ggml.model); {REBUILD_FIX}",
                self.path.display()
            ))
        })?;
        let tokens = self
            .string_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| corrupt(&self.path, "tokenizer.ggml.tokens is missing"))?;
        let types: Vec<i64> = match self.metadata.get("tokenizer.ggml.token_type") {
            Some(GgufValue::Array(a)) => a
                .iter()
                .map(|v| match *v {
                    GgufValue::I32(x) => x as i64,
                    ref other => as_u64(other).map(|x| x as i64).unwrap_or(1),
                })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        match kind {
            "gpt2" => self.byte_level_json(&tokens, &types),
            "llama" => self.sentencepiece_json(&tokens, &types),
            other => Err(CordaError::Model(format!(
                "{}: the `{other}` tokenizer cannot be rebuilt from GGUF metadata (only `gpt2` byte-level BPE and `llama` SentencePiece BPE can); {REBUILD_FIX}",
                self.path.display()
            ))),
        }
    }

    /// `tokenizer.json` for a byte-level BPE vocabulary (GPT-2 style: SmolLM, Llama 3, Qwen2).
    fn byte_level_json(&self, tokens: &[&str], types: &[i64]) -> Result<Value> {
        let merges = self
            .string_array("tokenizer.ggml.merges")?
            .ok_or_else(|| corrupt(&self.path, "tokenizer.ggml.merges is missing"))?;
        let pre = self.meta_str("tokenizer.ggml.pre").ok_or_else(|| {
            CordaError::Model(format!(
                "{} does not say how its tokenizer splits text (no tokenizer.ggml.pre; written by an old llama.cpp); {REBUILD_FIX}",
                self.path.display()
            ))
        })?;
        let (normalizer, pre_tokenizer, ignore_merges) = match pre {
            "gpt-2" | "gpt2" => (Value::Null, byte_level(true, true), false),
            "smollm" | "starcoder" | "refact" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true, true)]}),
                false,
            ),
            "llama-bpe" | "llama3" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(true, false)]}),
                true,
            ),
            "qwen2" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false, false)]}),
                false,
            ),
            other => {
                return Err(CordaError::Model(format!(
                    "{}: pre-tokenizer `{other}` cannot be rebuilt from GGUF metadata (known: gpt-2, smollm, starcoder, refact, llama-bpe, qwen2); {REBUILD_FIX}",
                    self.path.display()
                )))
            }
        };
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        for (id, tok) in tokens.iter().enumerate() {
            vocab.insert(tok.to_string(), id.into());
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| {
                // llama.cpp splits at the first space after the first byte.
                let at = m
                    .char_indices()
                    .skip(1)
                    .find(|&(_, c)| c == ' ')
                    .map(|(i, _)| i);
                match at {
                    Some(i) => Ok(json!([&m[..i], &m[i + 1..]])),
                    None => Err(corrupt(&self.path, format!("merge `{m}` has no space"))),
                }
            })
            .collect::<Result<_>>()?;
        let mut post = byte_level(false, true);
        post["add_prefix_space"] = true.into();
        if let Some(template) = self.special_template(tokens)? {
            post = json!({"type": "Sequence", "processors": [post, template]});
        }
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens(tokens, types),
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
        }))
    }

    /// `tokenizer.json` for a SentencePiece BPE vocabulary (`tokenizer.ggml.model` `llama`:
    /// Llama 1/2, Mistral), as transformers' `LlamaConverter` builds it: pieces with byte
    /// fallback, merges derived from the piece scores (every split of a piece into two pieces,
    /// highest-scoring piece first), "▁" for spaces with one prepended.
    fn sentencepiece_json(&self, tokens: &[&str], types: &[i64]) -> Result<Value> {
        let scores: Vec<f64> = match self.metadata.get("tokenizer.ggml.scores") {
            Some(GgufValue::Array(a)) if a.len() == tokens.len() => {
                a.iter().map(|v| as_f64(v).unwrap_or(0.0)).collect()
            }
            _ => {
                return Err(corrupt(
                    &self.path,
                    "a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token",
                ))
            }
        };
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
        for (id, tok) in tokens.iter().enumerate() {
            vocab.insert(tok.to_string(), id.into());
            ids.entry(tok).or_insert(id);
        }
        let mut merges: Vec<(usize, usize, f64)> = vec![];
        for (id, piece) in tokens.iter().enumerate() {
            let start = merges.len();
            for (at, _) in piece.char_indices().skip(1) {
                if let (Some(&l), Some(&r)) = (ids.get(&piece[..at]), ids.get(&piece[at..])) {
                    merges.push((l, r, scores[id]));
                }
            }
            merges[start..].sort_by_key(|&(l, r, _)| (l, r));
        }
        // Stable: ties keep the order above, as in transformers' SentencePieceExtractor.
        merges.sort_by(|a, b| b.2.total_cmp(&a.2));
        let merges: Vec<Value> = merges
            .iter()
            .map(|&(l, r, _)| json!([tokens[l], tokens[r]]))
            .collect();
        let unk = self
            .token_id("tokenizer.ggml.unknown_token_id")
            .and_then(|i| tokens.get(i as usize))
            .map(|t| Value::from(*t))
            .unwrap_or(Value::Null);
        let prefix = self.flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let normalizer = if prefix {
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
        } else {
            replace
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens(tokens, types),
            "normalizer": normalizer,
            "pre_tokenizer": null,
            "post_processor": self.special_template(tokens)?,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges},
        }))
    }

    /// Whether encoding adds BOS: `add_bos_token`, else llama.cpp's default (on for
    /// SentencePiece vocabularies, off for byte-level BPE).
    fn add_bos(&self) -> bool {
        self.flag("tokenizer.ggml.add_bos_token")
            .unwrap_or(self.meta_str("tokenizer.ggml.model") == Some("llama"))
    }

    /// BOS/EOS insertion (`add_bos_token` / `add_eos_token`, llama.cpp's default when absent)
    /// as a template post-processor; `None` when neither is added.
    fn special_template(&self, tokens: &[&str]) -> Result<Option<Value>> {
        let add_bos = self.add_bos();
        let add_eos = self.flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
        let special = |on: bool, key: &str| -> Result<Option<(String, u32)>> {
            if !on {
                return Ok(None);
            }
            let id = self.token_id(key).ok_or_else(|| {
                corrupt(
                    &self.path,
                    format!("BOS/EOS insertion is on but {key} is missing"),
                )
            })?;
            let text = tokens.get(id as usize).ok_or_else(|| {
                corrupt(&self.path, format!("{key} {id} is outside the vocabulary"))
            })?;
            Ok(Some((text.to_string(), id)))
        };
        let bos = special(add_bos, "tokenizer.ggml.bos_token_id")?;
        let eos = special(add_eos, "tokenizer.ggml.eos_token_id")?;
        if bos.is_none() && eos.is_none() {
            return Ok(None);
        }
        let piece = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
        let mut single = vec![];
        let mut pair = vec![];
        for (seq, type_id) in [("A", 0), ("B", 1)] {
            let target = if seq == "A" { &mut single } else { &mut pair };
            if let Some((t, _)) = &bos {
                target.push(piece(t));
            }
            target.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some((t, _)) = &eos {
                target.push(piece(t));
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
        let mut specials = serde_json::Map::new();
        for (t, id) in bos.iter().chain(eos.iter()) {
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        Ok(Some(
            json!({"type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": specials}),
        ))
    }

    /// The tokenizer rebuilt from the metadata, with BOS/EOS/pad from `tokenizer.ggml.*_token_id`.
    pub fn tokenizer_from_metadata(&self) -> Result<super::TokenizerInfo> {
        let doc = self.tokenizer_json()?;
        let tokenizer: tokenizers::Tokenizer = serde_json::from_value(doc).map_err(|e| {
            CordaError::Model(format!(
                "{}: the tokenizer rebuilt from the GGUF metadata does not load: {e}; put the model's tokenizer.json beside the .gguf",
                self.path.display()
            ))
        })?;
        let mut info = super::TokenizerInfo {
            tokenizer,
            bos_id: None,
            eos_id: None,
            eos_token: None,
            pad_id: None,
        };
        self.fill_special_ids(&mut info);
        Ok(info)
    }

    /// Fill the special ids a tokenizer's own files left unset from the metadata.
    pub fn fill_special_ids(&self, info: &mut super::TokenizerInfo) {
        let vocab = info.tokenizer.get_vocab_size(true) as u32;
        let id = |key: &str| self.token_id(key).filter(|&i| i < vocab);
        info.bos_id = info.bos_id.or_else(|| id("tokenizer.ggml.bos_token_id"));
        info.eos_id = info.eos_id.or_else(|| id("tokenizer.ggml.eos_token_id"));
        info.pad_id = info
            .pad_id
            .or_else(|| id("tokenizer.ggml.padding_token_id"));
        if info.eos_token.is_none() {
            info.eos_token = info.eos_id.and_then(|i| info.tokenizer.id_to_token(i));
        }
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` rebuilt from the metadata into `dst`.
    pub fn write_tokenizer_files(&self, dst: &Path) -> Result<()> {
        let doc = self.tokenizer_json()?;
        let path = dst.join("tokenizer.json");
        let text = serde_json::to_string(&doc).expect("json");
        std::fs::write(&path, text).map_err(|e| CordaError::io(&path, e))?;
        let mut cfg = json!({
            "add_bos_token": self.add_bos(),
            "add_eos_token": self.flag("tokenizer.ggml.add_eos_token").unwrap_or(false),
            "clean_up_tokenization_spaces": false,
            "model_max_length": self.meta_usize_or("context_length", 2048)?,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        for (key, hf) in [
            ("tokenizer.ggml.bos_token_id", "bos_token"),
            ("tokenizer.ggml.eos_token_id", "eos_token"),
            ("tokenizer.ggml.padding_token_id", "pad_token"),
            ("tokenizer.ggml.unknown_token_id", "unk_token"),
        ] {
            if let Some(t) = self.token_text(key)? {
                cfg[hf] = t.into();
            }
        }
        if let Some(t) = self.meta_str("tokenizer.chat_template") {
            cfg["chat_template"] = t.into();
        }
        let path = dst.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&cfg).expect("json");
        std::fs::write(&path, text + "\n").map_err(|e| CordaError::io(&path, e))
    }

    /// `bos_token_id` / `eos_token_id` / `pad_token_id` as config.json and
    /// generation_config.json name them, for those the metadata has.
    fn special_token_ids(&self) -> serde_json::Map<String, Value> {
        [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ]
        .into_iter()
        .filter_map(|(key, hf)| self.token_id(key).map(|id| (hf.to_string(), id.into())))
        .collect()
    }

    /// Write `generation_config.json` (BOS/EOS/pad ids) from the metadata into `dst`.
    pub fn write_generation_config(&self, dst: &Path) -> Result<()> {
        let cfg = self.special_token_ids();
        let path = dst.join("generation_config.json");
        let text = serde_json::to_string_pretty(&Value::Object(cfg)).expect("json");
        std::fs::write(&path, text + "\n").map_err(|e| CordaError::io(&path, e))
    }
}

/// `config.json` at a path (the file itself).
fn read_config_json(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| CordaError::io(path, e))?;
    let raw: Value = serde_json::from_str(&text).map_err(|source| CordaError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    ModelConfig::from_value(raw, &path.display().to_string())
}

/// Inverse of llama.cpp's `permute` of q/k rows: within each head GGUF stores rotary pairs
/// interleaved (row 2i, 2i+1 = dims i, i + d/2 of transformers' half-split layout).
fn unpermute_rotary(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let half = rows / heads / 2;
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, QTensor};

    /// GPT-2's byte-to-character table: every byte as one visible character.
    fn byte_chars() -> Vec<String> {
        let mut n = 0;
        (0u32..256)
            .map(|b| {
                let visible =
                    (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
                let c = if visible {
                    b
                } else {
                    n += 1;
                    255 + n
                };
                char::from_u32(c).unwrap().to_string()
            })
            .collect()
    }

    /// A minimal llama GGUF: one embedding tensor and the given metadata on top of the basics.
    fn tiny(dir: &Path, name: &str, extra: Vec<(&str, GgufValue)>, tensors: &[&str]) -> PathBuf {
        let mut tokens = vec!["<s>".to_string(), "</s>".to_string()];
        tokens.extend(byte_chars());
        let types: Vec<GgufValue> = (0..tokens.len())
            .map(|i| GgufValue::I32(if i < 2 { 3 } else { 1 }))
            .collect();
        let mut meta: Vec<(&str, GgufValue)> = vec![
            ("general.architecture", GgufValue::String("llama".into())),
            ("llama.embedding_length", GgufValue::U32(4)),
            ("llama.feed_forward_length", GgufValue::U32(8)),
            ("llama.block_count", GgufValue::U32(1)),
            ("llama.attention.head_count", GgufValue::U32(1)),
            ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
            ("tokenizer.ggml.pre", GgufValue::String("gpt-2".into())),
            (
                "tokenizer.ggml.tokens",
                GgufValue::Array(tokens.iter().cloned().map(GgufValue::String).collect()),
            ),
            ("tokenizer.ggml.token_type", GgufValue::Array(types)),
            ("tokenizer.ggml.merges", GgufValue::Array(vec![])),
            ("tokenizer.ggml.bos_token_id", GgufValue::U32(0)),
            ("tokenizer.ggml.eos_token_id", GgufValue::U32(1)),
        ];
        for (k, v) in extra {
            meta.retain(|(m, _)| *m != k);
            meta.push((k, v));
        }
        let embd = Tensor::zeros((tokens.len(), 4), DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&embd, GgmlDType::F32).unwrap();
        let small = QTensor::quantize(
            &Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let mut ts: Vec<(&str, &QTensor)> = vec![("token_embd.weight", &q)];
        ts.extend(tensors.iter().map(|n| (*n, &small)));
        let meta_refs: Vec<(&str, &GgufValue)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let path = dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut f, &meta_refs, &ts).unwrap();
        path
    }

    fn word_ids(pre: &str, text: &str) -> Vec<u32> {
        let tmp = tempfile::tempdir().unwrap();
        let p = tiny(
            tmp.path(),
            "t.gguf",
            vec![("tokenizer.ggml.pre", GgufValue::String(pre.into()))],
            &[],
        );
        let info = GgufModel::open(&p)
            .unwrap()
            .tokenizer_from_metadata()
            .unwrap();
        let enc = info.tokenizer.encode(text, true).unwrap();
        enc.get_word_ids().iter().map(|w| w.unwrap()).collect()
    }

    #[test]
    fn pre_tokenizers_split_like_llama_cpp() {
        // Words (pre-tokens) of "12345 ab": one token per byte here, so word ids show the split.
        let text = "12345 ab";
        assert_eq!(word_ids("gpt-2", text), [0, 0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(word_ids("smollm", text), [0, 1, 2, 3, 4, 5, 5, 5]);
        assert_eq!(word_ids("llama-bpe", text), [0, 0, 0, 1, 1, 2, 2, 2]);
        assert_eq!(word_ids("qwen2", text), [0, 1, 2, 3, 4, 5, 5, 5]);
        // Llama 3 / Qwen2 keep a letter run with one leading punctuation mark: "(ab".
        assert_eq!(word_ids("llama-bpe", "x(ab"), [0, 1, 1, 1]);
        assert_eq!(word_ids("qwen2", "x(ab"), [0, 1, 1, 1]);
        assert_eq!(word_ids("gpt-2", "x(ab"), [0, 1, 2, 2]);
    }

    #[test]
    fn control_tokens_and_bos_come_from_the_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let plain = tiny(tmp.path(), "a.gguf", vec![], &[]);
        let info = GgufModel::open(&plain)
            .unwrap()
            .tokenizer_from_metadata()
            .unwrap();
        // "</s>" is a control token: one id, never split into bytes.
        assert_eq!(info.encode("a</s>").unwrap(), [2 + b'a' as u32, 1]);
        assert_eq!((info.bos_id, info.eos_id), (Some(0), Some(1)));
        assert_eq!(info.eos_token.as_deref(), Some("</s>"));
        let bos = tiny(
            tmp.path(),
            "b.gguf",
            vec![("tokenizer.ggml.add_bos_token", GgufValue::Bool(true))],
            &[],
        );
        let info = GgufModel::open(&bos)
            .unwrap()
            .tokenizer_from_metadata()
            .unwrap();
        assert_eq!(info.encode("a").unwrap(), [0, 2 + b'a' as u32]);
    }

    #[test]
    fn tokenizers_that_cannot_be_rebuilt_say_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        for (key, value, expect) in [
            ("tokenizer.ggml.model", "bert", "`bert` tokenizer"),
            ("tokenizer.ggml.pre", "deepseek-coder", "deepseek-coder"),
        ] {
            let p = tiny(
                tmp.path(),
                "t.gguf",
                vec![(key, GgufValue::String(value.into()))],
                &[],
            );
            let e = GgufModel::open(&p)
                .unwrap()
                .tokenizer_from_metadata()
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains(expect) && e.contains("tokenizer.json beside"),
                "{e}"
            );
        }
    }

    #[test]
    fn sentencepiece_vocabularies_merge_by_score_with_byte_fallback() {
        // <unk>, <s>, </s>, the 256 byte pieces, then pieces with SentencePiece scores.
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        tokens.extend((0..=255).map(|b| format!("<0x{b:02X}>")));
        let pieces = [
            ("\u{2581}", -100.0),
            ("a", -101.0),
            ("b", -102.0),
            ("c", -103.0),
            ("\u{2581}a", -1.0),
            ("ab", -2.0),
            ("\u{2581}ab", -3.0),
            ("bc", -4.0),
        ];
        let mut scores = vec![0f32; tokens.len()];
        for (p, sc) in pieces {
            tokens.push(p.to_string());
            scores.push(sc);
        }
        let id = |p: &str| tokens.iter().position(|t| t == p).unwrap() as u32;
        let types: Vec<GgufValue> = (0..tokens.len())
            .map(|i| {
                GgufValue::I32(match i {
                    0 => 2,
                    1 | 2 => 3,
                    3..=258 => 6,
                    _ => 1,
                })
            })
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let p = tiny(
            tmp.path(),
            "spm.gguf",
            vec![
                ("tokenizer.ggml.model", GgufValue::String("llama".into())),
                (
                    "tokenizer.ggml.tokens",
                    GgufValue::Array(tokens.iter().cloned().map(GgufValue::String).collect()),
                ),
                ("tokenizer.ggml.token_type", GgufValue::Array(types)),
                (
                    "tokenizer.ggml.scores",
                    GgufValue::Array(scores.into_iter().map(GgufValue::F32).collect()),
                ),
                ("tokenizer.ggml.unknown_token_id", GgufValue::U32(0)),
                ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
                ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
            ],
            &[],
        );
        let info = GgufModel::open(&p)
            .unwrap()
            .tokenizer_from_metadata()
            .unwrap();
        let sp = |s: &str| id(&s.replace(' ', "\u{2581}"));
        // "▁a" (score -1) merges first, then "▁a"+"b" into "▁ab"; BOS is added by default.
        assert_eq!(info.encode("ab").unwrap(), [1, sp(" ab")]);
        // Higher scores merge first: "▁ab" + "c", not "▁a" + "bc" (score -4 comes last).
        assert_eq!(info.encode("abc").unwrap(), [1, sp(" ab"), id("c")]);
        assert_eq!(
            info.encode("ba c").unwrap(),
            [1, sp(" "), id("b"), id("a"), sp(" "), id("c")]
        );
        // Unknown characters fall back to their UTF-8 bytes.
        assert_eq!(info.encode("é").unwrap(), [1, sp(" "), 3 + 0xC3, 3 + 0xA9]);
        // Control tokens are matched whole; decoding restores spaces and bytes.
        assert_eq!(info.encode("a</s>").unwrap(), [1, sp(" a"), 2]);
        for text in ["ab", "ba c", "é bc"] {
            let ids = info.encode(text).unwrap();
            assert_eq!(info.tokenizer.decode(&ids, true).unwrap(), text);
        }
        assert_eq!((info.bos_id, info.eos_id), (Some(1), Some(2)));
    }

    #[test]
    fn rope_settings_from_the_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tiny(
            tmp.path(),
            "lin.gguf",
            vec![
                (
                    "llama.rope.scaling.type",
                    GgufValue::String("linear".into()),
                ),
                ("llama.rope.scaling.factor", GgufValue::F32(4.0)),
                ("llama.rope.freq_base", GgufValue::F32(500000.0)),
            ],
            &[],
        );
        let c = GgufModel::open(&p).unwrap().config_from_metadata().unwrap();
        assert_eq!(
            c.rope_scaling,
            super::super::RopeScaling::Linear { factor: 4.0 }
        );
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.vocab_size, 258);
        assert!(c.tie_word_embeddings);
        // Llama 3.1 factors as a tensor: only a config.json can describe them.
        let p = tiny(tmp.path(), "l31.gguf", vec![], &["rope_freqs.weight"]);
        let g = GgufModel::open(&p).unwrap();
        let e = g.config().unwrap_err().to_string();
        assert!(e.contains("rope_freqs") && e.contains("config.json"), "{e}");
        // Unknown tensors are refused by name.
        let p = tiny(
            tmp.path(),
            "moe.gguf",
            vec![],
            &["blk.0.ffn_gate_exps.weight"],
        );
        let e = GgufModel::open(&p).err().unwrap().to_string();
        assert!(e.contains("blk.0.ffn_gate_exps.weight"), "{e}");
    }

    #[test]
    fn which_paths_are_gguf_models() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        assert_eq!(find_gguf(d).unwrap(), None);
        let f = tiny(d, "m.GGUF", vec![], &[]);
        assert_eq!(find_gguf(d).unwrap(), Some(f.clone()));
        assert_eq!(find_gguf(&f).unwrap(), Some(f.clone()));
        // Safetensors weights win over a stray .gguf.
        std::fs::write(d.join("model.safetensors"), b"").unwrap();
        assert_eq!(find_gguf(d).unwrap(), None);
        assert_eq!(find_gguf(&d.join("model.safetensors")).unwrap(), None);
    }
}
