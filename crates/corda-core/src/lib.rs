//! corda-core: the library behind `corda-preprocess`, `corda-finetune`, `corda-convert` and
//! `corda-eval`.
//!
//! CorDA (Context-Oriented Decomposition Adaptation, NeurIPS 2024) builds task-aware LoRA
//! adapters from an SVD of each weight oriented by the covariance of its inputs. The modules
//! follow the method:
//! - [`model`]: Hugging Face model directories (config, weights, tokenizer) and a Llama-family
//!   decoder whose target linears can be observed (covariance) and extended (LoRA).
//! - [`data`]: datasets (jsonl / json / parquet), templates, calibration sampling, SFT batches.
//! - [`corda`]: covariance collection and the covariance-oriented decomposition.
//! - [`adapter`]: the PEFT adapter format and conversion to a plain LoRA.
//! - [`train`]: optimizer, schedules, trainer and checkpoints.
//! - [`eval`]: perplexity, greedy generation (KV cache) and the QA / math benchmarks.
//! - [`layout`]: the names of every output directory and file.
//! - [`hub`]: the Hugging Face hub cache and downloads (used by `model` and `data`).
//! - [`util`]: atomic output directories, phase timing and memory reports.

pub mod adapter;
pub mod corda;
pub mod data;
pub mod error;
pub mod eval;
pub mod hub;
pub mod layout;
pub mod model;
pub mod train;
pub mod util;

pub use error::{CordaError, Result};
