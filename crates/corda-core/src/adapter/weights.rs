//! `adapter_model.safetensors`: the LoRA matrices of every wrapped module, with PEFT's key scheme
//! `base_model.model.<module>.lora_A.weight` (r x d_in) and `...lora_B.weight` (d_out x r).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::config::{AdapterConfig, CONFIG_FILE};
use crate::util::atomic::write_file_atomic;
use crate::{CordaError, Result};

/// The file name PEFT uses for the adapter weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The prefix PEFT puts before the module path (`PeftModel.base_model.model`).
const KEY_PREFIX: &str = "base_model.model.";

/// One LoRA module: the update is `scaling * b @ a`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `lora_A.weight`, (r, d_in), f32 on the CPU.
    pub a: Tensor,
    /// `lora_B.weight`, (d_out, r), f32 on the CPU.
    pub b: Tensor,
}

impl LoraPair {
    /// The rank r (rows of A).
    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }

    /// Input features (columns of A).
    pub fn d_in(&self) -> usize {
        self.a.dims().get(1).copied().unwrap_or(0)
    }

    /// Output features (rows of B).
    pub fn d_out(&self) -> usize {
        self.b.dims().first().copied().unwrap_or(0)
    }
}

/// A PEFT LoRA adapter: its config and the matrices keyed by module path
/// (e.g. `model.layers.0.self_attn.q_proj`).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub modules: BTreeMap<String, LoraPair>,
}

/// Which matrix of a module a safetensors key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

/// Split a PEFT key into (module path, side); `None` for keys that are not LoRA A/B weights.
fn parse_key(key: &str) -> Option<(&str, Side)> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    if let Some(module) = rest.strip_suffix(".lora_A.weight") {
        Some((module, Side::A))
    } else {
        rest.strip_suffix(".lora_B.weight")
            .map(|module| (module, Side::B))
    }
}

/// The safetensors key of one side of `module`.
fn key_for(module: &str, side: Side) -> String {
    match side {
        Side::A => format!("{KEY_PREFIX}{module}.lora_A.weight"),
        Side::B => format!("{KEY_PREFIX}{module}.lora_B.weight"),
    }
}

