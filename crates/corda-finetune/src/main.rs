//! `corda-finetune`: train the adapter written by `corda-preprocess` (or a plain LoRA) on a
//! downstream task, with the flags of the reference `corda_finetuning.py` and Hugging Face
//! `TrainingArguments`. The work happens in `corda_core::train`; this file parses flags,
//! loads the model, adapter and data, and reports.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Parser;
use corda_cli::{parse_device, HubArgs};
use corda_core::data::Split;
use corda_core::layout::{checkpoint_step, FINAL_ADAPTER_DIR, LOSS_CURVE_FILE, TRAINER_STATE_FILE};
use corda_core::train::{
    defaults, resolve_resume, AdapterChoice, FineTuneSpec, LossNormalization, OptimizerName,
    ResumeFrom, SaveStrategy, SchedulerType, TrainConfig,
};
use corda_core::util::process::OutputLock;

#[derive(Debug, Parser)]
#[command(
    name = "corda-finetune",
    args_override_self = true,
    version,
    about = "Fine-tune a CorDA adapter (or a plain LoRA) on a downstream task, like PEFT's corda_finetuning.py",
    long_about = "Fine-tune the adapter written by corda-preprocess on the residual model, with the flags of \
the reference corda_finetuning.py / Hugging Face TrainingArguments. Only the LoRA factors train; the base \
weights are frozen. Outputs in --output_dir: checkpoint-<step>/ (adapter, optimizer, scheduler, data \
position), trainer_state.json, loss.svg and the final adapter in ft/ (PEFT format, loadable with \
PeftModel.from_pretrained(residual_model, OUTPUT_DIR/ft)).\n\nBoolean flags accept `--flag`, `--flag True` \
and `--flag false`. Flag names use underscores like the reference; kebab-case aliases also work.",
    after_help = "Example:\n  corda-finetune --model_name_or_path OUT --output_dir FT --corda_mode True \\\n    \
--data_path meta-math/MetaMathQA --dataset_split \"train[:100000]\" --dataset_field query response \\\n    \
--num_train_epochs 1 --per_device_train_batch_size 1 --gradient_accumulation_steps 32 \\\n    \
--save_strategy steps --save_steps 100 --save_total_limit 1 --learning_rate 2e-5 --weight_decay 0. \\\n    \
--warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 --bf16 True --tf32 True --report_to none \\\n    \
--device cuda"
)]
struct Args {
    /// YAML or TOML file whose keys are flag names (e.g. `bf16: true`,
    /// `dataset_field: [query, response]`); flags on the command line override it.
    // Read by `expand_config_args` before parsing; declared so that it shows in --help.
    #[arg(long, value_name = "FILE", help_heading = "Model")]
    #[allow(dead_code)]
    config: Option<PathBuf>,

    // ---------------------------------------------------------------- model
    /// The model directory (or cached hub id). In CorDA mode: the output of corda-preprocess
    /// (the residual model, with the initial adapter in <dir>/corda_init).
    #[arg(long = "model_name_or_path", help_heading = "Model")]
    model_name_or_path: String,

    #[command(flatten, next_help_heading = "Model")]
    hub: HubArgs,

    /// Train the CorDA adapter in <model_name_or_path>/corda_init. With false, train a fresh
    /// plain LoRA of rank --lora_r on the unmodified model (the paper's baseline).
    #[arg(long = "corda_mode", default_value = "true", help_heading = "Model")]
    corda_mode: bool,

    /// Rank of the plain LoRA when --corda_mode false (lora_alpha = r, all seven projections;
    /// A Kaiming-uniform seeded by --seed, B = 0).
    #[arg(long = "lora_r", help_heading = "Model")]
    lora_r: Option<usize>,

    /// Where tokenizer.json is, when the model directory has none [default: the model directory,
    /// then the adapter's base_model_name_or_path].
    #[arg(long = "tokenizer_name_or_path", help_heading = "Model")]
    tokenizer_name_or_path: Option<String>,

