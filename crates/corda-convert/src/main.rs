//! `corda-convert`: turn a trained CorDA adapter into a plain LoRA for the original base model
//! (exactly, like PEFT's `path_initial_model_for_weight_conversion`, or compressed to a rank cap),
//! optionally merge it into the base model and verify the result. The work is done by
//! `corda_core::adapter`; this binary parses flags, writes outputs atomically and reports.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;

use corda_core::adapter::{self, Adapter};
use corda_core::model::{resolve_model, TokenizerInfo};
use corda_core::util::progress_bar;

/// The probe sentence `--verify` runs through both models by default.
const DEFAULT_PROBE: &str = "The capital of France is Paris, and the capital of Germany is Berlin.";

#[derive(Debug, Parser)]
#[command(
    name = "corda-convert",
    args_override_self = true,
    version,
    about = "Convert a trained CorDA adapter into a plain LoRA for the original base model",
    long_about = "Convert a trained CorDA adapter into a plain LoRA for the original base model.\n\n\
        A CorDA adapter only works on its residual model. The conversion writes \
        lora_A' = [A ; A0] and lora_B' = [B | -B0] (rank 2r, exact, as PEFT's \
        save_pretrained(path_initial_model_for_weight_conversion=...)), or with --rank K the best \
        rank-K approximation of the update. --merge writes the fine-tuned model itself; --verify \
        compares base + converted LoRA against residual + trained adapter."
)]
struct Cli {
    /// YAML or TOML file whose keys are flag names; flags on the command line override it.
    #[arg(long, value_name = "FILE", help_heading = "Adapters")]
    config: Option<PathBuf>,

    /// The initial CorDA adapter saved by preprocessing (OUT/corda_init).
    #[arg(
        long = "initial_adapter",
        value_name = "DIR",
        help_heading = "Adapters"
    )]
    initial_adapter: PathBuf,

    /// The fine-tuned adapter (trained starting from the initial one on the residual model).
    #[arg(
        long = "trained_adapter",
        value_name = "DIR",
        help_heading = "Adapters"
    )]
    trained_adapter: PathBuf,

    /// Where to write the plain LoRA (adapter_config.json + adapter_model.safetensors).
    #[arg(long = "output_dir", value_name = "DIR", help_heading = "Output")]
    output_dir: Option<PathBuf>,

    /// Replace existing non-empty output directories.
    #[arg(long, help_heading = "Output")]
    overwrite: bool,

    /// Compress every module's update to rank K by SVD (uniform r = lora_alpha = K) instead of
    /// the exact rank-2r conversion; reports the relative error per module.
    #[arg(long, value_name = "K", help_heading = "Compression")]
    rank: Option<usize>,

    /// Also write the full fine-tuned model (base + update) as a model directory.
    #[arg(long, requires_all = ["base_model", "merged_path"], help_heading = "Merge")]
    merge: bool,

    /// The original base model: a Hugging Face model directory or a hub id (downloaded when not
    /// cached).
    #[arg(long = "base_model", value_name = "MODEL", help_heading = "Merge")]
    base_model: Option<String>,

    #[command(flatten, next_help_heading = "Merge")]
    hub: corda_cli::HubArgs,

    /// Where --merge writes the merged model.
    #[arg(long = "merged_path", value_name = "DIR", help_heading = "Merge")]
    merged_path: Option<PathBuf>,

    /// Compare base + converted LoRA with residual + trained adapter on a probe text.
    #[arg(long, requires_all = ["base_model", "residual_model"], help_heading = "Verify")]
    verify: bool,

    /// The residual model written by preprocessing (the directory holding corda_init/).
    #[arg(long = "residual_model", value_name = "DIR", help_heading = "Verify")]
    residual_model: Option<PathBuf>,

    /// The text --verify runs through both models.
    #[arg(long = "probe_text", value_name = "TEXT", default_value = DEFAULT_PROBE, help_heading = "Verify")]
    probe_text: String,

    /// Largest accepted logit difference, relative to the largest |logit|. f32 models agree to
    /// round-off; fp16/bf16 residual models differ by about one ulp of the weights.
    #[arg(
        long = "verify_tolerance",
        value_name = "REL",
        default_value_t = 1e-3,
        value_parser = corda_cli::non_negative_number,
        help_heading = "Verify"
    )]
    verify_tolerance: f64,

    /// Device for --verify: cpu, or cuda (needs a build with the `cuda` feature).
    #[arg(
        long,
        value_name = "DEVICE",
        default_value = "cpu",
        help_heading = "Verify"
    )]
    device: String,
}

