//! `corda-finetune`: train the adapter written by `corda-preprocess` (or a plain LoRA) on a
//! downstream task, with the flags of the reference `corda_finetuning.py` and Hugging Face
//! `TrainingArguments`. The work happens in `corda_core::train`; this file parses flags,
//! loads the model, adapter and data, and reports.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Parser;
use corda_core::adapter::Adapter;
use corda_core::data::{build_sft_examples, load_rows, SftOptions, Split};
use corda_core::model::{resolve_model_dir, CausalLM, LoadOptions, TokenizerInfo};
use corda_core::train::{
    plain_lora_adapter, resolve_resume, target_tokens, LossNormalization, ResumeFrom, SaveStrategy,
    SchedulerType, TrainConfig, Trainer,
};
use corda_core::util::cli::{expand_config_args, parse_bool, parse_device};
use corda_core::util::PhaseReport;

fn parse_scheduler(s: &str) -> Result<SchedulerType, String> {
    s.parse().map_err(|e: corda_core::CordaError| e.to_string())
}

fn parse_save_strategy(s: &str) -> Result<SaveStrategy, String> {
    s.parse().map_err(|e: corda_core::CordaError| e.to_string())
}

fn parse_loss_norm(s: &str) -> Result<LossNormalization, String> {
    s.parse().map_err(|e: corda_core::CordaError| e.to_string())
}

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
--warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 --bf16 True --tf32 True --report_to none"
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
    #[arg(
        long = "model_name_or_path",
        alias = "model-name-or-path",
        help_heading = "Model"
    )]
    model_name_or_path: String,

    /// Train the CorDA adapter in <model_name_or_path>/corda_init. With false, train a fresh
    /// plain LoRA of rank --lora_r on the unmodified model (the paper's baseline).
    #[arg(long = "corda_mode", alias = "corda-mode", num_args = 0..=1, default_value = "true",
          default_missing_value = "true", value_parser = parse_bool, help_heading = "Model")]
    corda_mode: bool,

    /// Rank of the plain LoRA when --corda_mode false (lora_alpha = r, all seven projections;
    /// A Kaiming-uniform seeded by --seed, B = 0).
    #[arg(long = "lora_r", alias = "lora-r", help_heading = "Model")]
    lora_r: Option<usize>,

    /// Where tokenizer.json is, when the model directory has none [default: the model directory,
    /// then the adapter's base_model_name_or_path].
    #[arg(
        long = "tokenizer_name_or_path",
        alias = "tokenizer-name-or-path",
        help_heading = "Model"
    )]
    tokenizer_name_or_path: Option<String>,

    /// Maximum tokens of prompt and of prompt + response (longer texts are truncated).
    #[arg(
        long = "model_max_length",
        alias = "model-max-length",
        default_value_t = 512,
        help_heading = "Model"
    )]
    model_max_length: usize,

    /// Hold the frozen base weights in bfloat16 (LoRA factors and optimizer state stay float32).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_bool, help_heading = "Model")]
    bf16: bool,

    /// Accepted for compatibility; a no-op here (TF32 matmuls only exist on NVIDIA GPUs, and
    /// candle does not expose the switch for CPU runs).
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_bool, help_heading = "Model")]
    tf32: bool,

    /// Accepted for compatibility; a no-op: candle keeps every activation until backward (the
    /// LoRA-only gradients already keep memory small).
    #[arg(long = "gradient_checkpointing", alias = "gradient-checkpointing", num_args = 0..=1,
          default_value = "false", default_missing_value = "true", value_parser = parse_bool,
          help_heading = "Model")]
    gradient_checkpointing: bool,

    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", help_heading = "Model")]
    device: String,

    // ---------------------------------------------------------------- data
    /// Training data: a hub dataset id from the local cache (its parquet files), or a local
    /// .parquet / .jsonl / .json file or directory.
    #[arg(long = "data_path", alias = "data-path", help_heading = "Data")]
    data_path: String,

    /// Split and slice, as in `datasets`: train, train[:N], train[N:M], train[:10%].
    #[arg(
        long = "dataset_split",
        alias = "dataset-split",
        default_value = "train[:100000]",
        help_heading = "Data"
    )]
    dataset_split: String,

    /// The query and response columns (e.g. `query response` for MetaMathQA).
    #[arg(long = "dataset_field", alias = "dataset-field", num_args = 2, value_names = ["QUERY", "RESPONSE"], action = clap::ArgAction::Set,
          required = true, help_heading = "Data")]
    dataset_field: Vec<String>,

    /// Accepted for compatibility with the reference script (tokenization is parallel anyway).
    #[arg(
        long = "dataloader_num_proc",
        alias = "dataloader-num-proc",
        hide = true
    )]
    dataloader_num_proc: Option<usize>,
    /// Accepted for compatibility with the reference script.
    #[arg(
        long = "dataloader_batch_size",
        alias = "dataloader-batch-size",
        hide = true
    )]
    dataloader_batch_size: Option<usize>,

    // ---------------------------------------------------------------- training
    /// Where checkpoints, trainer_state.json, loss.svg and the final adapter (ft/) go.
    #[arg(long = "output_dir", alias = "output-dir", help_heading = "Training")]
    output_dir: PathBuf,

    /// Epochs (may be fractional).
    #[arg(
        long = "num_train_epochs",
        alias = "num-train-epochs",
        default_value_t = 3.0,
        help_heading = "Training"
    )]
    num_train_epochs: f64,

    /// Total optimizer steps; when positive, overrides --num_train_epochs.
    #[arg(long = "max_steps", alias = "max-steps", default_value_t = -1, allow_negative_numbers = true,
          help_heading = "Training")]
    max_steps: i64,

    /// Examples per micro-batch.
    #[arg(
        long = "per_device_train_batch_size",
        alias = "per-device-train-batch-size",
        default_value_t = 8,
        help_heading = "Training"
    )]
    per_device_train_batch_size: usize,

    /// Micro-batches per optimizer step.
    #[arg(
        long = "gradient_accumulation_steps",
        alias = "gradient-accumulation-steps",
        default_value_t = 1,
        help_heading = "Training"
    )]
    gradient_accumulation_steps: usize,

    /// Peak learning rate.
    #[arg(
        long = "learning_rate",
        alias = "learning-rate",
        default_value_t = 5e-5,
        help_heading = "Training"
    )]
    learning_rate: f64,

    /// Decoupled weight decay of AdamW.
    #[arg(
        long = "weight_decay",
        alias = "weight-decay",
        default_value_t = 0.0,
        help_heading = "Training"
    )]
    weight_decay: f64,

    #[arg(
        long = "adam_beta1",
        alias = "adam-beta1",
        default_value_t = 0.9,
        help_heading = "Training"
    )]
    adam_beta1: f64,

    #[arg(
        long = "adam_beta2",
        alias = "adam-beta2",
        default_value_t = 0.999,
        help_heading = "Training"
    )]
    adam_beta2: f64,

    #[arg(
        long = "adam_epsilon",
        alias = "adam-epsilon",
        default_value_t = 1e-8,
        help_heading = "Training"
    )]
    adam_epsilon: f64,

    /// Optimizer; only adamw_torch (the reference's) is implemented.
    #[arg(long, default_value = "adamw_torch", help_heading = "Training")]
    optim: String,

    /// Clip the global gradient norm to this (0 disables clipping).
    #[arg(
        long = "max_grad_norm",
        alias = "max-grad-norm",
        default_value_t = 1.0,
        help_heading = "Training"
    )]
    max_grad_norm: f64,

    /// linear, cosine, constant or constant_with_warmup.
    #[arg(long = "lr_scheduler_type", alias = "lr-scheduler-type", default_value = "linear",
          value_parser = parse_scheduler, help_heading = "Training")]
    lr_scheduler_type: SchedulerType,

    /// Warmup steps; a value below 1 is a ratio of the total steps (transformers 5).
    #[arg(
        long = "warmup_steps",
        alias = "warmup-steps",
        default_value_t = 0.0,
        help_heading = "Training"
    )]
    warmup_steps: f64,

    /// Warmup as a ratio of the total steps (used when --warmup_steps is 0).
    #[arg(
        long = "warmup_ratio",
        alias = "warmup-ratio",
        default_value_t = 0.0,
        help_heading = "Training"
    )]
    warmup_ratio: f64,

    /// Seeds the data order (per epoch) and the plain-LoRA initialisation.
    #[arg(long, default_value_t = 42, help_heading = "Training")]
    seed: u64,

    /// How the micro-batch losses of one step combine: tokens_in_step (transformers >= 4.46:
    /// mean over all target tokens of the step) or mean_of_micro_batches (older transformers).
    #[arg(long = "loss_normalization", alias = "loss-normalization", default_value = "tokens_in_step",
          value_parser = parse_loss_norm, help_heading = "Training")]
    loss_normalization: LossNormalization,

    // ---------------------------------------------------------------- logging and checkpoints
    /// Log every N optimizer steps (trainer_state.json and stderr).
    #[arg(
        long = "logging_steps",
        alias = "logging-steps",
        default_value_t = 500,
        help_heading = "Logging and checkpoints"
    )]
    logging_steps: u64,

    /// steps, epoch or no.
    #[arg(long = "save_strategy", alias = "save-strategy", default_value = "steps", value_parser = parse_save_strategy,
          help_heading = "Logging and checkpoints")]
    save_strategy: SaveStrategy,

    /// Checkpoint every N optimizer steps with --save_strategy steps.
    #[arg(
        long = "save_steps",
        alias = "save-steps",
        default_value_t = 500,
        help_heading = "Logging and checkpoints"
    )]
    save_steps: u64,

    /// Keep at most this many checkpoints (oldest deleted first).
    #[arg(
        long = "save_total_limit",
        alias = "save-total-limit",
        help_heading = "Logging and checkpoints"
    )]
    save_total_limit: Option<usize>,

    /// Continue from a checkpoint directory, or `true` for the latest in --output_dir.
    #[arg(long = "resume_from_checkpoint", alias = "resume-from-checkpoint", num_args = 0..=1,
          default_missing_value = "true", value_name = "PATH|true", help_heading = "Logging and checkpoints")]
    resume_from_checkpoint: Option<String>,

    /// Only `none` is meaningful here; other integrations are not available.
    #[arg(
        long = "report_to",
        alias = "report-to",
        default_value = "none",
        help_heading = "Logging and checkpoints"
    )]
    report_to: String,

    /// Hide the progress bar.
    #[arg(long = "disable_tqdm", alias = "disable-tqdm", num_args = 0..=1, default_value = "false",
          default_missing_value = "true", value_parser = parse_bool, help_heading = "Logging and checkpoints")]
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
    c.progress = !a.disable_tqdm;
    c.validate()?;
    Ok(c)
}

