//! Calibration samples: the token sequences whose activations CorDA's covariances come from.
//!
//! Three ways to draw them, after the reference's `get_calib_data`:
//! - [`CalibSampling::Rows`]: one sample per row, in order (the fixtures' calibration).
//! - [`CalibSampling::Windows`]: question / raw-text sets; all texts joined with `"\n\n"` and
//!   random character windows cut from the result.
//! - [`CalibSampling::Chat`]: instruction sets; rows shuffled, the first `n` formatted with the
//!   Llama-2 chat template.
//!
//! The reference draws windows with Python's unseeded `random`; we use a seeded ChaCha8 stream
//! so the same inputs and seed always give the same samples.

use std::fmt;
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::data::template::{in_row, Template};
use crate::data::tokenize::TextEncoder;
use crate::{CordaError, Result};

/// How calibration samples are drawn from the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CalibSampling {
    Rows,
    Windows,
    Chat,
}

impl FromStr for CalibSampling {
    type Err = CordaError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "rows" => Ok(CalibSampling::Rows),
            "windows" => Ok(CalibSampling::Windows),
            "chat" => Ok(CalibSampling::Chat),
            _ => Err(CordaError::Invalid(format!(
                "unknown calibration sampling `{s}`; use rows, windows or chat"
            ))),
        }
    }
}

impl fmt::Display for CalibSampling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CalibSampling::Rows => "rows",
            CalibSampling::Windows => "windows",
            CalibSampling::Chat => "chat",
        })
    }
}

/// Size and randomness of a calibration set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalibOptions {
    /// Number of samples (`--calib_loader_size`).
    pub n: usize,
    /// Tokens per sample at most (the reference's `seqlen`, 2048).
    pub max_length: usize,
    pub seed: u64,
    pub sampling: CalibSampling,
}

impl Default for CalibOptions {
    /// The reference defaults: 256 samples of 2048 tokens, seed 233, windows.
    fn default() -> Self {
        CalibOptions {
            n: 256,
            max_length: 2048,
            seed: 233,
            sampling: CalibSampling::Windows,
        }
    }
}

/// Builds the calibration samples (token ids, special tokens included, each at most
/// `max_length` long). For [`CalibSampling::Chat`], `template` should be the chat template
/// (see `RegistryEntry::template`).
pub fn calibration_samples(
    rows: &[Value],
    template: &Template,
    tokenizer: &Tokenizer,
    opts: &CalibOptions,
) -> Result<Vec<Vec<u32>>> {
    if opts.n == 0 {
        return Err(CordaError::Invalid(
            "the calibration loader size is 0; ask for at least one sample".to_string(),
        ));
    }
    if opts.max_length == 0 {
        return Err(CordaError::Invalid(
            "the calibration sample length is 0; use a positive maximum length".to_string(),
        ));
    }
    if rows.is_empty() {
        return Err(CordaError::Data(
            "the calibration dataset has no rows; check its path, split and filters".to_string(),
        ));
    }
    let encoder = TextEncoder::new(tokenizer, None)?;
    let samples = match opts.sampling {
        CalibSampling::Rows => {
            let picked: Vec<usize> = (0..rows.len().min(opts.n)).collect();
            warn_if_short(picked.len(), opts.n);
            encode_rows(rows, &picked, template, &encoder, opts.max_length)?
        }
        CalibSampling::Chat => {
            let mut order: Vec<usize> = (0..rows.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(opts.seed));
            order.truncate(opts.n);
            warn_if_short(order.len(), opts.n);
            encode_rows(rows, &order, template, &encoder, opts.max_length)?
        }
        CalibSampling::Windows => windows(rows, template, &encoder, opts)?,
    };
    Ok(samples)
}

fn warn_if_short(got: usize, wanted: usize) {
    if got < wanted {
        tracing::warn!("the calibration dataset has only {got} usable rows; using {got} samples instead of {wanted}");
    }
}

