//! `corda-preprocess`: sample calibration data, collect covariances, decompose, and write the
//! residual model plus the initial CorDA adapter (`OUT/corda_init`). `--init pissa|milora`
//! writes the PiSSA / MiLoRA baselines in the same layout, from the weights alone.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use corda_cli::{
    key_alpha, key_rank, parse_device, parse_size, positive_count, positive_number, HubArgs,
};
use corda_core::adapter::Adapter;
use corda_core::corda::plan::Plan;
use corda_core::corda::{
    preprocess, CordaMode, CovariancePrecision, InitMethod, PreprocessOptions, PreprocessReport,
    REPORT_FILE,
};
use corda_core::data::{calibration_samples, CalibOptions, CalibSampling, CalibrationSource};
use corda_core::eval::{
    default_seq_len, verify_perplexity, EvalSource, PerplexityCheck, VerifyPplOptions,
};
use corda_core::hub::Hub;
use corda_core::layout::CORDA_INIT_DIR;
use corda_core::model::{
    parse_dtype, resolve_model, ModelConfig, TokenizerInfo, TARGET_PROJECTIONS,
};

/// Build a CorDA adapter: covariance-oriented SVD of every target linear layer.
///
/// KPM (default) trains the r smallest components and freezes the principal ones
/// (knowledge-preserved); IPM (--first_eigen) trains the r largest (instruction-previewed).
/// --init pissa|milora writes the PiSSA / MiLoRA baselines instead (SVD of W, no calibration).
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
    #[command(flatten, next_help_heading = "Input")]
    hub: HubArgs,
    /// Storage and output dtype: auto (the model's), float32, float16, bfloat16.
    #[arg(long, default_value = "auto", help_heading = "Input")]
    dtype: String,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu", help_heading = "Input")]
    device: String,

    /// Registry name (nqopen, trivia_qa, wikitext2, ptb, c4, MetaMATH, codefeedback, WizLMinstruct, alpaca) or a local .parquet/.jsonl/.json file or directory [default: wikitext2].
    #[arg(long = "calib_dataset", help_heading = "Calibration")]
    calib_dataset: Option<String>,
    /// Data files to read for a registry dataset instead of its hub files.
    #[arg(long = "calib_data_files", num_args = 1.., help_heading = "Calibration")]
    calib_data_files: Vec<PathBuf>,
    /// Number of calibration samples [default: 256].
    #[arg(
        long = "calib_loader_size",
        value_parser = positive_count,
        help_heading = "Calibration"
    )]
    calib_loader_size: Option<usize>,
    /// Tokens per calibration sample at most [default: 2048].
    #[arg(
        long = "calib_max_length",
        value_parser = positive_count,
        help_heading = "Calibration"
    )]
    calib_max_length: Option<usize>,
    /// Row template for a local dataset, e.g. "{query} {response}" (default "{text}").
    #[arg(long = "calib_template", help_heading = "Calibration")]
    calib_template: Option<String>,
    /// rows (one sample per row, truncated), windows (random windows of the joined text) or chat.
    #[arg(long = "calib_sampling", help_heading = "Calibration")]
    calib_sampling: Option<CalibSampling>,
    /// Calibration samples per forward pass (padded tokens are masked out of the covariance) [default: 1].
    #[arg(
        long = "calib_batch_size",
        value_parser = positive_count,
        help_heading = "Calibration"
    )]
    calib_batch_size: Option<usize>,
    /// Seed of the calibration sampling [default: 233].
    #[arg(long, help_heading = "Calibration")]
    seed: Option<u64>,

    /// corda, or a baseline from the weights alone: pissa (PEFT's init_lora_weights="pissa", the r largest singular components of W) or milora (the r smallest). The baselines take no calibration flags.
    #[arg(long, default_value = "corda", value_parser = parse_init, help_heading = "Adapter")]
    init: InitName,

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
    /// CorDA IPM: train the largest r components (default KPM: the smallest).
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
    /// Save covariances here, or reuse them when the file exists (made from the same model and calibration data, else refused).
    #[arg(long = "covariance_file", help_heading = "Files")]
    covariance_file: Option<PathBuf>,
    /// Save the decomposition here, or reuse it when the file exists (made from the same model and calibration data, else refused).
    #[arg(long = "cache_file", help_heading = "Files")]
    cache_file: Option<PathBuf>,
    /// Reuse a --covariance_file / --cache_file that has no corda provenance (e.g. PEFT's covariances converted to safetensors) without checking it against the model and calibration data.
    #[arg(long = "allow_unchecked_files", help_heading = "Files")]
    allow_unchecked_files: bool,

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

    /// After preprocessing, compare the perplexity of the original model with that of the
    /// residual model + corda_init on a few windows of this text (wikitext2, ptb, c4, a text
    /// file or a hub dataset id; the reference's check for --use_float16_for_covariance). The
    /// result is printed and added to corda_report.json; a difference above
    /// --verify_ppl_tolerance warns. Needs --save_model.
    #[arg(long = "verify_ppl", value_name = "DATASET", help_heading = "Verify")]
    verify_ppl: Option<String>,
    /// Windows scored by --verify_ppl.
    #[arg(long = "verify_ppl_windows", default_value_t = 4, value_parser = positive_count,
          help_heading = "Verify")]
    verify_ppl_windows: usize,
    /// Window length of --verify_ppl in tokens [default: 2048, or the model's maximum if smaller].
    #[arg(long = "verify_ppl_seq_len", value_parser = positive_count, help_heading = "Verify")]
    verify_ppl_seq_len: Option<usize>,
    /// Relative perplexity difference above which --verify_ppl warns.
    #[arg(long = "verify_ppl_tolerance", default_value_t = corda_core::eval::verify::DEFAULT_TOLERANCE,
          value_parser = positive_number, help_heading = "Verify")]
    verify_ppl_tolerance: f64,
}

