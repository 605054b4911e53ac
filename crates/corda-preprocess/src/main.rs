//! `corda-preprocess`: sample calibration data, collect covariances, decompose, and write the
//! residual model plus the initial CorDA adapter (`OUT/corda_init`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use corda_core::corda::{preprocess, CordaMode, CovariancePrecision, PreprocessOptions};
use corda_core::data::{
    calibration_samples, lookup, read_rows, CalibOptions, CalibSampling, RegistryEntry, Template,
};
use corda_core::hub::Hub;
use corda_core::model::{parse_dtype, resolve_model, TokenizerInfo, TARGET_PROJECTIONS};
use corda_core::util::cli::{expand_config_args, parse_bool, parse_device, parse_size};
use corda_core::util::AtomicDir;

/// Build a CorDA adapter: covariance-oriented SVD of every target linear layer.
///
/// KPM (default) trains the r smallest components and freezes the principal ones
/// (knowledge-preserved); IPM (--first_eigen) trains the r largest (instruction-previewed).
#[derive(Parser, Debug)]
#[command(name = "corda-preprocess", version, about, long_about = None, args_override_self = true)]
struct Args {
    /// YAML or TOML file whose keys are flag names; flags on the command line override it.
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    config: Option<PathBuf>,
    /// Model directory or Hugging Face hub id (from the local cache, else downloaded into it).
    #[arg(
        long = "model_id",
        alias = "model-id",
        default_value = "meta-llama/Llama-2-7b-hf",
        help_heading = "Input"
    )]
    model_id: String,
    /// Hub revision of --model_id: a branch, tag or commit sha.
    #[arg(long, default_value = "main", help_heading = "Input")]
    revision: String,
    /// Hugging Face token for gated or private repos [default: HF_TOKEN, else the token file of `huggingface-cli login`].
    #[arg(long, value_name = "TOKEN", help_heading = "Input")]
    token: Option<String>,
    /// Storage and output dtype: auto (the model's), float32, float16, bfloat16.
    #[arg(long, default_value = "auto", help_heading = "Input")]
    dtype: String,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu", help_heading = "Input")]
    device: String,

    /// Registry name (nqopen, trivia_qa, wikitext2, ptb, c4, MetaMATH, codefeedback, WizLMinstruct, alpaca) or a local .parquet/.jsonl/.json file or directory.
    #[arg(
        long = "calib_dataset",
        alias = "calib-dataset",
        default_value = "wikitext2",
        help_heading = "Calibration"
    )]
    calib_dataset: String,
    /// Data files to read for a registry dataset instead of its hub files.
    #[arg(long = "calib_data_files", alias = "calib-data-files", num_args = 1.., help_heading = "Calibration")]
    calib_data_files: Vec<PathBuf>,
    /// Number of calibration samples.
    #[arg(
        long = "calib_loader_size",
        alias = "calib-loader-size",
        default_value_t = 256,
        help_heading = "Calibration"
    )]
    calib_loader_size: usize,
    /// Tokens per calibration sample at most.
    #[arg(
        long = "calib_max_length",
        alias = "calib-max-length",
        default_value_t = 2048,
        help_heading = "Calibration"
    )]
    calib_max_length: usize,
    /// Row template for a local dataset, e.g. "{query} {response}" (default "{text}").
    #[arg(
        long = "calib_template",
        alias = "calib-template",
        help_heading = "Calibration"
    )]
    calib_template: Option<String>,
    /// rows (one sample per row, truncated), windows (random windows of the joined text) or chat.
    #[arg(
        long = "calib_sampling",
        alias = "calib-sampling",
        help_heading = "Calibration"
    )]
    calib_sampling: Option<String>,
    /// Calibration samples per forward pass (padded tokens are masked out of the covariance).
    #[arg(
        long = "calib_batch_size",
        alias = "calib-batch-size",
        default_value_t = 1,
        help_heading = "Calibration"
    )]
    calib_batch_size: usize,
    /// Seed of the calibration sampling.
    #[arg(long, default_value_t = 233, help_heading = "Calibration")]
    seed: u64,

    /// LoRA rank.
    #[arg(long, help_heading = "Adapter")]
    r: Option<usize>,
    /// LoRA alpha (default: r, as the reference).
    #[arg(long = "lora_alpha", alias = "lora-alpha", help_heading = "Adapter")]
    lora_alpha: Option<f64>,
    /// Scale by alpha/sqrt(r) instead of alpha/r.
    #[arg(long = "use_rslora", alias = "use-rslora", num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool, help_heading = "Adapter")]
    use_rslora: bool,
    /// IPM: train the largest r components (default KPM: the smallest).
    #[arg(long = "first_eigen", alias = "first-eigen", num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool, help_heading = "Adapter")]
    first_eigen: bool,
    /// Comma-separated target modules.
    #[arg(
        long = "target_modules",
        alias = "target-modules",
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help_heading = "Adapter"
    )]
    target_modules: Vec<String>,
    /// Per-module ranks, e.g. down_proj=64,q_proj=16 (a key matches modules ending with it).
    #[arg(
        long = "rank_pattern",
        alias = "rank-pattern",
        value_delimiter = ',',
        help_heading = "Adapter"
    )]
    rank_pattern: Vec<String>,
    /// Per-module alphas, same syntax as --rank_pattern.
    #[arg(
        long = "alpha_pattern",
        alias = "alpha-pattern",
        value_delimiter = ',',
        help_heading = "Adapter"
    )]
    alpha_pattern: Vec<String>,

    /// Hold the covariance sum in the model's half dtype (half the memory; overflow is detected).
    #[arg(long = "use_float16_for_covariance", alias = "use-float16-for-covariance", num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool, help_heading = "Files")]
    use_float16_for_covariance: bool,
    /// Save covariances here, or reuse them when the file exists.
    #[arg(
        long = "covariance_file",
        alias = "covariance-file",
        help_heading = "Files"
    )]
    covariance_file: Option<PathBuf>,
    /// Save the decomposition here, or reuse it when the file exists.
    #[arg(long = "cache_file", alias = "cache-file", help_heading = "Files")]
    cache_file: Option<PathBuf>,

    /// Write the residual model and OUT/corda_init.
    #[arg(long = "save_model", alias = "save-model", num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool, help_heading = "Output")]
    save_model: bool,
    /// Output directory.
    #[arg(long = "save_path", alias = "save-path", help_heading = "Output")]
    save_path: Option<PathBuf>,
    /// Replace an existing non-empty --save_path.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool, help_heading = "Output")]
    overwrite: bool,
    /// Largest weight shard, e.g. 2GB or 500MB (default: like the source model, at most 2 GiB).
    #[arg(
        long = "max_shard_size",
        alias = "max-shard-size",
        help_heading = "Output"
    )]
    max_shard_size: Option<String>,
    /// Write the run's phases, timings and memory as JSON here (for benchmarks).
    #[arg(long = "report_json", alias = "report-json", help_heading = "Output")]
    report_json: Option<PathBuf>,
    /// No progress bars.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = parse_bool, help_heading = "Output")]
    quiet: bool,
}

