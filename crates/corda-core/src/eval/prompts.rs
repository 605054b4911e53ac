//! The prompts of the evaluation tasks. Open-domain QA uses the few-shot "Q: … A:" format of
//! the common harnesses (lm-evaluation-harness' nq_open), answers stop at a newline; math uses
//! the Alpaca prompt that corda-finetune trains with ([`crate::data::alpaca_prompt`]), so a
//! model fine-tuned on MetaMathQA is asked the way it learned.

/// One worked question-answer pair shown before the question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shot {
    pub question: String,
    pub answer: String,
}

/// A question as it appears after "Q: ": with one question mark at the end.
fn question_line(question: &str) -> String {
    let q = question.trim();
    if q.ends_with('?') {
        q.to_string()
    } else {
        format!("{q}?")
    }
}

/// `Q: {shot}?\nA: {answer}\n\n` for every shot, then `Q: {question}?\nA:`.
pub fn qa_prompt(shots: &[Shot], question: &str) -> String {
    let mut out = String::new();
    for s in shots {
        out.push_str(&format!(
            "Q: {}\nA: {}\n\n",
            question_line(&s.question),
            s.answer.trim()
        ));
    }
    out.push_str(&format!("Q: {}\nA:", question_line(question)));
    out
}

/// Where a QA answer ends.
pub const QA_STOP: &str = "\n";

/// The math prompt: corda-finetune's Alpaca prompt around the problem.
pub fn math_prompt(problem: &str) -> String {
    crate::data::alpaca_prompt(problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_shot_qa_prompt() {
        let shots = vec![Shot {
            question: "who wrote hamlet".into(),
            answer: "William Shakespeare".into(),
        }];
        assert_eq!(
            qa_prompt(&shots, "capital of france?"),
            "Q: who wrote hamlet?\nA: William Shakespeare\n\nQ: capital of france?\nA:"
        );
        assert_eq!(qa_prompt(&[], "x"), "Q: x?\nA:");
    }

    #[test]
    fn math_prompt_is_the_training_prompt() {
        let p = math_prompt("What is 2+2?");
        assert!(p.starts_with("Below is an instruction"));
        assert!(p.ends_with("### Instruction:\nWhat is 2+2?\n\n### Response:"));
    }
}