/// The --verify_ppl text as token ids, read before any work so a bad dataset fails early.
fn verify_ppl_ids(args: &Args, model_dir: &std::path::Path, hub: &Hub) -> Result<Option<Vec<u32>>> {
    let Some(dataset) = &args.verify_ppl else {
        return Ok(None);
    };
    if !args.save_model {
        bail!("--verify_ppl compares the written residual model + adapter with the original; add --save_model --save_path DIR");
    }
    let text = EvalSource::new(dataset, hub.clone())
        .and_then(|s| s.load_text())
        .context("--verify_ppl")?;
    let ids = TokenizerInfo::load(model_dir)?.encode(&text)?;
    Ok(Some(ids))
}

/// Run --verify_ppl on the written output (before it is committed) and report.
fn verify_ppl(
    args: &Args,
    ids: &[u32],
    model_dir: &std::path::Path,
    out_dir: &std::path::Path,
    device: &candle_core::Device,
) -> Result<PerplexityCheck> {
    let adapter_dir = out_dir.join(CORDA_INIT_DIR);
    let adapter = Adapter::load(&adapter_dir)?;
    let opts = VerifyPplOptions {
        dataset: args.verify_ppl.clone().unwrap_or_default(),
        seq_len: match args.verify_ppl_seq_len {
            Some(s) => s,
            None => default_seq_len(model_dir)?,
        },
        max_windows: args.verify_ppl_windows,
        tolerance: args.verify_ppl_tolerance,
        device: device.clone(),
        progress: !args.quiet,
    };
    let check =
        verify_perplexity(model_dir, out_dir, &adapter, ids, &opts).context("--verify_ppl")?;
    check.add_to_report(&adapter_dir)?;
    eprintln!(
        "perplexity check ({}, {} windows of {} tokens): original {:.4}, residual + corda_init {:.4} (relative difference {:.1e})",
        check.dataset, check.windows, check.seq_len, check.original, check.with_adapter, check.relative_difference
    );
    if !check.within_tolerance() {
        eprintln!(
            "  warning: the perplexities differ by more than {:.1e}: the residual model + adapter does not reproduce the original; check the storage dtype (--dtype float32) and try without --use_float16_for_covariance",
            check.tolerance
        );
    }
    Ok(check)
}

/// The `--init` value; CorDA's mode comes from `--first_eigen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InitName {
    Corda,
    Pissa,
    Milora,
}

/// `corda`, `pissa` or `milora`. PEFT's `pissa_niter_K` (a randomized low-rank SVD, K subspace
/// iterations) is refused rather than silently run as the exact SVD.
fn parse_init(s: &str) -> std::result::Result<InitName, String> {
    match s.to_ascii_lowercase().as_str() {
        "corda" => Ok(InitName::Corda),
        "pissa" => Ok(InitName::Pissa),
        "milora" => Ok(InitName::Milora),
        v if v.starts_with("pissa_niter_") => Err(format!(
            "`{s}` (PEFT's fast randomized SVD) is not implemented; use --init pissa, the exact SVD (in float64) that pissa_niter_K approximates"
        )),
        _ => Err(format!("`{s}` is not an init method; use corda, pissa or milora")),
    }
}

