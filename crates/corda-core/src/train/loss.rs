//! The causal language-modelling loss of supervised fine-tuning: position `t` predicts token
//! `t + 1`, and only tokens whose label is not `-100` (the response and its EOS, not the prompt
//! or the padding) count.
//!
//! candle's `cross_entropy` has no `ignore_index`, so the loss is built from ops that all have a
//! backward: the rows with a real label are selected (`index_select`), then `log_softmax`,
//! `gather` of the target log-probability, and a sum. Selecting the rows first also skips the
//! softmax over the vocabulary for prompt and padding positions, which is most of the batch in
//! SFT. The max subtracted inside the log-softmax is detached: the result does not depend on it,
//! so no gradient needs to flow through it.

use candle_core::{DType, Tensor};

use super::fused_ce;
use crate::{CordaError, Result};

pub use crate::data::IGNORE_INDEX;

/// The summed negative log-likelihood of a batch and the number of tokens it covers, so that
/// callers can normalise by a token count of their choice (one micro-batch, or a whole
/// accumulation window as the Trainer does since transformers 4.46).
#[derive(Debug, Clone)]
pub struct LossSum {
    /// Scalar float32 tensor, differentiable with respect to the logits. Zero (and detached)
    /// when `tokens == 0`.
    pub sum: Tensor,
    /// Number of target tokens (shifted labels that are not [`IGNORE_INDEX`]).
    pub tokens: usize,
}

impl LossSum {
    /// The mean over this batch's tokens (what `CrossEntropyLoss(ignore_index=-100)` returns).
    pub fn mean(&self) -> Result<Tensor> {
        if self.tokens == 0 {
            return Err(CordaError::Data(
                "no target tokens in the batch: every label is -100 (is the response truncated away? raise model_max_length)"
                    .into(),
            ));
        }
        Ok(self.sum.affine(1.0 / self.tokens as f64, 0.0)?)
    }
}

/// The (row of the flattened (B·T) positions, target) pairs that carry a loss: position t
/// predicts label t+1 (the causal shift), skipping labels equal to -100.
pub fn target_rows(labels: &Tensor, vocab: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let (_, t) = labels.dims2()?;
    let host: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (bi, row) in host.iter().enumerate() {
        for ti in 0..t.saturating_sub(1) {
            let label = row[ti + 1];
            if label == IGNORE_INDEX {
                continue;
            }
            if label < 0 || label as usize >= vocab {
                return Err(CordaError::Data(format!(
                    "label {label} at batch row {bi}, position {} is outside the vocabulary (size {vocab})",
                    ti + 1
                )));
            }
            rows.push((bi * t + ti) as u32);
            targets.push(label as u32);
        }
    }
    Ok((rows, targets))
}

/// Summed cross-entropy of the shifted labels != -100 and their count. `per_token` (B, T, X)
/// holds the logits themselves or the final hidden states; `row_losses` turns the (n, X) rows
/// that carry a loss and their targets into n losses, so a model can skip its LM head on
/// prompt and padding.
pub fn shifted_loss_sum(
    per_token: &Tensor,
    labels: &Tensor,
    vocab: usize,
    row_losses: impl FnOnce(&Tensor, &[u32]) -> Result<Tensor>,
) -> Result<LossSum> {
    let (b, t, x) = per_token.dims3()?;
    let (lb, lt) = labels.dims2()?;
    if (lb, lt) != (b, t) {
        return Err(CordaError::Invalid(format!(
            "labels have shape ({lb}, {lt}) but the model output is ({b}, {t}, {x})"
        )));
    }
    let (rows, targets) = target_rows(labels, vocab)?;
    let device = per_token.device();
    if rows.is_empty() {
        return Ok(LossSum {
            sum: Tensor::zeros((), DType::F32, device)?,
            tokens: 0,
        });
    }
    let n = rows.len();
    let rows = Tensor::from_vec(rows, n, device)?;
    let selected = per_token.reshape((b * t, x))?.index_select(&rows, 0)?;
    let sum = row_losses(&selected, &targets)?.sum_all()?;
    Ok(LossSum { sum, tokens: n })
}