    /// Maximum tokens of prompt and of prompt + response (longer texts are truncated).
    #[arg(
        long = "model_max_length",
        default_value_t = 512,
        help_heading = "Model"
    )]
    model_max_length: usize,

    /// Hold the frozen base weights in bfloat16 (LoRA factors and optimizer state stay float32).
    #[arg(long, help_heading = "Model")]
    bf16: bool,

    /// Let float32 matmuls on CUDA use TF32 tensor cores (candle's reduced-precision switch).
    /// Refused with --device cpu, where there are no TF32 matmuls.
    #[arg(long, help_heading = "Model")]
    tf32: bool,

    /// Keep only the input of each residual block (attention, MLP) in the forward pass and
    /// recompute the block in the backward pass: much less activation memory for one more
    /// forward pass through the layers.
    #[arg(long = "gradient_checkpointing", help_heading = "Model")]
    gradient_checkpointing: bool,

    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", help_heading = "Model")]
    device: String,

    // ---------------------------------------------------------------- data
    /// Training data: a hub dataset id (from the local cache, else its parquet files are
    /// downloaded), or a local .parquet / .jsonl / .json file or directory.
    #[arg(long = "data_path", help_heading = "Data")]
    data_path: String,

    /// Split and slice, as in `datasets`: train, train[:N], train[N:M], train[:10%].
    #[arg(
        long = "dataset_split",
        default_value = "train[:100000]",
        help_heading = "Data"
    )]
    dataset_split: Split,

    /// The query and response columns (e.g. `query response` for MetaMathQA).
    #[arg(long = "dataset_field", num_args = 2, value_names = ["QUERY", "RESPONSE"], action = clap::ArgAction::Set,
          required = true, help_heading = "Data")]
    dataset_field: Vec<String>,

    // ---------------------------------------------------------------- training
    /// Where checkpoints, trainer_state.json, loss.svg and the final adapter (ft/) go.
    #[arg(long = "output_dir", help_heading = "Training")]
    output_dir: PathBuf,

    /// Epochs (may be fractional).
    #[arg(
        long = "num_train_epochs",
        default_value_t = defaults::NUM_TRAIN_EPOCHS,
        help_heading = "Training"
    )]
    num_train_epochs: f64,

    /// Total optimizer steps; when positive, overrides --num_train_epochs.
    #[arg(long = "max_steps", default_value_t = -1, allow_negative_numbers = true,
          help_heading = "Training")]
    max_steps: i64,

    /// Examples per micro-batch.
    #[arg(
        long = "per_device_train_batch_size",
        default_value_t = defaults::PER_DEVICE_TRAIN_BATCH_SIZE,
        help_heading = "Training"
    )]
    per_device_train_batch_size: usize,

    /// Micro-batches per optimizer step.
    #[arg(
        long = "gradient_accumulation_steps",
        default_value_t = defaults::GRADIENT_ACCUMULATION_STEPS,
        help_heading = "Training"
    )]
    gradient_accumulation_steps: usize,

    /// Peak learning rate.
    #[arg(
        long = "learning_rate",
        allow_negative_numbers = true,
        default_value_t = defaults::LEARNING_RATE,
        help_heading = "Training"
    )]
    learning_rate: f64,

    /// Decoupled weight decay of AdamW.
    #[arg(
        long = "weight_decay",
        default_value_t = defaults::WEIGHT_DECAY,
        help_heading = "Training"
    )]
    weight_decay: f64,

    #[arg(long = "adam_beta1", default_value_t = defaults::ADAM_BETA1, help_heading = "Training")]
    adam_beta1: f64,

    #[arg(
        long = "adam_beta2",
        default_value_t = defaults::ADAM_BETA2,
        help_heading = "Training"
    )]
    adam_beta2: f64,

    #[arg(
        long = "adam_epsilon",
        default_value_t = defaults::ADAM_EPSILON,
        help_heading = "Training"
    )]
    adam_epsilon: f64,

    /// Optimizer: adamw_torch (the reference's), or adamw_torch_fused, which is the same AdamW
    /// update (torch's fused kernel of it); other names are refused.
    #[arg(long, default_value_t = OptimizerName::AdamWTorch, help_heading = "Training")]
    optim: OptimizerName,

    /// Clip the global gradient norm to this (0 disables clipping).
    #[arg(
        long = "max_grad_norm",
        default_value_t = defaults::MAX_GRAD_NORM,
        help_heading = "Training"
    )]
    max_grad_norm: f64,

    /// linear, cosine, constant or constant_with_warmup.
    #[arg(
        long = "lr_scheduler_type",
        default_value_t = defaults::LR_SCHEDULER_TYPE,
        help_heading = "Training"
    )]
    lr_scheduler_type: SchedulerType,

    /// Warmup steps; a value below 1 is a ratio of the total steps (transformers 5).
    #[arg(
        long = "warmup_steps",
        default_value_t = defaults::WARMUP_STEPS,
        help_heading = "Training"
    )]
    warmup_steps: f64,

    /// Warmup as a ratio of the total steps (used when --warmup_steps is 0).
    #[arg(
        long = "warmup_ratio",
        default_value_t = defaults::WARMUP_RATIO,
        help_heading = "Training"
    )]
    warmup_ratio: f64,

    /// Seeds the data order (per epoch) and the plain-LoRA initialisation.
    #[arg(long, default_value_t = defaults::SEED, help_heading = "Training")]
    seed: u64,

    /// How the micro-batch losses of one step combine: tokens_in_step (transformers >= 4.46:
    /// mean over all target tokens of the step) or mean_of_micro_batches (older transformers).
    #[arg(
        long = "loss_normalization",
        default_value_t = defaults::LOSS_NORMALIZATION,
        help_heading = "Training"
    )]
    loss_normalization: LossNormalization,

    // ---------------------------------------------------------------- logging and checkpoints
    /// Log every N optimizer steps (trainer_state.json and stderr).
    #[arg(
        long = "logging_steps",
        default_value_t = defaults::LOGGING_STEPS,
        help_heading = "Logging and checkpoints"
    )]
    logging_steps: u64,

    /// steps, epoch or no.
    #[arg(
        long = "save_strategy",
        default_value_t = defaults::SAVE_STRATEGY,
        help_heading = "Logging and checkpoints"
    )]
    save_strategy: SaveStrategy,

    /// Checkpoint every N optimizer steps with --save_strategy steps.
    #[arg(
        long = "save_steps",
        default_value_t = defaults::SAVE_STEPS,
        help_heading = "Logging and checkpoints"
    )]
    save_steps: u64,

    /// Keep at most this many checkpoints (oldest deleted first).
    #[arg(long = "save_total_limit", help_heading = "Logging and checkpoints")]
    save_total_limit: Option<usize>,

    /// Train into a non-empty --output_dir, replacing the run there (its checkpoints, ft/,
    /// trainer_state.json and loss.svg); without it such a directory is refused unless resuming.
    #[arg(
        long = "overwrite_output_dir",
        help_heading = "Logging and checkpoints"
    )]
    overwrite_output_dir: bool,

    /// Continue from a checkpoint directory, or `true` for the latest in --output_dir.
    #[arg(long = "resume_from_checkpoint", num_args = 0..=1,
          default_missing_value = "true", value_name = "PATH|true", help_heading = "Logging and checkpoints")]
    resume_from_checkpoint: Option<String>,

    /// Only `none` is meaningful here; other integrations are not available.
    #[arg(
        long = "report_to",
        default_value = "none",
        help_heading = "Logging and checkpoints"
    )]
    report_to: String,

    /// Hide the progress bar.
    #[arg(long = "disable_tqdm", help_heading = "Logging and checkpoints")]
    disable_tqdm: bool,
}

