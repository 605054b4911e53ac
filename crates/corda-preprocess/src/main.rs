//! `corda-preprocess`: sample calibration data, collect covariances, decompose, and write the
//! residual model plus the initial CorDA adapter (`OUT/corda_init`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use corda_cli::{key_alpha, key_rank, parse_device, parse_size, positive_count, positive_number};
use corda_core::corda::{
    preprocess, CordaMode, CovariancePrecision, PreprocessOptions, PreprocessReport, REPORT_FILE,
};
use corda_core::data::{calibration_samples, CalibOptions, CalibSampling, CalibrationSource};
use corda_core::hub::Hub;
use corda_core::layout::CORDA_INIT_DIR;
use corda_core::model::{parse_dtype, resolve_model, TokenizerInfo, TARGET_PROJECTIONS};

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
        default_value = "wikitext2",
        help_heading = "Calibration"
    )]
    calib_dataset: String,
    /// Data files to read for a registry dataset instead of its hub files.
    #[arg(long = "calib_data_files", num_args = 1.., help_heading = "Calibration")]
    calib_data_files: Vec<PathBuf>,
    /// Number of calibration samples.
    #[arg(
        long = "calib_loader_size",
        default_value_t = 256,
        value_parser = positive_count,
        help_heading = "Calibration"
    )]
    calib_loader_size: usize,
    /// Tokens per calibration sample at most.
    #[arg(
        long = "calib_max_length",
        default_value_t = 2048,
        value_parser = positive_count,
        help_heading = "Calibration"
    )]
    calib_max_length: usize,
    /// Row template for a local dataset, e.g. "{query} {response}" (default "{text}").
    #[arg(long = "calib_template", help_heading = "Calibration")]
    calib_template: Option<String>,
    /// rows (one sample per row, truncated), windows (random windows of the joined text) or chat.
    #[arg(long = "calib_sampling", help_heading = "Calibration")]
    calib_sampling: Option<CalibSampling>,
    /// Calibration samples per forward pass (padded tokens are masked out of the covariance).
    #[arg(
        long = "calib_batch_size",
        default_value_t = 1,
        value_parser = positive_count,
        help_heading = "Calibration"
    )]
    calib_batch_size: usize,
    /// Seed of the calibration sampling.
    #[arg(long, default_value_t = 233, help_heading = "Calibration")]
    seed: u64,

    /// LoRA rank (at least 1).
    #[arg(long, value_parser = positive_count, help_heading = "Adapter")]
    r: Option<usize>,
    /// LoRA alpha, a finite number above 0 (default: r, as the reference).
    #[arg(
        long = "lora_alpha",
        value_parser = positive_number,
        allow_negative_numbers = true,
        help_heading = "Adapter"
    )]
    lora_alpha: Option<f64>,
    /// Scale by alpha/sqrt(r) instead of alpha/r.
    #[arg(long = "use_rslora", help_heading = "Adapter")]
    use_rslora: bool,
    /// IPM: train the largest r components (default KPM: the smallest).
    #[arg(long = "first_eigen", help_heading = "Adapter")]
    first_eigen: bool,
    /// Comma-separated target modules.
    #[arg(
        long = "target_modules",
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help_heading = "Adapter"
    )]
    target_modules: Vec<String>,
    /// Per-module ranks, e.g. down_proj=64,q_proj=16 (a key matches modules ending with it).
    #[arg(
        long = "rank_pattern",
        value_delimiter = ',',
        value_parser = key_rank,
        help_heading = "Adapter"
    )]
    rank_pattern: Vec<(String, usize)>,
    /// Per-module alphas, same syntax as --rank_pattern.
    #[arg(
        long = "alpha_pattern",
        value_delimiter = ',',
        value_parser = key_alpha,
        help_heading = "Adapter"
    )]
    alpha_pattern: Vec<(String, f64)>,

    /// Hold the covariance sum in the model's half dtype (half the memory; overflow is detected).
    #[arg(long = "use_float16_for_covariance", help_heading = "Files")]
    use_float16_for_covariance: bool,
    /// Save covariances here, or reuse them when the file exists.
    #[arg(long = "covariance_file", help_heading = "Files")]
    covariance_file: Option<PathBuf>,
    /// Save the decomposition here, or reuse it when the file exists.
    #[arg(long = "cache_file", help_heading = "Files")]
    cache_file: Option<PathBuf>,

    /// Write the residual model and OUT/corda_init.
    #[arg(long = "save_model", help_heading = "Output")]
    save_model: bool,
    /// Output directory.
    #[arg(long = "save_path", help_heading = "Output")]
    save_path: Option<PathBuf>,
    /// Replace an existing non-empty --save_path.
    #[arg(long, help_heading = "Output")]
    overwrite: bool,
    /// Largest weight shard, e.g. 2GB or 500MB (default: like the source model, at most 2 GiB).
    #[arg(
        long = "max_shard_size",
        value_parser = parse_size,
        help_heading = "Output"
    )]
    max_shard_size: Option<u64>,
    /// Write the run's phases, timings and memory as JSON here (for benchmarks).
    #[arg(long = "report_json", help_heading = "Output")]
    report_json: Option<PathBuf>,
    /// Write adapters even when a kept singular value is (numerically) zero or a factor is all
    /// zero; by default such a module is an error, since it could never train.
    #[arg(long = "allow_degenerate_adapters", help_heading = "Output")]
    allow_degenerate_adapters: bool,
    /// No progress bars.
    #[arg(long, help_heading = "Output")]
    quiet: bool,
}

