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
use super::recompute::MicroBatch;
use super::schedule::{warmup_steps, LrSchedule};
use super::state::{LogEntry, StepLog, TrainSummary, TrainerState, TRAINER_STATE_FILE};
use super::trainable::{factor_names, TrainableModel};
use crate::adapter::{Adapter, AdapterConfig, LoraPair, Provenance};
use crate::data::{collate, SftExample, IGNORE_INDEX};
use crate::util::atomic::write_file_atomic;
use crate::util::plot::loss_curve_svg;
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
    provenance: Option<Provenance>,
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
            provenance: None,
        })
    }

    /// Save `provenance` (the initial adapter's fingerprint) with every checkpoint and the
    /// final adapter, so that conversion can check its starting point.
    pub fn with_provenance(mut self, provenance: Option<Provenance>) -> Self {
        self.provenance = provenance;
        self
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
    ///
    /// The phases, each a method below: `start` (plan, optimizer, schedule), `resume`, then per
    /// optimizer step `step`, `advance`, `log` and `save`, and `finish` (summary, final
    /// adapter, state, loss curve).
    pub fn train(mut self) -> Result<TrainOutcome> {
        let mut on_step = self.on_step.take();
        let mut run = self.start()?;
        let resumed_from = self.resume(&mut run)?;
        let cfg = &self.config;
        let out_dir = &cfg.output_dir;
        crate::util::atomic::create_dir_all(out_dir)?;
        remove_stale_temp_dirs(out_dir)?;

        let pb = if cfg.progress {
            progress_bar(run.plan.total_steps, "training")
        } else {
            indicatif::ProgressBar::hidden()
        };
        pb.set_position(run.progress.global_step.min(run.plan.total_steps));
        let log_line = |line: String| {
            if cfg.print_logs {
                pb.suspend(|| eprintln!("{line}"));
            }
        };
        if crate::util::process::interrupt_requested() {
            return Err(CordaError::Invalid(
                "interrupted before the first step; nothing was trained or saved".into(),
            ));
        }
        run.clock = Clock::now();
        run.initial_param_norm = param_norm(&run.vars)?;

        let n = self.examples.len();
        let mut epoch = run.progress.epoch;
        let mut skip = run.progress.steps_in_epoch;
        'epochs: while epoch < run.plan.epochs && run.progress.global_step < run.plan.total_steps {
            let order = epoch_order(n, cfg.seed, epoch);
            let micro: Vec<&[usize]> = order.chunks(cfg.per_device_train_batch_size).collect();
            let windows: Vec<&[&[usize]]> = micro.chunks(cfg.gradient_accumulation_steps).collect();
            for (w_idx, window) in windows.iter().enumerate().skip(skip as usize) {
                if run.progress.global_step >= run.plan.total_steps {
                    break 'epochs;
                }
                let step_loss = self.step(&mut run, window)?;
                let position = WindowPosition {
                    epoch,
                    index: w_idx,
                    micro_batches: window.len(),
                    windows_in_epoch: windows.len(),
                };
                self.advance(&mut run, &position, step_loss);
                pb.inc(1);
                pb.set_message(format!("loss {step_loss:.4}"));
                self.log(&mut run, &log_line);
                let saved = self.save(&mut run, &position)?;
                if crate::util::process::interrupt_requested() {
                    pb.finish_and_clear();
                    let checkpoint = match saved {
                        Some(p) => p,
                        None => self.write_checkpoint(&mut run)?,
                    };
                    run.state.write(&out_dir.join(TRAINER_STATE_FILE))?;
                    return Err(CordaError::Interrupted {
                        step: run.progress.global_step,
                        checkpoint,
                    });
                }
                if let Some(cb) = on_step.as_mut() {
                    if cb(&run.state) {
                        tracing::info!(
                            "stopped by the step callback at step {}",
                            run.progress.global_step
                        );
                        break 'epochs;
                    }
                }
            }
            epoch += 1;
            skip = 0;
        }
        pb.finish_and_clear();
        self.finish(run, resumed_from, &log_line)
    }

    /// The plan of the run, the optimizer over the model's factors, the schedule, and a fresh
    /// state at step 0.
    fn start(&self) -> Result<RunState> {
        let cfg = &self.config;
        let n = self.examples.len();
        let plan = StepPlan::new(cfg, n)?;
        let factors = self.model.lora_factors();
        if factors.is_empty() {
            return Err(CordaError::Invalid(
                "the model has no LoRA factors to train; attach an adapter before training".into(),
            ));
        }
        let vars: Vec<Var> = named_vars(&factors).into_iter().map(|(_, v)| v).collect();
        let optimizer = AdamW::new(named_vars(&factors), cfg.adamw())?;
        let warmup = warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, plan.total_steps)?;
        let schedule = LrSchedule::new(
            cfg.lr_scheduler_type,
            cfg.learning_rate,
            warmup,
            plan.total_steps,
        );
        let state = TrainerState::new(
            plan.total_steps,
            plan.epochs,
            cfg.logging_steps,
            cfg.save_steps,
            cfg.per_device_train_batch_size,
        );
        let progress = Progress {
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
        Ok(RunState {
            plan,
            grads: Gradients::new(vars.len()),
            factors,
            vars,
            optimizer,
            schedule,
            state,
            progress,
            report: PhaseReport::new(),
            device: self.model.device(),
            clock: Clock::now(),
            last_grad_norm: 0.0,
            initial_param_norm: 0.0,
            zero_grad_steps: 0,
        })
    }

    /// With `resume_from_checkpoint`: restore the factors, the optimizer moments, the data
    /// position, the running sums and the log history; returns the checkpoint's directory.
    fn resume(&self, run: &mut RunState) -> Result<Option<PathBuf>> {
        let cfg = &self.config;
        let Some(from) = &cfg.resume_from_checkpoint else {
            return Ok(None);
        };
        let dir = resolve_resume(&cfg.output_dir, from)?;
        let ckpt = Checkpoint::load(&dir)?;
        ckpt.restore_adapter(&run.factors)?;
        crate::adapter::check_resume(self.provenance.as_ref(), &dir)?;
        ckpt.load_optimizer(&mut run.optimizer)?;
        warn_on_changed_run(&ckpt, &run.progress, &run.schedule);
        // Position and running sums from the checkpoint; the settings of this run.
        run.progress = Progress {
            seed: cfg.seed,
            num_examples: self.examples.len(),
            per_device_train_batch_size: cfg.per_device_train_batch_size,
            gradient_accumulation_steps: cfg.gradient_accumulation_steps,
            ..ckpt.progress.clone()
        };
        let plan = &run.plan;
        let state = &mut run.state;
        *state = ckpt.state.clone();
        state.max_steps = plan.total_steps;
        state.num_train_epochs = plan.epochs;
        state.logging_steps = cfg.logging_steps;
        state.save_steps = cfg.save_steps;
        state.train_batch_size = cfg.per_device_train_batch_size;
        // Entries after the checkpoint's step (from a later part of an earlier run) go.
        let step = run.progress.global_step;
        state.log_history.retain(|e| match e {
            LogEntry::Step(s) => s.step <= step,
            LogEntry::Summary(_) => false,
            LogEntry::Other(_) => true,
        });
        tracing::info!("resuming from {} at step {}", dir.display(), step);
        Ok(Some(dir))
    }

    /// One optimizer step over the micro-batches of `window`: forward and backward of each
    /// (gradients summed), clipping, AdamW with the scheduled learning rate. Returns the step's
    /// loss, normalised by `loss_normalization`.
    fn step(&self, run: &mut RunState, window: &[&[usize]]) -> Result<f64> {
        let cfg = &self.config;
        let step_start = Instant::now();
        // HF's `num_items_in_batch`: labels != -100 before the shift. It equals the number of
        // loss tokens whenever the first label is masked (always in SFT, where position 0
        // belongs to the prompt).
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
            let exs: Vec<SftExample> = mb.iter().map(|&i| self.examples[i].clone()).collect();
            let padded = collate(&exs, self.pad_id)?;
            let real_tokens: u64 = padded
                .attention_mask
                .iter()
                .flatten()
                .map(|&m| m as u64)
                .sum();
            let batch = padded.to_tensors(&run.device, DType::U8)?;
            run.clock.window_tokens += real_tokens;
            run.clock.tokens_this_run += real_tokens;
            run.progress.tokens_seen += real_tokens;
            let denom = |tokens: usize| match cfg.loss_normalization {
                LossNormalization::TokensInStep => window_targets as f64,
                LossNormalization::MeanOfMicroBatches => (tokens * window.len()) as f64,
            };
            let micro = MicroBatch {
                input_ids: &batch.input_ids,
                attention_mask: &batch.attention_mask,
                labels: &batch.labels,
            };
            if let Some(loss) = self.model.forward_backward(
                &micro,
                &denom,
                cfg.gradient_checkpointing,
                &run.vars,
                &mut run.grads,
                &mut run.report,
            )? {
                step_loss += loss;
            }
        }
        if !step_loss.is_finite() {
            return Err(CordaError::Numerics(format!(
                "the training loss is {step_loss} at step {}; lower learning_rate or check the data",
                run.progress.global_step + 1
            )));
        }
        let t2 = Instant::now();
        let grad_norm = clip_grad_norm(run.grads.as_mut_slice(), cfg.max_grad_norm)?;
        run.optimizer.step(
            run.grads.as_slice(),
            run.schedule.lr(run.progress.global_step),
        )?;
        run.grads.clear();
        run.report.add("optimizer", t2.elapsed());
        self.check_divergence(run, grad_norm, step_loss, window_targets)?;
        run.clock.train_seconds += step_start.elapsed().as_secs_f64();
        run.last_grad_norm = grad_norm;
        Ok(step_loss)
    }

    /// Stop a run that can no longer train instead of saving garbage as a result: a
    /// non-finite gradient, factors that are non-finite or grew by orders of magnitude (a far
    /// too high learning rate), or a gradient exactly zero for several steps while there are
    /// targets (a collapsed model, typically with the loss pinned at ln(vocabulary size)).
    fn check_divergence(
        &self,
        run: &mut RunState,
        grad_norm: f64,
        loss: f64,
        targets: usize,
    ) -> Result<()> {
        let step = run.progress.global_step + 1;
        let lr = self.config.learning_rate;
        let advice = format!(
            "lower learning_rate (now {lr}) or raise warmup_steps; the checkpoints saved before this step are unaffected"
        );
        if !grad_norm.is_finite() {
            return Err(CordaError::Numerics(format!(
                "training diverged at step {step}: the gradient norm is {grad_norm}; {advice}"
            )));
        }
        let norm = param_norm(&run.vars)?;
        let before = run.initial_param_norm;
        if !norm.is_finite() || norm > EXPLODED_FACTOR * before.max(1e-3) {
            return Err(CordaError::Numerics(format!(
                "training diverged at step {step}: the norm of the LoRA factors went from {before:.3e} to {norm:.3e} (loss {loss:.4}); {advice}"
            )));
        }
        if targets > 0 && grad_norm == 0.0 {
            run.zero_grad_steps += 1;
        } else {
            run.zero_grad_steps = 0;
        }
        if run.zero_grad_steps >= COLLAPSED_STEPS {
            return Err(CordaError::Numerics(format!(
                "training collapsed at step {step}: the gradient has been exactly 0 for {COLLAPSED_STEPS} steps while the loss is {loss:.4} (a loss near ln(vocabulary size) means the model predicts a uniform distribution); {advice}"
            )));
        }
        Ok(())
    }

    /// Count the step: position in the data, running loss sums, the state's epoch and tokens.
    fn advance(&self, run: &mut RunState, at: &WindowPosition, step_loss: f64) {
        let cfg = &self.config;
        let p = &mut run.progress;
        p.global_step += 1;
        run.clock.steps_this_run += 1;
        p.steps_in_epoch = at.index as u64 + 1;
        p.epoch = at.epoch;
        p.window_loss_sum += step_loss;
        p.window_steps += 1;
        p.total_loss_sum += step_loss;
        let done_micro = (at.index * cfg.gradient_accumulation_steps + at.micro_batches) as f64;
        run.state.global_step = p.global_step;
        run.state.epoch = at.epoch as f64 + done_micro / run.plan.micro_batches_per_epoch as f64;
        run.state.num_input_tokens_seen = p.tokens_seen;
        if p.steps_in_epoch == at.windows_in_epoch as u64 {
            p.epoch = at.epoch + 1;
            p.steps_in_epoch = 0;
        }
    }

    /// Every `logging_steps` steps: the mean loss of the window, the learning rate, the
    /// gradient norm and the tokens per second, into the log history and onto stderr.
    fn log(&self, run: &mut RunState, log_line: &dyn Fn(String)) {
        let p = &mut run.progress;
        if !p.global_step.is_multiple_of(self.config.logging_steps) {
            return;
        }
        let elapsed = run.clock.window_start.elapsed().as_secs_f64();
        let entry = StepLog {
            epoch: run.state.epoch,
            grad_norm: run.last_grad_norm,
            learning_rate: run.schedule.lr(p.global_step),
            loss: p.window_loss_sum / p.window_steps as f64,
            step: p.global_step,
            tokens_per_second: if elapsed > 0.0 {
                run.clock.window_tokens as f64 / elapsed
            } else {
                0.0
            },
        };
        log_line(serde_json::to_string(&entry).unwrap_or_default());
        run.state.log_history.push(LogEntry::Step(entry));
        p.window_loss_sum = 0.0;
        p.window_steps = 0;
        run.clock.window_tokens = 0;
        run.clock.window_start = Instant::now();
    }

    /// A checkpoint when `save_strategy` asks for one (and always at the last step unless it
    /// is `no`), then pruning to `save_total_limit`. Returns the checkpoint written, if any.
    fn save(&self, run: &mut RunState, at: &WindowPosition) -> Result<Option<PathBuf>> {
        let cfg = &self.config;
        let step = run.progress.global_step;
        let last = step >= run.plan.total_steps;
        let epoch_end = at.index + 1 == at.windows_in_epoch;
        let save = match cfg.save_strategy {
            SaveStrategy::Steps => step.is_multiple_of(cfg.save_steps) || last,
            SaveStrategy::Epoch => epoch_end || last,
            SaveStrategy::No => false,
        };
        if !save {
            return Ok(None);
        }
        self.write_checkpoint(run).map(Some)
    }

    /// Write the checkpoint of the current step, then prune to `save_total_limit`.
    fn write_checkpoint(&self, run: &mut RunState) -> Result<PathBuf> {
        let cfg = &self.config;
        let step = run.progress.global_step;
        let t3 = Instant::now();
        let schedule = &run.schedule;
        let scheduler = SchedulerState {
            lr_scheduler_type: schedule.kind,
            base_lr: schedule.base_lr,
            warmup_steps: schedule.warmup,
            total_steps: schedule.total_steps,
            last_epoch: step,
            last_lr: schedule.lr(step),
        };
        let adapter = current_adapter(&self.adapter_config, &run.factors)?;
        let path = save_checkpoint(
            &cfg.output_dir,
            &CheckpointContents {
                adapter: &adapter,
                optimizer: &run.optimizer,
                scheduler: &scheduler,
                progress: &run.progress,
                state: &run.state,
                args: cfg,
                provenance: self.provenance.as_ref(),
            },
        )?;
        if let Some(limit) = cfg.save_total_limit {
            prune_checkpoints(&cfg.output_dir, limit)?;
        }
        tracing::info!("saved {}", path.display());
        run.report.add("checkpoint", t3.elapsed());
        // Saving is not training: keep it out of the tokens/s of the window.
        run.clock.window_start += t3.elapsed();
        Ok(path)
    }

    /// The summary entry, the final adapter in `ft/`, `trainer_state.json` and the loss curve.
    fn finish(
        &self,
        mut run: RunState,
        resumed_from: Option<PathBuf>,
        log_line: &dyn Fn(String),
    ) -> Result<TrainOutcome> {
        let cfg = &self.config;
        let out_dir = &cfg.output_dir;
        let c = &run.clock;
        let runtime = c.run_start.elapsed().as_secs_f64();
        let samples = c.steps_this_run as f64
            * (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps) as f64;
        let step = run.progress.global_step;
        let per_second = |x: f64, secs: f64| if secs > 0.0 { x / secs } else { 0.0 };
        let summary = TrainSummary {
            epoch: run.state.epoch,
            step,
            train_loss: if step > 0 {
                run.progress.total_loss_sum / step as f64
            } else {
                0.0
            },
            train_runtime: runtime,
            train_samples_per_second: per_second(samples, runtime),
            train_steps_per_second: per_second(c.steps_this_run as f64, runtime),
            train_tokens_per_second: per_second(c.tokens_this_run as f64, c.train_seconds),
        };
        log_line(serde_json::to_string(&summary).unwrap_or_default());
        tracing::debug!("last grad norm {}", run.last_grad_norm);
        run.state.log_history.push(LogEntry::Summary(summary));

        let t4 = Instant::now();
        let adapter = current_adapter(&self.adapter_config, &run.factors)?;
        let adapter_dir = save_final_adapter(out_dir, &adapter, self.provenance.as_ref())?;
        run.state.write(&out_dir.join(TRAINER_STATE_FILE))?;
        let loss_curve = out_dir.join(LOSS_CURVE_FILE);
        let title = format!("training loss ({step} steps)");
        write_file_atomic(
            &loss_curve,
            loss_curve_svg(&run.state.loss_points(), &title).as_bytes(),
        )?;
        run.report.add("final save", t4.elapsed());

        Ok(TrainOutcome {
            state: run.state,
            adapter_dir,
            loss_curve,
            resumed_from,
            steps_this_run: run.clock.steps_this_run,
            tokens_this_run: run.clock.tokens_this_run,
            train_seconds: run.clock.train_seconds,
            report: run.report,
        })
    }
}