fn main() -> ExitCode {
    corda_cli::handle_interrupts(corda_cli::OnInterrupt::Exit);
    corda_cli::main("warn", |cli: Cli| run(&cli))
}

fn run(cli: &Cli) -> Result<()> {
    if cli.output_dir.is_none() && !cli.merge {
        bail!("nothing to do: pass --output_dir DIR for the converted LoRA (and/or --merge --base_model M --merged_path DIR)");
    }
    if cli.verify && cli.output_dir.is_none() {
        bail!("--verify checks the converted LoRA: pass --output_dir too");
    }
    if cli.rank == Some(0) {
        bail!("--rank must be at least 1");
    }

    let initial = Adapter::load(&cli.initial_adapter).with_context(|| {
        format!(
            "loading the initial adapter {}",
            cli.initial_adapter.display()
        )
    })?;
    let trained = Adapter::load(&cli.trained_adapter).with_context(|| {
        format!(
            "loading the trained adapter {}",
            cli.trained_adapter.display()
        )
    })?;
    adapter::check_compatible(&initial, &trained)
        .context("checking that the two adapters belong together")?;
    adapter::check_same_start(
        &initial,
        &cli.initial_adapter,
        &trained,
        &cli.trained_adapter,
    )?;
    let base_dir = cli
        .base_model
        .as_deref()
        .map(|id| resolve_model(id, &cli.hub.revision, &cli.hub.hub()))
        .transpose()
        .context("resolving --base_model")?;
    if cli.base_model.is_none() && cli.hub.is_set() {
        bail!("--revision and --token are for fetching --base_model from the hub; pass --base_model too");
    }
    // Outputs must not replace or land in an input (it would destroy the adapter being
    // converted, or the model merged into).
    let mut inputs = vec![
        (cli.initial_adapter.as_path(), "--initial_adapter"),
        (cli.trained_adapter.as_path(), "--trained_adapter"),
    ];
    if let Some(b) = &base_dir {
        inputs.push((b.as_path(), "--base_model"));
    }
    if let Some(r) = &cli.residual_model {
        inputs.push((r.as_path(), "--residual_model"));
    }

    // Claim every output first, so a refusal comes before any work and nothing is half-written.
    let lora_out = match &cli.output_dir {
        Some(dir) => {
            corda_cli::ensure_apart(dir, "--output_dir", &inputs)?;
            Some(corda_cli::output_dir(dir, cli.overwrite).context("preparing --output_dir")?)
        }
        None => None,
    };
    let merged_out = match (&cli.merge, &cli.merged_path) {
        (true, Some(dir)) => {
            corda_cli::ensure_apart(dir, "--merged_path", &inputs)?;
            if let Some(lora) = &cli.output_dir {
                let split = corda_core::util::process::split_target;
                if split(lora)? == split(dir)? {
                    bail!("--merged_path and --output_dir are both {}; give them different directories", dir.display());
                }
            }
            Some(corda_cli::output_dir(dir, cli.overwrite).context("preparing --merged_path")?)
        }
        _ => None,
    };

    if let Some(out) = &lora_out {
        write_lora(cli, &initial, &trained, out)?;
    }
    if let (Some(out), Some(base)) = (&merged_out, &base_dir) {
        let pb = progress_bar(0, "merging");
        let report =
            adapter::merge_into_base(base, &initial, &trained, out.path(), |done, total| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
            })
            .with_context(|| format!("merging into {}", base.display()))?;
        pb.finish_and_clear();
        println!(
            "merged {} of {} tensors of {} ({})",
            report.merged_modules,
            report.tensors,
            base.display(),
            corda_core::model::dtype_name(report.dtype)
        );
    }
    if cli.verify {
        let (Some(out), Some(base), Some(residual)) = (&lora_out, &base_dir, &cli.residual_model)
        else {
            bail!("--verify needs --output_dir, --base_model and --residual_model");
        };
        verify(cli, out.path(), base, residual, &trained)?;
    }

    if let Some(out) = lora_out {
        let dir = out
            .commit()
            .map_err(corda_cli::overwrite_hint)
            .context("moving the converted LoRA into place")?;
        println!("wrote {}", dir.display());
    }
    if let Some(out) = merged_out {
        let dir = out
            .commit()
            .map_err(corda_cli::overwrite_hint)
            .context("moving the merged model into place")?;
        println!("wrote {}", dir.display());
    }
    Ok(())
}

