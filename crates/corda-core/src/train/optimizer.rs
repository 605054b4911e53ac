//! AdamW exactly as `torch.optim.AdamW` computes it (the Trainer's `adamw_torch`), over candle
//! `Var`s, with a state that can be saved and restored.
//!
//! candle-nn ships an `AdamW`, but its moment estimates are private, so a checkpoint could not
//! hold them and a resumed run would restart the moments from zero (a different trajectory
//! from the uninterrupted run). This one keeps `exp_avg` / `exp_avg_sq` in float32 whatever
//! dtype the frozen model uses, and follows torch's single-tensor update step by step:
//!
//! ```text
//! p      *= 1 - lr * weight_decay                      (decoupled weight decay, first)
//! m       = lerp(m, g, 1 - beta1)                      (= beta1 * m + (1 - beta1) * g)
//! v       = beta2 * v + (1 - beta2) * g * g
//! denom   = sqrt(v) / sqrt(1 - beta2^t) + eps          (eps after the bias correction)
//! p      -= lr / (1 - beta1^t) * m / denom
//! ```

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};

use crate::{CordaError, Result};

/// The Trainer's `optim` names this optimizer implements. torch's `adamw_torch_fused` is the
/// same update rule as `adamw_torch` computed by one fused kernel (torch documents `fused` as
/// an implementation choice of `torch.optim.AdamW`), so both run the update above; any other
/// name (Adafactor, 8-bit Adam, SGD, ...) is refused rather than silently replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerName {
    #[default]
    AdamWTorch,
    AdamWTorchFused,
}

impl std::str::FromStr for OptimizerName {
    type Err = CordaError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adamw_torch" => Ok(Self::AdamWTorch),
            "adamw_torch_fused" => Ok(Self::AdamWTorchFused),
            other => Err(CordaError::Invalid(format!(
                "optimizer `{other}` is not implemented; use adamw_torch (or adamw_torch_fused, the same update)"
            ))),
        }
    }
}

impl std::fmt::Display for OptimizerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AdamWTorch => "adamw_torch",
            Self::AdamWTorchFused => "adamw_torch_fused",
        })
    }
}

/// AdamW hyper-parameters (the learning rate comes from the schedule at every step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One trainable tensor and its moment estimates.
struct ParamState {
    name: String,
    var: Var,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Decoupled-weight-decay Adam over named float32 variables.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    step: u64,
}