/// The calibration and covariance flags given (on the command line or in --config); the
/// baselines refuse them, since they would change nothing.
fn calibration_flags_given(args: &Args) -> Vec<&'static str> {
    [
        (args.calib_dataset.is_some(), "--calib_dataset"),
        (!args.calib_data_files.is_empty(), "--calib_data_files"),
        (args.calib_loader_size.is_some(), "--calib_loader_size"),
        (args.calib_max_length.is_some(), "--calib_max_length"),
        (args.calib_template.is_some(), "--calib_template"),
        (args.calib_sampling.is_some(), "--calib_sampling"),
        (args.calib_batch_size.is_some(), "--calib_batch_size"),
        (args.seed.is_some(), "--seed"),
        (args.first_eigen, "--first_eigen"),
        (
            args.use_float16_for_covariance,
            "--use_float16_for_covariance",
        ),
        (args.covariance_file.is_some(), "--covariance_file"),
        (args.cache_file.is_some(), "--cache_file"),
        (args.allow_unchecked_files, "--allow_unchecked_files"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect()
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
        let what = if report.init.needs_calibration() {
            "this covariance but ill-determined by the data"
        } else {
            "these weights but ill-determined by their float32 rounding"
        };
        eprintln!(
            "  {} of {} modules have kept components that float32 rounding of their inputs could turn (gap at the cut tiny against σ_max); they are exact for {what}, e.g.:",
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
    let init = match args.init {
        InitName::Corda if args.first_eigen => InitMethod::Corda(CordaMode::Ipm),
        InitName::Corda => InitMethod::Corda(CordaMode::Kpm),
        InitName::Pissa => InitMethod::Pissa,
        InitName::Milora => InitMethod::Milora,
    };
    if !init.needs_calibration() {
        let given = calibration_flags_given(&args);
        if !given.is_empty() {
            bail!(
                "--init {} decomposes the weights alone (no calibration data, no covariance) and would ignore {}; drop {} (from the command line or --config), or use --init corda",
                init.as_str(),
                given.join(", "),
                if given.len() == 1 { "it" } else { "them" }
            );
        }
        if !args.save_model {
            bail!("nothing to write: pass --save_model --save_path DIR");
        }
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
    let hub = args.hub.hub().with_progress(!args.quiet);
    let model_dir = resolve_model(&args.model_id, &args.hub.revision, &hub)?;
    let device = parse_device(&args.device).context("--device")?;
    let ppl_ids = verify_ppl_ids(&args, &model_dir, &hub)?;
    let dtype = match args.dtype.as_str() {
        "auto" => None,
        d => Some(parse_dtype(d).context("--dtype")?),
    };
    // Outputs must not replace or land in the input model.
    let input = [(model_dir.as_path(), "--model_id")];
    for (path, flag) in [
        (
            args.save_path.as_ref().filter(|_| args.save_model),
            "--save_path",
        ),
        (args.cache_file.as_ref(), "--cache_file"),
        (args.covariance_file.as_ref(), "--covariance_file"),
        (args.report_json.as_ref(), "--report_json"),
    ] {
        if let Some(p) = path {
            corda_cli::ensure_apart(p, flag, &input)?;
        }
    }
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
    opts.init = init;
    opts.target_modules = args.target_modules.clone();
    // A later KEY=VALUE for the same key wins.
    opts.rank_pattern = args.rank_pattern.iter().cloned().collect();
    opts.alpha_pattern = args.alpha_pattern.iter().cloned().collect();
    opts.covariance_file = args.covariance_file.clone();
    opts.cache_file = args.cache_file.clone();
    opts.dtype = dtype;
    opts.device = device.clone();
    opts.batch_size = args.calib_batch_size.unwrap_or(1);
    opts.max_shard_bytes = args.max_shard_size;
    opts.base_model_name = args.model_id.clone();
    opts.progress = !args.quiet;
    opts.allow_degenerate_adapters = args.allow_degenerate_adapters;
    opts.allow_unchecked_files = args.allow_unchecked_files;
    if args.use_float16_for_covariance {
        opts.covariance_precision = CovariancePrecision::ModelHalf;
    }

    // Targets and ranks against the model's shapes (config.json), before the calibration data
    // is read: `--r 100000` must not wait for it.
    let cfg = ModelConfig::from_dir(&model_dir)
        .with_context(|| format!("preprocessing {}", model_dir.display()))?;
    Plan::new(&cfg, &opts.adapter_config()).context("--r / --rank_pattern / --target_modules")?;
    let calib_dataset = args.calib_dataset.as_deref().unwrap_or("wikitext2");
    // A reused covariance file or cache is checked against the samples this run would
    // calibrate on, so they are built in every CorDA run (tokenizing is cheap next to a pass).
    let samples = if !init.needs_calibration() {
        vec![]
    } else {
        let tok = TokenizerInfo::load(&model_dir)?;
        let source = CalibrationSource {
            dataset: calib_dataset.to_string(),
            data_files: args.calib_data_files.clone(),
            template: args.calib_template.clone(),
            sampling: args.calib_sampling,
        };
        let calib = source.load_with(&hub).context("--calib_dataset")?;
        let copts = CalibOptions {
            n: args.calib_loader_size.unwrap_or(256),
            max_length: args.calib_max_length.unwrap_or(2048),
            seed: args.seed.unwrap_or(233),
            sampling: calib.sampling,
        };
        let mut dataset = calib_dataset.to_string();
        for f in &args.calib_data_files {
            dataset.push_str(&format!(" + {}", f.display()));
        }
        opts.calibration_settings = [
            ("--calib_dataset", dataset),
            ("--calib_template", calib.template.as_str().to_string()),
            (
                "--calib_sampling",
                format!("{:?}", copts.sampling).to_lowercase(),
            ),
            ("--calib_loader_size", copts.n.to_string()),
            ("--calib_max_length", copts.max_length.to_string()),
            ("--seed", copts.seed.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        calibration_samples(&calib.rows, &calib.template, &tok.tokenizer, &copts)
            .context("building calibration samples")?
    };
    let tokens: usize = samples.iter().map(Vec::len).sum();
    let reuses = opts.reuses();
    if reuses.is_none() && !samples.is_empty() {
        eprintln!(
            "calibration: {} samples, {} tokens ({})",
            samples.len(),
            tokens,
            calib_dataset
        );
    }
    let report = preprocess(&model_dir, &samples, &opts, out.as_ref().map(|o| o.path()))
        .with_context(|| format!("preprocessing {}", model_dir.display()))?;
    if let Some(what) = reuses {
        eprintln!(
            "reused the saved {what}: no calibration pass (its provenance matches this model and these {} calibration samples)",
            samples.len()
        );
    }
    let ppl_check = match (&ppl_ids, &out) {
        (Some(ids), Some(o)) => Some(verify_ppl(&args, ids, &model_dir, o.path(), &device)?),
        _ => None,
    };
    let final_path = match out {
        Some(o) => Some(o.commit().map_err(corda_cli::overwrite_hint)?),
        None => None,
    };

    let damps: Vec<f64> = report.modules.iter().filter_map(|m| m.damp).collect();
    let method = match init.corda_mode() {
        Some(mode) => format!("{} mode", mode.as_str()),
        None => init.label(),
    };
    eprint!(
        "decomposed {} modules ({method}, r {}, dtype {:?})",
        report.modules.len(),
        r,
        report.dtype,
    );
    if damps.is_empty() {
        eprintln!();
    } else {
        eprintln!(
            "; damping δ from {:.3} to {:.3}",
            damps.iter().copied().fold(f64::INFINITY, f64::min),
            damps.iter().copied().fold(0.0, f64::max),
        );
    }
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
    eprintln!(
        "identity check: residual + s·B·A vs W, largest deviation {:.2e} of max|W|",
        report.max_weight_deviation()
    );
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
        if let Some(c) = &ppl_check {
            v["verify_ppl"] = serde_json::to_value(c)?;
        }
        corda_core::util::atomic::write_file_atomic(
            j,
            serde_json::to_string_pretty(&v)?.as_bytes(),
        )
        .context("writing --report_json")?;
    }
    Ok(())
}

#[global_allocator]
static ALLOC: corda_core::util::alloc::HugePageAlloc = corda_core::util::alloc::HugePageAlloc;

fn main() -> std::process::ExitCode {
    corda_core::util::alloc::release_large_blocks_promptly();
    corda_cli::handle_interrupts(corda_cli::OnInterrupt::Exit);
    corda_cli::main("warn", run)
}
