//! Learning-rate schedules exactly as Hugging Face transformers defines them
//! (`get_scheduler` in `optimization.py`), so a run configured with the same flags as the
//! reference script follows the same learning rates.
//!
//! Like torch's `LambdaLR`, the multiplier is a function of the number of scheduler steps taken
//! so far: the first optimizer step uses `lr_lambda(0)` (zero during a linear warmup), and the
//! learning rate the Trainer logs after step `k` is `lr_lambda(k)`, the one the next step uses.

use std::fmt;
use std::str::FromStr;

use crate::{CordaError, Result};

/// `--lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    /// Linear warmup, then linear decay to zero at the last step.
    #[default]
    Linear,
    /// Linear warmup, then half a cosine wave to zero (`num_cycles = 0.5`).
    Cosine,
    /// The base learning rate throughout (no warmup, even if one is configured).
    Constant,
    /// Linear warmup, then the base learning rate.
    ConstantWithWarmup,
}

impl SchedulerType {
    pub fn as_str(&self) -> &'static str {
        match self {
            SchedulerType::Linear => "linear",
            SchedulerType::Cosine => "cosine",
            SchedulerType::Constant => "constant",
            SchedulerType::ConstantWithWarmup => "constant_with_warmup",
        }
    }
}

impl fmt::Display for SchedulerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerType {
    type Err = CordaError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "linear" => Ok(SchedulerType::Linear),
            "cosine" => Ok(SchedulerType::Cosine),
            "constant" => Ok(SchedulerType::Constant),
            "constant_with_warmup" => Ok(SchedulerType::ConstantWithWarmup),
            other => Err(CordaError::Invalid(format!(
                "unknown lr_scheduler_type `{other}`; use linear, cosine, constant or constant_with_warmup"
            ))),
        }
    }
}

/// HF `TrainingArguments.get_warmup_steps`: `warmup_steps` when positive, else
/// `ceil(warmup_ratio * total_steps)`. A `warmup_steps` value strictly between 0 and 1 is read
/// as a ratio, as transformers 5 does after folding `warmup_ratio` into `warmup_steps`.
pub fn warmup_steps(warmup_steps: f64, warmup_ratio: f64, total_steps: u64) -> Result<u64> {
    if warmup_steps.is_nan() || warmup_steps < 0.0 || warmup_ratio.is_nan() || warmup_ratio < 0.0 {
        return Err(CordaError::Invalid(format!(
            "warmup_steps ({warmup_steps}) and warmup_ratio ({warmup_ratio}) must be non-negative"
        )));
    }
    if warmup_ratio > 1.0 {
        return Err(CordaError::Invalid(format!(
            "warmup_ratio must be at most 1, got {warmup_ratio}"
        )));
    }
    if warmup_steps >= 1.0 {
        if warmup_steps.fract() != 0.0 {
            return Err(CordaError::Invalid(format!(
                "warmup_steps must be an integer number of steps or a ratio below 1, got {warmup_steps}"
            )));
        }
        Ok(warmup_steps as u64)
    } else if warmup_steps > 0.0 {
        Ok((warmup_steps * total_steps as f64).ceil() as u64)
    } else {
        Ok((warmup_ratio * total_steps as f64).ceil() as u64)
    }
}

/// A schedule over `total_steps` optimizer steps with `warmup` warmup steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: SchedulerType,
    pub base_lr: f64,
    pub warmup: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn new(kind: SchedulerType, base_lr: f64, warmup: u64, total_steps: u64) -> Self {
        Self {
            kind,
            base_lr,
            warmup,
            total_steps,
        }
    }

    /// The multiplier after `step` scheduler steps (HF's `lr_lambda(current_step)`).
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, n) = (step as f64, self.warmup as f64, self.total_steps as f64);
        let in_warmup = step < self.warmup;
        match self.kind {
            SchedulerType::Constant => 1.0,
            SchedulerType::ConstantWithWarmup => {
                if in_warmup {
                    s / w.max(1.0)
                } else {
                    1.0
                }
            }
            SchedulerType::Linear => {
                if in_warmup {
                    s / w.max(1.0)
                } else {
                    ((n - s) / (n - w).max(1.0)).max(0.0)
                }
            }
            SchedulerType::Cosine => {
                if in_warmup {
                    s / w.max(1.0)
                } else {
                    let num_cycles = 0.5;
                    let progress = (s - w) / (n - w).max(1.0);
                    (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos()))
                        .max(0.0)
                }
            }
        }
    }

    /// The learning rate after `step` scheduler steps: the one optimizer step `step + 1` uses.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn warmup_steps_like_hf() {
        assert_eq!(warmup_steps(0.0, 0.03, 3125).unwrap(), 94); // ceil(93.75)
        assert_eq!(warmup_steps(10.0, 0.03, 3125).unwrap(), 10);
        assert_eq!(warmup_steps(0.03, 0.0, 100).unwrap(), 3);
        assert_eq!(warmup_steps(0.0, 0.0, 100).unwrap(), 0);
        assert_eq!(warmup_steps(0.0, 0.1, 5).unwrap(), 1);
        assert!(warmup_steps(-1.0, 0.0, 5).is_err());
        assert!(warmup_steps(2.5, 0.0, 5).is_err());
    }

    #[test]
    fn linear_known_values() {
        let s = LrSchedule::new(SchedulerType::Linear, 1.0, 2, 10);
        let want = [
            0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0,
        ];
        for (k, w) in want.iter().enumerate() {
            assert!(
                close(s.factor(k as u64), *w),
                "step {k}: {} vs {w}",
                s.factor(k as u64)
            );
        }
    }

    #[test]
    fn cosine_known_values() {
        // transformers get_cosine_schedule_with_warmup(num_warmup_steps=2, num_training_steps=10)
        let s = LrSchedule::new(SchedulerType::Cosine, 2e-5, 2, 10);
        let want = [
            0.0,
            0.5,
            1.0,
            0.9619397662556434,
            0.8535533905932737,
            0.6913417161825449,
            0.5,
            0.30865828381745514,
            0.14644660940672627,
            0.03806023374435663,
            0.0,
        ];
        for (k, w) in want.iter().enumerate() {
            assert!(
                close(s.factor(k as u64), *w),
                "step {k}: {} vs {w}",
                s.factor(k as u64)
            );
            assert!(close(s.lr(k as u64), 2e-5 * w));
        }
        // No warmup: the first step uses the full rate.
        let s = LrSchedule::new(SchedulerType::Cosine, 1.0, 0, 4);
        assert!(close(s.factor(0), 1.0));
        assert!(close(s.factor(2), 0.5));
    }

    #[test]
    fn constant_variants() {
        let c = LrSchedule::new(SchedulerType::Constant, 3.0, 5, 10);
        assert_eq!(c.lr(0), 3.0);
        let cw = LrSchedule::new(SchedulerType::ConstantWithWarmup, 1.0, 4, 10);
        let got: Vec<f64> = (0..7).map(|k| cw.factor(k)).collect();
        assert_eq!(got, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn parses_names() {
        assert_eq!(
            "cosine".parse::<SchedulerType>().unwrap(),
            SchedulerType::Cosine
        );
        assert_eq!(
            "constant-with-warmup".parse::<SchedulerType>().unwrap(),
            SchedulerType::ConstantWithWarmup
        );
        assert!("polynomial".parse::<SchedulerType>().is_err());
    }
}
