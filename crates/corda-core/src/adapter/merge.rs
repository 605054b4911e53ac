//! `--merge`: the fine-tuned model without any adapter, W + dW for every adapted module, written as
//! a Hugging Face model directory sharded like the base. The addition is done in f64 and rounded
//! once to each tensor's stored dtype, so an f32 base is merged to round-off.

use std::path::Path;

use candle_core::{DType, Device};

use super::convert::{check_compatible, delta_weight_f64};
use super::Adapter;
use crate::model::save::{copy_support_files, write_config};
use crate::model::{resolve_dtype, ModelConfig, ShardWriter, Weights};
use crate::{CordaError, Result};

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// Tensors written (all of the base model's).
    pub tensors: usize,
    /// Of those, the ones that received an adapter's update.
    pub merged_modules: usize,
    /// The dtype recorded in the written `config.json`.
    pub dtype: DType,
}

/// Write `base + s (B A - B0 A0)` into `out` (an existing, empty directory, e.g. an
/// [`crate::util::AtomicDir`] path). `on_tensor(written, total)` is called after each tensor.
pub fn merge_into_base(
    base_dir: &Path,
    initial: &Adapter,
    trained: &Adapter,
    out: &Path,
    mut on_tensor: impl FnMut(usize, usize),
) -> Result<MergeReport> {
    check_compatible(initial, trained)?;
    let config = ModelConfig::from_dir(base_dir)?;
    let weights = Weights::open(base_dir)?;
    for (module, pair) in &trained.modules {
        let name = format!("{module}.weight");
        if !weights.contains(&name) {
            return Err(CordaError::Adapter(format!(
                "module `{module}` of the adapter has no weight `{name}` in {}; the adapter was trained for another model",
                base_dir.display()
            )));
        }
        let shape = weights.shape(&name)?;
        if shape != [pair.d_out(), pair.d_in()] {
            return Err(CordaError::Adapter(format!(
                "module `{module}`: the adapter implies a ({}, {}) weight but {} stores {shape:?}; the adapter was trained for another model",
                pair.d_out(),
                pair.d_in(),
                base_dir.display()
            )));
        }
    }

    // One file stays one file; shards keep the base's largest shard size.
    let max_shard = if weights.num_files() == 1 {
        u64::MAX
    } else {
        weights.max_shard_bytes
    };
    let mut writer = ShardWriter::new(out, max_shard);
    let names = weights.names();
    let mut merged_modules = 0;
    for (n, name) in names.iter().enumerate() {
        let t = weights.get(name, None, &Device::Cpu)?;
        let module = name
            .strip_suffix(".weight")
            .filter(|m| trained.modules.contains_key(*m));
        let t = match module {
            Some(module) => {
                merged_modules += 1;
                let dw = delta_weight_f64(initial, trained, module)?;
                (t.to_dtype(DType::F64)? + dw)?.to_dtype(t.dtype())?
            }
            None => t,
        };
        writer.push(name.clone(), t)?;
        on_tensor(n + 1, names.len());
    }
    writer.finish()?;
    let dtype = resolve_dtype(None, &config, &weights);
    write_config(&config.raw, dtype, out)?;
    copy_support_files(base_dir, out)?;
    Ok(MergeReport {
        tensors: names.len(),
        merged_modules,
        dtype,
    })
}
