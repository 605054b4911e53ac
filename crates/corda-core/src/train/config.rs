//! The training options, named and defaulted like Hugging Face `TrainingArguments` (plus the
//! fields the reference script adds), so a command line written for the reference works here.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::optimizer::AdamWConfig;
use super::schedule::SchedulerType;
use crate::{CordaError, Result};

/// The defaults of Hugging Face `TrainingArguments` (and of the reference script), used by
/// [`TrainConfig::new`] and by corda-finetune's flags: one source for both.
pub mod defaults {
    use super::{LossNormalization, SaveStrategy, SchedulerType};

    pub const NUM_TRAIN_EPOCHS: f64 = 3.0;
    pub const PER_DEVICE_TRAIN_BATCH_SIZE: usize = 8;
    pub const GRADIENT_ACCUMULATION_STEPS: usize = 1;
    pub const LEARNING_RATE: f64 = 5e-5;
    pub const WEIGHT_DECAY: f64 = 0.0;
    pub const ADAM_BETA1: f64 = 0.9;
    pub const ADAM_BETA2: f64 = 0.999;
    pub const ADAM_EPSILON: f64 = 1e-8;
    pub const MAX_GRAD_NORM: f64 = 1.0;
    pub const LR_SCHEDULER_TYPE: SchedulerType = SchedulerType::Linear;
    pub const WARMUP_STEPS: f64 = 0.0;
    pub const WARMUP_RATIO: f64 = 0.0;
    pub const LOGGING_STEPS: u64 = 500;
    pub const SAVE_STRATEGY: SaveStrategy = SaveStrategy::Steps;
    pub const SAVE_STEPS: u64 = 500;
    pub const SEED: u64 = 42;
    pub const LOSS_NORMALIZATION: LossNormalization = LossNormalization::TokensInStep;
}

/// When checkpoints are written (`--save_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveStrategy {
    /// Every `save_steps` optimizer steps, and at the last step.
    #[default]
    Steps,
    /// At the end of every epoch.
    Epoch,
    /// Never (the final adapter in `ft/` is still written).
    No,
}

impl FromStr for SaveStrategy {
    type Err = CordaError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "steps" => Ok(SaveStrategy::Steps),
            "epoch" => Ok(SaveStrategy::Epoch),
            "no" | "none" | "false" => Ok(SaveStrategy::No),
            other => Err(CordaError::Invalid(format!(
                "unknown save_strategy `{other}`; use steps, epoch or no"
            ))),
        }
    }
}

impl fmt::Display for SaveStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SaveStrategy::Steps => "steps",
            SaveStrategy::Epoch => "epoch",
            SaveStrategy::No => "no",
        })
    }
}

/// How the loss of the micro-batches of one optimizer step is combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossNormalization {
    /// The Trainer since transformers 4.46 (the version the reference fixtures come from):
    /// every micro-batch's summed token loss is divided by the number of target tokens in the
    /// whole accumulation window (`num_items_in_batch`), so the step's loss is the mean over all
    /// of its tokens, whatever the micro-batch split.
    #[default]
    TokensInStep,
    /// The Trainer before 4.46: each micro-batch's mean loss divided by the number of
    /// micro-batches in the window (a mean of means).
    MeanOfMicroBatches,
}

impl FromStr for LossNormalization {
    type Err = CordaError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "tokens_in_step" | "tokens" => Ok(LossNormalization::TokensInStep),
            "mean_of_micro_batches" | "micro_batch" | "legacy" => {
                Ok(LossNormalization::MeanOfMicroBatches)
            }
            other => Err(CordaError::Invalid(format!(
                "unknown loss normalization `{other}`; use tokens_in_step or mean_of_micro_batches"
            ))),
        }
    }
}

impl fmt::Display for LossNormalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LossNormalization::TokensInStep => "tokens_in_step",
            LossNormalization::MeanOfMicroBatches => "mean_of_micro_batches",
        })
    }
}

/// `--resume_from_checkpoint`: a checkpoint directory, or the latest one in `output_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResumeFrom {
    /// `true`: the checkpoint with the highest step in the output directory.
    Latest,
    Path(PathBuf),
}

impl ResumeFrom {
    /// Parse the flag's value: `true`/`True` means [`ResumeFrom::Latest`], `false` means no
    /// resume (`None`), anything else is a path.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Some(ResumeFrom::Latest),
            "false" | "no" | "0" | "" | "none" => None,
            _ => Some(ResumeFrom::Path(PathBuf::from(s))),
        }
    }
}