fn encode_rows(
    rows: &[Value],
    picked: &[usize],
    template: &Template,
    encoder: &TextEncoder,
    max_length: usize,
) -> Result<Vec<Vec<u32>>> {
    let texts = picked
        .iter()
        .map(|&i| template.format(&rows[i]).map_err(|e| in_row(i, e)))
        .collect::<Result<Vec<_>>>()?;
    let samples = encoder.encode_all(texts)?;
    samples
        .into_iter()
        .zip(picked)
        .map(|(mut ids, &row)| {
            if ids.is_empty() {
                return Err(CordaError::Data(format!(
                    "row {row} gives no tokens with template `{template}`; drop empty rows or \
                     change the template"
                )));
            }
            ids.truncate(max_length);
            Ok(ids)
        })
        .collect()
}

/// `get_calib_data`'s raw-text sampling: `n` times, a random character offset
/// `i ∈ [0, len - seqlen - 1]`, the text `[i, i + 10·seqlen)`, its first `seqlen` tokens.
fn windows(
    rows: &[Value],
    template: &Template,
    encoder: &TextEncoder,
    opts: &CalibOptions,
) -> Result<Vec<Vec<u32>>> {
    let text = template.format_rows(rows)?.join("\n\n");
    let chars = CharIndex::new(&text);
    let seqlen = opts.max_length;
    let needed = seqlen.saturating_add(1);
    if chars.len() < needed {
        return Err(CordaError::Data(format!(
            "the calibration text ({} rows joined) has {} characters, but windows of up to \
             {seqlen} tokens need at least {needed} characters (and about {} to fill {seqlen} \
             tokens); use more rows, a smaller maximum length, or rows sampling",
            rows.len(),
            chars.len(),
            seqlen.saturating_mul(4),
        )));
    }
    let last_start = (chars.len() - needed) as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let texts: Vec<String> = (0..opts.n)
        .map(|_| {
            let start = rng.gen_range(0..=last_start) as usize;
            let end = start.saturating_add(seqlen.saturating_mul(10));
            chars.slice(start, end).to_string()
        })
        .collect();
    let mut samples = encoder.encode_all(texts)?;
    for ids in &mut samples {
        ids.truncate(seqlen);
    }
    Ok(samples)
}

/// Character (Unicode scalar) offsets into a string without a `Vec<char>` copy: the byte
/// offset of every `STRIDE`-th character, then a short walk.
struct CharIndex<'a> {
    text: &'a str,
    marks: Vec<usize>,
    len: usize,
}

impl<'a> CharIndex<'a> {
    const STRIDE: usize = 1024;

    fn new(text: &'a str) -> Self {
        let mut marks = Vec::new();
        let mut len = 0;
        for (n, (byte, _)) in text.char_indices().enumerate() {
            if n % Self::STRIDE == 0 {
                marks.push(byte);
            }
            len = n + 1;
        }
        CharIndex { text, marks, len }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The byte offset of character `c` (the text's end for `c >= len`).
    fn byte(&self, c: usize) -> usize {
        if c >= self.len {
            return self.text.len();
        }
        let mark = self.marks[c / Self::STRIDE];
        self.text[mark..]
            .char_indices()
            .nth(c % Self::STRIDE)
            .map_or(self.text.len(), |(b, _)| mark + b)
    }

    /// Characters `[start, end)`, clamped to the text like a Python slice.
    fn slice(&self, start: usize, end: usize) -> &'a str {
        let (a, b) = (self.byte(start), self.byte(end.max(start)));
        &self.text[a..b]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_index_respects_utf8() {
        let text = "aé日🙂b".repeat(700);
        let idx = CharIndex::new(&text);
        let chars: Vec<char> = text.chars().collect();
        assert_eq!(idx.len(), chars.len());
        for (start, end) in [
            (0, 5),
            (1, 4),
            (1023, 1030),
            (2000, 2801),
            (2799, 5000),
            (3500, 3500),
        ] {
            let expected: String = chars[start.min(chars.len())..end.min(chars.len())]
                .iter()
                .collect();
            assert_eq!(idx.slice(start, end), expected, "{start}..{end}");
        }
    }

    #[test]
    fn sampling_names_parse() {
        assert_eq!(
            "Windows".parse::<CalibSampling>().unwrap(),
            CalibSampling::Windows
        );
        assert_eq!(CalibSampling::Chat.to_string(), "chat");
        assert!("random".parse::<CalibSampling>().is_err());
    }
}
