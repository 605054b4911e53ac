//! A trained CorDA adapter only works on its residual model (W_res = W - s B0 A0). PEFT's
//! `save_pretrained(..., path_initial_model_for_weight_conversion=...)` rewrites it as a plain LoRA
//! for the original W: s (B A - B0 A0) = s [B | -B0] [A ; A0], so the rank doubles and nothing is
//! approximated. This module does exactly that, plus the per-module weight deltas used by merging.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Tensor};
use serde_json::Value;

use super::{Adapter, AdapterConfig, LoraPair};
use crate::{CordaError, Result};

/// PEFT's reason for refusing the conversion (`LoraModel._convert_state_dict_for_initial_model`):
/// doubling a per-module alpha is wrong under rsLoRA.
pub const RSLORA_PATTERN_ERROR: &str = "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.";

/// Check that `initial` (the `corda_init` adapter) and `trained` (the fine-tuned one) come from the
/// same CorDA run: same config values that define the scaling, same modules, same shapes.
pub fn check_compatible(initial: &Adapter, trained: &Adapter) -> Result<()> {
    let (ci, ct) = (&initial.config, &trained.config);
    let set = |c: &AdapterConfig| c.target_modules.iter().cloned().collect::<BTreeSet<_>>();
    let (ti, tt) = (set(ci), set(ct));
    if ti != tt {
        let only_i: Vec<_> = ti.difference(&tt).cloned().collect();
        let only_t: Vec<_> = tt.difference(&ti).cloned().collect();
        return Err(mismatch(format!(
            "target_modules differ (only in the initial adapter: {only_i:?}; only in the trained adapter: {only_t:?})"
        )));
    }
    if ci.r != ct.r {
        return Err(mismatch(format!(
            "r is {} in the initial adapter but {} in the trained one",
            ci.r, ct.r
        )));
    }
    if ci.lora_alpha != ct.lora_alpha {
        return Err(mismatch(format!(
            "lora_alpha is {} in the initial adapter but {} in the trained one",
            ci.lora_alpha, ct.lora_alpha
        )));
    }
    if ci.use_rslora != ct.use_rslora {
        return Err(mismatch(format!(
            "use_rslora is {} in the initial adapter but {} in the trained one",
            ci.use_rslora, ct.use_rslora
        )));
    }
    if ci.rank_pattern != ct.rank_pattern || ci.alpha_pattern != ct.alpha_pattern {
        return Err(mismatch(
            "rank_pattern or alpha_pattern differ between the two adapters".to_string(),
        ));
    }
    if ci.base_model_name_or_path != ct.base_model_name_or_path {
        // Normal: the trained adapter names the residual model, the initial one the base.
        tracing::debug!(
            "base_model_name_or_path differs: {:?} (initial) vs {:?} (trained)",
            ci.base_model_name_or_path,
            ct.base_model_name_or_path
        );
    }

    for module in initial.modules.keys() {
        if !trained.modules.contains_key(module) {
            return Err(mismatch(format!(
                "module `{module}` is in the initial adapter but not in the trained one"
            )));
        }
    }
    for (module, t) in &trained.modules {
        let Some(i) = initial.modules.get(module) else {
            return Err(mismatch(format!(
                "module `{module}` is in the trained adapter but not in the initial one"
            )));
        };
        if i.a.dims() != t.a.dims() || i.b.dims() != t.b.dims() {
            return Err(mismatch(format!(
                "module `{module}` has lora_A {:?} / lora_B {:?} in the initial adapter but {:?} / {:?} in the trained one",
                i.a.dims(),
                i.b.dims(),
                t.a.dims(),
                t.b.dims()
            )));
        }
    }
    Ok(())
}

fn mismatch(what: String) -> CordaError {
    CordaError::Adapter(format!(
        "the initial and trained adapters do not belong together: {what}; pass the corda_init adapter saved with the residual model that the trained adapter was fine-tuned on"
    ))
}

