//! Checkpoints `FT/checkpoint-<step>/`: everything needed to continue a run exactly where it
//! stopped, in the layout of the Hugging Face Trainer where one exists.
//!
//! | file | holds |
//! | --- | --- |
//! | `adapter_config.json`, `adapter_model.safetensors` | the adapter at this step (PEFT format) |
//! | `optimizer.safetensors` | AdamW `exp_avg` / `exp_avg_sq` per parameter and `step` |
//! | `scheduler.json` | the schedule and how many steps it has taken |
//! | `rng_state.json` | the data order (seed, epoch) and position, and the running loss sums |
//! | `trainer_state.json` | the Trainer's state with its `log_history` |
//! | `training_args.json` | the options of the run that wrote it |
//!
//! A checkpoint is written into a temporary directory and renamed into place only once every
//! file is complete ([`AtomicDir`]), so a run killed while saving leaves at most a hidden
//! `.checkpoint-N.tmp-PID` directory, which resume never considers and the next run removes.

use std::path::{Path, PathBuf};

use candle_core::Var;
use serde::{Deserialize, Serialize};

use super::config::{ResumeFrom, TrainConfig};
use super::optimizer::AdamW;
use super::schedule::SchedulerType;
use super::state::TrainerState;
use crate::adapter::{Adapter, LoraPair};
use crate::layout::{checkpoint_dir_name, FINAL_ADAPTER_DIR};
pub use crate::layout::{
    checkpoint_step, CHECKPOINT_PREFIX, OPTIMIZER_FILE, RNG_STATE_FILE, SCHEDULER_FILE,
    TRAINER_STATE_FILE, TRAINING_ARGS_FILE,
};
use crate::util::atomic::write_file_atomic;
use crate::util::AtomicDir;
use crate::{CordaError, Result};

/// Files a checkpoint must contain to be trusted.
const REQUIRED: [&str; 6] = [
    crate::adapter::config::CONFIG_FILE,
    crate::adapter::weights::WEIGHTS_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    RNG_STATE_FILE,
    TRAINER_STATE_FILE,
];

/// `scheduler.json`: what torch's `LambdaLR.state_dict()` holds that matters here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerState {
    pub lr_scheduler_type: SchedulerType,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Scheduler steps taken (torch's `last_epoch`).
    pub last_epoch: u64,
    /// The learning rate the next optimizer step uses.
    pub last_lr: f64,
}

/// `rng_state.json`: where in the data the run is, and the running sums the logs need.
///
/// The data order of epoch `e` is a pure function of `seed + e`, so the position (epoch and
/// optimizer steps done in it) is enough to replay it; no generator state must be stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub seed: u64,
    /// The epoch in progress (0-based).
    pub epoch: u64,
    /// Optimizer steps completed in that epoch.
    pub steps_in_epoch: u64,
    pub global_step: u64,
    /// Rows, micro-batch size and accumulation the position refers to.
    pub num_examples: usize,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Sum of the step losses since the last log and how many steps that covers, so that the
    /// next logged loss equals the uninterrupted run's.
    pub window_loss_sum: f64,
    pub window_steps: u64,
    /// Sum of every step loss so far (for `train_loss` at the end).
    pub total_loss_sum: f64,
    /// Non-padding input tokens seen so far.
    pub tokens_seen: u64,
}

/// Everything a checkpoint restores, except the optimizer moments (see [`Checkpoint::load_optimizer`]).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub adapter: Adapter,
    pub scheduler: SchedulerState,
    pub progress: Progress,
    pub state: TrainerState,
}

/// What [`save_checkpoint`] writes.
pub struct CheckpointContents<'a> {
    pub adapter: &'a Adapter,
    pub optimizer: &'a AdamW,
    pub scheduler: &'a SchedulerState,
    pub progress: &'a Progress,
    pub state: &'a TrainerState,
    pub args: &'a TrainConfig,
    /// The initial adapter's fingerprint, for a CorDA run.
    pub provenance: Option<&'a crate::adapter::Provenance>,
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CordaError::Invalid(format!("cannot serialise {}: {e}", path.display())))?;
    write_file_atomic(path, format!("{text}\n").as_bytes())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| CordaError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| CordaError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Complete checkpoints in `output_dir`, oldest (lowest step) first. Directories missing a
