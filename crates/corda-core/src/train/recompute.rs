//! Forward and backward of one micro-batch, with or without gradient checkpointing.
//!
//! Without checkpointing, one autograd graph spans the whole model and every activation of
//! every layer stays alive until the backward pass. With it (`--gradient_checkpointing`), the
//! forward pass keeps only the input hidden state of each residual block (two per decoder
//! layer: attention, MLP); the backward pass runs the blocks in reverse, reruns each block's
//! forward from its stored input with gradients tracked, and back-propagates the incoming
//! gradient `g` through it as the gradient of `sum(out ⊙ g)` (whose gradient with respect to
//! `out` is exactly `g`). Only one block's activations are alive at a time, for the price of a
//! second forward pass through the decoder layers (all but the last block, whose graph the
//! forward pass keeps: it would be the first recomputed).

use std::time::Instant;

use candle_core::{Tensor, Var};

use super::grads::Gradients;
use super::loss::{head_loss_sum, LossSum};
use super::trainable::TrainableModel;
use crate::model::causal_lm::mask_rows;
use crate::model::{AttnContext, CausalLM, DecoderLayer};
use crate::util::PhaseReport;
use crate::{CordaError, Result};

/// One micro-batch: token ids and attention mask (B, T) and labels (B, T, -100 = no loss).
pub struct MicroBatch<'b> {
    pub input_ids: &'b Tensor,
    pub attention_mask: &'b Tensor,
    pub labels: &'b Tensor,
}

/// The summed loss divided by `denom(tokens)`, and its value; the forward pass ends here.
/// `None` when the batch has no target token.
fn scaled_loss(
    parts: &LossSum,
    denom: &dyn Fn(usize) -> f64,
    report: &mut PhaseReport,
    forward_start: Instant,
) -> Result<Option<(Tensor, f64)>> {
    let out = if parts.tokens == 0 {
        None
    } else {
        let loss = parts.sum.affine(1.0 / denom(parts.tokens), 0.0)?;
        let value = loss.to_scalar::<f32>()? as f64;
        Some((loss, value))
    };
    report.add("forward", forward_start.elapsed());
    Ok(out)
}

/// One graph over the whole model: the loss is scaled by `1 / denom(tokens)`, back-propagated,
/// and the gradients of `vars` added to `grads`. `None` when the batch has no target token.
pub fn plain_forward_backward<M: TrainableModel + ?Sized>(
    model: &M,
    batch: &MicroBatch<'_>,
    denom: &dyn Fn(usize) -> f64,
    vars: &[Var],
    grads: &mut Gradients,
    report: &mut PhaseReport,
) -> Result<Option<f64>> {
    let t0 = Instant::now();
    let parts = model.loss_sum(batch.input_ids, batch.attention_mask, batch.labels)?;
    let Some((loss, value)) = scaled_loss(&parts, denom, report, t0)? else {
        return Ok(None);
    };
    let t1 = Instant::now();
    let store = loss.backward()?;
    grads.accumulate(&store, vars)?;
    drop(store);
    report.add("backward", t1.elapsed());
    Ok(Some(value))
}

/// A stretch of the model that the backward pass recomputes at once: one of a decoder layer's
/// two residual blocks. Recomputing a block rather than a whole layer keeps only the attention's
/// or only the MLP's activations alive at a time (on the benchmark model the two are of a size),
/// for one more stored hidden state per layer.
#[derive(Clone, Copy)]
enum Segment<'m> {
    Attention(&'m DecoderLayer),
    Mlp(&'m DecoderLayer),
}

impl Segment<'_> {
    fn forward(self, h: &Tensor, ctx: &AttnContext) -> Result<Tensor> {
        match self {
            Self::Attention(layer) => layer.attention_block(h, ctx, &mut None, None),
            Self::Mlp(layer) => layer.mlp_block(h, &mut None),
        }
    }
}

/// [`CausalLM`]'s forward and backward with each residual block recomputed in the backward
/// pass. The gradients equal those of the plain pass: the same ops run on the same inputs.
pub fn checkpointed_forward_backward(
    model: &CausalLM,
    batch: &MicroBatch<'_>,
    denom: &dyn Fn(usize) -> f64,
    vars: &[Var],
    grads: &mut Gradients,
    report: &mut PhaseReport,
) -> Result<Option<f64>> {
    let t0 = Instant::now();
    let (b, t) = batch.input_ids.dims2()?;
    let rows = mask_rows(batch.attention_mask)?;
    let ctx = AttnContext::new(&model.config, b, t, Some(&rows), &model.device)?;
    let segments: Vec<Segment<'_>> = model
        .layers
        .iter()
        .flat_map(|layer| [Segment::Attention(layer), Segment::Mlp(layer)])
        .collect();
    let missing = || {
        CordaError::Numerics(
            "gradient checkpointing: no gradient reached a block's hidden state".into(),
        )
    };
    let Some((last, rest)) = segments.split_last() else {
        return Err(CordaError::Invalid(
            "gradient checkpointing: the model has no decoder layer".into(),
        ));
    };
    // The first block's input (the embeddings) is frozen: no gradient is needed there.
    let tracked = |h: Tensor, block: usize| -> Result<Tensor> {
        Ok(if block == 0 {
            h
        } else {
            Var::from_tensor(&h)?.as_tensor().clone()
        })
    };
    // Forward: every block's graph but the last is dropped as soon as its output is detached.
    // The last block's is kept: recomputing it would be the backward's first step anyway.
    let mut inputs = Vec::with_capacity(rest.len());
    let mut h = model.embed_tokens.lookup(batch.input_ids)?;
    for segment in rest {
        let out = segment.forward(&h, &ctx)?.detach();
        inputs.push(h);
        h = out;
    }
    let x = tracked(h, rest.len())?;
    let parts = head_loss_sum(
        &model.norm.forward(&last.forward(&x, &ctx)?)?,
        &model.lm_head,
        batch.labels,
    )?;
    let Some((loss, value)) = scaled_loss(&parts, denom, report, t0)? else {
        return Ok(None);
    };

    let t1 = Instant::now();
    let store = loss.backward()?;
    grads.accumulate(&store, vars)?;
    let mut g = if rest.is_empty() {
        None
    } else {
        Some(store.get(&x).ok_or_else(missing)?.detach())
    };
    drop((store, loss, parts, x));
    for (i, segment) in rest.iter().enumerate().rev() {
        let g_out = g.take().ok_or_else(missing)?;
        let x = tracked(inputs.pop().ok_or_else(missing)?, i)?;
        let out = segment.forward(&x, &ctx)?;
        let store = (out * &g_out)?.sum_all()?.backward()?;
        grads.accumulate(&store, vars)?;
        if i > 0 {
            g = Some(store.get(&x).ok_or_else(missing)?.detach());
        }
    }
    report.add("backward", t1.elapsed());
    Ok(Some(value))
}