/// The config PEFT saves with a converted adapter: the trained config with r and every
/// `rank_pattern` value doubled, `lora_alpha` and every `alpha_pattern` value doubled (alpha times
/// sqrt 2 with rsLoRA, which keeps alpha / sqrt(r)), and `init_lora_weights: true`.
pub fn converted_config(trained: &AdapterConfig) -> Result<AdapterConfig> {
    if trained.use_rslora && (!trained.rank_pattern.is_empty() || !trained.alpha_pattern.is_empty())
    {
        return Err(CordaError::Adapter(format!(
            "{RSLORA_PATTERN_ERROR} (PEFT refuses this too; compressing to a fixed rank K writes a uniform adapter and works)"
        )));
    }
    let mut c = trained.clone();
    c.init_lora_weights = Value::Bool(true);
    c.r *= 2;
    c.lora_alpha *= if c.use_rslora {
        std::f64::consts::SQRT_2
    } else {
        2.0
    };
    c.rank_pattern.values_mut().for_each(|v| *v *= 2);
    c.alpha_pattern.values_mut().for_each(|v| *v *= 2.0);
    Ok(c)
}

/// PEFT's `path_initial_model_for_weight_conversion`: `lora_A' = [A ; A0]` (2r x d_in) and
/// `lora_B' = [B | -B0]` (d_out x 2r) for every module, with [`converted_config`].
pub fn convert_to_lora(initial: &Adapter, trained: &Adapter) -> Result<Adapter> {
    let mut config = converted_config(&trained.config)?;
    // The trained adapter names the residual model it was fine-tuned on; the converted LoRA
    // belongs to the original model, which corda_init names.
    if initial.config.base_model_name_or_path.is_some() {
        config.base_model_name_or_path = initial.config.base_model_name_or_path.clone();
    }
    check_compatible(initial, trained)?;
    // PEFT warns too: the conversion is only meaningful for adapters whose initial value mutated
    // the base weights (CorDA, PiSSA, OLoRA, LoRA-GA); `true` is what a saved corda_init says.
    let known = match &trained.config.init_lora_weights {
        Value::Bool(b) => *b,
        Value::String(s) => ["pissa", "corda", "olora", "lora_ga", "true"]
            .iter()
            .any(|p| s.to_lowercase().starts_with(p)),
        _ => false,
    };
    if !known {
        tracing::warn!(
            "the trained adapter has init_lora_weights = {}; the conversion assumes it started from the initial adapter",
            trained.config.init_lora_weights
        );
    }
    let mut modules = BTreeMap::new();
    for (module, t) in &trained.modules {
        let i = &initial.modules[module];
        let a = Tensor::cat(&[&t.a, &i.a], 0)?.contiguous()?;
        let b = Tensor::cat(&[&t.b, &i.b.neg()?], 1)?.contiguous()?;
        modules.insert(module.clone(), LoraPair { a, b });
    }
    Ok(Adapter { config, modules })
}

/// The stacked factors `(s [B | -B0], [A ; A0])` of one module's update, in f64, so that
/// dW = first @ second.
pub(crate) fn delta_factors(
    initial: &Adapter,
    trained: &Adapter,
    module: &str,
) -> Result<(Tensor, Tensor)> {
    let (Some(t), Some(i)) = (trained.modules.get(module), initial.modules.get(module)) else {
        return Err(mismatch(format!(
            "module `{module}` is missing from one of the adapters"
        )));
    };
    let s = trained.scaling(module);
    let a = Tensor::cat(&[&t.a, &i.a], 0)?.to_dtype(DType::F64)?;
    let b = (Tensor::cat(&[&t.b, &i.b.neg()?], 1)?.to_dtype(DType::F64)? * s)?;
    Ok((b, a))
}

/// dW of one module in f64, for callers that add it to a weight before rounding once.
pub(crate) fn delta_weight_f64(
    initial: &Adapter,
    trained: &Adapter,
    module: &str,
) -> Result<Tensor> {
    let (b, a) = delta_factors(initial, trained, module)?;
    Ok(b.matmul(&a)?)
}

/// The weight change of one module, dW = s (B A - B0 A0), (d_out, d_in) f32, computed in f64.
pub fn delta_weight(initial: &Adapter, trained: &Adapter, module: &str) -> Result<Tensor> {
    Ok(delta_weight_f64(initial, trained, module)?.to_dtype(DType::F32)?)
}