impl Adapter {
    /// Load a PEFT adapter directory. Every float dtype is widened to f32.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(CordaError::Adapter(format!(
                "adapter directory {} does not exist (expected {CONFIG_FILE} and {WEIGHTS_FILE} in it)",
                dir.display()
            )));
        }
        let config = AdapterConfig::read(dir)?;
        let path = dir.join(WEIGHTS_FILE);
        if !path.is_file() {
            let hint = if dir.join("adapter_model.bin").is_file() {
                "; only adapter_model.bin (a pickle) is there: re-save it with PEFT's save_pretrained(safe_serialization=True)"
            } else {
                ""
            };
            return Err(CordaError::Adapter(format!(
                "{} not found{hint}",
                path.display()
            )));
        }
        let st_err = |e: candle_core::Error| CordaError::Safetensors {
            path: path.clone(),
            reason: e.to_string(),
        };
        // SAFETY: the file is mapped read-only; as with any mmap, it must not be truncated while in use.
        let st = unsafe { MmapedSafetensors::new(&path) }.map_err(st_err)?;

        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        names.sort();
        for name in &names {
            let Some((module, side)) = parse_key(name) else {
                tracing::warn!(
                    "{}: ignoring `{name}`, which is not a lora_A/lora_B weight",
                    path.display()
                );
                continue;
            };
            let t = st
                .load(name, &Device::Cpu)
                .map_err(|e| CordaError::Safetensors {
                    path: path.clone(),
                    reason: format!("tensor `{name}`: {e}"),
                })?;
            if !t.dtype().is_float() {
                return Err(CordaError::Adapter(format!(
                    "{}: `{name}` has dtype {:?}; LoRA weights must be floating point",
                    path.display(),
                    t.dtype()
                )));
            }
            if t.rank() != 2 {
                return Err(CordaError::Adapter(format!(
                    "{}: `{name}` has shape {:?}; LoRA weights must be matrices",
                    path.display(),
                    t.dims()
                )));
            }
            let t = t.to_dtype(DType::F32)?.contiguous()?;
            let bad = t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .filter(|x| !x.is_finite())
                .count();
            if bad > 0 {
                return Err(CordaError::Adapter(format!(
                    "{}: `{name}` has {bad} non-finite values (NaN or infinity); the adapter is broken, typically by a diverged training run",
                    path.display()
                )));
            }
            let entry = halves.entry(module.to_string()).or_default();
            match side {
                Side::A => entry.0 = Some(t),
                Side::B => entry.1 = Some(t),
            }
        }
        if halves.is_empty() {
            return Err(CordaError::Adapter(format!(
                "{} holds no `{KEY_PREFIX}<module>.lora_A.weight` / `lora_B.weight` tensors; is it a PEFT LoRA adapter?",
                path.display()
            )));
        }

        let mut modules = BTreeMap::new();
        for (module, (a, b)) in halves {
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (a, _) => {
                    let (has, missing) = if a.is_some() {
                        ("lora_A", "lora_B")
                    } else {
                        ("lora_B", "lora_A")
                    };
                    return Err(CordaError::Adapter(format!(
                        "{}: module `{module}` has {has} but no {missing}; the file is incomplete, re-save the adapter",
                        path.display()
                    )));
                }
            };
            let pair = LoraPair { a, b };
            if pair.b.dims()[1] != pair.rank() {
                return Err(CordaError::Adapter(format!(
                    "{}: module `{module}` has lora_A {:?} and lora_B {:?}; their ranks differ (A must be r x d_in, B d_out x r)",
                    path.display(),
                    pair.a.dims(),
                    pair.b.dims()
                )));
            }
            let expected = config.rank_for(&module);
            // PEFT refuses such an adapter (size mismatch), and its scaling would be wrong here:
            // training or converting it would only write another unloadable adapter.
            if pair.rank() != expected {
                return Err(CordaError::Adapter(format!(
                    "{}: module `{module}` has rank {} but {CONFIG_FILE} implies r = {expected} (r / rank_pattern); PEFT refuses to load such an adapter. Make r / rank_pattern in {} match the tensors",
                    path.display(),
                    pair.rank(),
                    dir.join(CONFIG_FILE).display()
                )));
            }
            modules.insert(module, pair);
        }
        Ok(Self { config, modules })
    }

    /// Write `dir/adapter_model.safetensors` (f32, metadata `{"format": "pt"}`, keys sorted) and
    /// `dir/adapter_config.json`. The bytes depend only on the contents.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::util::atomic::create_dir_all(dir)?;
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.modules.len());
        for (module, pair) in &self.modules {
            for (side, t) in [(Side::A, &pair.a), (Side::B, &pair.b)] {
                let t = t
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .contiguous()?;
                tensors.push((key_for(module, side), t));
            }
        }
        tensors.sort_by(|x, y| x.0.cmp(&y.0));
        let path = dir.join(WEIGHTS_FILE);
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes =
            safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
                .map_err(|e| CordaError::Safetensors {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
        write_file_atomic(&path, &bytes)?;
        self.config.write(dir)
    }

    /// The LoRA scaling of `module` from the config (alpha / r, or alpha / sqrt(r) with rsLoRA).
    pub fn scaling(&self, module: &str) -> f64 {
        self.config.scaling_for(module)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use corda_testdata::peft_tiny_llama as fixtures;

    #[test]
    fn parses_peft_keys() {
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"),
            Some(("model.layers.0.mlp.up_proj", Side::B))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.up_proj.lora_B.bias"),
            None
        );
        assert_eq!(
            key_for("m.q", Side::A),
            "base_model.model.m.q.lora_A.weight"
        );
    }

    #[test]
    fn fixture_adapters_load_and_round_trip() {
        for mode in ["kpm", "ipm"] {
            for kind in ["corda_init", "trained", "lora"] {
                let dir = fixtures().join(mode).join(kind);
                let ad = Adapter::load(&dir).unwrap();
                assert_eq!(ad.modules.len(), 14, "{}", dir.display());
                let r = ad.config.r;
                for pair in ad.modules.values() {
                    assert_eq!(pair.rank(), r);
                    assert_eq!(pair.a.dtype(), DType::F32);
                }
                let out = tempfile::tempdir().unwrap();
                ad.save(out.path()).unwrap();
                // Same tensors, same bytes as PEFT's file (PEFT also sorts and uses f32 + {"format":"pt"}).
                let ours = std::fs::read(out.path().join(WEIGHTS_FILE)).unwrap();
                let theirs = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
                let back = Adapter::load(out.path()).unwrap();
                assert_eq!(back.config, ad.config);
                for (m, p) in &ad.modules {
                    let q = &back.modules[m];
                    let d = (&p.a - &q.a)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    let e = (&p.b - &q.b)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert_eq!((d, e), (0.0, 0.0), "{m}");
                }
                assert!(
                    ours == theirs,
                    "{}: bytes differ from PEFT's file",
                    dir.display()
                );
                let again = tempfile::tempdir().unwrap();
                back.save(again.path()).unwrap();
                assert_eq!(
                    std::fs::read(again.path().join(WEIGHTS_FILE)).unwrap(),
                    ours
                );
            }
        }
    }

    #[test]
    fn scaling_follows_config() {
        let ad = Adapter::load(&fixtures().join("kpm/lora")).unwrap();
        assert_eq!(ad.scaling("model.layers.0.self_attn.q_proj"), 2.0);
    }
}
