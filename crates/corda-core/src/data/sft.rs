//! Supervised fine-tuning examples and batches, as in the reference `corda_finetuning.py`.
//!
//! Each row becomes an Alpaca prompt (the source) followed by the response and the EOS token
//! (the target). Only the target is trained on: the source positions of the labels are -100.
//! Batches are right-padded with the EOS id, which is also the pad id, so — exactly like the
//! reference collator — the attention mask is 0 on the real trailing EOS too.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::data::template::{in_row, Template};
use crate::data::tokenize::TextEncoder;
use crate::{CordaError, Result};

/// The reference's `PROMPT`; `{instruction}` is replaced by the query.
pub const ALPACA_PROMPT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:";

/// Label value of positions that do not count in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    pub input_ids: Vec<u32>,
    /// `input_ids` with the source (prompt) positions set to [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
}

/// How rows become examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftOptions {
    /// Field path of the instruction (`--dataset_field` first value, e.g. `query`).
    pub query_field: String,
    /// Field path of the response (`--dataset_field` second value, e.g. `response`).
    pub response_field: String,
    /// The tokenizer's `model_max_length`: source and source+target are each cut to it.
    pub model_max_length: usize,
    /// The EOS token text appended to the target (`</s>` for Llama); its id is the pad id.
    pub eos_token: String,
}

/// The Alpaca prompt with `query` inserted (inserted text is not re-scanned for `{…}`).
pub fn alpaca_prompt(query: &str) -> String {
    match ALPACA_PROMPT.split_once("{instruction}") {
        Some((head, tail)) => format!("{head}{query}{tail}"),
        None => ALPACA_PROMPT.to_string(),
    }
}

/// Tokenizes rows into examples like the reference's `train_tokenize_function`: source and
/// source+target are tokenized separately with special tokens and truncation at
/// `model_max_length`; the first `source_len` labels (source tokens that are not the pad id)
/// are masked.
pub fn build_sft_examples(
    rows: &[Value],
    tokenizer: &Tokenizer,
    opts: &SftOptions,
) -> Result<Vec<SftExample>> {
    if rows.is_empty() {
        return Err(CordaError::Data(
            "the fine-tuning dataset has no rows; check its path and split".to_string(),
        ));
    }
    let encoder = TextEncoder::new(tokenizer, Some(opts.model_max_length))?;
    let pad_id = encoder.token_id(&opts.eos_token)?;
    let query = Template::field(&opts.query_field)?;
    let response = Template::field(&opts.response_field)?;

    let mut sources = Vec::with_capacity(rows.len());
    let mut examples = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let source = alpaca_prompt(&query.format(row).map_err(|e| in_row(i, e))?);
        let target = format!(
            "{}{}",
            response.format(row).map_err(|e| in_row(i, e))?,
            opts.eos_token
        );
        examples.push(format!("{source}{target}"));
        sources.push(source);
    }
    let sources = encoder.encode_all(sources)?;
    let examples = encoder.encode_all(examples)?;
    Ok(sources
        .iter()
        .zip(examples)
        .map(|(source, input_ids)| {
            let source_len = source.iter().filter(|&&id| id != pad_id).count();
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(t, &id)| {
                    if t < source_len {
                        IGNORE_INDEX
                    } else {
                        i64::from(id)
                    }
                })
                .collect();
            SftExample { input_ids, labels }
        })
        .collect())
}

/// A right-padded batch, as plain row-major vectors of equal length `seq_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
    /// 1 where `input_ids != pad_id`.
    pub attention_mask: Vec<Vec<u8>>,
    pub seq_len: usize,
}

/// The batch as `(B, T)` tensors.
#[derive(Debug, Clone)]
pub struct SftTensors {
    /// `u32`.
    pub input_ids: Tensor,
    /// `i64`.
    pub labels: Tensor,
    /// In the dtype asked for (`u8`, or a float type for additive masks).
    pub attention_mask: Tensor,
}