/// [`shifted_loss_sum`] from full logits (B, T, vocab).
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<LossSum> {
    let vocab = logits.dim(2)?;
    shifted_loss_sum(logits, labels, vocab, fused_ce::cross_entropy_rows)
}

/// [`shifted_loss_sum`] from final hidden states (B, T, hidden) and the frozen LM head
/// (vocab, hidden): the head and the cross-entropy run as one op on the rows that carry a
/// loss ([`fused_ce::head_cross_entropy_rows`]), so the logits are never held whole.
pub fn head_loss_sum(hidden: &Tensor, head: &Tensor, labels: &Tensor) -> Result<LossSum> {
    let vocab = head.dim(0)?;
    shifted_loss_sum(hidden, labels, vocab, |rows, targets| {
        fused_ce::head_cross_entropy_rows(rows, head, targets)
    })
}

pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    causal_lm_loss_sum(logits, labels)?.mean()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Plain scalar cross-entropy for checking.
    fn reference(logits: &[Vec<Vec<f64>>], labels: &[Vec<i64>]) -> f64 {
        let mut total = 0.0;
        let mut n = 0;
        for (lrow, yrow) in logits.iter().zip(labels) {
            for t in 0..lrow.len() - 1 {
                let y = yrow[t + 1];
                if y == IGNORE_INDEX {
                    continue;
                }
                let m = lrow[t].iter().cloned().fold(f64::MIN, f64::max);
                let lse = lrow[t].iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
                total += lse - lrow[t][y as usize];
                n += 1;
            }
        }
        total / n as f64
    }

    #[test]
    fn matches_reference_and_ignores_masked_positions() {
        let dev = Device::Cpu;
        let (b, t, v) = (2, 4, 5);
        let vals: Vec<f32> = (0..b * t * v)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let logits = Tensor::from_vec(vals.clone(), (b, t, v), &dev).unwrap();
        let labels_v = vec![vec![-100i64, -100, 3, 1], vec![-100, 4, -100, -100]];
        let labels = Tensor::new(labels_v.clone(), &dev).unwrap();
        let loss = causal_lm_loss(&logits, &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let nested: Vec<Vec<Vec<f64>>> = (0..b)
            .map(|i| {
                (0..t)
                    .map(|j| (0..v).map(|k| vals[(i * t + j) * v + k] as f64).collect())
                    .collect()
            })
            .collect();
        let want = reference(&nested, &labels_v);
        assert!((loss as f64 - want).abs() < 1e-6, "{loss} vs {want}");
        let parts = causal_lm_loss_sum(&logits, &labels).unwrap();
        assert_eq!(parts.tokens, 3);
    }

    #[test]
    fn gradient_matches_softmax_minus_one_hot() {
        let dev = Device::Cpu;
        let logits =
            Var::from_vec(vec![0.1f32, 0.7, -0.2, 0.0, 0.0, 0.0], (1, 2, 3), &dev).unwrap();
        let labels = Tensor::new(&[[-100i64, 1]], &dev).unwrap();
        let grads = causal_lm_loss(logits.as_tensor(), &labels)
            .unwrap()
            .backward()
            .unwrap();
        let g = grads
            .get(logits.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let e: Vec<f64> = [0.1f64, 0.7, -0.2].iter().map(|x| x.exp()).collect();
        let z: f64 = e.iter().sum();
        let want = [e[0] / z, e[1] / z - 1.0, e[2] / z, 0.0, 0.0, 0.0];
        for (a, w) in g.iter().zip(want) {
            assert!((*a as f64 - w).abs() < 1e-6, "{g:?}");
        }
    }

    #[test]
    fn all_ignored_is_zero_tokens_and_mean_errors() {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((1, 3, 4), DType::F32, &dev).unwrap();
        let labels = Tensor::new(&[[-100i64, -100, -100]], &dev).unwrap();
        let parts = causal_lm_loss_sum(&logits, &labels).unwrap();
        assert_eq!(parts.tokens, 0);
        assert!(parts.mean().is_err());
        let bad = Tensor::new(&[[0i64, 9, 1]], &dev).unwrap();
        assert!(causal_lm_loss_sum(&logits, &bad).is_err());
    }
}
