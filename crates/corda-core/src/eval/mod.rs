//! Evaluation: the numbers CorDA is for. Knowledge kept (NQ-open / TriviaQA exact match) while a
//! task is learned (GSM8K / MATH accuracy), and perplexity before and after preprocessing (the
//! reference's check for float16 covariances).
//!
//! - [`perplexity()`]: non-overlapping windows of a joined test split, mean token NLL.
//! - [`generate`]: greedy generation with a KV cache, batched with left padding, token for
//!   token like transformers' `generate(do_sample=False)`.
//! - [`prompts`]: few-shot "Q: … A:" prompts; the Alpaca training prompt for math.
//! - [`normalize`]: SQuAD-style answer normalisation and exact match.
//! - [`answers`]: final answers of GSM8K / MATH solutions and their comparison.
//! - [`datasets`]: built-in evaluation datasets (`configs/eval_datasets.toml`) and files.
//! - [`task`]: the tasks, their prompts and scoring.
//! - [`subject`]: a model alone or with one adapter.
//! - [`results`]: records as JSON, a table and a bar chart.
//! - [`run`]: a whole run over several subjects.
//! - [`verify`]: original vs residual + adapter perplexity after preprocessing.

pub mod answers;
pub mod datasets;
pub mod generate;
pub mod normalize;
pub mod perplexity;
pub mod prompts;
pub mod results;
pub mod run;
pub mod subject;
pub mod task;
pub mod verify;

pub use datasets::{EvalSource, Question};
pub use generate::{greedy_generate, GenerationOptions};
pub use perplexity::{perplexity, relative_difference, PerplexityResult};
pub use results::{EvalRecord, EvalResults};
pub use run::{default_seq_len, EvalSpec, DEFAULT_SEQ_LEN};
pub use subject::{subjects, Subject};
pub use task::Task;
pub use verify::{verify_perplexity, PerplexityCheck, VerifyPplOptions};
