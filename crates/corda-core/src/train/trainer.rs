//! The training loop of the Hugging Face Trainer, for LoRA factors only.
//!
//! Per optimizer step: `gradient_accumulation_steps` micro-batches of
//! `per_device_train_batch_size` examples are run forward and backward and their gradients
//! summed; the gradients are clipped by global norm; AdamW steps with the scheduled learning
//! rate; the scheduler steps. Every `logging_steps` steps the mean loss of the window is logged;
//! checkpoints are written by `save_strategy`. The data order of epoch `e` is a shuffle seeded
//! by `seed + e`, so a resumed run replays exactly the batches the uninterrupted run would see.
//!
//! The loss of a step is the mean over all target tokens of its micro-batches (transformers
//! 4.46 and later, [`LossNormalization::TokensInStep`]) or the mean of the micro-batch means
//! (older transformers, [`LossNormalization::MeanOfMicroBatches`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{prune_checkpoints, Progress, SchedulerState};
use super::checkpoint::{
    remove_stale_temp_dirs, resolve_resume, save_checkpoint, Checkpoint, CheckpointContents,
};
use super::clip::clip_grad_norm;
use super::config::{LossNormalization, SaveStrategy, StepPlan, TrainConfig};
use super::grads::Gradients;
use super::optimizer::AdamW;
use super::plot::loss_curve_svg;
use super::schedule::{warmup_steps, LrSchedule};
use super::state::{LogEntry, StepLog, TrainSummary, TrainerState, TRAINER_STATE_FILE};
use super::trainable::{factor_names, TrainableModel};
use crate::adapter::{Adapter, AdapterConfig, LoraPair};
use crate::data::{collate, SftExample, IGNORE_INDEX};
use crate::util::atomic::write_file_atomic;
use crate::util::{progress_bar, AtomicDir, PhaseReport};
use crate::{CordaError, Result};

pub use crate::layout::{FINAL_ADAPTER_DIR, LOSS_CURVE_FILE};

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub state: TrainerState,
    /// `output_dir/ft`: the trained adapter in PEFT format.
    pub adapter_dir: PathBuf,
    /// `output_dir/loss.svg`.
    pub loss_curve: PathBuf,
    /// The checkpoint this run resumed from, if any.
    pub resumed_from: Option<PathBuf>,
    /// Optimizer steps taken by this process (not counting those before a resume).
    pub steps_this_run: u64,
    /// Non-padding input tokens processed by this process.
    pub tokens_this_run: u64,
    /// Seconds spent in forward, backward and optimizer steps in this process.
    pub train_seconds: f64,
    /// Wall time per phase and peak memory.
    pub report: PhaseReport,
}

impl TrainOutcome {
    /// Training throughput of this process: non-padding tokens per second of compute.
    pub fn tokens_per_second(&self) -> f64 {
        if self.train_seconds > 0.0 {
            self.tokens_this_run as f64 / self.train_seconds
        } else {
            0.0
        }
    }
}

/// One training run: a model with LoRA factors attached, tokenized examples, options.
pub struct Trainer<'a, M: TrainableModel> {
    model: &'a M,
    examples: &'a [SftExample],
    pad_id: u32,
    adapter_config: AdapterConfig,
    config: TrainConfig,
    on_step: Option<StepCallback<'a>>,
}

/// Called after every optimizer step (after logging and saving) with the trainer state;
/// returning `true` stops training there, like the Trainer's `control.should_training_stop`.
pub type StepCallback<'a> = Box<dyn FnMut(&TrainerState) -> bool + 'a>;

/// Target tokens an example contributes to the causal-LM loss (shifted labels != -100).
pub fn target_tokens(example: &SftExample) -> usize {
    example
        .labels
        .iter()
        .skip(1)
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

/// The indices of the examples in the order epoch `epoch` visits them.
pub fn epoch_order(num_examples: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..num_examples).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch));
    order.shuffle(&mut rng);
    order
}

/// The optimizer's view of the factors: names and variables, A then B per module.
fn named_vars(factors: &[(String, Var, Var)]) -> Vec<(String, Var)> {
    factors
        .iter()
        .flat_map(|(m, a, b)| {
            let (na, nb) = factor_names(m);
            [(na, a.clone()), (nb, b.clone())]
        })
        .collect()
}