/// The per-module figures a user should see: how exact the decomposition is, and which modules'
/// selections are ill-determined by the data or degenerate.
fn print_exactness(report: &PreprocessReport) {
    if let (Some(err), Some(kept)) = (report.max_error_estimate(), report.min_relative_kept()) {
        eprintln!(
            "decomposition (float64): largest error estimate {err:.1e}; smallest kept singular value {kept:.1e} of its module's largest"
        );
    }
    let ill: Vec<_> = report.ill_determined().collect();
    if !ill.is_empty() {
        eprintln!(
            "  {} of {} modules have kept components that float32 rounding of their inputs could turn (gap at the cut tiny against σ_max); they are exact for this covariance but ill-determined by the data, e.g.:",
            ill.len(),
            report.modules.len()
        );
        for m in ill.iter().take(5) {
            let s = m.spectrum.expect("ill-determined modules have a spectrum");
            eprintln!(
                "    {}: gap at the cut {:.1e}, sensitivity {:.1e}",
                m.name,
                s.gap_at_cut.unwrap_or(f64::NAN),
                s.sensitivity
            );
        }
    }
    for m in report.modules.iter().filter(|m| m.degenerate.is_some()) {
        eprintln!(
            "  warning: {} is degenerate ({}), written because of --allow_degenerate_adapters",
            m.name,
            m.degenerate.as_deref().unwrap_or_default()
        );
    }
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
    let device = parse_device(&args.device).context("--device")?;
    let dtype = match args.dtype.as_str() {
        "auto" => None,
        d => Some(parse_dtype(d).context("--dtype")?),
    };
    // Refuse an existing output before any work.
    let out = match (&args.save_model, &args.save_path) {
        (true, Some(p)) => Some(corda_cli::output_dir(p, args.overwrite)?),
        _ => None,
    };
    // A report that cannot be written must fail now, not after the run.
    if let Some(j) = &args.report_json {
        let (dir, _) = corda_core::util::process::split_target(j)?;
        corda_core::util::atomic::create_dir_all(&dir).context("--report_json")?;
    }
    // Temporaries of cache and covariance files left by killed runs go now.
    for f in [&args.cache_file, &args.covariance_file]
        .into_iter()
        .flatten()
    {
        let (dir, name) = corda_core::util::process::split_target(f)?;
        corda_core::util::atomic::clean_leftovers(&dir, &name)?;
    }
    let mut opts = PreprocessOptions::new(r);
    opts.lora_alpha = args.lora_alpha.unwrap_or(r as f64);
    opts.use_rslora = args.use_rslora;
    opts.mode = if args.first_eigen {
        CordaMode::Ipm
    } else {
        CordaMode::Kpm
    };
    opts.target_modules = args.target_modules.clone();
    // A later KEY=VALUE for the same key wins.
    opts.rank_pattern = args.rank_pattern.iter().cloned().collect();
    opts.alpha_pattern = args.alpha_pattern.iter().cloned().collect();
    opts.covariance_file = args.covariance_file.clone();
    opts.cache_file = args.cache_file.clone();
    opts.dtype = dtype;
    opts.device = device;
    opts.batch_size = args.calib_batch_size;
    opts.max_shard_bytes = args.max_shard_size;
    opts.base_model_name = args.model_id.clone();
    opts.progress = !args.quiet;
    opts.allow_degenerate_adapters = args.allow_degenerate_adapters;
    if args.use_float16_for_covariance {
        opts.covariance_precision = CovariancePrecision::ModelHalf;
    }

    let samples = if let Some(what) = opts.reuses() {
        eprintln!("reusing saved {what}: no calibration pass");
        vec![]
    } else {
        let tok = TokenizerInfo::load(&model_dir)?;
        let source = CalibrationSource {
            dataset: args.calib_dataset.clone(),
            data_files: args.calib_data_files.clone(),
            template: args.calib_template.clone(),
            sampling: args.calib_sampling,
        };
        let calib = source.load_with(&hub).context("--calib_dataset")?;
        let copts = CalibOptions {
            n: args.calib_loader_size,
            max_length: args.calib_max_length,
            seed: args.seed,
            sampling: calib.sampling,
        };
        calibration_samples(&calib.rows, &calib.template, &tok.tokenizer, &copts)
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
        Some(o) => Some(o.commit().map_err(corda_cli::overwrite_hint)?),
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
    let damped: Vec<_> = report
        .modules
        .iter()
        .filter(|m| m.damp.is_some_and(|d| d > 0.01))
        .collect();
    if !damped.is_empty() {
        eprintln!(
            "  {} modules needed δ > 0.01 (covariance poorly conditioned; more or longer samples help), e.g.:",
            damped.len()
        );
    }
    for m in damped.iter().take(5) {
        eprintln!("    {}: δ = {}", m.name, m.damp.unwrap_or(0.0));
    }
    if !report.layer_deviation.is_empty() {
        eprintln!("identity check: residual + adapter vs original layer, largest relative deviation {:.2e}", report.max_deviation());
    }
    print_exactness(&report);
    if let Some(p) = &final_path {
        eprintln!(
            "wrote residual model {} and adapter {} (per-module report: {})",
            p.display(),
            p.join(CORDA_INIT_DIR).display(),
            p.join(CORDA_INIT_DIR).join(REPORT_FILE).display()
        );
    }
    eprintln!("{}", report.phases.render());
    if let Some(j) = &args.report_json {
        let mut v = report.phases.to_json();
        v["samples"] = report.num_samples.into();
        v["tokens"] = report.num_tokens.into();
        v["wall_seconds"] = start.elapsed().as_secs_f64().into();
        v["max_deviation"] = report.max_deviation().into();
        v["decomposition"] = report.to_json();
        corda_core::util::atomic::write_file_atomic(
            j,
            serde_json::to_string_pretty(&v)?.as_bytes(),
        )
        .context("writing --report_json")?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    corda_core::util::alloc::release_large_blocks_promptly();
    corda_cli::handle_interrupts(corda_cli::OnInterrupt::Exit);
    corda_cli::main("warn", run)
}
