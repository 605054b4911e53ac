//! The corda-demo library: small random models and synthetic datasets, written with
//! corda-core's own writers, so the quickstart, the tests and the benchmarks run without
//! downloading anything. It is not part of corda-core's API: only the `corda-demo` binary and
//! tests that need a model of a given shape use it.
//!
//! - [`model`]: a random Llama model directory of any shape in the Hugging Face layout.
//! - [`tokenizer`]: the word-level tokenizer that model ships with.
//! - [`datasets`]: nq_open-shaped QA and MetaMathQA-shaped arithmetic, as jsonl and parquet.
//! - [`init`]: the seeded, thread-count-independent normal initialisation behind the model.

pub mod datasets;
pub mod init;
pub mod model;
pub mod tokenizer;

pub use datasets::{math_rows, qa_rows, write_datasets, DemoDataFiles, DemoDataSpec};
pub use model::{write_random_model, ConfigStyle, DemoModelSpec, DemoModelSummary};
pub use tokenizer::{demo_tokenizer, write_tokenizer};
