//! Datasets for CorDA: loading rows, selecting splits, templating, calibration samples and
//! supervised fine-tuning batches.
//!
//! The flow mirrors the reference scripts:
//! - preprocessing: [`CalibrationSource`] ([`registry::lookup`], or a path plus a [`Template`]) →
//!   [`calibration_samples`] → token id sequences for the covariance pass;
//! - fine-tuning: [`load_rows`] with a [`Split`] such as `train[:100000]` →
//!   [`build_sft_examples`] → [`collate`] → [`SftBatch::to_tensors`].
//!
//! Hub dataset ids are read from the local Hugging Face cache, or downloaded into it
//! ([`hub`]; nothing is fetched when `HF_HUB_OFFLINE` is set).

pub mod calib_source;
pub mod calibration;
pub mod files;
pub mod hub;
pub mod parquet;
pub mod registry;
pub mod sft;
pub mod source;
pub mod split;
pub mod template;
pub mod tokenize;

pub use calib_source::{CalibrationRows, CalibrationSource};
pub use calibration::{calibration_samples, CalibOptions, CalibSampling};
pub use registry::{llama_chat_template, lookup, Registry, RegistryEntry, LLAMA_CHAT_TEMPLATE};
pub use sft::{
    alpaca_prompt, build_sft_examples, collate, SftBatch, SftExample, SftOptions, SftTensors,
    ALPACA_PROMPT, IGNORE_INDEX,
};
pub use source::{load_rows, read_rows, RowSource};
pub use split::Split;
pub use template::{FieldPath, Template};
pub use tokenize::TextEncoder;