/// The adapter as it currently is in the model (factors copied to the CPU).
fn current_adapter(config: &AdapterConfig, factors: &[(String, Var, Var)]) -> Result<Adapter> {
    let mut modules = std::collections::BTreeMap::new();
    for (m, a, b) in factors {
        let a = a.as_tensor().detach().to_device(&Device::Cpu)?;
        let b = b.as_tensor().detach().to_device(&Device::Cpu)?;
        modules.insert(m.clone(), LoraPair { a, b });
    }
    Ok(Adapter {
        config: config.clone(),
        modules,
    })
}

impl<'a, M: TrainableModel> Trainer<'a, M> {
    /// A run over `examples`, padding with `pad_id`. `adapter_config` is the config written with
    /// the checkpoints and the final adapter (its `init_lora_weights` is forced to `true`, so
    /// PEFT loads the trained factors instead of re-running an initialisation).
    pub fn new(
        model: &'a M,
        examples: &'a [SftExample],
        pad_id: u32,
        adapter_config: AdapterConfig,
        config: TrainConfig,
    ) -> Result<Self> {
        config.validate()?;
        if examples.is_empty() {
            return Err(CordaError::Data(
                "the training set is empty; check the data source and its split".into(),
            ));
        }
        let mut adapter_config = adapter_config;
        adapter_config.init_lora_weights = serde_json::Value::Bool(true);
        adapter_config
            .extra
            .insert("inference_mode".into(), serde_json::Value::Bool(true));
        Ok(Self {
            model,
            examples,
            pad_id,
            adapter_config,
            config,
            on_step: None,
        })
    }