/// The weight change of every module, keyed by module path: original W + dW equals the residual
/// model with the trained adapter merged, i.e. the fine-tuned model.
pub fn delta_weights(initial: &Adapter, trained: &Adapter) -> Result<BTreeMap<String, Tensor>> {
    check_compatible(initial, trained)?;
    trained
        .modules
        .keys()
        .map(|m| Ok((m.clone(), delta_weight(initial, trained, m)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn adapter(r: usize, seed: f32, modules: &[&str]) -> Adapter {
        let targets = vec!["q_proj".to_string(), "v_proj".to_string()];
        let mut config = AdapterConfig::new_lora(r, 2.0 * r as f64, targets);
        config.init_lora_weights = Value::from("corda");
        let modules = modules
            .iter()
            .enumerate()
            .map(|(n, m)| {
                let f = |rows: usize, cols: usize, k: f32| {
                    let v: Vec<f32> = (0..rows * cols)
                        .map(|x| ((x as f32 + k) * 0.37).sin())
                        .collect();
                    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
                };
                let pair = LoraPair {
                    a: f(r, 6, seed + n as f32),
                    b: f(5, r, seed * 3.0 + n as f32),
                };
                (m.to_string(), pair)
            })
            .collect();
        Adapter { config, modules }
    }

    const MODS: [&str; 2] = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ];

    #[test]
    fn conversion_reproduces_the_delta() {
        let (init, trained) = (adapter(3, 0.0, &MODS), adapter(3, 1.0, &MODS));
        let lora = convert_to_lora(&init, &trained).unwrap();
        assert_eq!((lora.config.r, lora.config.lora_alpha), (6, 12.0));
        assert_eq!(lora.config.init_lora_weights, Value::Bool(true));
        let deltas = delta_weights(&init, &trained).unwrap();
        for m in MODS {
            let p = &lora.modules[m];
            assert_eq!((p.a.dims(), p.b.dims()), (&[6, 6][..], &[5, 6][..]));
            let got = (p.b.matmul(&p.a).unwrap() * lora.scaling(m)).unwrap();
            let diff = (got - &deltas[m])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{m}: {diff}");
        }
    }

    #[test]
    fn config_doubling_and_rslora_refusal() {
        let mut c = AdapterConfig::new_lora(8, 16.0, vec!["q_proj".into()]);
        c.rank_pattern.insert("layers.0.self_attn.q_proj".into(), 4);
        c.alpha_pattern.insert("q_proj".into(), 3.0);
        let d = converted_config(&c).unwrap();
        assert_eq!(
            (
                d.r,
                d.lora_alpha,
                d.rank_pattern["layers.0.self_attn.q_proj"],
                d.alpha_pattern["q_proj"]
            ),
            (16, 32.0, 8, 6.0)
        );
        let m = "model.layers.0.self_attn.q_proj";
        assert_eq!(c.scaling_for(m), d.scaling_for(m));
        c.use_rslora = true;
        let err = converted_config(&c).unwrap_err().to_string();
        assert!(err.contains(RSLORA_PATTERN_ERROR), "{err}");
        c.rank_pattern.clear();
        c.alpha_pattern.clear();
        let d = converted_config(&c).unwrap();
        assert!((d.lora_alpha - 16.0 * 2f64.sqrt()).abs() < 1e-12);
        assert!((c.scaling_for(m) - d.scaling_for(m)).abs() < 1e-12);
    }

    #[test]
    fn mismatches_name_the_module() {
        let init = adapter(3, 0.0, &MODS);
        let err = convert_to_lora(&init, &adapter(3, 1.0, &MODS[..1]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(MODS[1]) && err.contains("not in the trained"),
            "{err}"
        );
        let mut other = adapter(3, 1.0, &MODS);
        other.config.r = 4;
        let err = convert_to_lora(&init, &other).unwrap_err().to_string();
        assert!(err.contains("r is 3"), "{err}");
        let mut wide = adapter(3, 1.0, &MODS);
        let p = wide.modules.get_mut(MODS[0]).unwrap();
        p.a = Tensor::zeros((3, 7), DType::F32, &Device::Cpu).unwrap();
        let err = convert_to_lora(&init, &wide).unwrap_err().to_string();
        assert!(err.contains(MODS[0]) && err.contains("[3, 7]"), "{err}");
        let mut targets = adapter(3, 1.0, &MODS);
        targets.config.target_modules.push("k_proj".into());
        let err = convert_to_lora(&init, &targets).unwrap_err().to_string();
        assert!(err.contains("k_proj"), "{err}");
    }
}
