//! `corda-eval`: measure what CorDA is for. Perplexity of a text (the reference's check before
//! and after preprocessing), open-domain QA exact match (knowledge kept) and GSM8K / MATH
//! accuracy (task learned), for a model alone or with adapters, compared on identical windows
//! and prompts. The work happens in `corda_core::eval`; this file parses flags and reports.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Parser;
use corda_cli::{parse_device, positive_count, HubArgs};
use corda_core::eval::{subjects, EvalResults, EvalSource, EvalSpec, Task};

#[derive(Debug, Parser)]
#[command(
    name = "corda-eval",
    args_override_self = true,
    version,
    about = "Evaluate models and adapters: perplexity, NQ-open / TriviaQA exact match, GSM8K / MATH accuracy",
    long_about = "Evaluate a model, alone or with adapters, the way the CorDA paper reports it: \
perplexity of a test text (--task ppl: the split joined, non-overlapping windows of --seq_len, mean \
token NLL), open-domain QA (--task nqopen|trivia_qa: few-shot \"Q: ... A:\" prompts, greedy answers \
cut at a newline, SQuAD-normalised exact match against any alias) and math (--task gsm8k|math: the \
Alpaca prompt corda-finetune trains with, greedy solutions, the final answer extracted from \"The \
answer is: N\", \"#### N\", \\boxed{} or the last number).\n\nEach --adapter is evaluated on \
--model_name_or_path (the residual model for OUT/corda_init or a fine-tuned FT/ft; the original model \
for a converted LoRA), each --compare_model alone (e.g. a merged model); all on identical prompts. \
Results print as a table; --output writes them as JSON, and a bar chart (SVG) is written beside it \
when more than one model is compared.",
    after_help = "Examples:\n  corda-eval --model_name_or_path meta-llama/Llama-2-7b-hf --task ppl --dataset wikitext2\n  \
corda-eval --model_name_or_path OUT --adapter OUT/corda_init --adapter FT/ft --task nqopen \\\n    \
--limit 500 --batch_size 8 --output results/nqopen.json\n  \
corda-eval --model_name_or_path meta-llama/Llama-2-7b-hf --adapter LORA --task gsm8k --dtype bf16"
)]
struct Args {
    /// YAML or TOML file whose keys are flag names; flags on the command line override it.
    #[arg(long, value_name = "FILE", help_heading = "Model")]
    #[allow(dead_code)]
    config: Option<PathBuf>,

    /// The model: a Hugging Face model directory, a hub id (cached, else downloaded) or a
    /// .gguf file. The adapters are attached to it.
    #[arg(long = "model_name_or_path", help_heading = "Model")]
    model_name_or_path: String,

    #[command(flatten, next_help_heading = "Model")]
    hub: HubArgs,

    /// A PEFT adapter directory to evaluate on the model (repeatable: each is evaluated on its
    /// own, on the same prompts).
    #[arg(long, value_name = "DIR", action = clap::ArgAction::Append, help_heading = "Model")]
    adapter: Vec<PathBuf>,

    /// Also evaluate the model without adapter (it always is when there is no --adapter and no
    /// --compare_model).
    #[arg(long = "eval_base", help_heading = "Model")]
    eval_base: bool,

