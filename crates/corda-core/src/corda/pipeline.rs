//! CorDA preprocessing one decoder layer at a time.
//!
//! PEFT hooks the whole model and holds every covariance at once. Here the calibration hidden
//! states are kept instead: layer l runs on them while its input covariances are collected,
//! its targets are decomposed and written, the hidden states advance through the *original*
//! layer l (exactly what PEFT's single full pass sees), and the layer is freed. Peak memory is
//! one layer plus the hidden states, whatever the depth.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use faer::Mat;

use super::covariance::{CovarianceAccumulator, CovariancePrecision};
use super::decompose::{
    corda_eigens_parallel, corda_init, damp_covariance, CordaEigens, CordaMode, Damped,
};
use super::files::{load_existing, mat_data, mat_to_tensor, tensor_to_mat, StreamingSafetensors};
use crate::adapter::{Adapter, AdapterConfig, LoraPair};
use crate::model::save::{copy_support_files, write_config};
use crate::model::{
    embed, load_embeddings, module_name, resolve_dtype, AttnContext, DecoderLayer, InputSite,
    ModelConfig, Observer, ShardWriter, Weights, TARGET_PROJECTIONS,
};
use crate::util::tensor::{max_abs, max_abs_diff};
use crate::util::{progress_bar, PhaseReport};
use crate::{CordaError, Result};

/// Everything `corda-preprocess` decides besides the data.
#[derive(Debug, Clone)]
pub struct PreprocessOptions {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub mode: CordaMode,
    /// Short names (`q_proj`) or full module paths, PEFT's `target_modules`.
    pub target_modules: Vec<String>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub covariance_precision: CovariancePrecision,
    /// Saved after collection, or reused when it exists (then no forward pass runs).
    pub covariance_file: Option<PathBuf>,
    /// Decomposition cache: saved, or reused when it exists (then neither forward nor SVD runs).
    pub cache_file: Option<PathBuf>,
    /// Storage / output dtype; `None` = the model's.
    pub dtype: Option<DType>,
    pub device: Device,
    /// Calibration samples per forward pass.
    pub batch_size: usize,
    /// Largest shard of the written residual model; `None` = like the source.
    pub max_shard_bytes: Option<u64>,
    /// Recorded as `base_model_name_or_path` in the adapter config.
    pub base_model_name: String,
    pub progress: bool,
}

impl PreprocessOptions {
    /// The reference defaults (`preprocess.py`): r 128, alpha = r, KPM, the seven projections.
    pub fn new(r: usize) -> Self {
        Self {
            r,
            lora_alpha: r as f64,
            use_rslora: false,
            mode: CordaMode::Kpm,
            target_modules: TARGET_PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            covariance_precision: CovariancePrecision::Float32,
            covariance_file: None,
            cache_file: None,
            dtype: None,
            device: Device::Cpu,
            batch_size: 1,
            max_shard_bytes: None,
            base_model_name: String::new(),
            progress: false,
        }
    }

    /// The PEFT adapter config this run writes.
    pub fn adapter_config(&self) -> AdapterConfig {
        let mut targets: Vec<String> = self.target_modules.clone();
        targets.sort();
        let mut c = AdapterConfig::new_lora(self.r, self.lora_alpha, targets);
        c.rank_pattern = self.rank_pattern.clone();
        c.alpha_pattern = self.alpha_pattern.clone();
        c.use_rslora = self.use_rslora;
        c.base_model_name_or_path = Some(self.base_model_name.clone());
        c.extra.insert(
            "corda_config".into(),
            serde_json::json!({
                "cache_file": null, "corda_method": self.mode.as_str(), "covariance_file": null,
                "prune_temporary_fields": true,
                "use_float16_for_covariance": self.covariance_precision != CovariancePrecision::Float32,
                "verbose": false
            }),
        );
        c
    }
}