/// The training options from the flags (checked before anything is loaded).
fn train_config(a: &Args) -> Result<TrainConfig> {
    let mut c = TrainConfig::new(&a.output_dir);
    c.num_train_epochs = a.num_train_epochs;
    c.max_steps = (a.max_steps > 0).then_some(a.max_steps as u64);
    c.per_device_train_batch_size = a.per_device_train_batch_size;
    c.gradient_accumulation_steps = a.gradient_accumulation_steps;
    c.learning_rate = a.learning_rate;
    c.weight_decay = a.weight_decay;
    c.adam_beta1 = a.adam_beta1;
    c.adam_beta2 = a.adam_beta2;
    c.adam_epsilon = a.adam_epsilon;
    c.max_grad_norm = a.max_grad_norm;
    c.lr_scheduler_type = a.lr_scheduler_type;
    c.warmup_steps = a.warmup_steps;
    c.warmup_ratio = a.warmup_ratio;
    c.logging_steps = a.logging_steps;
    c.save_strategy = a.save_strategy;
    c.save_steps = a.save_steps;
    c.save_total_limit = a.save_total_limit;
    c.seed = a.seed;
    c.resume_from_checkpoint = a
        .resume_from_checkpoint
        .as_deref()
        .and_then(ResumeFrom::parse);
    c.loss_normalization = a.loss_normalization;
    c.gradient_checkpointing = a.gradient_checkpointing;
    c.progress = !a.disable_tqdm;
    c.validate()?;
    Ok(c)
}

