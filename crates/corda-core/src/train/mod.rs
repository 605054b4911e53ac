//! Fine-tuning the LoRA factors of an adapter, with the semantics of the Hugging Face Trainer
//! that the reference `corda_finetuning.py` uses.
//!
//! - [`config`]: the options (`TrainingArguments` names and defaults) and the step arithmetic.
//! - [`trainable`]: what the loop needs from a model.
//! - [`loss`]: the shifted, masked causal-LM cross-entropy.
//! - [`grads`]: gradients summed over the micro-batches of a step.
//! - [`recompute`]: forward and backward of a micro-batch, optionally with gradient checkpointing.
//! - [`clip`]: gradient clipping by global norm.
//! - [`optimizer`]: torch's AdamW over candle `Var`s, with a saveable state.
//! - [`schedule`]: transformers' learning-rate schedules and warmup.
//! - [`state`]: `trainer_state.json` and its `log_history`.
//! - [`checkpoint`]: atomic checkpoints, pruning and resume.
//! - [`lora_init`]: PEFT's default LoRA initialisation for the plain-LoRA baseline.
//! - [`trainer`]: the loop.
//! - [`finetune`]: a whole run put together (model + adapter + tokenizer + examples).

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod finetune;
pub mod fused_ce;
pub mod grads;
pub mod lora_init;
pub mod loss;
pub mod optimizer;
pub mod recompute;
pub mod schedule;
pub mod state;
pub mod trainable;
pub mod trainer;

pub use crate::util::plot::loss_curve_svg;
pub use checkpoint::{
    check_adapter_matches, list_checkpoints, prune_checkpoints, resolve_resume, save_checkpoint,
    Checkpoint, CheckpointContents, Progress, SchedulerState, CHECKPOINT_PREFIX,
};
pub use clip::{clip_grad_norm, global_norm};
pub use config::{defaults, LossNormalization, ResumeFrom, SaveStrategy, StepPlan, TrainConfig};
pub use finetune::{corda_init_dir, AdapterChoice, FineTuneRun, FineTuneSpec};
pub use grads::Gradients;
pub use lora_init::{kaiming_uniform_bound, plain_lora_adapter};
pub use loss::{causal_lm_loss, causal_lm_loss_sum, LossSum, IGNORE_INDEX};
pub use optimizer::{AdamW, AdamWConfig, OptimizerName};
pub use recompute::MicroBatch;
pub use schedule::{warmup_steps, LrSchedule, SchedulerType};
pub use state::{LogEntry, StepLog, TrainSummary, TrainerState, TRAINER_STATE_FILE};
pub use trainable::{factor_names, TrainableModel};
pub use trainer::{
    epoch_order, target_tokens, StepCallback, TrainOutcome, Trainer, FINAL_ADAPTER_DIR,
    LOSS_CURVE_FILE,
};
