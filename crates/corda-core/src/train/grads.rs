//! Gradients of the trainable variables, summed over the micro-batches of one optimizer step.
//!
//! candle's `GradStore` cannot be created empty (`GradStore::new` is private) and it also holds
//! the gradients candle computes for the frozen operands of every matmul. Each micro-batch's
//! store is therefore read once, for the trainable variables only, and dropped at once, so the
//! memory of the frozen-weight gradients is freed before the next forward pass.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;

/// The running sum of the gradients of `vars`, aligned with them (`None` = no gradient yet).
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    grads: Vec<Option<Tensor>>,
}

impl Gradients {
    /// No gradients yet for `n` variables.
    pub fn new(n: usize) -> Self {
        Self {
            grads: vec![None; n],
        }
    }

    /// Add the gradients `store` holds for `vars` (in the order used at construction).
    pub fn accumulate(&mut self, store: &GradStore, vars: &[Var]) -> Result<()> {
        if self.grads.len() != vars.len() {
            self.grads.resize(vars.len(), None);
        }
        for (slot, var) in self.grads.iter_mut().zip(vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.detach();
                *slot = Some(match slot.take() {
                    Some(prev) => prev.add(&g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// The summed gradients, aligned with the variables.
    pub fn as_slice(&self) -> &[Option<Tensor>] {
        &self.grads
    }

    /// Mutable access (clipping scales them in place).
    pub fn as_mut_slice(&mut self) -> &mut [Option<Tensor>] {
        &mut self.grads
    }

    /// How many variables received a gradient.
    pub fn present(&self) -> usize {
        self.grads.iter().filter(|g| g.is_some()).count()
    }

    /// Forget every gradient (the `zero_grad` after an optimizer step).
    pub fn clear(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sums_over_micro_batches() {
        let dev = Device::Cpu;
        let a = Var::from_slice(&[1.0f32, 2.0], 2, &dev).unwrap();
        let b = Var::from_slice(&[3.0f32], 1, &dev).unwrap();
        let vars = vec![a.clone(), b.clone()];
        let mut acc = Gradients::new(2);
        // d/da sum(a^2) = 2a; b unused in the first pass.
        let store = a
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        acc.accumulate(&store, &vars).unwrap();
        assert_eq!(acc.present(), 1);
        let loss = (a.as_tensor().sum_all().unwrap() + b.as_tensor().sum_all().unwrap()).unwrap();
        acc.accumulate(&loss.backward().unwrap(), &vars).unwrap();
        let ga = acc.as_slice()[0]
            .as_ref()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ga, vec![3.0, 5.0]);
        let gb = acc.as_slice()[1]
            .as_ref()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(gb, vec![1.0]);
        acc.clear();
        assert_eq!(acc.present(), 0);
    }
}
