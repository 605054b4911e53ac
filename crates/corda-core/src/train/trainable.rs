//! What the training loop needs from a model: logits for a batch, and the LoRA factors that
//! train. Keeping it a trait lets the loop be tested on toy models and keeps it independent of
//! how the decoder is built.

use candle_core::{Device, Tensor, Var};

use super::loss::{causal_lm_loss_sum, shifted_loss_sum, LossSum};
use crate::model::CausalLM;
use crate::Result;

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
    /// the positions whose next label is trained: the prompt and the padding are skipped.
    fn loss_sum(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        labels: &Tensor,
    ) -> Result<LossSum> {
        let h = self.hidden_states(input_ids, Some(attention_mask))?;
        shifted_loss_sum(&h, labels, self.config.vocab_size, |rows| {
            Ok(self.lm_head_logits(&rows.unsqueeze(0)?)?.squeeze(0)?)
        })
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
