//! A fine-tuning run put together: the model with its adapter attached, the tokenizer and the
//! tokenized examples. This is what `corda-finetune` does between reading its flags and
//! training, so the tests and other front ends get the same run.
//!
//! The adapter is either the initial CorDA adapter written by preprocessing
//! (`<model>/corda_init`) or a fresh plain LoRA (the paper's baseline). The tokenizer comes from
//! an explicit location, else the model directory, else the adapter's base model (preprocessing
//! records the original model there; the residual model may have no tokenizer). The EOS token
//! ends every target and pads the batches, as in the reference script.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::config::TrainConfig;
use super::lora_init::plain_lora_adapter;
use super::trainer::{target_tokens, Trainer};
use crate::adapter::{Adapter, AdapterConfig, Provenance};
use crate::data::{build_sft_examples, RowSource, SftExample, SftOptions, Split};
use crate::hub::Hub;
use crate::layout::CORDA_INIT_DIR;
use crate::model::{find_tokenizer_dir, resolve_model, CausalLM, LoadOptions, TokenizerInfo};
use crate::util::PhaseReport;
use crate::{CordaError, Result};

/// Which adapter trains.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterChoice {
    /// The CorDA adapter in `<model>/corda_init`, on the residual model.
    Corda,
    /// A fresh plain LoRA of rank `r` (alpha = r) on every target of the unmodified model,
    /// A drawn with `seed`.
    PlainLora { r: usize, seed: u64 },
}

/// Everything a fine-tuning run is made of, before anything is loaded.
#[derive(Debug, Clone)]
pub struct FineTuneSpec {
    /// A model directory or a hub id (downloaded when not cached).
    pub model_name_or_path: String,
    /// Branch, tag or commit of a hub model.
    pub revision: String,
    /// Where hub models, tokenizers and datasets come from.
    pub hub: Hub,
    pub adapter: AdapterChoice,
    /// Where `tokenizer.json` is, when not in the model directory.
    pub tokenizer_name_or_path: Option<String>,
    /// A hub dataset id (cached, else downloaded) or a local data file or directory.
    pub data_path: String,
    pub split: Split,
    /// The instruction and response columns.
    pub query_field: String,
    pub response_field: String,
    /// Prompt and prompt + response are each cut to this many tokens.
    pub model_max_length: usize,
    /// Storage dtype of the frozen base weights (the LoRA factors are float32).
    pub dtype: DType,
    pub device: Device,
}

/// A loaded run, ready to train.
pub struct FineTuneRun {
    /// The model with the adapter's factors attached.
    pub model: CausalLM,
    /// The config of the adapter that trains (written with every save). Its factors live in the
    /// model once attached; a second copy would stay resident for the whole run.
    pub adapter_config: AdapterConfig,
    pub examples: Vec<SftExample>,
    /// The EOS id, which pads the batches.
    pub pad_id: u32,
    /// Wall time of the loading phases.
    pub report: PhaseReport,
    /// For a CorDA adapter: the initial adapter's fingerprint, saved with every trained one.
    pub provenance: Option<Provenance>,
}

/// The initial CorDA adapter's directory for a preprocessing output `model_dir`.
pub fn corda_init_dir(model_dir: &Path) -> PathBuf {
    model_dir.join(CORDA_INIT_DIR)
}

impl FineTuneSpec {
    /// The model directory, after the checks that need no loading: the model exists and, for
    /// a CorDA run, so does its initial adapter.
    pub fn check(&self) -> Result<PathBuf> {
        let model_dir = resolve_model(&self.model_name_or_path, &self.revision, &self.hub)?;
        if self.adapter == AdapterChoice::Corda {
            let dir = corda_init_dir(&model_dir);
            if !dir.join(crate::adapter::config::CONFIG_FILE).is_file() {
                return Err(CordaError::Adapter(format!(
                    "{} does not exist (corda-preprocess writes it beside the residual model)",
                    dir.display()
                )));
            }
        }
        Ok(model_dir)
    }

