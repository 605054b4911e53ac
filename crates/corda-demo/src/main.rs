//! `corda-demo`: write a random Llama model and synthetic datasets, so the quickstart, the
//! tests and the benchmarks run without a download.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use corda_cli::parse_size;
use corda_core::model::parse_dtype;
use corda_demo::{write_datasets, write_random_model, ConfigStyle, DemoDataSpec, DemoModelSpec};

/// Write a random Llama-family model and demo datasets (no download).
///
/// OUT/model/ is a Hugging Face model directory (config.json, safetensors weights, a word-level
/// tokenizer.json, generation_config.json) initialised like a fresh transformers model.
/// OUT/data/ holds qa.{jsonl,parquet} (question, answer: the shape of nq_open, for KPM
/// calibration) and math.{jsonl,parquet} (query, response: the shape of MetaMathQA, for IPM
/// calibration and fine-tuning). The same seed always writes the same bytes.
#[derive(Parser, Debug)]
#[command(
    name = "corda-demo",
    version,
    about,
    long_about,
    args_override_self = true
)]
struct Args {
    /// YAML or TOML file whose keys are flag names; flags on the command line override it.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    config: Option<PathBuf>,
    /// Output directory: the model goes to OUT/model, the datasets to OUT/data.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "demo",
        help_heading = "Output"
    )]
    out: PathBuf,
    /// Replace existing non-empty OUT/model and OUT/data.
    #[arg(long, help_heading = "Output")]
    overwrite: bool,
    /// Write only the datasets.
    #[arg(long = "skip_model", help_heading = "Output")]
    skip_model: bool,
    /// Write only the model (e.g. a large benchmark shape).
    #[arg(long = "skip_data", help_heading = "Output")]
    skip_data: bool,
    /// Seed of the weights and of the datasets.
    #[arg(long, default_value_t = 42, help_heading = "Output")]
    seed: u64,

    /// Decoder layers.
    #[arg(long, default_value_t = 4, help_heading = "Model")]
    layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 128, help_heading = "Model")]
    hidden: usize,
    /// MLP intermediate size.
    #[arg(long, default_value_t = 352, help_heading = "Model")]
    intermediate: usize,
    /// Attention heads (must divide --hidden).
    #[arg(long, default_value_t = 4, help_heading = "Model")]
    heads: usize,
    /// Key/value heads (must divide --heads; fewer than --heads is grouped-query attention).
    #[arg(long = "kv_heads", default_value_t = 2, help_heading = "Model")]
    kv_heads: usize,
    /// Embedding rows (default: the demo tokenizer's vocabulary; e.g. 32000 for Llama-2-sized LM-head costs).
    #[arg(long = "vocab_size", help_heading = "Model")]
    vocab_size: Option<usize>,
    /// Storage dtype: float32, float16 or bfloat16.
    #[arg(long, default_value = "float32", help_heading = "Model")]
    dtype: String,
    /// Share the embedding with the LM head (no lm_head.weight).
    #[arg(long = "tie_word_embeddings", help_heading = "Model")]
    tie_word_embeddings: bool,
    /// config.json layout: v4 (torch_dtype, rope_theta) or v5 (dtype, rope_parameters).
    #[arg(long = "config_style", default_value = "v4", help_heading = "Model")]
    config_style: ConfigStyle,
    /// Standard deviation of the random linear and embedding weights (transformers' default: 0.02).
    #[arg(
        long = "initializer_range",
        default_value_t = 0.02,
        help_heading = "Model"
    )]
    initializer_range: f32,
    /// Largest weight shard, e.g. 2GB, 500MB or a byte count; bigger models are sharded with an index.
    #[arg(
        long = "max_shard_size",
        default_value = "2GB",
        value_parser = parse_size,
        help_heading = "Model"
    )]
    max_shard_size: u64,

    /// Rows of each dataset.
    #[arg(long, default_value_t = 512, help_heading = "Data")]
    rows: usize,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn list_files(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    Ok(names.join(", "))
}

fn run(args: Args) -> Result<()> {
    if args.skip_model && args.skip_data {
        anyhow::bail!("--skip_model and --skip_data together write nothing; drop one of them");
    }
    let spec = DemoModelSpec {
        hidden_size: args.hidden,
        intermediate_size: args.intermediate,
        num_layers: args.layers,
        num_heads: args.heads,
        num_kv_heads: args.kv_heads,
        vocab_size: args.vocab_size,
        dtype: parse_dtype(&args.dtype)?,
        seed: args.seed,
        max_shard_bytes: Some(args.max_shard_size),
        config_style: args.config_style,
        tie_word_embeddings: args.tie_word_embeddings,
        initializer_range: args.initializer_range,
    };
    spec.validate()?;
    // Refuse existing outputs before writing anything.
    let model_out = (!args.skip_model)
        .then(|| corda_cli::output_dir(&args.out.join("model"), args.overwrite))
        .transpose()?;
    let data_out = (!args.skip_data)
        .then(|| corda_cli::output_dir(&args.out.join("data"), args.overwrite))
        .transpose()?;

    if let Some(out) = model_out {
        let start = Instant::now();
        let s = write_random_model(out.path(), &spec)?;
        let dir = out.commit().map_err(corda_cli::overwrite_hint)?;
        println!(
            "model: {} (llama, {} layers, hidden {}, intermediate {}, heads {}/{} kv, vocab {}, {}, {:.2}M parameters, {:.1} MiB in {} weight file{}, {:.2} s)",
            dir.display(),
            spec.num_layers,
            spec.hidden_size,
            spec.intermediate_size,
            spec.num_heads,
            spec.num_kv_heads,
            s.vocab_size,
            args.dtype,
            s.num_parameters as f64 / 1e6,
            mib(s.weight_bytes),
            s.num_shards,
            if s.num_shards == 1 { "" } else { "s" },
            start.elapsed().as_secs_f64(),
        );
        println!("       files: {}", list_files(&dir)?);
    }
    if let Some(out) = data_out {
        write_datasets(
            out.path(),
            &DemoDataSpec {
                rows: args.rows,
                seed: args.seed,
            },
        )?;
        let dir = out.commit().map_err(corda_cli::overwrite_hint)?;
        println!("data:  {} ({} rows each)", dir.display(), args.rows);
        println!("       qa.jsonl, qa.parquet: question, answer (nq_open shape; KPM calibration)");
        println!("       math.jsonl, math.parquet: query, response (MetaMathQA shape; IPM calibration, fine-tuning)");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    corda_cli::handle_interrupts(corda_cli::OnInterrupt::Exit);
    corda_cli::main("warn", run)
}
