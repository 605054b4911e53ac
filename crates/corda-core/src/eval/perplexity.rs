//! Perplexity as the GPTQ-style protocol the CorDA paper reports (Wiki/PTB): the test split's
//! texts are joined and tokenized once, cut into non-overlapping windows of `seq_len` tokens
//! (the tail shorter than a window is dropped), and each window is scored on its own: the mean
//! negative log-likelihood of tokens 2..seq_len given the ones before, as transformers'
//! `model(ids, labels=ids).loss`. Perplexity is `exp` of the mean over all windows.

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::model::CausalLM;
use crate::train::fused_ce::cross_entropy_rows;
use crate::{CordaError, Result};

/// The score of one model on one text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerplexityResult {
    pub seq_len: usize,
    /// Windows scored.
    pub windows: usize,
    /// Tokens predicted (`windows · (seq_len − 1)`).
    pub tokens: usize,
    /// Mean negative log-likelihood per predicted token (nats).
    pub mean_nll: f64,
    pub perplexity: f64,
    /// Each window's mean NLL, in order.
    pub window_nll: Vec<f64>,
}

/// The non-overlapping windows of `seq_len` tokens of `ids`, at most `max_windows` of them.
pub fn windows(ids: &[u32], seq_len: usize, max_windows: Option<usize>) -> Result<Vec<&[u32]>> {
    if seq_len < 2 {
        return Err(CordaError::Invalid(format!(
            "seq_len {seq_len} leaves nothing to predict; use at least 2"
        )));
    }
    if ids.len() < seq_len {
        return Err(CordaError::Data(format!(
            "the text has {} tokens, fewer than one window of seq_len {seq_len}; use a longer \
             text or a smaller seq_len",
            ids.len()
        )));
    }
    let n = (ids.len() / seq_len).min(max_windows.unwrap_or(usize::MAX));
    Ok(ids.chunks_exact(seq_len).take(n).collect())
}

/// Mean NLL of each window (all of one length), `batch_size` windows per forward;
/// `progress(k)` is told when `k` more windows are done.
pub fn window_nlls(
    model: &CausalLM,
    windows: &[&[u32]],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(windows.len());
    for batch in windows.chunks(batch_size.max(1)) {
        let t = batch[0].len();
        if batch.iter().any(|w| w.len() != t) {
            return Err(CordaError::Invalid(
                "perplexity windows must have one length".into(),
            ));
        }
        let flat: Vec<u32> = batch.iter().flat_map(|w| w.iter().copied()).collect();
        let ids = Tensor::from_vec(flat, (batch.len(), t), &model.device)?;
        let h = model.hidden_states(&ids, None)?;
        for (row, w) in batch.iter().enumerate() {
            let hr = h.get(row)?.narrow(0, 0, t - 1)?.unsqueeze(0)?;
            let logits = model.lm_head_logits(&hr)?.squeeze(0)?;
            let nll = cross_entropy_rows(&logits, &w[1..])?
                .to_dtype(DType::F64)?
                .mean_all()?
                .to_scalar::<f64>()?;
            if !nll.is_finite() {
                return Err(CordaError::Numerics(format!(
                    "window {} has a non-finite NLL ({nll}); the model's weights or dtype \
                     overflow (try --dtype f32)",
                    out.len()
                )));
            }
            out.push(nll);
        }
        progress(batch.len());
    }
    Ok(out)
}

/// Perplexity of `model` on `ids` (see the module's protocol).
pub fn perplexity(
    model: &CausalLM,
    ids: &[u32],
    seq_len: usize,
    max_windows: Option<usize>,
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<PerplexityResult> {
    let ws = windows(ids, seq_len, max_windows)?;
    let window_nll = window_nlls(model, &ws, batch_size, progress)?;
    let mean_nll = window_nll.iter().sum::<f64>() / window_nll.len() as f64;
    Ok(PerplexityResult {
        seq_len,
        windows: window_nll.len(),
        tokens: window_nll.len() * (seq_len - 1),
        mean_nll,
        perplexity: mean_nll.exp(),
        window_nll,
    })
}

/// Relative difference `|a − b| / |b|` of two perplexities (`b` the reference).
pub fn relative_difference(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_non_overlapping_and_drop_the_tail() {
        let ids: Vec<u32> = (0..10).collect();
        let w = windows(&ids, 3, None).unwrap();
        assert_eq!(w, vec![&[0, 1, 2][..], &[3, 4, 5], &[6, 7, 8]]);
        assert_eq!(windows(&ids, 3, Some(2)).unwrap().len(), 2);
        assert!(windows(&ids, 11, None)
            .unwrap_err()
            .to_string()
            .contains("fewer than one window"));
        assert!(windows(&ids, 1, None).is_err());
        assert!((relative_difference(10.1, 10.0) - 0.01).abs() < 1e-12);
    }
}