/// Everything the training loop needs besides the model and the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// `FT`: checkpoints, `trainer_state.json`, `loss.svg` and the final adapter in `ft/`.
    pub output_dir: PathBuf,
    /// May be fractional, as in the Trainer.
    pub num_train_epochs: f64,
    /// When set, the number of optimizer steps, overriding `num_train_epochs`.
    pub max_steps: Option<u64>,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub max_grad_norm: f64,
    pub lr_scheduler_type: SchedulerType,
    /// Warmup steps; a value in (0, 1) is a ratio of the total steps (transformers 5).
    pub warmup_steps: f64,
    /// Used when `warmup_steps` is 0: `ceil(warmup_ratio * total_steps)`.
    pub warmup_ratio: f64,
    pub logging_steps: u64,
    pub save_strategy: SaveStrategy,
    pub save_steps: u64,
    /// Keep at most this many checkpoints (the oldest are deleted).
    pub save_total_limit: Option<usize>,
    /// Seeds the per-epoch data order (seed + epoch).
    pub seed: u64,
    pub resume_from_checkpoint: Option<ResumeFrom>,
    pub loss_normalization: LossNormalization,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping them
    /// (less memory, one more forward pass through the layers).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Draw a progress bar (it is hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// Print each log entry as a line on stderr, like the Trainer does.
    pub print_logs: bool,
}

impl TrainConfig {
    /// Hugging Face `TrainingArguments` defaults for `output_dir`.
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        use defaults as d;
        Self {
            output_dir: output_dir.into(),
            num_train_epochs: d::NUM_TRAIN_EPOCHS,
            max_steps: None,
            per_device_train_batch_size: d::PER_DEVICE_TRAIN_BATCH_SIZE,
            gradient_accumulation_steps: d::GRADIENT_ACCUMULATION_STEPS,
            learning_rate: d::LEARNING_RATE,
            weight_decay: d::WEIGHT_DECAY,
            adam_beta1: d::ADAM_BETA1,
            adam_beta2: d::ADAM_BETA2,
            adam_epsilon: d::ADAM_EPSILON,
            max_grad_norm: d::MAX_GRAD_NORM,
            lr_scheduler_type: d::LR_SCHEDULER_TYPE,
            warmup_steps: d::WARMUP_STEPS,
            warmup_ratio: d::WARMUP_RATIO,
            logging_steps: d::LOGGING_STEPS,
            save_strategy: d::SAVE_STRATEGY,
            save_steps: d::SAVE_STEPS,
            save_total_limit: None,
            seed: d::SEED,
            resume_from_checkpoint: None,
            loss_normalization: d::LOSS_NORMALIZATION,
            gradient_checkpointing: false,
            progress: true,
            print_logs: true,
        }
    }

    /// The optimizer's hyper-parameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_epsilon,
            weight_decay: self.weight_decay,
        }
    }

    /// Reject values the loop cannot run with, before anything is loaded or trained.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CordaError::Invalid(m));
        if self.per_device_train_batch_size == 0 {
            return bad("per_device_train_batch_size must be at least 1".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps must be at least 1".into());
        }
        if self.max_steps == Some(0) {
            return bad("max_steps must be positive (leave it unset to train by epochs)".into());
        }
        // Checked with max_steps set too (it is then unused): a bad value is a mistake.
        if !(self.num_train_epochs > 0.0 && self.num_train_epochs.is_finite()) {
            return bad(format!(
                "num_train_epochs must be a finite number above 0, got {}",
                self.num_train_epochs
            ));
        }
        if !(self.learning_rate >= 0.0 && self.learning_rate.is_finite()) {
            return bad(format!(
                "learning_rate must be a non-negative number, got {}",
                self.learning_rate
            ));
        }
        if self.logging_steps == 0 {
            return bad("logging_steps must be at least 1".into());
        }
        if self.save_strategy == SaveStrategy::Steps && self.save_steps == 0 {
            return bad("save_steps must be at least 1 with save_strategy steps".into());
        }
        if self.save_total_limit == Some(0) {
            return bad(
                "save_total_limit must be at least 1 (or unset to keep every checkpoint)".into(),
            );
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return bad(format!(
                "max_grad_norm must be a finite non-negative number, got {}",
                self.max_grad_norm
            ));
        }
        super::schedule::warmup_steps(self.warmup_steps, self.warmup_ratio, 1)?;
        check_adamw(&self.adamw())
    }
}