/// The exact conversion, or the `--rank` compression with its error table.
fn write_lora(
    cli: &Cli,
    initial: &Adapter,
    trained: &Adapter,
    out: &corda_cli::Output,
) -> Result<()> {
    let converted = match cli.rank {
        None => {
            let lora =
                adapter::convert_to_lora(initial, trained).context("converting to a plain LoRA")?;
            println!(
                "converted {} modules exactly: r {} -> {}, lora_alpha {} -> {}",
                lora.modules.len(),
                trained.config.r,
                lora.config.r,
                trained.config.lora_alpha,
                lora.config.lora_alpha
            );
            lora
        }
        Some(k) => {
            if k >= 2 * trained.config.r && trained.config.rank_pattern.is_empty() {
                eprintln!(
                    "note: --rank {k} is at least 2r = {}; the exact conversion (without --rank) already has rank {}",
                    2 * trained.config.r,
                    2 * trained.config.r
                );
            }
            let pb = progress_bar(trained.modules.len() as u64, "compressing");
            let compressed = adapter::compress_to_rank(initial, trained, k, |_| pb.inc(1))
                .context("compressing the update")?;
            pb.finish_and_clear();
            println!(
                "{:<48} {:>12} {:>14}",
                "module", "rel. error", "sigma_K+1/sigma_1"
            );
            let mut worst: f64 = 0.0;
            for m in &compressed.report {
                let s = &m.singular_values;
                let ratio = match (s.first(), s.get(k)) {
                    (Some(&s0), Some(&sk)) if s0 > 0.0 => sk / s0,
                    _ => 0.0,
                };
                println!(
                    "{:<48} {:>12.3e} {:>14.3e}",
                    m.module, m.relative_error, ratio
                );
                worst = worst.max(m.relative_error);
            }
            println!(
                "compressed {} modules to rank {k} (lora_alpha {k}, scaling 1); largest relative Frobenius error {worst:.3e}",
                compressed.report.len()
            );
            compressed.adapter
        }
    };
    converted
        .save(out.path())
        .with_context(|| format!("writing {}", out.target().display()))?;
    Ok(())
}

/// Run the probe text through both models and compare the logits.
fn verify(
    cli: &Cli,
    converted_dir: &Path,
    base: &Path,
    residual: &Path,
    trained: &Adapter,
) -> Result<()> {
    let converted = Adapter::load(converted_dir).context("re-reading the converted LoRA")?;
    let tokenizer = TokenizerInfo::load(base).context("loading the base model's tokenizer")?;
    let ids = tokenizer.encode(&cli.probe_text)?;
    let dev = corda_cli::parse_device(&cli.device).context("--device")?;
    let report = adapter::verify_conversion(base, &converted, residual, trained, &ids, &dev)
        .context("running the verification forward passes")?;
    let rel = report.max_abs_diff / report.max_abs_logit.max(f64::MIN_POSITIVE);
    println!(
        "verify: {} probe tokens, max |logit difference| {:.3e} (largest |logit| {:.3e}, relative {:.3e})",
        report.tokens, report.max_abs_diff, report.max_abs_logit, rel
    );
    if rel > cli.verify_tolerance {
        bail!(
            "verification failed: base + converted LoRA differs from residual + trained adapter by {:.3e} (relative {rel:.3e} > --verify_tolerance {}); check that --residual_model is the model the adapter was trained on, and that --base_model is the model preprocessing started from",
            report.max_abs_diff,
            cli.verify_tolerance
        );
    }
    Ok(())
}
