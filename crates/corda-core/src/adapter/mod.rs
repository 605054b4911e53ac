//! The PEFT LoRA adapter format (`adapter_config.json` + `adapter_model.safetensors`) and the
//! conversion of a trained CorDA adapter into a plain LoRA for the original base model.
//!
//! - [`config`]: [`AdapterConfig`], a PEFT `LoraConfig` that round-trips unknown fields.
//! - [`weights`]: [`Adapter`] and [`LoraPair`], loading and saving the tensors.
//! - [`attach`]: an adapter attaching itself to a [`crate::model::CausalLM`].
//! - [`convert`]: PEFT's `path_initial_model_for_weight_conversion` (exact, rank doubled) and the
//!   per-module weight deltas.
//! - [`compress`]: the `--rank K` SVD compression of the same update.
//! - [`merge`]: the fine-tuned model as a plain model directory (base + delta).
//! - [`pattern`]: a small regex matcher for PEFT's regex target modules and pattern keys.
//! - [`verify`]: base + converted LoRA against residual + trained adapter on a probe text.

pub mod attach;
pub mod compress;
pub mod config;
pub mod convert;
pub mod merge;
pub mod pattern;
pub mod provenance;
pub mod verify;
pub mod weights;

pub use compress::{compress_to_rank, Compressed, ModuleCompression};
pub use config::AdapterConfig;
pub use convert::{
    check_compatible, convert_to_lora, converted_config, delta_weight, delta_weights,
};
pub use merge::{merge_into_base, MergeReport};
pub use provenance::{check_resume, check_same_start, Provenance, PROVENANCE_FILE};
pub use verify::{logits_with_adapter, verify_conversion, VerifyReport};
pub use weights::{Adapter, LoraPair};
