//! The demo tokenizer: a deterministic word-level `tokenizer.json` built from the demo
//! datasets' words, so the demo model needs no download and its vocabulary stays small.
//!
//! It behaves like a Llama tokenizer where the pipeline can tell:
//! - `<unk>` = 0, `<s>` = 1, `</s>` = 2 are special added tokens, so `</s>` written into a
//!   training target (the reference appends the EOS text) becomes the EOS id;
//! - a `TemplateProcessing` post-processor puts `<s>` in front of every encoded text, like
//!   Llama's `add_bos_token`;
//! - there is no pad token: like the reference, the pipeline pads with EOS.
//!
//! Text is split by whitespace and punctuation, and numbers into single digits, so any number
//! in the arithmetic data is representable with ten tokens.

use std::collections::BTreeSet;
use std::path::Path;

use ahash::AHashMap;
use serde_json::json;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer,
};

use corda_core::{CordaError, Result};

pub const UNK: &str = "<unk>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// The default probe text of `corda-convert --verify`: its words are in the vocabulary so the
/// logit check exercises real tokens rather than `<unk>`.
pub const PROBE_TEXT: &str =
    "The capital of France is Paris, and the capital of Germany is Berlin.";

/// Punctuation that may appear on its own in user text.
const PUNCTUATION: &[&str] = &[
    ".", ",", "?", "!", ":", ";", "'", "\"", "(", ")", "[", "]", "-", "+", "*", "/", "=", "%", "$",
    "#", "###",
];

fn pre_tokenizer() -> Sequence {
    Sequence::new(vec![Whitespace.into(), Digits::new(true).into()])
}

/// The pieces `text` is split into before the word lookup.
pub fn pieces(text: &str) -> Result<Vec<String>> {
    let mut pre = PreTokenizedString::from(text);
    pre_tokenizer()
        .pre_tokenize(&mut pre)
        .map_err(|e| CordaError::Data(format!("cannot pre-tokenize demo text: {e}")))?;
    Ok(pre
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect())
}

/// The vocabulary in id order: the three special tokens, then every piece of the demo
/// datasets, the Alpaca prompt, the probe text, punctuation and digits, sorted so the ids
/// never depend on the order the words were collected in.
pub fn vocabulary() -> Result<Vec<String>> {
    let mut texts = super::datasets::vocabulary_text();
    texts.push(corda_core::data::ALPACA_PROMPT.to_string());
    texts.push(PROBE_TEXT.to_string());
    let mut words = BTreeSet::new();
    for t in &texts {
        words.extend(pieces(t)?);
    }
    words.extend(PUNCTUATION.iter().map(|s| s.to_string()));
    words.extend((0..10).map(|d| d.to_string()));
    for s in [UNK, BOS, EOS] {
        words.remove(s);
    }
    Ok([UNK, BOS, EOS]
        .iter()
        .map(|s| s.to_string())
        .chain(words)
        .collect())
}

/// Build the demo tokenizer.
pub fn demo_tokenizer() -> Result<Tokenizer> {
    let err = |e: &dyn std::fmt::Display| {
        CordaError::Model(format!("cannot build the demo tokenizer: {e}"))
    };
    let vocab: AHashMap<String, u32> = vocabulary()?.into_iter().zip(0u32..).collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token(UNK.into())
        .build()
        .map_err(|e| err(&e))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(|e| err(&e))?
        .try_pair(format!("{BOS} $A {BOS} $B"))
        .map_err(|e| err(&e))?
        .special_tokens(vec![(BOS, BOS_ID)])
        .build()
        .map_err(|e| err(&e))?;
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(pre_tokenizer()));
    tok.with_post_processor(Some(post));
    tok.add_special_tokens([UNK, BOS, EOS].map(|s| AddedToken::from(s, true)))
        .map_err(|e| err(&e))?;
    Ok(tok)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("json value");
    std::fs::write(path, text + "\n").map_err(|e| CordaError::io(path, e))
}

/// Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `dir`;
/// returns the vocabulary size.
pub fn write_tokenizer(dir: &Path) -> Result<usize> {
    let tok = demo_tokenizer()?;
    let path = dir.join("tokenizer.json");
    let text = tok
        .to_string(true)
        .map_err(|e| CordaError::Model(format!("cannot serialise the demo tokenizer: {e}")))?;
    std::fs::write(&path, text + "\n").map_err(|e| CordaError::io(&path, e))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "add_bos_token": true,
            "add_eos_token": false,
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "clean_up_tokenization_spaces": false,
            "model_max_length": 2048,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    )?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}),
    )?;
    Ok(tok.get_vocab_size(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use corda_core::model::TokenizerInfo;

    #[test]
    fn demo_tokenizer_loads_like_a_llama_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let n = write_tokenizer(dir.path()).unwrap();
        assert_eq!(n, vocabulary().unwrap().len());
        let info = TokenizerInfo::load(dir.path()).unwrap();
        assert_eq!(
            (info.bos_id, info.eos_id, info.pad_id),
            (Some(BOS_ID), Some(EOS_ID), None)
        );
        assert_eq!(info.eos_token.as_deref(), Some(EOS));
        let ids = info.encode("What is 23 plus 48?").unwrap();
        assert_eq!(ids[0], BOS_ID);
        assert_eq!(ids.len(), 1 + 1 + 1 + 2 + 1 + 2 + 1, "{ids:?}");
        // The EOS text in a training target is the EOS token.
        let ids = info.encode("The answer is: 71</s>").unwrap();
        assert_eq!(*ids.last().unwrap(), EOS_ID);
    }

    #[test]
    fn demo_data_prompt_and_probe_have_no_unknown_words() {
        let tok = demo_tokenizer().unwrap();
        let mut texts = vec![
            PROBE_TEXT.to_string(),
            corda_core::data::alpaca_prompt("What is 2 plus 3?"),
        ];
        for r in crate::datasets::qa_rows(300, 3) {
            texts.push(r["question"].as_str().unwrap().to_string());
            texts.extend(
                r["answer"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string()),
            );
        }
        for r in crate::datasets::math_rows(300, 3) {
            texts.push(format!(
                "{} {}",
                r["query"].as_str().unwrap(),
                r["response"].as_str().unwrap()
            ));
        }
        for t in texts {
            let ids = tok.encode(t.as_str(), true).unwrap().get_ids().to_vec();
            assert!(!ids.contains(&UNK_ID), "`{t}` has unknown words: {ids:?}");
        }
    }

    #[test]
    fn demo_tokenizer_is_deterministic() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_tokenizer(a.path()).unwrap();
        write_tokenizer(b.path()).unwrap();
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap(),
                "{f}"
            );
        }
    }
}