/// required file are skipped with a warning: they were not written by a finished save.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !output_dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(output_dir).map_err(|e| CordaError::io(output_dir, e))? {
        let entry = entry.map_err(|e| CordaError::io(output_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = checkpoint_step(&name) else {
            continue;
        };
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if let Some(missing) = REQUIRED.iter().find(|f| !path.join(f).is_file()) {
            tracing::warn!(
                "ignoring {}: it has no {missing}, so it is not a complete checkpoint",
                path.display()
            );
            continue;
        }
        out.push((step, path));
    }
    out.sort_by_key(|(s, _)| *s);
    Ok(out)
}

/// The checkpoint to resume from: the given directory, or the latest complete one.
pub fn resolve_resume(output_dir: &Path, from: &ResumeFrom) -> Result<PathBuf> {
    match from {
        ResumeFrom::Latest => list_checkpoints(output_dir)?
            .pop()
            .map(|(_, p)| p)
            .ok_or_else(|| {
                CordaError::Invalid(format!(
                    "resume_from_checkpoint true: no valid checkpoint found in output directory {}",
                    output_dir.display()
                ))
            }),
        ResumeFrom::Path(p) => {
            if !p.is_dir() {
                return Err(CordaError::Invalid(format!(
                    "resume_from_checkpoint {}: no such checkpoint directory",
                    p.display()
                )));
            }
            if let Some(missing) = REQUIRED.iter().find(|f| !p.join(f).is_file()) {
                return Err(CordaError::Invalid(format!(
                    "resume_from_checkpoint {}: {missing} is missing, so this is not a complete checkpoint",
                    p.display()
                )));
            }
            Ok(p.clone())
        }
    }
}

/// Remove the temporary directories of saves whose process is gone (a run killed mid-save):
/// those of a checkpoint or of the final adapter only. Resume never trusts them either way.
pub fn remove_stale_temp_dirs(output_dir: &Path) -> Result<()> {
    crate::util::atomic::remove_stale_temp_dirs(output_dir, |stem| {
        stem == FINAL_ADAPTER_DIR || checkpoint_step(stem).is_some()
    })
}

/// Write `output_dir/checkpoint-<global_step>/` atomically and return its path.
pub fn save_checkpoint(output_dir: &Path, c: &CheckpointContents<'_>) -> Result<PathBuf> {
    let target = output_dir.join(checkpoint_dir_name(c.progress.global_step));
    let dir = AtomicDir::create(&target, true)?;
    let p = dir.path();
    c.adapter.save(p)?;
    if let Some(prov) = c.provenance {
        prov.write(p)?;
    }
    c.optimizer.save(&p.join(OPTIMIZER_FILE))?;
    write_json(&p.join(SCHEDULER_FILE), c.scheduler)?;
    write_json(&p.join(RNG_STATE_FILE), c.progress)?;
    write_json(&p.join(TRAINING_ARGS_FILE), c.args)?;
    // Written last: its presence is what marks a complete checkpoint (besides the rename).
    c.state.write(&p.join(TRAINER_STATE_FILE))?;
    dir.commit()
}

