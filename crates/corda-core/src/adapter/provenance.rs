//! `corda_provenance.json` beside an adapter: which initial CorDA adapter it starts from (a
//! SHA-256 of that adapter's tensors) and its `corda_method`. Preprocessing writes it with
//! `corda_init`, fine-tuning with every checkpoint and the final adapter, and conversion checks
//! that the trained adapter started from the initial adapter it is given: subtracting another
//! starting point would give a wrong LoRA without any error.
//!
//! A side file rather than a key of `adapter_config.json`: PEFT loads a config with unknown
//! keys, but warns that it was "saved using a higher version of the library".

use std::path::Path;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Adapter, AdapterConfig};
use crate::util::atomic::write_file_atomic;
use crate::{CordaError, Result};

/// The file name in an adapter directory.
pub const PROVENANCE_FILE: &str = "corda_provenance.json";

/// Where an adapter comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// `kpm` or `ipm`, as in the config's `corda_config`.
    pub corda_method: Option<String>,
    /// [`fingerprint`] of the initial adapter.
    pub initial_adapter_sha256: String,
}

/// SHA-256 over every module (sorted): its name, then the shape and float32 little-endian
/// values of lora_A and lora_B. The same for an adapter in memory and read back from disk.
pub fn fingerprint(adapter: &Adapter) -> Result<String> {
    let mut h = Sha256::new();
    for (module, pair) in &adapter.modules {
        h.update(module.as_bytes());
        h.update([0u8]);
        for t in [&pair.a, &pair.b] {
            for d in t.dims() {
                h.update((*d as u64).to_le_bytes());
            }
            let v = t
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The `corda_method` recorded in a config's `corda_config`, if any.
pub fn corda_method(config: &AdapterConfig) -> Option<&str> {
    config
        .extra
        .get("corda_config")?
        .get("corda_method")?
        .as_str()
}

impl Provenance {
    /// The provenance of `initial` and of everything trained from it.
    pub fn of_initial(initial: &Adapter) -> Result<Self> {
        Ok(Self {
            corda_method: corda_method(&initial.config).map(str::to_string),
            initial_adapter_sha256: fingerprint(initial)?,
        })
    }

    /// `dir/corda_provenance.json`, or `None` when the adapter has none (PEFT's own, or older).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(PROVENANCE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CordaError::io(&path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| CordaError::Json { path, source })
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| CordaError::Invalid(format!("cannot serialise the provenance: {e}")))?;
        write_file_atomic(&dir.join(PROVENANCE_FILE), format!("{text}\n").as_bytes())
    }
}

/// Refuse an initial and a trained adapter of different CorDA methods, or a trained adapter
/// whose recorded starting point is not `initial` (or an initial adapter changed since
/// preprocessing). Adapters without a provenance file are only checked by method.
pub fn check_same_start(
    initial: &Adapter,
    initial_dir: &Path,
    trained: &Adapter,
    trained_dir: &Path,
) -> Result<()> {
    let (mi, mt) = (corda_method(&initial.config), corda_method(&trained.config));
    if let (Some(i), Some(t)) = (mi, mt) {
        if i != t {
            return Err(CordaError::Adapter(format!(
                "the initial adapter {} was made with corda_method {i} but the trained adapter {} with {t}; pass the corda_init written by the preprocessing run the trained adapter comes from",
                initial_dir.display(),
                trained_dir.display()
            )));
        }
    }
    let recorded_initial = Provenance::read(initial_dir)?;
    let recorded_trained = Provenance::read(trained_dir)?;
    if recorded_initial.is_none() && recorded_trained.is_none() {
        tracing::info!(
            "neither adapter has {PROVENANCE_FILE}; cannot check that {} is the starting point of {}",
            initial_dir.display(),
            trained_dir.display()
        );
        return Ok(());
    }
    let actual = fingerprint(initial)?;
    if let Some(p) = &recorded_initial {
        if p.initial_adapter_sha256 != actual {
            return Err(CordaError::Adapter(format!(
                "the initial adapter {} was changed after preprocessing (its tensors no longer match {PROVENANCE_FILE}); use the corda_init exactly as corda-preprocess wrote it",
                initial_dir.display()
            )));
        }
    }
    if let Some(p) = &recorded_trained {
        if p.initial_adapter_sha256 != actual {
            return Err(CordaError::Adapter(format!(
                "the trained adapter {} was fine-tuned from another initial adapter than {} (fingerprints {} and {}); pass the corda_init of the residual model it was trained on",
                trained_dir.display(),
                initial_dir.display(),
                short(&p.initial_adapter_sha256),
                short(&actual)
            )));
        }
        if let (Some(t), Some(i)) = (&p.corda_method, mi) {
            if t != i {
                return Err(CordaError::Adapter(format!(
                    "the trained adapter {} was fine-tuned from a {t} adapter but {} is {i}",
                    trained_dir.display(),
                    initial_dir.display()
                )));
            }
        }
    }
    Ok(())
}

/// Refuse to resume a run that trains from `ours` (the initial CorDA adapter's provenance, or
/// `None` for a plain LoRA) from the checkpoint `checkpoint_dir` of a run that started
/// elsewhere: another initial adapter (another residual model, KPM vs IPM), a plain LoRA where
/// this run is CorDA, or the reverse. The factors' shapes alone cannot tell them apart, and
/// the resumed run would stamp its own provenance on the other run's adapter.
pub fn check_resume(ours: Option<&Provenance>, checkpoint_dir: &Path) -> Result<()> {
    let theirs = Provenance::read(checkpoint_dir)?;
    let err = |why: String| {
        Err(CordaError::Adapter(format!(
            "cannot resume from {}: {why}; resume on the model it was trained from, or start a new run (another output directory)",
            checkpoint_dir.display()
        )))
    };
    match (ours, theirs) {
        (None, None) => Ok(()),
        (Some(_), None) => err(format!(
            "it has no {PROVENANCE_FILE} (it was not written by a CorDA fine-tuning run), so it cannot be checked to start from this model's initial adapter"
        )),
        (None, Some(t)) => err(format!(
            "it was fine-tuned from a CorDA initial adapter ({}, {}) but this run trains a plain LoRA",
            t.corda_method.as_deref().unwrap_or("unknown method"),
            short(&t.initial_adapter_sha256)
        )),
        (Some(o), Some(t)) => {
            if o.corda_method.is_some() && t.corda_method.is_some() && o.corda_method != t.corda_method {
                return err(format!(
                    "it was fine-tuned from a {} initial adapter but this model's is {}",
                    t.corda_method.as_deref().unwrap_or_default(),
                    o.corda_method.as_deref().unwrap_or_default()
                ));
            }
            if o.initial_adapter_sha256 != t.initial_adapter_sha256 {
                return err(format!(
                    "it was fine-tuned from another initial adapter than this model's (fingerprints {} and {})",
                    short(&t.initial_adapter_sha256),
                    short(&o.initial_adapter_sha256)
                ));
            }
            Ok(())
        }
    }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use corda_testdata::peft_tiny_llama as fixtures;

    #[test]
    fn fingerprints_survive_a_save_and_tell_adapters_apart() {
        let kpm = Adapter::load(&fixtures().join("kpm/corda_init")).unwrap();
        let ipm = Adapter::load(&fixtures().join("ipm/corda_init")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        kpm.save(dir.path()).unwrap();
        let back = Adapter::load(dir.path()).unwrap();
        assert_eq!(fingerprint(&kpm).unwrap(), fingerprint(&back).unwrap());
        assert_ne!(fingerprint(&kpm).unwrap(), fingerprint(&ipm).unwrap());
        assert_eq!(corda_method(&kpm.config), Some("kpm"));
        let p = Provenance::of_initial(&kpm).unwrap();
        p.write(dir.path()).unwrap();
        assert_eq!(Provenance::read(dir.path()).unwrap(), Some(p));
        assert_eq!(
            Provenance::read(&fixtures().join("kpm/trained")).unwrap(),
            None
        );
    }
}
