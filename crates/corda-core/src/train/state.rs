//! `trainer_state.json`, in the layout of the Hugging Face Trainer's `TrainerState`, so the
//! tools people already point at a Trainer output directory (and their habits) keep working.
//!
//! `log_history` holds one entry per logging step (`loss`, `grad_norm`, `learning_rate`,
//! `epoch`, `step`, plus our `tokens_per_second`) and, at the end of training, the Trainer's
//! summary entry (`train_loss`, `train_runtime`, ...).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::util::atomic::write_file_atomic;
use crate::{CordaError, Result};

pub use crate::layout::TRAINER_STATE_FILE;

/// One logging step, as the Trainer writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// Fractional epoch: completed epochs plus the fraction of this epoch's micro-batches done.
    pub epoch: f64,
    /// Global gradient norm before clipping, at this step.
    pub grad_norm: f64,
    /// The learning rate after this step's scheduler step (what the next step uses).
    pub learning_rate: f64,
    /// Mean training loss over the optimizer steps since the previous log.
    pub loss: f64,
    /// Optimizer step (global_step) at which this was logged.
    pub step: u64,
    /// Non-padding input tokens per second of wall time since the previous log (not in HF).
    #[serde(default)]
    pub tokens_per_second: f64,
}

/// The Trainer's end-of-training entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub epoch: f64,
    pub step: u64,
    /// Mean loss over every optimizer step of the run (including those before a resume).
    pub train_loss: f64,
    /// Seconds of training in this process (after a resume: since the resume).
    pub train_runtime: f64,
    pub train_samples_per_second: f64,
    pub train_steps_per_second: f64,
    /// Non-padding input tokens per second over the run in this process (not in HF).
    #[serde(default)]
    pub train_tokens_per_second: f64,
}

/// An entry of `log_history`. Unknown shapes (e.g. from a Python run) are kept verbatim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LogEntry {
    Step(StepLog),
    Summary(TrainSummary),
    Other(Map<String, Value>),
}

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    #[serde(default)]
    pub best_global_step: Option<u64>,
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_model_checkpoint: Option<String>,
    /// Fractional epoch reached.
    pub epoch: f64,
    #[serde(default = "default_eval_steps")]
    pub eval_steps: u64,
    /// Optimizer steps taken.
    pub global_step: u64,
    #[serde(default)]
    pub is_hyper_param_search: bool,
    #[serde(default = "yes")]
    pub is_local_process_zero: bool,
    #[serde(default = "yes")]
    pub is_world_process_zero: bool,
    pub log_history: Vec<LogEntry>,
    pub logging_steps: u64,
    /// Total optimizer steps of the run.
    pub max_steps: u64,
    #[serde(default)]
    pub num_input_tokens_seen: u64,
    /// Epochs the loop iterates (the Trainer stores the integer ceiling).
    pub num_train_epochs: u64,
    pub save_steps: u64,
    #[serde(default)]
    pub stateful_callbacks: Map<String, Value>,
    #[serde(default)]
    pub total_flos: f64,
    pub train_batch_size: usize,
    #[serde(default)]
    pub trial_name: Option<String>,
    #[serde(default)]
    pub trial_params: Option<Value>,
}

fn default_eval_steps() -> u64 {
    500
}

fn yes() -> bool {
    true
}

impl TrainerState {
    /// A fresh state for a run of `max_steps` steps over `num_train_epochs` epochs.
    pub fn new(
        max_steps: u64,
        num_train_epochs: u64,
        logging_steps: u64,
        save_steps: u64,
        batch: usize,
    ) -> Self {
        Self {
            best_global_step: None,
            best_metric: None,
            best_model_checkpoint: None,
            epoch: 0.0,
            eval_steps: default_eval_steps(),
            global_step: 0,
            is_hyper_param_search: false,
            is_local_process_zero: true,
            is_world_process_zero: true,
            log_history: Vec::new(),
            logging_steps,
            max_steps,
            num_input_tokens_seen: 0,
            num_train_epochs,
            save_steps,
            stateful_callbacks: Map::new(),
            total_flos: 0.0,
            train_batch_size: batch,
            trial_name: None,
            trial_params: None,
        }
    }

    /// The logged step entries, in order.
    pub fn step_logs(&self) -> impl Iterator<Item = &StepLog> {
        self.log_history.iter().filter_map(|e| match e {
            LogEntry::Step(s) => Some(s),
            _ => None,
        })
    }

    /// (step, loss) of every logged step, for the loss curve.
    pub fn loss_points(&self) -> Vec<(u64, f64)> {
        self.step_logs().map(|s| (s.step, s.loss)).collect()
    }

    /// Read `path` (a `trainer_state.json`).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| CordaError::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| CordaError::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Write `path` atomically, indented like the Trainer (`indent=2, sort_keys=True`).
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| CordaError::Invalid(format!("cannot serialise the trainer state: {e}")))?;
        write_file_atomic(path, format!("{text}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_hf_layout() {
        let mut s = TrainerState::new(10, 1, 1, 100, 1);
        s.global_step = 2;
        s.log_history.push(LogEntry::Step(StepLog {
            loss: 1.5,
            grad_norm: 0.3,
            learning_rate: 2e-5,
            epoch: 0.2,
            step: 2,
            tokens_per_second: 100.0,
        }));
        s.log_history.push(LogEntry::Summary(TrainSummary {
            train_loss: 1.4,
            train_runtime: 3.0,
            train_samples_per_second: 1.0,
            train_steps_per_second: 0.5,
            train_tokens_per_second: 90.0,
            epoch: 0.2,
            step: 2,
        }));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(TRAINER_STATE_FILE);
        s.write(&p).unwrap();
        let back = TrainerState::read(&p).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.loss_points(), vec![(2, 1.5)]);

        // A file written by the Python Trainer (no tokens_per_second, an eval entry).
        let hf = r#"{"best_metric": null, "best_model_checkpoint": null, "epoch": 1.0, "eval_steps": 500,
            "global_step": 1, "is_hyper_param_search": false, "is_local_process_zero": true,
            "is_world_process_zero": true, "log_history": [
              {"epoch": 1.0, "grad_norm": 2.5, "learning_rate": 0.0, "loss": 6.28, "step": 1},
              {"epoch": 1.0, "eval_loss": 5.0, "step": 1}],
            "logging_steps": 1, "max_steps": 1, "num_input_tokens_seen": 0, "num_train_epochs": 1,
            "save_steps": 100, "stateful_callbacks": {}, "total_flos": 1.0, "train_batch_size": 3,
            "trial_name": null, "trial_params": null}"#;
        let s: TrainerState = serde_json::from_str(hf).unwrap();
        assert_eq!(s.step_logs().count(), 1);
        assert!(matches!(s.log_history[1], LogEntry::Other(_)));
    }
}