/// Delete the oldest checkpoints so that at most `limit` remain; returns what was deleted.
pub fn prune_checkpoints(output_dir: &Path, limit: usize) -> Result<Vec<PathBuf>> {
    let all = list_checkpoints(output_dir)?;
    let excess = all.len().saturating_sub(limit.max(1));
    let mut removed = Vec::new();
    for (_, path) in all.into_iter().take(excess) {
        tracing::info!(
            "deleting older checkpoint {} (save_total_limit {limit})",
            path.display()
        );
        std::fs::remove_dir_all(&path).map_err(|e| CordaError::io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

impl Checkpoint {
    /// Read a checkpoint directory (everything but the optimizer moments).
    pub fn load(dir: &Path) -> Result<Self> {
        let adapter = Adapter::load(dir)?;
        let scheduler = read_json(&dir.join(SCHEDULER_FILE))?;
        let progress = read_json(&dir.join(RNG_STATE_FILE))?;
        let state = TrainerState::read(&dir.join(TRAINER_STATE_FILE))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            adapter,
            scheduler,
            progress,
            state,
        })
    }

    /// Copy the adapter's factors into the model's variables `vars` (module, A, B), after
    /// checking that it has exactly their modules and shapes (otherwise it comes from another
    /// model or adapter).
    pub fn restore_adapter(&self, vars: &[(String, Var, Var)]) -> Result<()> {
        check_adapter_matches(&self.adapter, vars, &self.dir)?;
        for (module, a, b) in vars {
            let LoraPair { a: ca, b: cb } = &self.adapter.modules[module];
            a.set(&ca.to_dtype(a.dtype())?.to_device(a.device())?)?;
            b.set(&cb.to_dtype(b.dtype())?.to_device(b.device())?)?;
        }
        Ok(())
    }

    /// Restore the optimizer moments into `optimizer`.
    pub fn load_optimizer(&self, optimizer: &mut AdamW) -> Result<()> {
        optimizer.load(&self.dir.join(OPTIMIZER_FILE))
    }
}

/// The error for an adapter (from a checkpoint at `origin`) that does not fit the model.
pub fn check_adapter_matches(
    adapter: &Adapter,
    vars: &[(String, Var, Var)],
    origin: &Path,
) -> Result<()> {
    let theirs: Vec<&String> = adapter.modules.keys().collect();
    let mut ours: Vec<&String> = vars.iter().map(|(m, _, _)| m).collect();
    ours.sort();
    let mismatch = |what: String| {
        Err(CordaError::Adapter(format!(
            "checkpoint {} does not belong to this model and adapter: {what}; resume from a checkpoint of this run or start without resume_from_checkpoint",
            origin.display()
        )))
    };
    if theirs != ours {
        let missing: Vec<&&String> = ours
            .iter()
            .filter(|m| !adapter.modules.contains_key(**m))
            .collect();
        let extra: Vec<&&String> = theirs.iter().filter(|m| !ours.contains(m)).collect();
        return mismatch(format!(
            "it has {} LoRA modules and the model {} (missing: {:?}, unexpected: {:?})",
            theirs.len(),
            ours.len(),
            missing.iter().take(3).collect::<Vec<_>>(),
            extra.iter().take(3).collect::<Vec<_>>()
        ));
    }
    for (module, a, b) in vars {
        let pair = &adapter.modules[module];
        if pair.a.dims() != a.dims() || pair.b.dims() != b.dims() {
            return mismatch(format!(
                "module `{module}` has lora_A {:?} / lora_B {:?} there but {:?} / {:?} here",
                pair.a.dims(),
                pair.b.dims(),
                a.dims(),
                b.dims()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_and_temporary_dirs_are_not_checkpoints() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path();
        std::fs::create_dir(out.join("checkpoint-5")).unwrap();
        std::fs::write(out.join("checkpoint-5").join(TRAINER_STATE_FILE), "{}").unwrap();
        std::fs::create_dir(out.join(".checkpoint-7.tmp-999999999")).unwrap();
        std::fs::create_dir(out.join(".ft.tmp-999999998")).unwrap();
        std::fs::create_dir(out.join(".data.tmp-999999997")).unwrap();
        assert!(list_checkpoints(out).unwrap().is_empty());
        let err = resolve_resume(out, &ResumeFrom::Latest)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no valid checkpoint"), "{err}");
        let err = resolve_resume(out, &ResumeFrom::Path(out.join("checkpoint-5")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a complete checkpoint"), "{err}");
        remove_stale_temp_dirs(out).unwrap();
        assert!(!out.join(".checkpoint-7.tmp-999999999").exists());
        assert!(!out.join(".ft.tmp-999999998").exists());
        assert!(
            out.join(".data.tmp-999999997").exists(),
            "not ours to remove"
        );
        assert!(out.join("checkpoint-5").exists());
    }

    /// Issue 14 case 4 for checkpoints: a run killed between the two renames that replace a
    /// checkpoint (or `ft/`) left it only as `.NAME.old-PID`; the next run puts it back.
    #[test]
    fn a_checkpoint_caught_mid_replacement_is_restored() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path();
        let dead = crate::util::atomic::testing::dead_pid();
        let old = out.join(format!(".checkpoint-4.old-{dead}"));
        std::fs::create_dir(&old).unwrap();
        for f in REQUIRED {
            std::fs::write(old.join(f), "{}").unwrap();
        }
        std::fs::create_dir(out.join(format!(".checkpoint-4.tmp-{dead}"))).unwrap();
        std::fs::create_dir(out.join(format!(".ft.old-{dead}"))).unwrap();
        std::fs::create_dir(out.join(FINAL_ADAPTER_DIR)).unwrap();
        assert!(list_checkpoints(out).unwrap().is_empty());
        remove_stale_temp_dirs(out).unwrap();
        let found: Vec<u64> = list_checkpoints(out).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(found, [4]);
        assert_eq!(
            crate::util::atomic::testing::names(out),
            ["checkpoint-4", FINAL_ADAPTER_DIR]
        );
    }
}