impl AdamW {
    /// An optimizer over `params` (name, variable), moments at zero. Names key the saved state,
    /// so they must be unique; variables must be float32 (the moments share their dtype).
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        if !(0.0..1.0).contains(&config.beta1) || !(0.0..1.0).contains(&config.beta2) {
            return Err(CordaError::Invalid(format!(
                "adam betas must lie in [0, 1), got ({}, {})",
                config.beta1, config.beta2
            )));
        }
        if config.eps < 0.0 || config.weight_decay < 0.0 {
            return Err(CordaError::Invalid(format!(
                "adam_epsilon and weight_decay must be non-negative, got {} and {}",
                config.eps, config.weight_decay
            )));
        }
        let mut seen = std::collections::HashSet::new();
        let mut states = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(CordaError::Invalid(format!(
                    "parameter `{name}` is given to the optimizer twice"
                )));
            }
            if var.dtype() != DType::F32 {
                return Err(CordaError::Invalid(format!(
                    "parameter `{name}` is {:?}; trainable parameters must be float32",
                    var.dtype()
                )));
            }
            let exp_avg = var.as_tensor().zeros_like()?;
            let exp_avg_sq = var.as_tensor().zeros_like()?;
            states.push(ParamState {
                name,
                var,
                exp_avg,
                exp_avg_sq,
            });
        }
        Ok(Self {
            config,
            params: states,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Number of optimizer steps taken so far (torch's `state["step"]`).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Parameter names in optimizer order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// The variables in optimizer order (the order `step` expects gradients in).
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.params.iter().map(|p| &p.var)
    }

    /// One update with learning rate `lr`. `grads[i]` belongs to the i-th parameter; a `None`
    /// leaves that parameter and its moments untouched, like torch skips `p.grad is None`.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(CordaError::Invalid(format!(
                "optimizer has {} parameters but got {} gradients",
                self.params.len(),
                grads.len()
            )));
        }
        if grads.iter().all(Option::is_none) {
            // torch counts steps per parameter, only for parameters with a gradient.
            return Ok(());
        }
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(DType::F32)?;
            let mut value = p.var.as_tensor().detach();
            if weight_decay != 0.0 {
                value = value.affine(1.0 - lr * weight_decay, 0.0)?;
            }
            // torch's lerp for weight < 0.5: m + w * (g - m).
            p.exp_avg = (&p.exp_avg + (g.sub(&p.exp_avg)?.affine(1.0 - beta1, 0.0))?)?;
            p.exp_avg_sq =
                (p.exp_avg_sq.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let denom = p
                .exp_avg_sq
                .sqrt()?
                .affine(1.0 / bias_correction2_sqrt, eps)?;
            let update = p.exp_avg.div(&denom)?.affine(step_size, 0.0)?;
            p.var.set(&value.sub(&update)?)?;
        }
        Ok(())
    }

    /// The state as named tensors: `<name>.exp_avg`, `<name>.exp_avg_sq` and a scalar `step`.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let device = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut out = Vec::with_capacity(2 * self.params.len() + 1);
        for p in &self.params {
            out.push((format!("{}.exp_avg", p.name), p.exp_avg.clone()));
            out.push((format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.clone()));
        }
        out.push(("step".to_string(), Tensor::new(self.step as i64, &device)?));
        Ok(out)
    }

    /// Write the state to a safetensors file (see [`AdamW::state_tensors`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self.state_tensors()?.into_iter().collect();
        candle_core::safetensors::save(&tensors, path).map_err(|e| CordaError::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Restore the state written by [`AdamW::save`]. Every parameter must be present with its
    /// shape; anything else means the file belongs to another model or adapter.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let tensors =
            candle_core::safetensors::load(path, &device).map_err(|e| CordaError::Safetensors {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        self.load_state_tensors(&tensors, &path.display().to_string())
    }

    /// Restore from named tensors (see [`AdamW::state_tensors`]); `origin` names the source in errors.
    pub fn load_state_tensors(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        origin: &str,
    ) -> Result<()> {
        let step = tensors
            .get("step")
            .ok_or_else(|| CordaError::Invalid(format!("{origin}: optimizer state has no `step`")))?
            .to_dtype(DType::I64)?
            .to_scalar::<i64>()?;
        let expected = 2 * self.params.len() + 1;
        if tensors.len() != expected {
            return Err(CordaError::Invalid(format!(
                "{origin}: optimizer state has {} tensors but this adapter needs {expected}; the checkpoint belongs to another model or adapter",
                tensors.len()
            )));
        }
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut pair = Vec::with_capacity(2);
            for suffix in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{}.{suffix}", p.name);
                let t = tensors.get(&key).ok_or_else(|| {
                    CordaError::Invalid(format!(
                        "{origin}: optimizer state lacks `{key}`; the checkpoint belongs to another model or adapter"
                    ))
                })?;
                if t.dims() != p.var.dims() {
                    return Err(CordaError::ShapeMismatch {
                        name: key,
                        expected: p.var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                pair.push(t.to_dtype(DType::F32)?.to_device(p.var.device())?);
            }
            restored.push(pair);
        }
        for (p, mut pair) in self.params.iter_mut().zip(restored) {
            p.exp_avg_sq = pair.pop().expect("two tensors");
            p.exp_avg = pair.pop().expect("two tensors");
        }
        self.step = step.max(0) as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A scalar reference implementation of torch's single-tensor AdamW.
    fn reference(p0: &[f64], grads: &[Vec<f64>], lrs: &[f64], c: AdamWConfig) -> Vec<f64> {
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, (g, lr)) in grads.iter().zip(lrs).enumerate() {
            let t = (t + 1) as i32;
            for i in 0..p.len() {
                p[i] *= 1.0 - lr * c.weight_decay;
                m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
                v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
                let denom = v[i].sqrt() / (1.0 - c.beta2.powi(t)).sqrt() + c.eps;
                p[i] -= lr / (1.0 - c.beta1.powi(t)) * m[i] / denom;
            }
        }
        p
    }

    #[test]
    fn matches_torch_formula() {
        let dev = Device::Cpu;
        let c = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 0.1,
        };
        let p0 = vec![0.5, -1.0, 2.0, 0.0];
        let var =
            Var::from_slice(&p0.iter().map(|&x| x as f32).collect::<Vec<_>>(), 4, &dev).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], c).unwrap();
        let grads = vec![
            vec![0.1, -0.2, 0.3, 1e-4],
            vec![-0.5, 0.1, 0.0, 2.0],
            vec![0.05, 0.05, -1.0, 0.0],
        ];
        let lrs = [1e-2, 5e-3, 2e-2];
        for (g, lr) in grads.iter().zip(lrs) {
            let gt = Tensor::from_slice(&g.iter().map(|&x| x as f32).collect::<Vec<_>>(), 4, &dev)
                .unwrap();
            opt.step(&[Some(gt)], lr).unwrap();
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        let want = reference(&p0, &grads, &lrs, c);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert_eq!(opt.step_count(), 3);
    }

    #[test]
    fn none_gradient_skips_parameter() {
        let dev = Device::Cpu;
        let var = Var::from_slice(&[1.0f32, 2.0], 2, &dev).unwrap();
        let c = AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], c).unwrap();
        opt.step(&[None], 0.1).unwrap();
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        assert_eq!(opt.step_count(), 0);
    }

    #[test]
    fn state_round_trips_and_resumes_identically() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let c = AdamWConfig::default();
        let make = || Var::from_slice(&[0.3f32, -0.7, 1.1], 3, &dev).unwrap();
        let g = |k: f32| Tensor::from_slice(&[0.1 * k, -0.3, 0.2 / k], 3, &dev).unwrap();

        let full = make();
        let mut opt = AdamW::new(vec![("a".into(), full.clone())], c).unwrap();
        for k in 1..=4 {
            opt.step(&[Some(g(k as f32))], 1e-2).unwrap();
        }

        let part = make();
        let mut opt1 = AdamW::new(vec![("a".into(), part.clone())], c).unwrap();
        for k in 1..=2 {
            opt1.step(&[Some(g(k as f32))], 1e-2).unwrap();
        }
        let path = dir.path().join("optimizer.safetensors");
        opt1.save(&path).unwrap();
        let resumed = Var::from_tensor(part.as_tensor()).unwrap();
        let mut opt2 = AdamW::new(vec![("a".into(), resumed.clone())], c).unwrap();
        opt2.load(&path).unwrap();
        assert_eq!(opt2.step_count(), 2);
        for k in 3..=4 {
            opt2.step(&[Some(g(k as f32))], 1e-2).unwrap();
        }
        assert_eq!(
            full.as_tensor().to_vec1::<f32>().unwrap(),
            resumed.as_tensor().to_vec1::<f32>().unwrap()
        );

        let other = Var::from_slice(&[0.0f32; 4], 4, &dev).unwrap();
        let mut wrong = AdamW::new(vec![("a".into(), other)], c).unwrap();
        assert!(wrong.load(&path).is_err());
        let mut renamed = AdamW::new(vec![("b".into(), make())], c).unwrap();
        let err = renamed.load(&path).unwrap_err().to_string();
        assert!(err.contains("another model"), "{err}");
    }
}
