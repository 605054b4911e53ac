//! A whole evaluation run, as `corda-eval` does it: the data and prompts are prepared once
//! (one tokenizer), then each subject is loaded in turn, evaluated on the identical windows or
//! prompts with a progress bar (tokens/s), and freed, so peak memory is one model.

use std::time::Instant;

use candle_core::{DType, Device};
use serde_json::json;

use super::datasets::EvalSource;
use super::generate::GenerationOptions;
use super::perplexity::perplexity;
use super::results::{EvalRecord, EvalResults};
use super::subject::Subject;
use super::task::{encode_prompts, run_generation, Task};
use crate::hub::Hub;
use crate::model::{find_tokenizer_dir, LoadOptions, ModelConfig, TokenizerInfo};
use crate::util::styled_progress_bar;
use crate::{CordaError, Result};

/// The perplexity window when none is given: 2048 tokens, or the model's maximum if smaller.
pub const DEFAULT_SEQ_LEN: usize = 2048;

/// Everything a run needs, before anything is loaded.
#[derive(Debug, Clone)]
pub struct EvalSpec {
    pub subjects: Vec<Subject>,
    /// Hub revision of hub model ids.
    pub revision: String,
    pub hub: Hub,
    /// Where `tokenizer.json` is, when not beside the first subject's model.
    pub tokenizer: Option<String>,
    pub task: Task,
    pub source: EvalSource,
    /// Perplexity window (default [`DEFAULT_SEQ_LEN`] capped at the model's maximum).
    pub seq_len: Option<usize>,
    /// At most this many windows (perplexity) or questions.
    pub limit: Option<usize>,
    /// Few-shot examples of QA prompts (default [`Task::default_fewshot`]).
    pub num_fewshot: Option<usize>,
    /// Default [`Task::default_max_new_tokens`].
    pub max_new_tokens: Option<usize>,
    /// Windows or prompts per forward.
    pub batch_size: usize,
    /// Storage dtype of the frozen weights (adapters and activations are float32).
    pub dtype: DType,
    pub device: Device,
}

/// [`DEFAULT_SEQ_LEN`], or the model's maximum (`max_position_embeddings`) if smaller.
pub fn default_seq_len(model_dir: &std::path::Path) -> Result<usize> {
    let max = match crate::model::find_gguf(model_dir)? {
        Some(g) => {
            crate::model::GgufModel::open(&g)?
                .config()?
                .max_position_embeddings
        }
        None => ModelConfig::from_dir(model_dir)?.max_position_embeddings,
    };
    Ok(DEFAULT_SEQ_LEN.min(max.max(2)))
}

/// Perplexity progress: tokens scored, with the throughput.
const TOKEN_BAR: &str =
    "{msg:>20} [{bar:30}] {human_pos}/{human_len} tok {per_sec} {elapsed_precise} ETA {eta}";
/// Generation progress: questions answered; the prefix shows generated tokens per second.
const QUESTION_BAR: &str =
    "{msg:>20} [{bar:30}] {pos}/{len} questions {elapsed_precise} ETA {eta} {prefix}";

