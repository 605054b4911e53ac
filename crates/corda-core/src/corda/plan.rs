//! What a run will decompose, decided before any work: the target modules of every layer (PEFT's
//! `target_modules`) with their rank, scaling and input site, checked against the model.

use crate::adapter::AdapterConfig;
use crate::model::{module_name, InputSite, ModelConfig, TARGET_PROJECTIONS};
use crate::{CordaError, Result};

/// One module to decompose.
#[derive(Debug, Clone)]
pub struct Target {
    /// `q_proj` … `down_proj`.
    pub proj: &'static str,
    /// The module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub name: String,
    /// Where it reads its input: modules of one site share a covariance.
    pub site: InputSite,
    /// (d_out, d_in).
    pub shape: (usize, usize),
    /// r of this module (PEFT's `rank_pattern` or r).
    pub rank: usize,
    /// alpha/r (or alpha/√r with rsLoRA).
    pub scaling: f64,
}

/// The targets of every decoder layer, in layer and projection order.
pub struct Plan {
    pub layers: Vec<Vec<Target>>,
}

impl Plan {
    /// Targets of `cfg`'s layers by the adapter config's rule; refuses an empty selection and any
    /// rank outside 1..=min(d_out, d_in), so bad options fail before any work.
    pub fn new(cfg: &ModelConfig, adapter: &AdapterConfig) -> Result<Self> {
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut targets = vec![];
            for proj in TARGET_PROJECTIONS {
                let name = module_name(l, proj);
                if !adapter.is_target(&name) {
                    continue;
                }
                let (site, shape) =
                    InputSite::of(proj)
                        .zip(cfg.target_shape(proj))
                        .ok_or_else(|| {
                            CordaError::Model(format!(
                                "{name}: the model config gives no shape for {proj}"
                            ))
                        })?;
                let rank = adapter.rank_for(&name);
                let k = shape.0.min(shape.1);
                if rank == 0 || rank > k {
                    return Err(CordaError::Invalid(format!(
                        "rank {rank} of {name} ({}x{}, layer {l}) is not in 1..={k} = min(d_out, d_in); lower r or give {proj} a smaller rank in the rank pattern ({proj}=N)",
                        shape.0, shape.1
                    )));
                }
                let scaling = adapter.scaling_for(&name);
                targets.push(Target {
                    proj,
                    name,
                    site,
                    shape,
                    rank,
                    scaling,
                });
            }
            layers.push(targets);
        }
        if layers.iter().all(Vec::is_empty) {
            return Err(CordaError::Invalid(format!(
                "the target modules {:?} match no linear layer of this model; use names such as {}",
                adapter.target_modules,
                TARGET_PROJECTIONS.join(",")
            )));
        }
        Ok(Self { layers })
    }

    /// Every target, layer by layer.
    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.layers.iter().flatten()
    }
}
