//! Tokenization the way `transformers` drives a fast tokenizer.
//!
//! `tokenizer(text)` in Python ignores any padding or truncation stored in `tokenizer.json`
//! unless asked for, and `truncation=True, max_length=L` keeps the special tokens while cutting
//! the text. [`TextEncoder`] reproduces both, so our token ids match the reference's.

use tokenizers::{Tokenizer, TruncationParams};

use crate::{CordaError, Result};

/// A tokenizer configured for one job: special tokens on, no padding, optional truncation.
#[derive(Clone)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
}

impl TextEncoder {
    /// Clones `tokenizer` without its stored padding and truncation; with `truncate_to`, the
    /// encodings (special tokens included) are cut to that many tokens like
    /// `truncation=True, max_length=truncate_to`.
    pub fn new(tokenizer: &Tokenizer, truncate_to: Option<usize>) -> Result<Self> {
        let mut tokenizer = tokenizer.clone();
        tokenizer.with_padding(None);
        let truncation = match truncate_to {
            None => None,
            Some(max_length) => {
                let added = tokenizer
                    .get_post_processor()
                    .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
                if max_length <= added {
                    return Err(CordaError::Invalid(format!(
                        "a maximum length of {max_length} tokens leaves no room for text after \
                         the tokenizer's {added} special tokens; raise the maximum length"
                    )));
                }
                Some(TruncationParams {
                    max_length,
                    ..Default::default()
                })
            }
        };
        tokenizer.with_truncation(truncation).map_err(|e| {
            CordaError::Invalid(format!("cannot configure tokenizer truncation: {e}"))
        })?;
        Ok(TextEncoder { tokenizer })
    }

    /// The configured tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Encodes one text with special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| tokenizer_failed(&e))
    }

    /// Encodes many texts (in parallel) with special tokens.
    pub fn encode_all(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts, true)
            .map_err(|e| tokenizer_failed(&e))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// The id of a token of the vocabulary (e.g. `</s>`), or an error naming it.
    pub fn token_id(&self, token: &str) -> Result<u32> {
        self.tokenizer.token_to_id(token).ok_or_else(|| {
            CordaError::Data(format!(
                "the tokenizer has no token `{token}`; check the tokenizer files (eos_token in \
                 tokenizer_config.json)"
            ))
        })
    }
}

fn tokenizer_failed(e: &tokenizers::Error) -> CordaError {
    CordaError::Data(format!(
        "tokenization failed ({e}); check that tokenizer.json belongs to the model"
    ))
}