fn main() {
    corda_core::util::cli::init_logging("info");
    let argv = match expand_config_args(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(Args::parse_from(argv)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let mut report = PhaseReport::new();
    let start = Instant::now();

    // Cheap checks first: nothing is loaded before the flags make sense.
    let config = train_config(&args)?;
    if args.optim != "adamw_torch" && args.optim != "adamw_torch_fused" {
        bail!("--optim {}: only adamw_torch is implemented", args.optim);
    }
    if args.report_to != "none" {
        tracing::warn!(
            "--report_to {}: no reporting integrations here; logs go to trainer_state.json",
            args.report_to
        );
    }
    if args.dataloader_num_proc.is_some() || args.dataloader_batch_size.is_some() {
        tracing::info!("--dataloader_num_proc / --dataloader_batch_size are accepted for compatibility and ignored");
    }
    if args.tf32 {
        tracing::info!("--tf32 has no effect in this build (no TF32 on CPU); continuing");
    }
    if args.gradient_checkpointing {
        tracing::info!(
            "--gradient_checkpointing has no effect (not available in candle); continuing"
        );
    }
    let device = parse_device(&args.device)?;
    let model_dir = resolve_model_dir(&args.model_name_or_path)?;
    let corda_dir = model_dir.join("corda_init");
    if args.corda_mode {
        if !corda_dir.join("adapter_config.json").is_file() {
            bail!(
                "--corda_mode true needs the initial adapter in {}, which does not exist; run corda-preprocess \
                 with this output directory first, or pass --corda_mode false --lora_r R for a plain LoRA",
                corda_dir.display()
            );
        }
        if args.lora_r.is_some() {
            tracing::warn!(
                "--lora_r is ignored with --corda_mode true (the rank comes from corda_init)"
            );
        }
    } else if args.lora_r.is_none() {
        bail!("--corda_mode false needs --lora_r R (full fine-tuning is not supported)");
    }
    if let Some(from) = &config.resume_from_checkpoint {
        resolve_resume(&config.output_dir, from)?;
    }

    // Adapter config (read early: it may name where the tokenizer is).
    let corda_adapter = if args.corda_mode {
        Some(
            report
                .time("load adapter", || Adapter::load(&corda_dir))
                .context("loading corda_init")?,
        )
    } else {
        None
    };

    // Data.
    let tok_dir = tokenizer_dir(&args, &model_dir, corda_adapter.as_ref())?;
    let tok = TokenizerInfo::load(&tok_dir)?;
    let eos = tok
        .eos_token
        .clone()
        .context("the tokenizer defines no EOS token (needed as target end and pad)")?;
    let pad_id = tok
        .eos_id
        .context("the tokenizer defines no EOS token id")?;
    let split = Split::parse(&args.dataset_split)?;
    let examples = report.time("load data", || -> Result<_> {
        let rows = load_rows(&args.data_path, &split, None)?;
        let opts = SftOptions {
            query_field: args.dataset_field[0].clone(),
            response_field: args.dataset_field[1].clone(),
            model_max_length: args.model_max_length,
            eos_token: eos.clone(),
        };
        Ok(build_sft_examples(&rows, &tok.tokenizer, &opts)?)
    })?;
    let trainable = examples.iter().filter(|e| target_tokens(e) > 0).count();
    if trainable == 0 {
        bail!(
            "none of the {} examples has a response token left after truncation at --model_max_length {}; raise it",
            examples.len(),
            args.model_max_length
        );
    }
    let mean_len =
        examples.iter().map(|e| e.input_ids.len()).sum::<usize>() as f64 / examples.len() as f64;
    tracing::info!(
        "{} examples from {} {} (mean {:.0} tokens, {} without response tokens)",
        examples.len(),
        args.data_path,
        args.dataset_split,
        mean_len,
        examples.len() - trainable
    );

    // Model and adapter.
    let dtype = if args.bf16 { DType::BF16 } else { DType::F32 };
    let mut model = report
        .time("load model", || {
            CausalLM::load(
                &model_dir,
                &LoadOptions {
                    dtype: Some(dtype),
                    device: device.clone(),
                },
            )
        })
        .with_context(|| format!("loading the model from {}", model_dir.display()))?;
    let mut adapter = match corda_adapter {
        Some(a) => a,
        None => {
            let r = args.lora_r.expect("checked above");
            let modules: Vec<(String, usize, usize)> = model
                .targets()
                .map(|t| {
                    let (o, i) = t.dims();
                    (t.name.clone(), o, i)
                })
                .collect();
            plain_lora_adapter(&modules, r, args.seed)?
        }
    };
    adapter.config.base_model_name_or_path = Some(args.model_name_or_path.clone());
    model
        .attach_adapter(&adapter)
        .context("attaching the adapter")?;
    let n_params: usize = model
        .lora_vars()
        .iter()
        .map(|(_, a, b)| a.elem_count() + b.elem_count())
        .sum();
    tracing::info!(
        "{} LoRA modules, {} trainable parameters; base weights {:?} on {:?}",
        adapter.modules.len(),
        n_params,
        model.dtype,
        device
    );

    let trainer = Trainer::new(&model, &examples, pad_id, adapter.config.clone(), config)?;
    let outcome = trainer.train()?;
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

/// The directory with tokenizer.json: the flag, else the model directory, else the adapter's
/// base model (corda-preprocess records the original model there).
fn tokenizer_dir(args: &Args, model_dir: &Path, adapter: Option<&Adapter>) -> Result<PathBuf> {
    if let Some(t) = &args.tokenizer_name_or_path {
        return Ok(resolve_model_dir(t)?);
    }
    if TokenizerInfo::available(model_dir) {
        return Ok(model_dir.to_path_buf());
    }
    if let Some(base) = adapter.and_then(|a| a.config.base_model_name_or_path.as_deref()) {
        if let Ok(dir) = resolve_model_dir(base) {
            if TokenizerInfo::available(&dir) {
                tracing::info!(
                    "no tokenizer in {}; using the one of {}",
                    model_dir.display(),
                    dir.display()
                );
                return Ok(dir);
            }
        }
    }
    bail!(
        "{} has no tokenizer.json; pass --tokenizer_name_or_path with the original model",
        model_dir.display()
    )
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

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut v: Vec<&str> = BASE.to_vec();
        v.push("response");
        v.extend_from_slice(extra);
        Args::try_parse_from(v)
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
        assert_eq!(a.dataset_split, "train[:100000]");
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
        assert!(parse(&["--save_strategy", "sometimes"]).is_err());
        let a = parse(&["--gradient_accumulation_steps", "0"]).unwrap();
        assert!(train_config(&a).is_err());
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cpu").is_ok());
        let only_one_field = Args::try_parse_from(BASE);
        assert!(only_one_field.is_err());
    }
}
