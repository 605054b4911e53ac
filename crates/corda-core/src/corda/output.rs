//! Everything a run writes, streamed as the layers go by so nothing waits in memory for the
//! whole model: the residual model's shards, PEFT's covariance file and decomposition cache, and
//! at the end the initial adapter (`corda_init/`) with the per-module report.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use faer::Mat;

use super::files::{mat_data, Provenance, StreamingSafetensors};
use super::init::ModuleInit;
use super::plan::{Plan, Target};
use super::report::PreprocessReport;
use crate::adapter::{Adapter, AdapterConfig, LoraPair};
use crate::layout::CORDA_INIT_DIR;
use crate::model::save::{copy_support_files, write_config};
use crate::model::{InputSite, ShardWriter, Weights};
use crate::Result;

/// The open writers of a run.
pub struct Outputs<'a> {
    out: Option<&'a Path>,
    model: Option<ShardWriter>,
    covariances: Option<StreamingSafetensors>,
    cache: Option<StreamingSafetensors>,
    adapter: BTreeMap<String, LoraPair>,
    dtype: DType,
}

fn row_major_f32(m: &Mat<f64>) -> Vec<f32> {
    mat_data(&Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32))
}

impl<'a> Outputs<'a> {
    /// Open the writers: the residual model under `out` (shards of at most `max_shard` bytes),
    /// and the covariance file / cache when given (their headers list every target up front).
    pub fn create(
        out: Option<&'a Path>,
        max_shard: u64,
        plan: &Plan,
        covariance_file: Option<&Path>,
        cache_file: Option<(&Path, &str)>,
        provenance: &Provenance,
        dtype: DType,
    ) -> Result<Self> {
        let mut metadata = provenance.metadata();
        metadata.push(("format", "pt".into()));
        let covariances = covariance_file
            .map(|p| {
                let entries: Vec<(String, Vec<usize>)> = plan
                    .targets()
                    .map(|t| (t.name.clone(), vec![t.shape.1, t.shape.1]))
                    .collect();
                StreamingSafetensors::create(p, &entries, &metadata)
            })
            .transpose()?;
        let cache = cache_file
            .map(|(p, mode)| {
                let mut entries = vec![];
                for t in plan.targets() {
                    let ((o, i), r) = (t.shape, t.rank);
                    entries.push((format!("{}.eigens.S_WC", t.name), vec![r]));
                    entries.push((format!("{}.eigens.U_WC", t.name), vec![o, r]));
                    entries.push((format!("{}.eigens.V_WC", t.name), vec![i, r]));
                }
                let mut metadata = metadata.clone();
                metadata.push(("corda_method", mode.into()));
                StreamingSafetensors::create(p, &entries, &metadata)
            })
            .transpose()?;
        Ok(Self {
            out,
            model: out.map(|o| ShardWriter::new(o, max_shard)),
            covariances,
            cache,
            adapter: BTreeMap::new(),
            dtype,
        })
    }

    /// Copy tensors unchanged (cast to the output dtype) into the residual model.
    pub fn copy_tensors<'n>(
        &mut self,
        weights: &Weights,
        names: impl Iterator<Item = &'n String>,
    ) -> Result<()> {
        if let Some(model) = self.model.as_mut() {
            for name in names {
                let t = weights.get(name, None, &Device::Cpu)?;
                let t = if t.dtype().is_float() {
                    t.to_dtype(self.dtype)?
                } else {
                    t
                };
                model.push(name.clone(), t)?;
            }
        }
        Ok(())
    }

    /// The covariance of every target of a layer, into the covariance file.
    pub fn covariances(
        &mut self,
        targets: &[Target],
        covs: &BTreeMap<InputSite, Mat<f32>>,
    ) -> Result<()> {
        if let Some(file) = self.covariances.as_mut() {
            for t in targets {
                file.write(&t.name, &mat_data(&covs[&t.site]))?;
            }
        }
        Ok(())
    }

    /// A module's cache entries, residual weight and adapter factors.
    pub fn module(&mut self, name: &str, m: &ModuleInit) -> Result<()> {
        if let Some(cache) = self.cache.as_mut() {
            let s: Vec<f32> = m.eigens.s.iter().map(|&v| v as f32).collect();
            cache.write(&format!("{name}.eigens.S_WC"), &s)?;
            cache.write(&format!("{name}.eigens.U_WC"), &row_major_f32(&m.eigens.u))?;
            let v = m.eigens.vt.transpose().to_owned();
            cache.write(&format!("{name}.eigens.V_WC"), &row_major_f32(&v))?;
        }
        if let Some(model) = self.model.as_mut() {
            model.push(format!("{name}.weight"), m.residual.clone())?;
            self.adapter.insert(
                name.to_string(),
                LoraPair {
                    a: m.a.clone(),
                    b: m.b.clone(),
                },
            );
        }
        Ok(())
    }

    /// Close every file: the model's config and support files beside its shards, then
    /// `corda_init/` with the adapter and the per-module report.
    pub fn finish(
        self,
        model_dir: &Path,
        raw_config: &serde_json::Value,
        adapter: AdapterConfig,
        report: &PreprocessReport,
    ) -> Result<()> {
        if let Some(f) = self.covariances {
            f.finish()?;
        }
        if let Some(f) = self.cache {
            f.finish()?;
        }
        if let (Some(out), Some(model)) = (self.out, self.model) {
            model.finish()?;
            write_config(raw_config, self.dtype, out)?;
            copy_support_files(model_dir, out)?;
            let dir = out.join(CORDA_INIT_DIR);
            let adapter = Adapter {
                config: adapter,
                modules: self.adapter,
            };
            adapter.save(&dir)?;
            crate::adapter::Provenance::of_initial(&adapter)?.write(&dir)?;
            report.write(&dir)?;
        }
        Ok(())
    }
}