/// The run's model, adapter and data from the flags.
fn finetune_spec(a: &Args, device: Device) -> Result<FineTuneSpec> {
    let adapter = match (a.corda_mode, a.lora_r) {
        (true, r) => {
            if r.is_some() {
                tracing::warn!(
                    "--lora_r is ignored with --corda_mode true (the rank comes from corda_init)"
                );
            }
            AdapterChoice::Corda
        }
        (false, Some(r)) => AdapterChoice::PlainLora { r, seed: a.seed },
        (false, None) => {
            bail!("--corda_mode false needs --lora_r R (full fine-tuning is not supported)")
        }
    };
    Ok(FineTuneSpec {
        model_name_or_path: a.model_name_or_path.clone(),
        revision: a.hub.revision.clone(),
        hub: a.hub.hub().with_progress(!a.disable_tqdm),
        adapter,
        tokenizer_name_or_path: a.tokenizer_name_or_path.clone(),
        data_path: a.data_path.clone(),
        split: a.dataset_split.clone(),
        query_field: a.dataset_field[0].clone(),
        response_field: a.dataset_field[1].clone(),
        model_max_length: a.model_max_length,
        dtype: if a.bf16 { DType::BF16 } else { DType::F32 },
        device,
    })
}

/// A fresh run may not mix with what is already in `dir` (a finished run or checkpoints, which
/// `save_total_limit` and a later `--resume_from_checkpoint` would confuse with this run's):
/// refuse a non-empty directory unless `overwrite`, which removes the previous run's outputs.
fn claim_output_dir(dir: &Path, overwrite: bool) -> Result<()> {
    let entries: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading --output_dir {}", dir.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => bail!(
            "--output_dir {} exists and is not a directory; remove it or choose another path",
            dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("--output_dir {}", dir.display())),
    };
    if entries.is_empty() {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "--output_dir {} is not empty; pass --overwrite_output_dir to replace the run in it, --resume_from_checkpoint to continue it, or choose another directory",
            dir.display()
        );
    }
    for e in entries {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let path = e.path();
        let run_output = checkpoint_step(&name).is_some()
            || [FINAL_ADAPTER_DIR, TRAINER_STATE_FILE, LOSS_CURVE_FILE].contains(&name.as_ref());
        if !run_output {
            continue;
        }
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("--overwrite_output_dir: removing {}", path.display()))?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    // candle runs element-wise ops on its own spinning thread pool, beside rayon's (faer's
    // products and our fused ops): on few cores the two pools spin against each other. With
    // candle's pool off, a training step took ~40% less CPU time (perf stat task-clock, 2 cores,
    // docs/benchmarks.md). Set before any thread starts; an explicit value is kept.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // The first interrupt stops training after the current step with a checkpoint.
    corda_cli::handle_interrupts(corda_cli::OnInterrupt::Request);
    corda_cli::main("info", run)
}

fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    corda_core::util::alloc::keep_freed_memory();

    // Cheap checks first: nothing is loaded before the flags make sense.
    let config = train_config(&args)?;
    if args.report_to != "none" {
        tracing::warn!(
            "--report_to {}: no reporting integrations here; logs go to trainer_state.json",
            args.report_to
        );
    }
    let device = parse_device(&args.device).context("--device")?;
    if args.tf32 && device.is_cpu() {
        // Like the Trainer, which refuses tf32 without a GPU that has it.
        bail!("--tf32 True needs a CUDA device (TF32 tensor cores exist only on NVIDIA GPUs); drop --tf32 on the CPU or pass --device cuda");
    }
    candle_core::cuda::set_gemm_reduced_precision_f32(args.tf32);
    let spec = finetune_spec(&args, device)?;
    let model_dir = spec.check().with_context(|| {
        if args.corda_mode {
            "--corda_mode true trains the adapter of a corda-preprocess output (run it first, or pass --corda_mode false --lora_r R for a plain LoRA)".to_string()
        } else {
            format!("--model_name_or_path {}", args.model_name_or_path)
        }
    })?;
    // Checkpoints and ft/ must not land in (or over) the model they train on.
    corda_cli::ensure_apart(
        &config.output_dir,
        "--output_dir",
        &[(model_dir.as_path(), "--model_name_or_path")],
    )?;
    // One run per output directory: a second one would mix its checkpoints with this one's.
    let _lock = OutputLock::acquire(&config.output_dir)?;
    if let Some(from) = &config.resume_from_checkpoint {
        resolve_resume(&config.output_dir, from)?;
    } else {
        claim_output_dir(&config.output_dir, args.overwrite_output_dir)?;
    }

    let run = spec.load().with_context(|| {
        format!(
            "preparing the run ({} on {} {})",
            args.model_name_or_path, args.data_path, args.dataset_split
        )
    })?;
    let mut report = run.report.clone();
    tracing::info!(
        "{} LoRA modules, {} trainable parameters; base weights {:?} on {:?}",
        run.model.lora_vars().len(),
        run.model.lora_parameter_count(),
        run.model.dtype,
        run.model.device
    );

    let outcome = run.trainer(config)?.train()?;
    for (phase, secs, _) in outcome.report.entries() {
        report.add(phase, std::time::Duration::from_secs_f64(secs));
    }
    eprintln!(
        "trained {} steps ({} in this run) in {:.1} s: {:.0} tokens/s; final adapter in {}, loss curve in {}",
        outcome.state.global_step,
        outcome.steps_this_run,
        start.elapsed().as_secs_f64(),
        outcome.tokens_per_second(),
        outcome.adapter_dir.display(),
        outcome.loss_curve.display()
    );
    eprint!("{}", report.render());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: [&str; 9] = [
        "corda-finetune",
        "--model_name_or_path",
        "M",
        "--output_dir",
        "FT",
        "--data_path",
        "d.jsonl",
        "--dataset_field",
        "query",
    ];

    fn parse(extra: &[&str]) -> Result<Args, corda_cli::ParseOutcome> {
        let mut v: Vec<&str> = BASE.to_vec();
        v.push("response");
        v.extend_from_slice(extra);
        corda_cli::parse_args(v.into_iter().map(Into::into).collect())
    }

    #[test]
    fn booleans_accept_bare_true_and_false_forms() {
        assert!(!parse(&[]).unwrap().bf16);
        assert!(parse(&["--bf16"]).unwrap().bf16);
        assert!(parse(&["--bf16", "True"]).unwrap().bf16);
        assert!(!parse(&["--bf16", "false"]).unwrap().bf16);
        assert!(parse(&["--corda_mode", "--bf16"]).unwrap().corda_mode);
        assert!(
            !parse(&["--corda_mode", "False", "--lora_r", "8"])
                .unwrap()
                .corda_mode
        );
        assert!(parse(&[
            "--tf32",
            "True",
            "--report_to",
            "none",
            "--gradient_checkpointing"
        ])
        .is_ok());
        assert!(parse(&["--bf16", "maybe"]).is_err());
    }

    #[test]
    fn reference_command_line_parses_with_defaults() {
        let a = parse(&[
            "--num_train_epochs",
            "1",
            "--per_device_train_batch_size",
            "1",
            "--gradient_accumulation_steps",
            "32",
            "--save_strategy",
            "steps",
            "--save_steps",
            "100",
            "--save_total_limit",
            "1",
            "--learning_rate",
            "2e-5",
            "--weight_decay",
            "0.",
            "--warmup_ratio",
            "0.03",
            "--lr_scheduler_type",
            "cosine",
            "--logging_steps",
            "1",
        ])
        .unwrap();
        assert_eq!(a.dataset_field, vec!["query", "response"]);
        assert_eq!(a.dataset_split.to_string(), "train[:100000]");
        assert_eq!(
            (a.model_max_length, a.seed, a.max_grad_norm, a.max_steps),
            (512, 42, 1.0, -1)
        );
        let c = train_config(&a).unwrap();
        assert_eq!(c.lr_scheduler_type, SchedulerType::Cosine);
        assert_eq!(
            (
                c.gradient_accumulation_steps,
                c.save_total_limit,
                c.max_steps
            ),
            (32, Some(1), None)
        );
        assert_eq!(
            (c.adam_beta1, c.adam_beta2, c.adam_epsilon),
            (0.9, 0.999, 1e-8)
        );
        // The flags' defaults are TrainConfig's.
        assert_eq!(
            train_config(&parse(&[]).unwrap()).unwrap(),
            TrainConfig::new("FT")
        );
        // Kebab-case aliases.
        let a = parse(&["--max-steps", "5", "--resume-from-checkpoint"]).unwrap();
        let c = train_config(&a).unwrap();
        assert_eq!(
            (c.max_steps, c.resume_from_checkpoint),
            (Some(5), Some(ResumeFrom::Latest))
        );
        let a = parse(&["--resume_from_checkpoint", "FT/checkpoint-3"]).unwrap();
        assert_eq!(
            train_config(&a).unwrap().resume_from_checkpoint,
            Some(ResumeFrom::Path("FT/checkpoint-3".into()))
        );
    }

    #[test]
    fn bad_flags_are_rejected() {
        assert!(parse(&["--lr_scheduler_type", "polynomial"]).is_err());
        assert!(parse(&["--optim", "sgd"]).is_err());
        assert!(parse(&["--optim", "adafactor"]).is_err());
        assert_eq!(
            parse(&["--optim", "adamw_torch_fused"]).unwrap().optim,
            OptimizerName::AdamWTorchFused
        );
        assert!(parse(&["--dataloader_num_proc", "4"]).is_err());
        assert!(parse(&["--save_strategy", "sometimes"]).is_err());
        let a = parse(&["--gradient_accumulation_steps", "0"]).unwrap();
        assert!(train_config(&a).is_err());
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cpu").is_ok());
        let only_one_field =
            corda_cli::parse_args::<Args>(BASE.into_iter().map(Into::into).collect());
        assert!(only_one_field.is_err());
    }
}