impl Default for AdamWConfig {
    /// The Hugging Face `TrainingArguments` defaults (weight decay 0, unlike torch's 0.01).
    fn default() -> Self {
        use defaults as d;
        Self {
            beta1: d::ADAM_BETA1,
            beta2: d::ADAM_BETA2,
            eps: d::ADAM_EPSILON,
            weight_decay: d::WEIGHT_DECAY,
        }
    }
}

/// The optimizer settings torch would reject, checked without building an optimizer.
fn check_adamw(c: &AdamWConfig) -> Result<()> {
    if !(0.0..1.0).contains(&c.beta1) || !(0.0..1.0).contains(&c.beta2) {
        return Err(CordaError::Invalid(format!(
            "adam_beta1/adam_beta2 must lie in [0, 1), got {} and {}",
            c.beta1, c.beta2
        )));
    }
    for (name, v) in [("adam_epsilon", c.eps), ("weight_decay", c.weight_decay)] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(CordaError::Invalid(format!(
                "{name} must be a finite non-negative number, got {v}"
            )));
        }
    }
    Ok(())
}

/// The step arithmetic of the Trainer for a dataset of `num_examples` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    /// Micro-batches per epoch: `ceil(num_examples / batch)` (the last one may be short).
    pub micro_batches_per_epoch: u64,
    /// Optimizer steps per epoch: `ceil(micro_batches / accumulation)`; the last step of an
    /// epoch may accumulate fewer micro-batches.
    pub steps_per_epoch: u64,
    /// Optimizer steps of the whole run.
    pub total_steps: u64,
    /// Epochs the loop visits (the last may stop early at `total_steps`).
    pub epochs: u64,
}

impl StepPlan {
    /// `max_steps` wins over `num_train_epochs`, as in the Trainer.
    pub fn new(cfg: &TrainConfig, num_examples: usize) -> Result<Self> {
        if num_examples == 0 {
            return Err(CordaError::Data(
                "the training set is empty; check the data source and its split".into(),
            ));
        }
        let b = cfg.per_device_train_batch_size as u64;
        let acc = cfg.gradient_accumulation_steps as u64;
        let micro = (num_examples as u64).div_ceil(b);
        let steps_per_epoch = micro.div_ceil(acc).max(1);
        let (total_steps, epochs) = match cfg.max_steps {
            Some(m) => (m, m.div_ceil(steps_per_epoch)),
            None => {
                let total = (cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64;
                (total.max(1), cfg.num_train_epochs.ceil() as u64)
            }
        };
        Ok(Self {
            micro_batches_per_epoch: micro,
            steps_per_epoch,
            total_steps,
            epochs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_plan_like_trainer() {
        let mut c = TrainConfig::new("x");
        c.per_device_train_batch_size = 1;
        c.gradient_accumulation_steps = 32;
        c.num_train_epochs = 1.0;
        let p = StepPlan::new(&c, 100_000).unwrap();
        assert_eq!(
            (
                p.micro_batches_per_epoch,
                p.steps_per_epoch,
                p.total_steps,
                p.epochs
            ),
            (100_000, 3125, 3125, 1)
        );
        c.per_device_train_batch_size = 3;
        c.gradient_accumulation_steps = 2;
        c.num_train_epochs = 2.0;
        let p = StepPlan::new(&c, 16).unwrap(); // 6 micro-batches, 3 steps per epoch
        assert_eq!((p.steps_per_epoch, p.total_steps, p.epochs), (3, 6, 2));
        c.max_steps = Some(7);
        let p = StepPlan::new(&c, 16).unwrap();
        assert_eq!((p.total_steps, p.epochs), (7, 3));
        c.max_steps = None;
        c.num_train_epochs = 0.5;
        assert_eq!(StepPlan::new(&c, 16).unwrap().total_steps, 2);
        assert!(StepPlan::new(&c, 0).is_err());
    }

    #[test]
    fn validation_and_parsing() {
        let mut c = TrainConfig::new("x");
        c.validate().unwrap();
        c.gradient_accumulation_steps = 0;
        assert!(c.validate().is_err());
        assert_eq!(
            "EPOCH".parse::<SaveStrategy>().unwrap(),
            SaveStrategy::Epoch
        );
        assert_eq!(ResumeFrom::parse("True"), Some(ResumeFrom::Latest));
        assert_eq!(ResumeFrom::parse("false"), None);
        assert_eq!(
            ResumeFrom::parse("FT/checkpoint-3"),
            Some(ResumeFrom::Path("FT/checkpoint-3".into()))
        );
    }
}