/// What happened to one module.
#[derive(Debug, Clone)]
pub struct ModuleReport {
    pub name: String,
    pub rank: usize,
    pub scaling: f64,
    /// Damping δ accepted by the inverse check (None when read from the cache).
    pub damp: Option<f64>,
}

/// The outcome of a preprocessing run.
#[derive(Debug, Clone)]
pub struct PreprocessReport {
    pub modules: Vec<ModuleReport>,
    /// Largest |layer output with residual + adapter − original layer output| over the check
    /// batch, relative to the largest |original output|, per layer.
    pub layer_deviation: Vec<f64>,
    pub phases: PhaseReport,
    pub num_samples: usize,
    pub num_tokens: usize,
    pub dtype: DType,
}

impl PreprocessReport {
    pub fn max_deviation(&self) -> f64 {
        self.layer_deviation.iter().copied().fold(0.0, f64::max)
    }
}

/// Tolerated relative deviation of residual + adapter from the original layer, by dtype.
fn deviation_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-3,
        DType::F16 => 2e-2,
        _ => 8e-2,
    }
}

/// Collects covariances of the sites a layer needs.
struct CovObserver<'a> {
    accs: &'a mut BTreeMap<InputSite, CovarianceAccumulator>,
    lengths: &'a [usize],
}

impl Observer for CovObserver<'_> {
    fn observe(&mut self, layer: usize, site: InputSite, input: &Tensor) -> Result<()> {
        if let Some(acc) = self.accs.get_mut(&site) {
            acc.add_batch(
                input,
                self.lengths,
                &format!("model.layers.{layer} {site:?} input"),
            )?;
        }
        Ok(())
    }
}

/// One calibration batch: hidden states (batch, seq, hidden) and real lengths.
struct CalibBatch {
    hidden: Tensor,
    lengths: Vec<usize>,
}

impl CalibBatch {
    fn context(&self, cfg: &ModelConfig, device: &Device) -> Result<AttnContext> {
        let (b, t, _) = self.hidden.dims3()?;
        let rows: Vec<Vec<u8>> = self
            .lengths
            .iter()
            .map(|&l| (0..t).map(|j| u8::from(j < l)).collect())
            .collect();
        AttnContext::new(cfg, b, t, Some(&rows), device)
    }
}

/// The target projections of one layer, by PEFT's `target_modules` rule.
fn layer_targets(cfg: &AdapterConfig, layer: usize) -> Vec<(&'static str, String)> {
    TARGET_PROJECTIONS
        .iter()
        .map(|p| (*p, module_name(layer, p)))
        .filter(|(_, name)| cfg.is_target(name))
        .collect()
}

/// The cropped eigens of `name` from a decomposition cache, checked against its weight.
fn cached_eigens(c: &HashMap<String, Tensor>, name: &str, w: &Mat<f32>) -> Result<CordaEigens> {
    let s = c[&format!("{name}.eigens.S_WC")]
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let u = tensor_to_mat(&c[&format!("{name}.eigens.U_WC")])?;
    let v = tensor_to_mat(&c[&format!("{name}.eigens.V_WC")])?;
    if u.nrows() != w.nrows() || v.nrows() != w.ncols() {
        return Err(CordaError::Invalid(format!(
            "the decomposition cache entry of {name} does not fit its {}x{} weight; the cache belongs to another model",
            w.nrows(),
            w.ncols()
        )));
    }
    Ok(CordaEigens {
        s,
        u,
        vt: v.transpose().to_owned(),
        damp: f64::NAN,
    })
}

fn tensor_f32(m: &Mat<f32>, device: &Device) -> Result<Tensor> {
    mat_to_tensor(m, device)
}

