//! Greedy generation, batched with left padding and an incremental KV cache
//! ([`crate::model::KvCache`]), token for token what transformers'
//! `generate(do_sample=False)` produces: prompts are left-padded to one length, each row's
//! positions count only its real tokens, the argmax (first index on ties) is appended until
//! EOS or `max_new_tokens`. A row may also stop when its text contains a stop string (QA
//! answers end at a newline); it leaves the batch, so later steps cost only the running rows.

use candle_core::Tensor;

use crate::model::{CausalLM, KvCache};
use crate::{CordaError, Result};

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// Prompts per batch.
    pub batch_size: usize,
    /// Tokens that end a sequence (kept as its last token).
    pub eos_ids: Vec<u32>,
    /// Fills the left padding (never attended to).
    pub pad_id: u32,
    /// A row stops once its decoded continuation contains one of these.
    pub stop_strings: Vec<String>,
}

/// Decodes token ids to text (the stop-string check needs it).
pub trait Detokenize {
    fn decode(&self, ids: &[u32]) -> Result<String>;
}

impl Detokenize for tokenizers::Tokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        std::ops::Deref::deref(self)
            .decode(ids, true)
            .map_err(|e| CordaError::Data(format!("cannot decode generated tokens: {e}")))
    }
}

/// Index of the first largest value of each row of `logits` (batch, vocab), like torch's
/// `argmax`.
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    rows.iter()
        .map(|r| {
            let mut best = 0usize;
            for (i, &v) in r.iter().enumerate() {
                if v > r[best] || (r[best].is_nan() && !v.is_nan()) {
                    best = i;
                }
            }
            if r.iter().all(|v| v.is_nan()) {
                return Err(CordaError::Numerics(
                    "the model produced NaN logits; its weights or dtype overflow (try --dtype \
                     f32)"
                        .into(),
                ));
            }
            Ok(best as u32)
        })
        .collect()
}

/// Generate greedily for one batch of prompts (left-padded together); the new tokens of each.
fn generate_batch(
    model: &CausalLM,
    detok: &dyn Detokenize,
    prompts: &[&[u32]],
    opts: &GenerationOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * width);
    let mut mask = Vec::with_capacity(b);
    for p in prompts {
        let pad = width - p.len();
        ids.extend(std::iter::repeat_n(opts.pad_id, pad));
        ids.extend_from_slice(p);
        let mut m = vec![0u8; pad];
        m.resize(width, 1);
        mask.push(m);
    }
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    if opts.max_new_tokens == 0 {
        progress(0, b);
        return Ok(out);
    }
    let mut cache = KvCache::new(model, b);
    let mut running: Vec<usize> = (0..b).collect();
    let mut input = Tensor::from_vec(ids, (b, width), &model.device)?;
    let mut step_mask = mask;
    for _ in 0..opts.max_new_tokens {
        let logits = model.next_token_logits(&input, &step_mask, &mut cache)?;
        let next = argmax_rows(&logits)?;
        let mut keep = Vec::with_capacity(running.len());
        for (slot, (&row, &tok)) in running.iter().zip(&next).enumerate() {
            out[row].push(tok);
            let mut done = opts.eos_ids.contains(&tok) || out[row].len() >= opts.max_new_tokens;
            if !done && !opts.stop_strings.is_empty() {
                // The whole continuation: a stop string may span tokens.
                let text = detok.decode(&out[row])?;
                done = opts.stop_strings.iter().any(|s| text.contains(s.as_str()));
            }
            if !done {
                keep.push(slot);
            }
        }
        progress(running.len(), running.len() - keep.len());
        if keep.is_empty() {
            break;
        }
        if keep.len() != running.len() {
            cache.retain_rows(&keep)?;
            running = keep.iter().map(|&s| running[s]).collect();
        }
        let last: Vec<u32> = running
            .iter()
            .map(|&r| *out[r].last().expect("one token"))
            .collect();
        input = Tensor::from_vec(last, (running.len(), 1), &model.device)?;
        step_mask = vec![vec![1u8]; running.len()];
    }
    Ok(out)
}

/// Greedy continuations of every prompt (token ids, EOS included when generated), in the
/// prompts' order. Prompts are batched in order of length (less padding); `progress(t, p)` is
/// told after each step of `t` more generated tokens and `p` more finished prompts.
pub fn greedy_generate(
    model: &CausalLM,
    detok: &dyn Detokenize,
    prompts: &[Vec<u32>],
    opts: &GenerationOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<u32>>> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(CordaError::Data(format!(
            "prompt {i} tokenizes to no tokens; generation needs at least one"
        )));
    }
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| (prompts[i].len(), i));
    let mut out = vec![Vec::new(); prompts.len()];
    for chunk in order.chunks(opts.batch_size.max(1)) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        let gen = generate_batch(model, detok, &batch, opts, progress)?;
        for (&i, g) in chunk.iter().zip(gen) {
            out[i] = g;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest() {
        let t = Tensor::new(
            &[[1.0f32, 3.0, 3.0], [f32::NAN, 0.0, -1.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(argmax_rows(&t).unwrap(), vec![1, 1]);
        let nan = Tensor::new(&[[f32::NAN, f32::NAN]], &candle_core::Device::Cpu).unwrap();
        assert!(argmax_rows(&nan).is_err());
    }
}