    /// Another model to evaluate alone (repeatable), e.g. a merged model beside the base.
    #[arg(long = "compare_model", value_name = "MODEL", action = clap::ArgAction::Append,
          help_heading = "Model")]
    compare_model: Vec<String>,

    /// Where tokenizer.json is, when the model directory has none [default: the model directory,
    /// then the first adapter's base_model_name_or_path].
    #[arg(long = "tokenizer_name_or_path", help_heading = "Model")]
    tokenizer_name_or_path: Option<String>,

    /// Storage dtype of the model weights: f32 or bf16 (adapters and activations are float32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "float32", "bf16", "bfloat16"],
          help_heading = "Model")]
    dtype: String,

    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", help_heading = "Model")]
    device: String,

    // ---------------------------------------------------------------- task
    /// ppl (perplexity), nqopen, trivia_qa (exact match), gsm8k or math (accuracy).
    #[arg(long, help_heading = "Task")]
    task: String,

    /// The data: a built-in name (wikitext2, ptb, c4 for ppl; nqopen, trivia_qa, gsm8k, math),
    /// a local .jsonl/.json/.parquet/.txt file or directory, or a hub dataset id [default: the
    /// task's own dataset; ppl needs one].
    #[arg(long, help_heading = "Task")]
    dataset: Option<String>,

    /// Split and slice of the data, as in `datasets` (test, validation[:500]) [default: the
    /// built-in dataset's, else train (a single file)].
    #[arg(long, help_heading = "Task")]
    split: Option<String>,

    /// Text column of a ppl dataset that is not built in [default: text; a .txt file is read
    /// whole].
    #[arg(long = "text_field", help_heading = "Task")]
    text_field: Option<String>,

    /// Question column of a QA/math dataset that is not built in [default: question].
    #[arg(long = "question_field", help_heading = "Task")]
    question_field: Option<String>,

    /// Gold answer column (a list is a set of aliases) [default: answer].
    #[arg(long = "answer_field", help_heading = "Task")]
    answer_field: Option<String>,

    /// Perplexity window in tokens [default: 2048, or the model's maximum if smaller].
    #[arg(long = "seq_len", value_parser = positive_count, help_heading = "Task")]
    seq_len: Option<usize>,

    /// Evaluate at most N windows (ppl) or questions.
    #[arg(long, value_name = "N", value_parser = positive_count, help_heading = "Task")]
    limit: Option<usize>,

    /// Few-shot examples in QA prompts, from the dataset's train split (a file: its first rows,
    /// which are then not evaluated) [default: 5 for QA, 0 for math].
    #[arg(long = "num_fewshot", help_heading = "Task")]
    num_fewshot: Option<usize>,

    /// Most tokens generated per question [default: 32 for QA, 512 for math].
    #[arg(long = "max_new_tokens", value_parser = positive_count, help_heading = "Task")]
    max_new_tokens: Option<usize>,

    /// Windows or prompts per forward (prompts are left-padded together).
    #[arg(long = "batch_size", default_value_t = 1, value_parser = positive_count,
          help_heading = "Task")]
    batch_size: usize,

    // ---------------------------------------------------------------- output
    /// Write the results (scores, settings, per-window NLL or per-question generations) as JSON.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    output: Option<PathBuf>,

    /// Write the bar chart comparing the models here [default: beside --output as .svg, when
    /// more than one model is compared].
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    chart: Option<PathBuf>,

    /// Results of earlier runs (their --output) to include in the table, JSON and chart
    /// (repeatable), e.g. to put QA and math scores of several runs side by side.
    #[arg(long = "compare_with", value_name = "FILE", action = clap::ArgAction::Append,
          help_heading = "Output")]
    compare_with: Vec<PathBuf>,
}

fn main() -> ExitCode {
    corda_cli::main("warn", |a: Args| run(&a))
}

fn spec(a: &Args) -> Result<EvalSpec> {
    let task: Task = a.task.parse().context("--task")?;
    let hub = a.hub.hub();
    let dataset = match (&a.dataset, task.default_dataset()) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => d.to_string(),
        (None, None) => {
            bail!("--task ppl needs --dataset: wikitext2, ptb, c4, a text file or a hub dataset id")
        }
    };
    let mut source = EvalSource::new(&dataset, hub.clone()).context("--dataset")?;
    source.split.clone_from(&a.split);
    source.text_field.clone_from(&a.text_field);
    source.question_field.clone_from(&a.question_field);
    source.answer_field.clone_from(&a.answer_field);
    if task == Task::Perplexity && (a.question_field.is_some() || a.answer_field.is_some()) {
        bail!("--question_field and --answer_field apply to QA and math tasks; ppl reads --text_field");
    }
    if task != Task::Perplexity && (a.text_field.is_some() || a.seq_len.is_some()) {
        bail!("--text_field and --seq_len apply to --task ppl");
    }
    if task == Task::Perplexity && (a.num_fewshot.is_some() || a.max_new_tokens.is_some()) {
        bail!("--num_fewshot and --max_new_tokens apply to generation tasks, not ppl");
    }
    for adapter in &a.adapter {
        if !adapter.join("adapter_config.json").is_file() {
            bail!(
                "--adapter {}: no adapter_config.json there; pass a PEFT adapter directory (e.g. OUT/corda_init, FT/ft or a converted LoRA)",
                adapter.display()
            );
        }
    }
    let dtype = match a.dtype.as_str() {
        "bf16" | "bfloat16" => DType::BF16,
        _ => DType::F32,
    };
    Ok(EvalSpec {
        subjects: subjects(
            &a.model_name_or_path,
            &a.adapter,
            a.eval_base,
            &a.compare_model,
        ),
        revision: a.hub.revision.clone(),
        hub,
        tokenizer: a.tokenizer_name_or_path.clone(),
        task,
        source,
        seq_len: a.seq_len,
        limit: a.limit,
        num_fewshot: a.num_fewshot,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        dtype,
        device: parse_device(&a.device).context("--device")?,
    })
}

