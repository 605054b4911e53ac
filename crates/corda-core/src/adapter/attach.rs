//! Putting an adapter into a model. The adapter format depends on the model (it attaches
//! itself through [`CausalLM::attach_lora`]); the model knows only plain LoRA factors.

use super::weights::Adapter;
use crate::model::CausalLM;
use crate::Result;

impl Adapter {
    /// Attach every module's factors to `model` (as float32 variables, which train), with this
    /// adapter's scaling per module. A module the model lacks or a shape that differs is an error.
    pub fn attach_to(&self, model: &mut CausalLM) -> Result<()> {
        for (module, pair) in &self.modules {
            model.attach_lora(module, &pair.a, &pair.b, self.scaling(module))?;
        }
        Ok(())
    }
}