fn parse_patterns<T: std::str::FromStr>(
    items: &[String],
    flag: &str,
) -> Result<BTreeMap<String, T>> {
    let mut m = BTreeMap::new();
    for item in items.iter().filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .with_context(|| format!("{flag}: `{item}` is not KEY=VALUE (e.g. down_proj=64)"))?;
        let v = v
            .trim()
            .parse::<T>()
            .map_err(|_| anyhow::anyhow!("{flag}: `{v}` in `{item}` is not a number"))?;
        m.insert(k.trim().to_string(), v);
    }
    Ok(m)
}

fn sampling(s: &str) -> Result<CalibSampling> {
    Ok(match s {
        "rows" => CalibSampling::Rows,
        "windows" => CalibSampling::Windows,
        "chat" => CalibSampling::Chat,
        other => bail!("--calib_sampling `{other}`: use rows, windows or chat"),
    })
}

/// Rows, template and sampling of `--calib_dataset`.
fn calibration_source(
    args: &Args,
    hub: &Hub,
) -> Result<(Vec<serde_json::Value>, Template, CalibSampling)> {
    let path = Path::new(&args.calib_dataset);
    if path.exists() {
        let rows = read_rows(path)
            .with_context(|| format!("reading calibration data {}", path.display()))?;
        let template = Template::parse(args.calib_template.as_deref().unwrap_or("{text}"))?;
        let mode = sampling(args.calib_sampling.as_deref().unwrap_or("rows"))?;
        return Ok((rows, template, mode));
    }
    let entry: RegistryEntry = lookup(&args.calib_dataset).with_context(|| {
        format!(
            "--calib_dataset `{}` is neither a registry name nor an existing file",
            args.calib_dataset
        )
    })?;
    let rows = if args.calib_data_files.is_empty() {
        entry.load_rows_from(&entry.source().hub(hub.clone()))?
    } else {
        let mut rows = vec![];
        for f in &args.calib_data_files {
            rows.extend(read_rows(f).with_context(|| format!("reading {}", f.display()))?);
        }
        entry.filter_rows(rows)?
    };
    let template = match &args.calib_template {
        Some(t) => Template::parse(t)?,
        None => entry.template()?,
    };
    let mode = match &args.calib_sampling {
        Some(s) => sampling(s)?,
        None => entry.sampling,
    };
    Ok((rows, template, mode))
}

fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    let r = args
        .r
        .context("--r is required (the LoRA rank, e.g. --r 128)")?;
    if args.save_model && args.save_path.is_none() {
        bail!("--save_model needs --save_path DIR");
    }
    if !args.save_model && args.covariance_file.is_none() && args.cache_file.is_none() {
        bail!("nothing to write: pass --save_model --save_path DIR (and/or --covariance_file / --cache_file)");
    }
    for t in &args.target_modules {
        if !TARGET_PROJECTIONS.contains(&t.as_str()) && !t.contains('.') {
            bail!(
                "--target_modules: `{t}` is not a linear layer of Llama-family models; use {}",
                TARGET_PROJECTIONS.join(",")
            );
        }
    }
    let hub = Hub::from_env()
        .with_token(args.token.clone())
        .with_progress(!args.quiet);
    let model_dir = resolve_model(&args.model_id, &args.revision, &hub)?;
    let device = parse_device(&args.device)?;
    let dtype = match args.dtype.as_str() {
        "auto" => None,
        d => Some(parse_dtype(d)?),
    };
    // Refuse an existing output before any work.
    let out = match (&args.save_model, &args.save_path) {
        (true, Some(p)) => Some(AtomicDir::create(p, args.overwrite)?),
        _ => None,
    };
    let mut opts = PreprocessOptions::new(r);
    opts.lora_alpha = args.lora_alpha.unwrap_or(r as f64);
    opts.use_rslora = args.use_rslora;
    opts.mode = if args.first_eigen {
        CordaMode::Ipm
    } else {
        CordaMode::Kpm
    };
    opts.target_modules = args.target_modules.clone();
    opts.rank_pattern = parse_patterns(&args.rank_pattern, "--rank_pattern")?;
    opts.alpha_pattern = parse_patterns(&args.alpha_pattern, "--alpha_pattern")?;
    opts.covariance_file = args.covariance_file.clone();
    opts.cache_file = args.cache_file.clone();
    opts.dtype = dtype;
    opts.device = device;
    opts.batch_size = args.calib_batch_size.max(1);
    opts.max_shard_bytes = args.max_shard_size.as_deref().map(parse_size).transpose()?;
    opts.base_model_name = args.model_id.clone();
    opts.progress = !args.quiet;
    if args.use_float16_for_covariance {
        let cfg = corda_core::model::ModelConfig::from_dir(&model_dir)?;
        let half = match dtype.or(cfg.dtype) {
            Some(d @ (candle_core::DType::F16 | candle_core::DType::BF16)) => d,
            _ => candle_core::DType::F16,
        };
        opts.covariance_precision = CovariancePrecision::Half(half);
    }

    let reuse = |p: &Option<PathBuf>| {
        p.as_ref()
            .is_some_and(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
    };
    let samples = if reuse(&args.cache_file) || reuse(&args.covariance_file) {
        eprintln!(
            "reusing saved {}: no calibration pass",
            if reuse(&args.cache_file) {
                "decomposition"
            } else {
                "covariances"
            }
        );
        vec![]
    } else {
        let tok = TokenizerInfo::load(&model_dir)?;
        let (rows, template, mode) = calibration_source(&args, &hub)?;
        let copts = CalibOptions {
            n: args.calib_loader_size,
            max_length: args.calib_max_length,
            seed: args.seed,
            sampling: mode,
        };
        calibration_samples(&rows, &template, &tok.tokenizer, &copts)
            .context("building calibration samples")?
    };
    let tokens: usize = samples.iter().map(Vec::len).sum();
    if !samples.is_empty() {
        eprintln!(
            "calibration: {} samples, {} tokens ({})",
            samples.len(),
            tokens,
            args.calib_dataset
        );
    }
    let report = preprocess(&model_dir, &samples, &opts, out.as_ref().map(|o| o.path()))
        .with_context(|| format!("preprocessing {}", model_dir.display()))?;
    let final_path = match out {
        Some(o) => Some(o.commit()?),
        None => None,
    };

    let damps: Vec<f64> = report.modules.iter().filter_map(|m| m.damp).collect();
    eprintln!(
        "decomposed {} modules ({} mode, r {}, dtype {:?}); damping δ from {:.3} to {:.3}",
        report.modules.len(),
        opts.mode.as_str(),
        r,
        report.dtype,
        damps.iter().copied().fold(f64::INFINITY, f64::min),
        damps.iter().copied().fold(0.0, f64::max),
    );
    for m in report
        .modules
        .iter()
        .filter(|m| m.damp.is_some_and(|d| d > 0.01))
    {
        eprintln!(
            "  {}: damping δ = {} (covariance poorly conditioned; more or longer samples help)",
            m.name,
            m.damp.unwrap_or(0.0)
        );
    }
    if !report.layer_deviation.is_empty() {
        eprintln!("identity check: residual + adapter vs original layer, largest relative deviation {:.2e}", report.max_deviation());
    }
    if let Some(p) = &final_path {
        eprintln!(
            "wrote residual model {} and adapter {}",
            p.display(),
            p.join("corda_init").display()
        );
    }
    eprintln!("{}", report.phases.render());
    if let Some(j) = &args.report_json {
        let mut v = report.phases.to_json();
        v["samples"] = report.num_samples.into();
        v["tokens"] = report.num_tokens.into();
        v["wall_seconds"] = start.elapsed().as_secs_f64().into();
        v["max_deviation"] = report.max_deviation().into();
        std::fs::write(j, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", j.display()))?;
    }
    Ok(())
}

fn main() {
    corda_core::util::alloc::release_large_blocks_promptly();
    corda_core::util::cli::init_logging("warn");
    let argv = match expand_config_args(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::exit(2);
        }
    };
    let args = Args::parse_from(argv);
    if let Err(e) = run(args) {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