/// The chart's path: the flag, else beside the JSON output.
fn chart_path(a: &Args) -> Option<PathBuf> {
    a.chart
        .clone()
        .or_else(|| a.output.as_ref().map(|o| o.with_extension("svg")))
}

fn ensure_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Before any evaluation: the result files must not replace or land in a model or adapter
/// being evaluated, be a directory, or be one file for both the JSON and the chart.
fn check_outputs(a: &Args) -> Result<()> {
    let mut inputs: Vec<(&Path, &str)> = vec![];
    fn local(m: &str) -> Option<&Path> {
        Some(Path::new(m)).filter(|p| p.exists())
    }
    inputs.extend(local(&a.model_name_or_path).map(|p| (p, "--model_name_or_path")));
    inputs.extend(a.adapter.iter().map(|p| (p.as_path(), "--adapter")));
    inputs.extend(
        a.compare_model
            .iter()
            .filter_map(|m| local(m))
            .map(|p| (p, "--compare_model")),
    );
    let chart = chart_path(a);
    for (path, flag) in [
        (a.output.as_deref(), "--output"),
        (chart.as_deref(), "--chart"),
    ] {
        let Some(p) = path else { continue };
        corda_cli::ensure_apart(p, flag, &inputs)?;
        if p.is_dir() {
            bail!("{flag} {} is a directory; give a file path", p.display());
        }
    }
    if let (Some(o), Some(c)) = (&a.output, &chart) {
        if o == c {
            bail!(
                "--output and the chart are both {}; give --chart another path (or --output a .json name)",
                o.display()
            );
        }
    }
    Ok(())
}

fn run(a: &Args) -> Result<()> {
    check_outputs(a)?;
    let spec = spec(a)?;
    let earlier = a
        .compare_with
        .iter()
        .map(|p| {
            corda_core::eval::EvalResults::read_json(p)
                .with_context(|| format!("--compare_with {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut results = spec.run()?;
    let mut all = EvalResults {
        records: earlier.into_iter().flat_map(|r| r.records).collect(),
        settings: results.settings.clone(),
    };
    all.records.append(&mut results.records);
    print!("{}", all.table());
    if let Some(out) = &a.output {
        ensure_parent(out)?;
        all.write_json(out)
            .with_context(|| format!("--output {}", out.display()))?;
        eprintln!("results in {}", out.display());
    }
    // With --compare_with the chart may hold several tasks; its bars name each task's dataset.
    let mut tasks: Vec<&str> = Vec::new();
    for r in &all.records {
        if !tasks.contains(&r.task.as_str()) {
            tasks.push(&r.task);
        }
    }
    let title = if tasks.len() > 1 {
        tasks.join(", ")
    } else if spec.source.name == spec.task.name() {
        spec.task.to_string()
    } else {
        format!("{} ({})", spec.task, spec.source.name)
    };
    match (chart_path(a), all.chart(&title)) {
        (Some(path), Some(svg)) => {
            ensure_parent(&path)?;
            corda_core::util::atomic::write_file_atomic(&path, svg.as_bytes())
                .with_context(|| format!("--chart {}", path.display()))?;
            eprintln!("chart in {}", path.display());
        }
        (Some(path), None) if a.chart.is_some() => bail!(
            "--chart {}: a chart compares two or more models; add --adapter, --compare_model, --eval_base or --compare_with",
            path.display()
        ),
        _ => {}
    }
    Ok(())
}