/// The reference's `DataCollatorForSupervisedDataset`: pad `input_ids` with `pad_id` (the EOS
/// id) and labels with -100 to the longest example; the mask is `input_ids != pad_id`.
pub fn collate(examples: &[SftExample], pad_id: u32) -> Result<SftBatch> {
    if examples.is_empty() {
        return Err(CordaError::Invalid(
            "cannot collate an empty batch; use a batch size of at least 1".to_string(),
        ));
    }
    if let Some(i) = examples
        .iter()
        .position(|e| e.input_ids.len() != e.labels.len())
    {
        return Err(CordaError::Invalid(format!(
            "example {i} has {} input ids but {} labels; build examples with build_sft_examples",
            examples[i].input_ids.len(),
            examples[i].labels.len()
        )));
    }
    let seq_len = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let pad = |ids: &[u32]| {
        let mut out = ids.to_vec();
        out.resize(seq_len, pad_id);
        out
    };
    let input_ids: Vec<Vec<u32>> = examples.iter().map(|e| pad(&e.input_ids)).collect();
    let labels = examples
        .iter()
        .map(|e| {
            let mut out = e.labels.clone();
            out.resize(seq_len, IGNORE_INDEX);
            out
        })
        .collect();
    let attention_mask = input_ids
        .iter()
        .map(|ids| ids.iter().map(|&id| u8::from(id != pad_id)).collect())
        .collect();
    Ok(SftBatch {
        input_ids,
        labels,
        attention_mask,
        seq_len,
    })
}

impl SftBatch {
    pub fn batch_size(&self) -> usize {
        self.input_ids.len()
    }

    /// Number of label positions that count in the loss (after the one-token shift of causal
    /// LM training, each row contributes its non-ignored labels except a leading one).
    pub fn target_tokens(&self) -> usize {
        self.labels
            .iter()
            .map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }

    /// Builds `(B, T)` tensors on `device`: `u32` ids, `i64` labels and the mask in
    /// `mask_dtype` (e.g. `DType::U8` or `DType::F32`).
    pub fn to_tensors(&self, device: &Device, mask_dtype: DType) -> Result<SftTensors> {
        let shape = (self.batch_size(), self.seq_len);
        let flat_ids: Vec<u32> = self.input_ids.concat();
        let flat_labels: Vec<i64> = self.labels.concat();
        let flat_mask: Vec<u8> = self.attention_mask.concat();
        Ok(SftTensors {
            input_ids: Tensor::from_vec(flat_ids, shape, device)?,
            labels: Tensor::from_vec(flat_labels, shape, device)?,
            attention_mask: Tensor::from_vec(flat_mask, shape, device)?.to_dtype(mask_dtype)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(ids: &[u32], masked: usize) -> SftExample {
        SftExample {
            input_ids: ids.to_vec(),
            labels: ids
                .iter()
                .enumerate()
                .map(|(i, &id)| {
                    if i < masked {
                        IGNORE_INDEX
                    } else {
                        i64::from(id)
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn prompt_matches_the_reference() {
        assert_eq!(
            alpaca_prompt("Add 1 and {x}."),
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\nAdd 1 and {x}.\n\n### Response:"
        );
    }

    #[test]
    fn collate_pads_right_and_masks_pad_ids() {
        let batch = collate(&[example(&[1, 5, 6, 2], 2), example(&[1, 7], 1)], 2).unwrap();
        assert_eq!(batch.seq_len, 4);
        assert_eq!(batch.input_ids, vec![vec![1, 5, 6, 2], vec![1, 7, 2, 2]]);
        assert_eq!(
            batch.labels,
            vec![vec![-100, -100, 6, 2], vec![-100, 7, -100, -100]]
        );
        // The real trailing EOS is masked too, as in the reference.
        assert_eq!(
            batch.attention_mask,
            vec![vec![1, 1, 1, 0], vec![1, 1, 0, 0]]
        );
        assert_eq!(batch.target_tokens(), 3);

        let t = batch.to_tensors(&Device::Cpu, DType::F32).unwrap();
        assert_eq!(t.input_ids.dims(), [2, 4]);
        assert_eq!(t.input_ids.dtype(), DType::U32);
        assert_eq!(t.labels.dtype(), DType::I64);
        assert_eq!(t.attention_mask.dtype(), DType::F32);
        assert_eq!(
            t.attention_mask.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 1.0, 1.0, 0.0], vec![1.0, 1.0, 0.0, 0.0]]
        );
    }

    #[test]
    fn collate_rejects_bad_input() {
        assert!(collate(&[], 2).is_err());
        let bad = SftExample {
            input_ids: vec![1, 2],
            labels: vec![-100],
        };
        assert!(collate(&[bad], 2).is_err());
    }
}
