//! The names of everything the toolchain writes, in one place, so that the writers, the
//! readers, the binaries and the tests agree. Nothing here depends on any other module.
//!
//! ```text
//! OUT/                      corda-preprocess --save_path: the residual model (HF model dir)
//!   corda_init/             the initial CorDA adapter (PEFT format)       CORDA_INIT_DIR
//! FT/                       corda-finetune --output_dir
//!   checkpoint-<step>/      a resumable checkpoint                          CHECKPOINT_PREFIX
//!     adapter_config.json, adapter_model.safetensors, optimizer.safetensors, scheduler.json,
//!     rng_state.json, training_args.json, trainer_state.json
//!   ft/                     the trained adapter (PEFT format)               FINAL_ADAPTER_DIR
//!   trainer_state.json      the Trainer's state and log history             TRAINER_STATE_FILE
//!   loss.svg                the loss curve                                  LOSS_CURVE_FILE
//! ```

/// Sub-directory of a preprocessing output that holds the initial adapter (PEFT's
/// `subfolder="corda_init"` in the reference scripts).
pub const CORDA_INIT_DIR: &str = "corda_init";
/// Sub-directory of a fine-tuning output that receives the final adapter (the reference's `ft`).
pub const FINAL_ADAPTER_DIR: &str = "ft";
/// The loss curve written at the end of a fine-tuning run.
pub const LOSS_CURVE_FILE: &str = "loss.svg";
/// The Trainer's state, in every checkpoint and at the top of the output directory.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// Directory-name prefix of a checkpoint (`checkpoint-<global_step>`), as in the Trainer.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// AdamW moments of a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The learning-rate schedule's position.
pub const SCHEDULER_FILE: &str = "scheduler.json";
/// The data position and running loss sums.
pub const RNG_STATE_FILE: &str = "rng_state.json";
/// The options of the run that wrote a checkpoint.
pub const TRAINING_ARGS_FILE: &str = "training_args.json";

/// `checkpoint-<step>`.
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("{CHECKPOINT_PREFIX}{step}")
}

/// The step of a checkpoint directory name (`checkpoint-120` gives 120).
pub fn checkpoint_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(CHECKPOINT_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checkpoint_names() {
        assert_eq!(checkpoint_step(&checkpoint_dir_name(120)), Some(120));
        assert_eq!(checkpoint_step("checkpoint-"), None);
        assert_eq!(checkpoint_step("checkpoint-1a"), None);
        assert_eq!(checkpoint_step(".checkpoint-3.tmp-5"), None);
    }
}
