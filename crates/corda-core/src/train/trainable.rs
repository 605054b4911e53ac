//! What the training loop needs from a model: logits for a batch, and the LoRA factors that
//! train. Keeping it a trait lets the loop be tested on toy models and keeps it independent of
//! how the decoder is built.

use candle_core::{Device, Tensor, Var};

use super::grads::Gradients;
use super::loss::{causal_lm_loss_sum, head_loss_sum, LossSum};
use super::recompute::{checkpointed_forward_backward, plain_forward_backward, MicroBatch};
use crate::model::CausalLM;
use crate::util::PhaseReport;
use crate::{CordaError, Result};

/// A model whose only trainable parameters are LoRA factors.
pub trait TrainableModel {
    /// Logits (B, T, vocab) for `input_ids` (B, T) with `attention_mask` (B, T), differentiable
    /// with respect to the LoRA factors.
    fn logits(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor>;

    /// (module path, A (r, d_in), B (d_out, r)) of every attached LoRA, in a stable order.
    fn lora_factors(&self) -> Vec<(String, Var, Var)>;

    /// Where the batches must live.
    fn device(&self) -> Device;

    /// Summed loss over the shifted labels != -100 and their count. The default goes through
    /// full logits; a model may skip the LM head for positions that carry no loss.
    fn loss_sum(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        labels: &Tensor,
    ) -> Result<LossSum> {
        causal_lm_loss_sum(&self.logits(input_ids, attention_mask)?, labels)
    }

    /// Forward and backward of one micro-batch: the loss (summed over its target tokens, divided
    /// by `denom(tokens)`) and the gradients of `vars` added to `grads`; `None` when the batch has
    /// no target token. `checkpoint` recomputes activations in the backward pass instead of
    /// keeping them; a model that cannot do that refuses it.
    fn forward_backward(
        &self,
        batch: &MicroBatch<'_>,
        denom: &dyn Fn(usize) -> f64,
        checkpoint: bool,
        vars: &[Var],
        grads: &mut Gradients,
        report: &mut PhaseReport,
    ) -> Result<Option<f64>> {
        if checkpoint {
            return Err(CordaError::Invalid(
                "gradient checkpointing is not available for this model; train without it".into(),
            ));
        }
        plain_forward_backward(self, batch, denom, vars, grads, report)
    }
}

impl TrainableModel for CausalLM {
    fn logits(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.forward(input_ids, Some(attention_mask))
    }

    fn lora_factors(&self) -> Vec<(String, Var, Var)> {
        self.lora_vars()
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    /// The LM head (vocab × hidden per token, the largest matmul of a small model) runs only on
    /// the positions whose next label is trained (the prompt and the padding are skipped), as
    /// one op with the cross-entropy, so the logits are never held whole.
    fn loss_sum(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        labels: &Tensor,
    ) -> Result<LossSum> {
        let h = self.hidden_states(input_ids, Some(attention_mask))?;
        head_loss_sum(&h, &self.lm_head, labels)
    }

    /// With `checkpoint`, each decoder layer is recomputed in the backward pass (see
    /// [`super::recompute`]).
    fn forward_backward(
        &self,
        batch: &MicroBatch<'_>,
        denom: &dyn Fn(usize) -> f64,
        checkpoint: bool,
        vars: &[Var],
        grads: &mut Gradients,
        report: &mut PhaseReport,
    ) -> Result<Option<f64>> {
        if checkpoint {
            return checkpointed_forward_backward(self, batch, denom, vars, grads, report);
        }
        plain_forward_backward(self, batch, denom, vars, grads, report)
    }
}

/// The PEFT state-dict names of a module's factors (`base_model.model.<module>.lora_A.weight`),
/// used to key the optimizer state and gradients like PEFT does.
pub fn factor_names(module: &str) -> (String, String) {
    (
        format!("base_model.model.{module}.lora_A.weight"),
        format!("base_model.model.{module}.lora_B.weight"),
    )
}