/// The mutable state of one call of [`Trainer::train`].
struct RunState {
    plan: StepPlan,
    /// (module, A, B) of the model, and the same variables in optimizer order.
    factors: Vec<(String, Var, Var)>,
    vars: Vec<Var>,
    optimizer: AdamW,
    schedule: LrSchedule,
    grads: Gradients,
    /// What `trainer_state.json` and `rng_state.json` hold.
    state: TrainerState,
    progress: Progress,
    report: PhaseReport,
    device: Device,
    clock: Clock,
    last_grad_norm: f64,
    /// Norm of all LoRA factors when this process started training (the divergence baseline).
    initial_param_norm: f64,
    /// Consecutive steps with targets and a gradient of exactly zero.
    zero_grad_steps: u32,
}

/// Factors whose norm grows beyond this multiple of their starting norm have diverged (a
/// working run changes it by a small fraction; a far too high learning rate by 1e6 and more).
const EXPLODED_FACTOR: f64 = 1e4;
/// Steps of exactly zero gradient (with targets) that mean the model collapsed.
const COLLAPSED_STEPS: u32 = 3;

/// The Frobenius norm of all `vars` together (non-finite when any entry is).
fn param_norm(vars: &[Var]) -> Result<f64> {
    let mut sum = 0.0f64;
    for v in vars {
        let t = v.as_tensor().to_dtype(DType::F32)?;
        sum += t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sum.sqrt())
}