impl EvalSpec {
    /// The tokenizer shared by every subject (prompts must be identical).
    fn tokenizer(&self) -> Result<TokenizerInfo> {
        let first = self
            .subjects
            .first()
            .ok_or_else(|| CordaError::Invalid("nothing to evaluate: give a model".into()))?;
        let dir = first.model_dir(&self.revision, &self.hub)?;
        let base = first
            .load_adapter()?
            .and_then(|a| a.config.base_model_name_or_path.clone());
        TokenizerInfo::load(&find_tokenizer_dir(
            self.tokenizer.as_deref(),
            &dir,
            base.as_deref(),
            &self.hub,
        )?)
    }

    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            dtype: Some(self.dtype),
            device: self.device.clone(),
        }
    }

    /// Evaluate every subject.
    pub fn run(&self) -> Result<EvalResults> {
        if self.batch_size == 0 {
            return Err(CordaError::Invalid("batch_size must be at least 1".into()));
        }
        let tok = self.tokenizer()?;
        let records = if self.task == Task::Perplexity {
            self.run_perplexity(&tok)?
        } else {
            self.run_generation(&tok)?
        };
        Ok(EvalResults {
            records,
            settings: json!({
                "task": self.task.name(),
                "dataset": self.source.name,
                "dtype": crate::model::dtype_name(self.dtype),
                "batch_size": self.batch_size,
                "limit": self.limit,
                "seq_len": self.seq_len,
                "num_fewshot": self.num_fewshot.unwrap_or(self.task.default_fewshot()),
                "max_new_tokens": self.max_new_tokens.unwrap_or(self.task.default_max_new_tokens()),
            }),
        })
    }

    /// The window length: the given one, else the default capped at the first model's maximum.
    fn seq_len(&self) -> Result<usize> {
        if let Some(s) = self.seq_len {
            return Ok(s);
        }
        let dir = self.subjects[0].model_dir(&self.revision, &self.hub)?;
        let max = match crate::model::find_gguf(&dir)? {
            Some(g) => {
                crate::model::GgufModel::open(&g)?
                    .config()?
                    .max_position_embeddings
            }
            None => ModelConfig::from_dir(&dir)?.max_position_embeddings,
        };
        Ok(DEFAULT_SEQ_LEN.min(max.max(2)))
    }

    /// The record of `subject`: (value, count, tokens, seconds) and the task's details.
    fn record(
        &self,
        subject: &Subject,
        (value, count, tokens, seconds): (f64, usize, usize, f64),
        details: serde_json::Value,
    ) -> EvalRecord {
        EvalRecord {
            label: subject.label.clone(),
            model: subject.model.clone(),
            adapter: subject.adapter.as_ref().map(|a| a.display().to_string()),
            task: self.task.name().into(),
            dataset: self.source.name.clone(),
            metric: self.task.metric().into(),
            value,
            count,
            tokens,
            seconds,
            details,
        }
    }

    fn run_perplexity(&self, tok: &TokenizerInfo) -> Result<Vec<EvalRecord>> {
        let text = self.source.load_text()?;
        let ids = tok.encode(&text)?;
        let seq_len = self.seq_len()?;
        let mut records = Vec::new();
        for s in &self.subjects {
            let model = s.load(&self.revision, &self.hub, &self.load_options())?;
            let n = super::perplexity::windows(&ids, seq_len, self.limit)?.len();
            let pb = styled_progress_bar((n * seq_len) as u64, &s.label, TOKEN_BAR);
            let start = Instant::now();
            let r = perplexity(
                &model,
                &ids,
                seq_len,
                self.limit,
                self.batch_size,
                &mut |k| pb.inc((k * seq_len) as u64),
            )?;
            pb.finish_and_clear();
            let seconds = start.elapsed().as_secs_f64();
            tracing::info!(
                "{}: perplexity {:.4} over {} windows",
                s.label,
                r.perplexity,
                r.windows
            );
            records.push(self.record(
                s,
                (r.perplexity, r.windows, r.windows * seq_len, seconds),
                json!({
                    "seq_len": seq_len,
                    "mean_nll": r.mean_nll,
                    "text_tokens": ids.len(),
                    "window_nll": r.window_nll,
                }),
            ));
        }
        Ok(records)
    }

    fn run_generation(&self, tok: &TokenizerInfo) -> Result<Vec<EvalRecord>> {
        let shots = self.num_fewshot.unwrap_or(self.task.default_fewshot());
        if shots > 0 && !self.task.is_qa() {
            return Err(CordaError::Invalid(format!(
                "{} prompts are the Alpaca training prompt without examples; few-shot applies \
                 to nqopen and trivia_qa (use num_fewshot 0)",
                self.task
            )));
        }
        let (mut questions, shot_list) = self.source.load_questions(shots)?;
        if let Some(l) = self.limit {
            questions.truncate(l);
        }
        let prompts = encode_prompts(self.task, tok, &questions, &shot_list)?;
        let eos = tok.eos_id.ok_or_else(|| {
            CordaError::Model("the tokenizer defines no EOS token, which ends generation".into())
        })?;
        let opts = GenerationOptions {
            max_new_tokens: self
                .max_new_tokens
                .unwrap_or(self.task.default_max_new_tokens()),
            batch_size: self.batch_size,
            eos_ids: vec![eos],
            pad_id: tok.pad_id.unwrap_or(eos),
            stop_strings: self.task.stop_strings(),
        };
        let mut records = Vec::new();
        for s in &self.subjects {
            let model = s.load(&self.revision, &self.hub, &self.load_options())?;
            let pb = styled_progress_bar(questions.len() as u64, &s.label, QUESTION_BAR);
            let start = Instant::now();
            let mut generated = 0usize;
            let r = run_generation(
                self.task,
                &model,
                tok,
                &questions,
                &prompts,
                &opts,
                &mut |t, done| {
                    generated += t;
                    pb.set_prefix(format!(
                        "{:.1} tok/s",
                        generated as f64 / start.elapsed().as_secs_f64().max(1e-9)
                    ));
                    pb.inc(done as u64);
                },
            )?;
            pb.finish_and_clear();
            let seconds = start.elapsed().as_secs_f64();
            tracing::info!(
                "{}: {} {:.4} ({}/{})",
                s.label,
                self.task.metric(),
                r.score,
                r.correct,
                r.total
            );
            records.push(self.record(
                s,
                (r.score, r.total, r.generated_tokens, seconds),
                json!({
                    "correct": r.correct,
                    "prompt_tokens": prompts.iter().map(Vec::len).sum::<usize>(),
                    "samples": r.samples,
                }),
            ));
        }
        Ok(records)
    }
}