/// Run CorDA preprocessing of `model_dir` on tokenized calibration `samples`.
///
/// With `out` set, the residual model is written there (a Hugging Face model directory) and
/// the initial adapter into `out/corda_init`; the caller owns `out` (normally a temporary
/// directory renamed into place when this returns Ok).
pub fn preprocess(
    model_dir: &Path,
    samples: &[Vec<u32>],
    opts: &PreprocessOptions,
    out: Option<&Path>,
) -> Result<PreprocessReport> {
    let mut phases = PhaseReport::new();
    let t0 = Instant::now();
    let cfg = ModelConfig::from_dir(model_dir)?;
    let weights = Weights::open(model_dir)?;
    let dtype = resolve_dtype(opts.dtype, &cfg, &weights);
    let device = &opts.device;
    let adapter_cfg = opts.adapter_config();
    let targets: Vec<Vec<(&str, String)>> = (0..cfg.num_hidden_layers)
        .map(|l| layer_targets(&adapter_cfg, l))
        .collect();
    let all_targets: Vec<String> = targets.iter().flatten().map(|(_, n)| n.clone()).collect();
    if all_targets.is_empty() {
        return Err(CordaError::Invalid(format!(
            "--target_modules {:?} matches no linear layer of this model; use names such as {}",
            opts.target_modules,
            TARGET_PROJECTIONS.join(",")
        )));
    }
    // Ranks are checked up front so a bad --r fails before any work.
    for (l, ts) in targets.iter().enumerate() {
        for (proj, name) in ts {
            let (o, i) = cfg.target_shape(proj).expect("projection");
            let r = adapter_cfg.rank_for(name);
            if r == 0 || r > o.min(i) {
                return Err(CordaError::Invalid(format!(
                    "rank {r} is larger than min(d_out, d_in) = {} of {name} ({o}x{i}, layer {l}); lower --r or give it a smaller rank with --rank_pattern {proj}=N",
                    o.min(i)
                )));
            }
        }
    }

    // Reuse: decomposition cache first (PEFT: nothing else runs), then covariance file.
    let cache = match &opts.cache_file {
        Some(p) => load_existing(p, "decomposition cache")?,
        None => None,
    };
    if let Some((t, meta)) = &cache {
        if let Some(m) = meta.get("corda_method") {
            if m != opts.mode.as_str() {
                return Err(CordaError::Invalid(format!(
                    "the decomposition cache was made for {m} but this run is {}; delete it or use another --cache_file",
                    opts.mode.as_str()
                )));
            }
        }
        for name in &all_targets {
            let key = format!("{name}.eigens.S_WC");
            match t.get(&key) {
                Some(s) if s.dim(0)? == adapter_cfg.rank_for(name) => {}
                Some(s) => {
                    return Err(CordaError::Invalid(format!(
                        "the decomposition cache holds rank {} for {name} but this run asks for {}; delete it or use another --cache_file",
                        s.dim(0)?,
                        adapter_cfg.rank_for(name)
                    )))
                }
                None => {
                    return Err(CordaError::Invalid(format!(
                        "the decomposition cache lacks {name}; delete it or use another --cache_file"
                    )))
                }
            }
        }
    }
    let covs_in = match (&cache, &opts.covariance_file) {
        (None, Some(p)) => load_existing(p, "covariance file")?.map(|(t, _)| t),
        _ => None,
    };
    if let Some(c) = &covs_in {
        if let Some(missing) = all_targets.iter().find(|n| !c.contains_key(*n)) {
            return Err(CordaError::Invalid(format!(
                "the covariance file lacks {missing}; delete it to recompute or pass another --covariance_file"
            )));
        }
    }
    let need_forward = cache.is_none() && covs_in.is_none();
    if need_forward && samples.is_empty() {
        return Err(CordaError::Data(
            "no calibration samples: the calibration set is empty".into(),
        ));
    }

    // Streaming outputs.
    let mut cov_out = match (&opts.covariance_file, need_forward) {
        (Some(p), true) => {
            let entries: Vec<(String, Vec<usize>)> = targets
                .iter()
                .flatten()
                .map(|(p, n)| {
                    let d = cfg.target_shape(p).expect("projection").1;
                    (n.clone(), vec![d, d])
                })
                .collect();
            Some(StreamingSafetensors::create(
                p,
                &entries,
                &[("format", "pt".into())],
            )?)
        }
        _ => None,
    };
    let mut cache_out = match (&opts.cache_file, cache.is_none()) {
        (Some(p), true) => {
            let mut entries = vec![];
            for (proj, n) in targets.iter().flatten() {
                let (o, i) = cfg.target_shape(proj).expect("projection");
                let r = adapter_cfg.rank_for(n);
                entries.push((format!("{n}.eigens.S_WC"), vec![r]));
                entries.push((format!("{n}.eigens.U_WC"), vec![o, r]));
                entries.push((format!("{n}.eigens.V_WC"), vec![i, r]));
            }
            Some(StreamingSafetensors::create(
                p,
                &entries,
                &[
                    ("format", "pt".into()),
                    ("corda_method", opts.mode.as_str().into()),
                ],
            )?)
        }
        _ => None,
    };
    let max_shard = opts.max_shard_bytes.unwrap_or_else(|| {
        if weights.num_files() == 1 {
            u64::MAX
        } else {
            weights.max_shard_bytes
        }
    });
    let mut writer = out.map(|o| ShardWriter::new(o, max_shard));
    let target_weight_names: BTreeSet<String> =
        all_targets.iter().map(|n| format!("{n}.weight")).collect();
    let copy_tensor = |writer: &mut Option<ShardWriter>, name: &str| -> Result<()> {
        if let Some(wr) = writer.as_mut() {
            let t = weights.get(name, None, &Device::Cpu)?;
            let t = if t.dtype().is_float() {
                t.to_dtype(dtype)?
            } else {
                t
            };
            wr.push(name.to_string(), t)?;
        }
        Ok(())
    };
    let names = weights.names();
    let layer_prefix = |l: usize| format!("model.layers.{l}.");
    // Tensors outside the decoder layers (embeddings, final norm, LM head).
    for n in names.iter().filter(|n| !n.starts_with("model.layers.")) {
        copy_tensor(&mut writer, n)?;
    }
    phases.add("load + setup", t0.elapsed());

    // Calibration hidden states, kept in float32 (or the model's half dtype).
    let hidden_dtype = if dtype == DType::F32 {
        DType::F32
    } else {
        dtype
    };
    let mut batches: Vec<CalibBatch> = vec![];
    let mut num_tokens = 0;
    if need_forward {
        let t = Instant::now();
        let table = load_embeddings(&weights, &cfg, dtype, device)?;
        for chunk in samples.chunks(opts.batch_size.max(1)) {
            let lengths: Vec<usize> = chunk.iter().map(Vec::len).collect();
            if lengths.contains(&0) {
                return Err(CordaError::Data(
                    "a calibration sample has no tokens".into(),
                ));
            }
            let tmax = *lengths.iter().max().expect("non-empty chunk");
            num_tokens += lengths.iter().sum::<usize>();
            let mut ids = vec![0u32; chunk.len() * tmax];
            for (b, s) in chunk.iter().enumerate() {
                if let Some(bad) = s.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                    return Err(CordaError::Data(format!(
                        "token id {bad} is outside the model's vocabulary ({}); the tokenizer does not belong to this model",
                        cfg.vocab_size
                    )));
                }
                ids[b * tmax..b * tmax + s.len()].copy_from_slice(s);
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), tmax), device)?;
            let hidden = embed(&table, &ids)?.to_dtype(hidden_dtype)?;
            batches.push(CalibBatch { hidden, lengths });
        }
        phases.add("embed", t.elapsed());
    }

    let mut modules = vec![];
    let mut layer_deviation = vec![];
    let pb = opts
        .progress
        .then(|| progress_bar(cfg.num_hidden_layers as u64, "layers"));
    for (l, layer_t) in targets.iter().enumerate() {
        let t = Instant::now();
        let layer = DecoderLayer::load(&weights, &cfg, l, dtype, device)?;
        phases.add("load layer", t.elapsed());
        let sites: BTreeSet<InputSite> = layer_t
            .iter()
            .filter_map(|(p, _)| InputSite::of(p))
            .collect();

        // 1. Covariances of this layer's inputs, while advancing the hidden states.
        let mut covs: HashMap<InputSite, Mat<f32>> = HashMap::new();
        let mut check_input: Option<(Tensor, AttnContext, Tensor)> = None;
        if need_forward {
            let t = Instant::now();
            let mut accs: BTreeMap<InputSite, CovarianceAccumulator> = BTreeMap::new();
            for site in &sites {
                let proj = layer_t
                    .iter()
                    .find(|(p, _)| InputSite::of(p) == Some(*site))
                    .expect("site")
                    .0;
                let d_in = cfg.target_shape(proj).expect("projection").1;
                accs.insert(
                    *site,
                    CovarianceAccumulator::new(d_in, opts.covariance_precision),
                );
            }
            for (bi, batch) in batches.iter_mut().enumerate() {
                let ctx = batch.context(&cfg, device)?;
                let h = batch.hidden.to_dtype(DType::F32)?;
                let mut obs = CovObserver {
                    accs: &mut accs,
                    lengths: &batch.lengths,
                };
                let next = layer.forward(&h, &ctx, Some(&mut obs))?;
                if bi == 0 {
                    check_input = Some((h, ctx, next.clone()));
                }
                batch.hidden = next.to_dtype(hidden_dtype)?;
            }
            for (site, acc) in accs.iter_mut() {
                covs.insert(
                    *site,
                    acc.finish(&format!("model.layers.{l} {site:?} input"))?,
                );
            }
            phases.add("calibration forward + covariance", t.elapsed());
        } else if let Some(c) = &covs_in {
            for (p, name) in layer_t {
                if let std::collections::hash_map::Entry::Vacant(e) =
                    covs.entry(InputSite::of(p).expect("site"))
                {
                    e.insert(tensor_to_mat(&c[name])?);
                }
            }
        }
        if let Some(co) = cov_out.as_mut() {
            for (p, name) in layer_t {
                co.write(name, &mat_data(&covs[&InputSite::of(p).expect("site")]))?;
            }
        }

        // 2. Decompose every target of the layer: one damping loop per shared input, then
        //    the modules' SVDs side by side.
        let t = Instant::now();
        let weights_f32: Vec<Mat<f32>> = layer_t
            .iter()
            .map(|(_, name)| {
                let target = layer
                    .targets()
                    .into_iter()
                    .find(|x| x.name == *name)
                    .expect("target");
                tensor_to_mat(&target.weight)
            })
            .collect::<Result<_>>()?;
        let all_eigens: Vec<CordaEigens> = match &cache {
            Some((c, _)) => layer_t
                .iter()
                .zip(&weights_f32)
                .map(|((_, name), w)| cached_eigens(c, name, w))
                .collect::<Result<_>>()?,
            None => {
                let mut damped: BTreeMap<InputSite, Damped> = BTreeMap::new();
                for (p, name) in layer_t {
                    let site = InputSite::of(p).expect("site");
                    if let std::collections::btree_map::Entry::Vacant(e) = damped.entry(site) {
                        e.insert(damp_covariance(covs[&site].as_ref(), name)?);
                    }
                }
                let jobs: Vec<_> = layer_t
                    .iter()
                    .zip(&weights_f32)
                    .map(|((p, name), w)| {
                        let site = InputSite::of(p).expect("site");
                        (
                            w.as_ref(),
                            &damped[&site],
                            adapter_cfg.rank_for(name),
                            name.as_str(),
                        )
                    })
                    .collect();
                corda_eigens_parallel(&jobs, opts.mode)?
            }
        };
        let mut residual_layer = layer.clone();
        for (((_, name), w), eigens) in layer_t.iter().zip(&weights_f32).zip(all_eigens) {
            let rank = adapter_cfg.rank_for(name);
            let scaling = adapter_cfg.scaling_for(name);
            if let Some(co) = cache_out.as_mut() {
                co.write(&format!("{name}.eigens.S_WC"), &eigens.s)?;
                co.write(&format!("{name}.eigens.U_WC"), &mat_data(&eigens.u))?;
                co.write(
                    &format!("{name}.eigens.V_WC"),
                    &mat_data(&eigens.vt.transpose().to_owned()),
                )?;
            }
            let init = corda_init(w.as_ref(), &eigens, scaling);
            // PEFT: W_res cast to the model dtype; A, B rounded through it and stored as float32.
            let residual = tensor_f32(&init.residual, device)?.to_dtype(dtype)?;
            let a = tensor_f32(&init.a, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?;
            let b = tensor_f32(&init.b, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?;
            let rt = residual_layer
                .targets_mut()
                .into_iter()
                .find(|x| x.name == *name)
                .expect("target");
            rt.weight = residual.clone();
            rt.lora = Some(crate::model::Lora {
                a: candle_core::Var::from_tensor(&a.to_device(device)?)?,
                b: candle_core::Var::from_tensor(&b.to_device(device)?)?,
                scaling,
            });
            if let Some(wr) = writer.as_mut() {
                wr.push(format!("{name}.weight"), residual.to_device(&Device::Cpu)?)?;
            }
            modules.push((
                ModuleReport {
                    name: name.clone(),
                    rank,
                    scaling,
                    damp: cache.is_none().then_some(eigens.damp),
                },
                LoraPair { a, b },
            ));
        }
        phases.add("decomposition (damping, inverse, SVD)", t.elapsed());

        // 3. Check: residual + adapter reproduces the original layer on the first batch.
        if let Some((h, ctx, expected)) = check_input.take() {
            let t = Instant::now();
            let got = residual_layer.forward(&h, &ctx, None)?;
            let dev = max_abs_diff(&got, &expected)? as f64;
            let scale = max_abs(&expected)? as f64;
            let rel = dev / scale.max(1e-30);
            if !rel.is_finite() || rel > deviation_tolerance(dtype) {
                return Err(CordaError::Numerics(format!(
                    "layer {l}: residual + adapter deviates from the original layer by {rel:.3e} (relative); expected below {:.0e}. The decomposition is inaccurate: check the model for NaN/huge weights or use --dtype float32",
                    deviation_tolerance(dtype)
                )));
            }
            layer_deviation.push(rel);
            phases.add("identity check", t.elapsed());
        }

        // 4. The layer's other tensors (norms, biases) go out unchanged.
        let t = Instant::now();
        let prefix = layer_prefix(l);
        for n in names
            .iter()
            .filter(|n| n.starts_with(&prefix) && !target_weight_names.contains(*n))
        {
            copy_tensor(&mut writer, n)?;
        }
        phases.add("write", t.elapsed());
        if let Some(pb) = &pb {
            pb.inc(1);
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }

    let t = Instant::now();
    if let Some(co) = cov_out {
        co.finish()?;
    }
    if let Some(co) = cache_out {
        co.finish()?;
    }
    let mut reports = vec![];
    if let (Some(o), Some(wr)) = (out, writer) {
        wr.finish()?;
        write_config(&cfg.raw, dtype, o)?;
        copy_support_files(model_dir, o)?;
        let mut adapter = Adapter {
            config: adapter_cfg,
            modules: BTreeMap::new(),
        };
        for (rep, pair) in modules {
            adapter.modules.insert(rep.name.clone(), pair);
            reports.push(rep);
        }
        adapter.save(&o.join("corda_init"))?;
    } else {
        reports = modules.into_iter().map(|(r, _)| r).collect();
    }
    phases.add("write", t.elapsed());
    Ok(PreprocessReport {
        modules: reports,
        layer_deviation,
        phases,
        num_samples: samples.len(),
        num_tokens,
        dtype,
    })
}
