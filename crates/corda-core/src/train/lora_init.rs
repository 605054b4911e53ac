//! The plain-LoRA baseline of the paper's tables (`--corda_mode False --lora_r R`): PEFT's
//! default initialisation on an unmodified model, so both runs go through the same tool.
//!
//! PEFT initialises `lora_A` like `nn.Linear` does, `kaiming_uniform_(a = sqrt(5))`, which is
//! uniform on `[-1/sqrt(d_in), 1/sqrt(d_in)]`, and `lora_B` to zero, so the model starts exactly
//! at the base model. The reference script uses `lora_alpha = r` (scaling 1) and the seven
//! projections. torch's generator cannot be reproduced here, so A is drawn from a ChaCha8
//! stream seeded by `--seed`: the same distribution, deterministic per seed.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::distributions::{Distribution, Uniform};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::adapter::{Adapter, AdapterConfig, LoraPair};
use crate::model::TARGET_PROJECTIONS;
use crate::{CordaError, Result};

/// The bound of PEFT's / `nn.Linear`'s default uniform init: `gain * sqrt(3 / fan_in)` with
/// `gain = sqrt(2 / (1 + 5))`, i.e. `1 / sqrt(d_in)`.
pub fn kaiming_uniform_bound(d_in: usize) -> f64 {
    let gain = (2.0f64 / (1.0 + 5.0)).sqrt();
    gain * (3.0 / d_in as f64).sqrt()
}

/// A fresh plain LoRA of rank `r` (alpha = r) over `modules` (module path, d_out, d_in),
/// A uniform in the Kaiming bound and B zero. Modules are processed in the given order.
pub fn plain_lora_adapter(
    modules: &[(String, usize, usize)],
    r: usize,
    seed: u64,
) -> Result<Adapter> {
    if r == 0 {
        return Err(CordaError::Invalid(
            "the LoRA rank must be at least 1".into(),
        ));
    }
    if modules.is_empty() {
        return Err(CordaError::Invalid(
            "the model has no target modules for LoRA".into(),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    for (name, d_out, d_in) in modules {
        let bound = kaiming_uniform_bound(*d_in) as f32;
        let dist = Uniform::new_inclusive(-bound, bound);
        let a: Vec<f32> = (0..r * d_in).map(|_| dist.sample(&mut rng)).collect();
        let a = Tensor::from_vec(a, (r, *d_in), &Device::Cpu)?;
        let b = Tensor::zeros((*d_out, r), candle_core::DType::F32, &Device::Cpu)?;
        out.insert(name.clone(), LoraPair { a, b });
    }
    let targets = TARGET_PROJECTIONS.iter().map(|s| s.to_string()).collect();
    let mut config = AdapterConfig::new_lora(r, r as f64, targets);
    config
        .extra
        .insert("task_type".into(), serde_json::Value::from("CAUSAL_LM"));
    Ok(Adapter {
        config,
        modules: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_is_bounded_b_is_zero_and_seeded() {
        let mods = vec![("model.layers.0.self_attn.q_proj".to_string(), 8, 16)];
        let ad = plain_lora_adapter(&mods, 4, 7).unwrap();
        let p = &ad.modules["model.layers.0.self_attn.q_proj"];
        assert_eq!(p.a.dims(), &[4, 16]);
        assert_eq!(p.b.dims(), &[8, 4]);
        let a = p.a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().all(|x| x.abs() <= 0.25 + 1e-7));
        assert!(a.iter().any(|x| x.abs() > 0.1));
        assert_eq!(
            p.b.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let again = plain_lora_adapter(&mods, 4, 7).unwrap();
        assert_eq!(
            again.modules[&mods[0].0]
                .a
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            a
        );
        assert_eq!(ad.config.lora_alpha, 4.0);
        assert_eq!(ad.config.scaling_for(&mods[0].0), 1.0);
        assert!((kaiming_uniform_bound(64) - 0.125).abs() < 1e-12);
    }
}
