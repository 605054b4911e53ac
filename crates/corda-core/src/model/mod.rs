//! Hugging Face model directories and the Llama-family decoder.
//!
//! - [`config`]: `config.json` in both transformers layouts.
//! - [`hub`]: `--model_id` as a directory or a hub id (from the cache, else downloaded).
//! - [`weights`]: memory-mapped (sharded) safetensors or GGUF, and a streaming shard writer.
//! - [`gguf`]: llama.cpp GGUF files as weights, config and tokenizer (dequantized on read).
//! - [`tokenizer`]: `tokenizer.json` with BOS/EOS/pad.
//! - [`linear`], [`frozen`], [`lora_matmul`]: target linears with optional LoRA; frozen-weight
//!   matmul; the frozen product and its LoRA branch as one op.
//! - [`decoder`]: one decoder layer with observable linear inputs.
//! - [`embedding`]: the token embeddings, read from the checkpoint file by row unless tied to
//!   the head.
//! - [`widened`]: a layer's bfloat16 weights as a float32 copy, for fast calibration products.
//! - [`attention`]: masked attention as one op with its own backward (no seq × seq tensors kept).
//! - [`swiglu`]: the feed-forward gate `silu(gate) ⊙ up` as one op with its own backward.
//! - [`rms_norm`], [`rotary`]: RMSNorm and the rotary embedding, one parallel pass each way on
//!   the CPU.
//! - [`causal_lm`]: the whole model.
//! - [`kv_cache`]: keys and values kept between steps for incremental (batched) decoding.
//! - [`save`]: writing a model directory.

pub mod attention;
pub mod causal_lm;
pub mod config;
pub mod decoder;
pub mod embedding;
pub mod frozen;
pub mod gguf;
pub mod hub;
pub mod kv_cache;
pub mod linear;
pub mod lora_matmul;
pub mod rms_norm;
pub mod rotary;
pub mod save;
pub mod swiglu;
pub mod tokenizer;
pub mod weights;
pub mod widened;

pub use causal_lm::{resolve_dtype, CausalLM, LoadOptions};
pub use config::{dtype_name, parse_dtype, Architecture, ModelConfig, RopeScaling};
pub use decoder::{module_name, AttnContext, DecoderLayer, InputSite, LayerCache, Observer};
pub use embedding::{embed, load_embeddings, Embeddings};
pub use gguf::{find_gguf, GgufModel};
pub use hub::{
    cache_root, find_tokenizer_dir, resolve_model, resolve_model_dir, resolve_tokenizer,
};
pub use kv_cache::KvCache;
pub use linear::{Lora, TargetLinear, TARGET_PROJECTIONS};
pub use tokenizer::TokenizerInfo;
pub use weights::{RowReader, ShardWriter, Weights};