    /// Install a callback run after every step (see [`StepCallback`]).
    pub fn on_step(mut self, callback: impl FnMut(&TrainerState) -> bool + 'a) -> Self {
        self.on_step = Some(Box::new(callback));
        self
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Train, write checkpoints, the final adapter, `trainer_state.json` and the loss curve.
    /// Every check (options, data, the model's factors, the resume checkpoint) happens before
    /// the first step.
    pub fn train(mut self) -> Result<TrainOutcome> {
        let mut on_step = self.on_step.take();
        let cfg = &self.config;
        let out_dir = cfg.output_dir.clone();
        let n = self.examples.len();
        let plan = StepPlan::new(cfg, n)?;
        let factors = self.model.lora_factors();
        if factors.is_empty() {
            return Err(CordaError::Invalid(
                "the model has no LoRA factors to train; attach an adapter before training".into(),
            ));
        }
        let vars: Vec<Var> = named_vars(&factors).into_iter().map(|(_, v)| v).collect();
        let mut optimizer = AdamW::new(named_vars(&factors), cfg.adamw())?;
        let warmup = warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, plan.total_steps)?;
        let schedule = LrSchedule::new(
            cfg.lr_scheduler_type,
            cfg.learning_rate,
            warmup,
            plan.total_steps,
        );
        let device = self.model.device();

        let mut state = TrainerState::new(
            plan.total_steps,
            plan.epochs,
            cfg.logging_steps,
            cfg.save_steps,
            cfg.per_device_train_batch_size,
        );
        let mut progress = Progress {
            seed: cfg.seed,
            epoch: 0,
            steps_in_epoch: 0,
            global_step: 0,
            num_examples: n,
            per_device_train_batch_size: cfg.per_device_train_batch_size,
            gradient_accumulation_steps: cfg.gradient_accumulation_steps,
            window_loss_sum: 0.0,
            window_steps: 0,
            total_loss_sum: 0.0,
            tokens_seen: 0,
        };
        let mut report = PhaseReport::new();

        let resumed_from = match &cfg.resume_from_checkpoint {
            None => None,
            Some(from) => {
                let dir = resolve_resume(&out_dir, from)?;
                let ckpt = Checkpoint::load(&dir)?;
                ckpt.restore_adapter(&factors)?;
                ckpt.load_optimizer(&mut optimizer)?;
                warn_on_changed_run(&ckpt, &progress, &schedule);
                // Position and running sums from the checkpoint; the settings of this run.
                progress = Progress {
                    seed: cfg.seed,
                    num_examples: n,
                    per_device_train_batch_size: cfg.per_device_train_batch_size,
                    gradient_accumulation_steps: cfg.gradient_accumulation_steps,
                    ..ckpt.progress.clone()
                };
                state = ckpt.state.clone();
                state.max_steps = plan.total_steps;
                state.num_train_epochs = plan.epochs;
                state.logging_steps = cfg.logging_steps;
                state.save_steps = cfg.save_steps;
                state.train_batch_size = cfg.per_device_train_batch_size;
                // Entries after the checkpoint's step (from a later part of an earlier run) go.
                state.log_history.retain(|e| match e {
                    LogEntry::Step(s) => s.step <= progress.global_step,
                    LogEntry::Summary(_) => false,
                    LogEntry::Other(_) => true,
                });
                tracing::info!(
                    "resuming from {} at step {}",
                    dir.display(),
                    progress.global_step
                );
                Some(dir)
            }
        };
        std::fs::create_dir_all(&out_dir).map_err(|e| CordaError::io(&out_dir, e))?;
        remove_stale_temp_dirs(&out_dir)?;

        let pb = if cfg.progress {
            progress_bar(plan.total_steps, "training")
        } else {
            indicatif::ProgressBar::hidden()
        };
        pb.set_position(progress.global_step.min(plan.total_steps));
        let log_line = |line: String| {
            if cfg.print_logs {
                pb.suspend(|| eprintln!("{line}"));
            }
        };

        let mut grads = Gradients::new(vars.len());
        let mut steps_this_run = 0u64;
        let mut tokens_this_run = 0u64;
        let mut train_seconds = 0.0f64;
        let mut window_start = Instant::now();
        let mut window_tokens = 0u64;
        let run_start = Instant::now();
        let mut last_grad_norm = 0.0;

        let mut epoch = progress.epoch;
        let mut skip = progress.steps_in_epoch;
        'epochs: while epoch < plan.epochs && progress.global_step < plan.total_steps {
            let order = epoch_order(n, cfg.seed, epoch);
            let micro: Vec<&[usize]> = order.chunks(cfg.per_device_train_batch_size).collect();
            let windows: Vec<&[&[usize]]> = micro.chunks(cfg.gradient_accumulation_steps).collect();
            for (w_idx, window) in windows.iter().enumerate().skip(skip as usize) {
                if progress.global_step >= plan.total_steps {
                    break 'epochs;
                }
                let step_start = Instant::now();
                // HF's `num_items_in_batch`: labels != -100 before the shift. It equals the
                // number of loss tokens whenever the first label is masked (always in SFT,
                // where position 0 belongs to the prompt).
                let window_targets: usize = window
                    .iter()
                    .flat_map(|mb| mb.iter())
                    .map(|&i| {
                        self.examples[i]
                            .labels
                            .iter()
                            .filter(|&&l| l != IGNORE_INDEX)
                            .count()
                    })
                    .sum();
                let mut step_loss = 0.0f64;
                for mb in window.iter() {
                    let exs: Vec<SftExample> =
                        mb.iter().map(|&i| self.examples[i].clone()).collect();
                    let padded = collate(&exs, self.pad_id)?;
                    let real_tokens: u64 = padded
                        .attention_mask
                        .iter()
                        .flatten()
                        .map(|&m| m as u64)
                        .sum();
                    let batch = padded.to_tensors(&device, DType::U8)?;
                    window_tokens += real_tokens;
                    tokens_this_run += real_tokens;
                    progress.tokens_seen += real_tokens;
                    let t0 = Instant::now();
                    let parts = self.model.loss_sum(
                        &batch.input_ids,
                        &batch.attention_mask,
                        &batch.labels,
                    )?;
                    if parts.tokens == 0 {
                        report.add("forward", t0.elapsed());
                        continue;
                    }
                    let denom = match cfg.loss_normalization {
                        LossNormalization::TokensInStep => window_targets as f64,
                        LossNormalization::MeanOfMicroBatches => {
                            (parts.tokens * window.len()) as f64
                        }
                    };
                    let loss = parts.sum.affine(1.0 / denom, 0.0)?;
                    step_loss += loss.to_scalar::<f32>()? as f64;
                    report.add("forward", t0.elapsed());
                    let t1 = Instant::now();
                    let store = loss.backward()?;
                    grads.accumulate(&store, &vars)?;
                    drop(store);
                    report.add("backward", t1.elapsed());
                }
                if !step_loss.is_finite() {
                    return Err(CordaError::Numerics(format!(
                        "the training loss is {step_loss} at step {}; lower learning_rate or check the data",
                        progress.global_step + 1
                    )));
                }
                let t2 = Instant::now();
                let grad_norm = clip_grad_norm(grads.as_mut_slice(), cfg.max_grad_norm)?;
                optimizer.step(grads.as_slice(), schedule.lr(progress.global_step))?;
                grads.clear();
                report.add("optimizer", t2.elapsed());
                train_seconds += step_start.elapsed().as_secs_f64();
                last_grad_norm = grad_norm;

                progress.global_step += 1;
                steps_this_run += 1;
                progress.steps_in_epoch = w_idx as u64 + 1;
                progress.epoch = epoch;
                progress.window_loss_sum += step_loss;
                progress.window_steps += 1;
                progress.total_loss_sum += step_loss;
                let done_micro = (w_idx * cfg.gradient_accumulation_steps + window.len()) as f64;
                state.global_step = progress.global_step;
                state.epoch = epoch as f64 + done_micro / plan.micro_batches_per_epoch as f64;
                state.num_input_tokens_seen = progress.tokens_seen;
                if progress.steps_in_epoch == windows.len() as u64 {
                    progress.epoch = epoch + 1;
                    progress.steps_in_epoch = 0;
                }
                pb.inc(1);
                pb.set_message(format!("loss {step_loss:.4}"));

                if progress.global_step.is_multiple_of(cfg.logging_steps) {
                    let elapsed = window_start.elapsed().as_secs_f64();
                    let entry = StepLog {
                        epoch: state.epoch,
                        grad_norm,
                        learning_rate: schedule.lr(progress.global_step),
                        loss: progress.window_loss_sum / progress.window_steps as f64,
                        step: progress.global_step,
                        tokens_per_second: if elapsed > 0.0 {
                            window_tokens as f64 / elapsed
                        } else {
                            0.0
                        },
                    };
                    log_line(serde_json::to_string(&entry).unwrap_or_default());
                    state.log_history.push(LogEntry::Step(entry));
                    progress.window_loss_sum = 0.0;
                    progress.window_steps = 0;
                    window_tokens = 0;
                    window_start = Instant::now();
                }

                let last = progress.global_step >= plan.total_steps;
                let epoch_end = w_idx + 1 == windows.len();
                let save = match cfg.save_strategy {
                    SaveStrategy::Steps => {
                        progress.global_step.is_multiple_of(cfg.save_steps) || last
                    }
                    SaveStrategy::Epoch => epoch_end || last,
                    SaveStrategy::No => false,
                };
                if save {
                    let t3 = Instant::now();
                    let scheduler = SchedulerState {
                        lr_scheduler_type: schedule.kind,
                        base_lr: schedule.base_lr,
                        warmup_steps: schedule.warmup,
                        total_steps: schedule.total_steps,
                        last_epoch: progress.global_step,
                        last_lr: schedule.lr(progress.global_step),
                    };
                    let adapter = current_adapter(&self.adapter_config, &factors)?;
                    let path = save_checkpoint(
                        &out_dir,
                        &CheckpointContents {
                            adapter: &adapter,
                            optimizer: &optimizer,
                            scheduler: &scheduler,
                            progress: &progress,
                            state: &state,
                            args: cfg,
                        },
                    )?;
                    if let Some(limit) = cfg.save_total_limit {
                        prune_checkpoints(&out_dir, limit)?;
                    }
                    tracing::info!("saved {}", path.display());
                    report.add("checkpoint", t3.elapsed());
                    // Saving is not training: keep it out of the tokens/s of the window.
                    window_start += t3.elapsed();
                }
                if let Some(cb) = on_step.as_mut() {
                    if cb(&state) {
                        tracing::info!(
                            "stopped by the step callback at step {}",
                            progress.global_step
                        );
                        break 'epochs;
                    }
                }
            }
            epoch += 1;
            skip = 0;
        }
        pb.finish_and_clear();