    /// Load the adapter, the tokenizer, the examples and the model (in that order, so that the
    /// cheap failures come first), and attach the adapter.
    pub fn load(&self) -> Result<FineTuneRun> {
        let mut report = PhaseReport::new();
        let model_dir = self.check()?;
        // Read early: it may name where the tokenizer is.
        let corda_adapter = match self.adapter {
            AdapterChoice::Corda => Some(report.time("load adapter", || {
                Adapter::load(&corda_init_dir(&model_dir))
            })?),
            AdapterChoice::PlainLora { .. } => None,
        };

        let tok = TokenizerInfo::load(&self.tokenizer_dir(&model_dir, corda_adapter.as_ref())?)?;
        let eos_token = tok.eos_token.clone().ok_or_else(|| {
            CordaError::Data(
                "the tokenizer defines no EOS token (needed as target end and pad)".into(),
            )
        })?;
        let pad_id = tok
            .eos_id
            .ok_or_else(|| CordaError::Data("the tokenizer defines no EOS token id".into()))?;
        let examples = report.time("load data", || -> Result<_> {
            let rows = RowSource::new(&self.data_path)
                .hub(self.hub.clone())
                .load(&self.split)?;
            let opts = SftOptions {
                query_field: self.query_field.clone(),
                response_field: self.response_field.clone(),
                model_max_length: self.model_max_length,
                eos_token,
            };
            build_sft_examples(&rows, &tok.tokenizer, &opts)
        })?;
        self.check_examples(&examples)?;

        let mut model = report.time("load model", || {
            CausalLM::load(
                &model_dir,
                &LoadOptions {
                    dtype: Some(self.dtype),
                    device: self.device.clone(),
                },
            )
        })?;
        let mut adapter = match (corda_adapter, &self.adapter) {
            (Some(a), _) => a,
            (None, AdapterChoice::PlainLora { r, seed }) => {
                plain_lora_adapter(&model.target_shapes(), *r, *seed)?
            }
            (None, AdapterChoice::Corda) => unreachable!("loaded above"),
        };
        if model.device.is_cpu() {
            model.widen_layers()?;
        }
        adapter.config.base_model_name_or_path = Some(self.model_name_or_path.clone());
        let provenance = match self.adapter {
            AdapterChoice::Corda => Some(Provenance::of_initial(&adapter)?),
            AdapterChoice::PlainLora { .. } => None,
        };
        adapter.attach_to(&mut model)?;
        Ok(FineTuneRun {
            provenance,
            model,
            adapter_config: adapter.config,
            examples,
            pad_id,
            report,
        })
    }

    /// The directory with `tokenizer.json` (see [`find_tokenizer_dir`]).
    fn tokenizer_dir(&self, model_dir: &Path, adapter: Option<&Adapter>) -> Result<PathBuf> {
        find_tokenizer_dir(
            self.tokenizer_name_or_path.as_deref(),
            model_dir,
            adapter.and_then(|a| a.config.base_model_name_or_path.as_deref()),
            &self.hub,
        )
    }

    /// Some example must keep a response token after truncation; report the data's shape.
    fn check_examples(&self, examples: &[SftExample]) -> Result<()> {
        let trainable = examples.iter().filter(|e| target_tokens(e) > 0).count();
        if trainable == 0 {
            return Err(CordaError::Data(format!(
                "none of the {} examples has a response token left after truncation at model_max_length {}; raise it",
                examples.len(),
                self.model_max_length
            )));
        }
        let mean_len = examples.iter().map(|e| e.input_ids.len()).sum::<usize>() as f64
            / examples.len() as f64;
        tracing::info!(
            "{} examples from {} {} (mean {:.0} tokens, {} without response tokens)",
            examples.len(),
            self.data_path,
            self.split,
            mean_len,
            examples.len() - trainable
        );
        Ok(())
    }
}

impl FineTuneRun {
    /// The trainer over this run's model and examples.
    pub fn trainer(&self, config: TrainConfig) -> Result<Trainer<'_, CausalLM>> {
        Trainer::new(
            &self.model,
            &self.examples,
            self.pad_id,
            self.adapter_config.clone(),
            config,
        )
        .map(|t| t.with_provenance(self.provenance.clone()))
    }
}
