//! The evaluation tasks and their scoring: perplexity on a text, open-domain QA (exact match
//! against any gold alias) and math word problems (accuracy of the extracted final answer).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::answers::{
    extract_gsm8k_answer, extract_math_answer, gsm8k_equal, math_equal, math_gold,
};
use super::datasets::Question;
use super::generate::{greedy_generate, GenerationOptions};
use super::normalize::{cut_at_stop, exact_match};
use super::prompts::{math_prompt, qa_prompt, Shot, QA_STOP};
use crate::model::{CausalLM, TokenizerInfo};
use crate::{CordaError, Result};

/// What `corda-eval --task` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Perplexity of a text (`ppl`).
    Perplexity,
    NqOpen,
    TriviaQa,
    Gsm8k,
    Math,
}

impl Task {
    pub const ALL: [Task; 5] = [
        Self::Perplexity,
        Self::NqOpen,
        Self::TriviaQa,
        Self::Gsm8k,
        Self::Math,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Perplexity => "ppl",
            Self::NqOpen => "nqopen",
            Self::TriviaQa => "trivia_qa",
            Self::Gsm8k => "gsm8k",
            Self::Math => "math",
        }
    }

    /// The dataset a task reads unless another is named (perplexity has none: the text
    /// must be chosen).
    pub fn default_dataset(self) -> Option<&'static str> {
        match self {
            Self::Perplexity => None,
            other => Some(other.name()),
        }
    }

    /// The reported number: perplexity, exact match or accuracy (higher is better but for
    /// perplexity).
    pub fn metric(self) -> &'static str {
        match self {
            Self::Perplexity => "perplexity",
            Self::NqOpen | Self::TriviaQa => "exact_match",
            Self::Gsm8k | Self::Math => "accuracy",
        }
    }

    pub fn is_qa(self) -> bool {
        matches!(self, Self::NqOpen | Self::TriviaQa)
    }

    pub fn is_math(self) -> bool {
        matches!(self, Self::Gsm8k | Self::Math)
    }

    /// New tokens a generation task allows by default: a short answer, or a worked solution.
    pub fn default_max_new_tokens(self) -> usize {
        if self.is_qa() {
            32
        } else {
            512
        }
    }

    /// Few-shot examples by default: five for QA (as the harnesses), none for math (the
    /// fine-tuned model answers the training prompt).
    pub fn default_fewshot(self) -> usize {
        if self.is_qa() {
            5
        } else {
            0
        }
    }

    /// The prompt of one question.
    pub fn prompt(self, shots: &[Shot], question: &str) -> String {
        if self.is_qa() {
            qa_prompt(shots, question)
        } else {
            math_prompt(question)
        }
    }

    /// Where an answer ends besides EOS.
    pub fn stop_strings(self) -> Vec<String> {
        if self.is_qa() {
            vec![QA_STOP.to_string()]
        } else {
            Vec::new()
        }
    }

    /// The prediction extracted from a generated continuation, and whether it is correct.
    pub fn score(self, generated: &str, golds: &[String]) -> (String, bool) {
        match self {
            Self::NqOpen | Self::TriviaQa => {
                let p = cut_at_stop(generated, &self.stop_strings()).to_string();
                let ok = exact_match(&p, golds);
                (p, ok)
            }
            Self::Gsm8k => {
                let p = extract_gsm8k_answer(generated).unwrap_or_default();
                let ok = golds.iter().any(|g| {
                    let gold = extract_gsm8k_answer(g).unwrap_or_else(|| g.clone());
                    !p.is_empty() && gsm8k_equal(&p, &gold)
                });
                (p, ok)
            }
            Self::Math => {
                let p = extract_math_answer(generated).unwrap_or_default();
                let ok = golds
                    .iter()
                    .any(|g| !p.is_empty() && math_equal(&p, &math_gold(g)));
                (p, ok)
            }
            Self::Perplexity => (String::new(), false),
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = CordaError;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "ppl" | "perplexity" => Self::Perplexity,
            "nqopen" | "nq_open" => Self::NqOpen,
            "trivia_qa" | "triviaqa" | "traivia_qa" => Self::TriviaQa,
            "gsm8k" => Self::Gsm8k,
            "math" => Self::Math,
            _ => {
                return Err(CordaError::Invalid(format!(
                    "unknown task `{s}`; use one of {}",
                    Self::ALL.map(Self::name).join(", ")
                )))
            }
        })
    }
}

/// One evaluated question.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub question: String,
    pub golds: Vec<String>,
    /// The continuation as generated (decoded, special tokens skipped).
    pub generated: String,
    pub prediction: String,
    pub correct: bool,
}

/// A generation task's outcome on one model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationResult {
    /// Exact match or accuracy, in [0, 1].
    pub score: f64,
    pub correct: usize,
    pub total: usize,
    pub generated_tokens: usize,
    pub samples: Vec<Sample>,
}

/// Token ids of each question's prompt (with the tokenizer's special tokens, as
/// transformers' `tokenizer(prompt)`).
pub fn encode_prompts(
    task: Task,
    tok: &TokenizerInfo,
    questions: &[Question],
    shots: &[Shot],
) -> Result<Vec<Vec<u32>>> {
    questions
        .iter()
        .map(|q| tok.encode(&task.prompt(shots, &q.question)))
        .collect()
}

/// Generate for every prompt with `model` and score against the questions' golds.
pub fn run_generation(
    task: Task,
    model: &CausalLM,
    tok: &TokenizerInfo,
    questions: &[Question],
    prompts: &[Vec<u32>],
    opts: &GenerationOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<GenerationResult> {
    let outputs = greedy_generate(model, &tok.tokenizer, prompts, opts, progress)?;
    let mut samples = Vec::with_capacity(questions.len());
    let mut generated_tokens = 0;
    for (q, ids) in questions.iter().zip(&outputs) {
        generated_tokens += ids.len();
        let generated = super::generate::Detokenize::decode(&tok.tokenizer, ids)?;
        let (prediction, correct) = task.score(&generated, &q.answers);
        samples.push(Sample {
            question: q.question.clone(),
            golds: q.answers.clone(),
            generated,
            prediction,
            correct,
        });
    }
    let correct = samples.iter().filter(|s| s.correct).count();
    let total = samples.len();
    Ok(GenerationResult {
        score: if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        },
        correct,
        total,
        generated_tokens,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_round_trip() {
        for t in Task::ALL {
            assert_eq!(t.name().parse::<Task>().unwrap(), t);
        }
        assert_eq!("NQ_OPEN".parse::<Task>().unwrap(), Task::NqOpen);
        assert!("mmlu"
            .parse::<Task>()
            .unwrap_err()
            .to_string()
            .contains("ppl, nqopen"));
    }

    #[test]
    fn scoring_per_task() {
        let golds = vec!["Paris".to_string()];
        assert_eq!(
            Task::NqOpen.score(" paris\nQ: x", &golds),
            ("paris".to_string(), true)
        );
        assert!(!Task::TriviaQa.score(" Lyon", &golds).1);
        let g = vec!["so 3*4=12\n#### 12".to_string()];
        assert_eq!(
            Task::Gsm8k.score("3*4 = 12.\nThe answer is: 12", &g),
            ("12".into(), true)
        );
        assert!(!Task::Gsm8k.score("The answer is: 13", &g).1);
        assert!(!Task::Gsm8k.score("no number", &g).1);
        let m = vec!["\\frac{1}{2}".to_string()];
        assert!(Task::Math.score("so $\\boxed{\\dfrac12}$", &m).1);
        assert!(Task::Math.score("The answer is: 0.5", &m).1);
    }
}