        let runtime = run_start.elapsed().as_secs_f64();
        let samples = steps_this_run as f64
            * (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps) as f64;
        let summary = TrainSummary {
            epoch: state.epoch,
            step: progress.global_step,
            train_loss: if progress.global_step > 0 {
                progress.total_loss_sum / progress.global_step as f64
            } else {
                0.0
            },
            train_runtime: runtime,
            train_samples_per_second: if runtime > 0.0 {
                samples / runtime
            } else {
                0.0
            },
            train_steps_per_second: if runtime > 0.0 {
                steps_this_run as f64 / runtime
            } else {
                0.0
            },
            train_tokens_per_second: if train_seconds > 0.0 {
                tokens_this_run as f64 / train_seconds
            } else {
                0.0
            },
        };
        log_line(serde_json::to_string(&summary).unwrap_or_default());
        tracing::debug!("last grad norm {last_grad_norm}");
        state.log_history.push(LogEntry::Summary(summary));

        let t4 = Instant::now();
        let adapter = current_adapter(&self.adapter_config, &factors)?;
        let adapter_dir = save_final_adapter(&out_dir, &adapter)?;
        state.write(&out_dir.join(TRAINER_STATE_FILE))?;
        let loss_curve = out_dir.join(LOSS_CURVE_FILE);
        let title = format!("training loss ({} steps)", progress.global_step);
        write_file_atomic(
            &loss_curve,
            loss_curve_svg(&state.loss_points(), &title).as_bytes(),
        )?;
        report.add("final save", t4.elapsed());