/// Counters and timers of this process (not restored on resume).
struct Clock {
    run_start: Instant,
    /// Start of the current logging window, and its non-padding tokens.
    window_start: Instant,
    window_tokens: u64,
    steps_this_run: u64,
    tokens_this_run: u64,
    /// Seconds in forward, backward and optimizer steps.
    train_seconds: f64,
}

impl Clock {
    fn now() -> Self {
        let now = Instant::now();
        Self {
            run_start: now,
            window_start: now,
            window_tokens: 0,
            steps_this_run: 0,
            tokens_this_run: 0,
            train_seconds: 0.0,
        }
    }
}

/// Where an optimizer step's window of micro-batches lies in its epoch.
struct WindowPosition {
    epoch: u64,
    /// Index of the window (optimizer step) within the epoch.
    index: usize,
    /// Micro-batches in this window (the last of an epoch may have fewer).
    micro_batches: usize,
    windows_in_epoch: usize,
}

/// Write the final adapter to `output_dir/ft` (replacing a previous one) atomically.
fn save_final_adapter(
    out_dir: &Path,
    adapter: &Adapter,
    provenance: Option<&Provenance>,
) -> Result<PathBuf> {
    let dir = AtomicDir::create(out_dir.join(FINAL_ADAPTER_DIR), true)?;
    adapter.save(dir.path())?;
    if let Some(p) = provenance {
        p.write(dir.path())?;
    }
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