        Ok(TrainOutcome {
            state,
            adapter_dir,
            loss_curve,
            resumed_from,
            steps_this_run,
            tokens_this_run,
            train_seconds,
            report,
        })
    }
}

/// Write the final adapter to `output_dir/ft` (replacing a previous one) atomically.
fn save_final_adapter(out_dir: &Path, adapter: &Adapter) -> Result<PathBuf> {
    let dir = AtomicDir::create(out_dir.join(FINAL_ADAPTER_DIR), true)?;
    adapter.save(dir.path())?;
    dir.commit()
}

/// A resumed run replays the data by position; say so when the position means something else now.
fn warn_on_changed_run(ckpt: &Checkpoint, now: &Progress, schedule: &LrSchedule) {
    let then = &ckpt.progress;
    let mut changed = Vec::new();
    if then.seed != now.seed {
        changed.push(format!("seed {} -> {}", then.seed, now.seed));
    }
    if then.num_examples != now.num_examples {
        changed.push(format!(
            "training rows {} -> {}",
            then.num_examples, now.num_examples
        ));
    }
    if then.per_device_train_batch_size != now.per_device_train_batch_size {
        changed.push(format!(
            "per_device_train_batch_size {} -> {}",
            then.per_device_train_batch_size, now.per_device_train_batch_size
        ));
    }
    if then.gradient_accumulation_steps != now.gradient_accumulation_steps {
        changed.push(format!(
            "gradient_accumulation_steps {} -> {}",
            then.gradient_accumulation_steps, now.gradient_accumulation_steps
        ));
    }
    let s = &ckpt.scheduler;
    if s.lr_scheduler_type != schedule.kind
        || s.base_lr != schedule.base_lr
        || s.warmup_steps != schedule.warmup
        || s.total_steps != schedule.total_steps
    {
        changed.push(format!(
            "schedule {} lr {} warmup {} over {} steps -> {} lr {} warmup {} over {} steps",
            s.lr_scheduler_type,
            s.base_lr,
            s.warmup_steps,
            s.total_steps,
            schedule.kind,
            schedule.base_lr,
            schedule.warmup,
            schedule.total_steps
        ));
    }
    if !changed.is_empty() {
        tracing::warn!(
            "{} was written by a run with other settings ({}); training continues, but not as the original run would have",
            ckpt.dir.display(),
            changed.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(10, 42, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(10, 42, 0));
        assert_ne!(a, epoch_order(10, 42, 1));
        assert_eq!(epoch_order(10, 41, 1), epoch_order(10, 42, 0));
    }
}
