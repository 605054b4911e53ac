//! CorDA preprocessing one decoder layer at a time: the driver of the method's phases.
//!
//! PEFT hooks the whole model and holds every covariance at once. Here the calibration hidden
//! states are kept instead, and each layer goes through the phases in turn:
//!
//! 1. [`calibration`](super::calibration): layer l runs on the hidden states while the
//!    covariance of each input site is collected; the hidden states advance through the
//!    *original* layer l (exactly what PEFT's single full pass sees);
//! 2. [`init`](super::init): damping and decomposition per module, `corda_init` (A, B, residual);
//! 3. identity check: residual + adapter reproduce the original layer on the first batch;
//! 4. [`output`](super::output): residual weights, covariances, cache entries stream out;
//!
//! and the layer is freed. Peak memory is one layer plus the hidden states, whatever the depth.
//! The PiSSA and MiLoRA baselines skip phases 1 and 3 (they read no inputs) and write the same
//! layout, so fine-tuning and conversion treat every method alike.
//! [`plan`](super::plan) fixes the targets and ranks before any work, and
//! [`files`](super::files) what is reused from an earlier run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};

use super::calibration::{HiddenStates, LayerProbe};
use super::covariance::CovariancePrecision;
use super::decompose::{CordaMode, InitMethod};
use super::files::{calibration_fingerprint, is_reusable, model_fingerprint, Provenance, Reused};
use super::init::{deviation_tolerance, init_layer, target_weights, EigenSource, ModuleInit};
use super::output::Outputs;
use super::plan::{Plan, Target};
use super::report::PreprocessReport;
use crate::adapter::AdapterConfig;
use crate::model::{
    resolve_dtype, DecoderLayer, InputSite, ModelConfig, Weights, TARGET_PROJECTIONS,
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
    /// CorDA (KPM or IPM), or the PiSSA / MiLoRA baselines.
    pub init: InitMethod,
    /// Short names (`q_proj`) or full module paths, PEFT's `target_modules`.
    pub target_modules: Vec<String>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub covariance_precision: CovariancePrecision,
    /// Saved after collection, or reused when it exists (then no forward pass runs). A reused
    /// file must record this model and these calibration samples (see [`Provenance`]).
    pub covariance_file: Option<PathBuf>,
    /// Decomposition cache: saved, or reused when it exists (then neither forward nor SVD runs),
    /// with the same provenance check as the covariance file.
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
    /// Write degenerate adapters (zero or numerically zero kept singular values, all-zero
    /// factors) instead of refusing them.
    pub allow_degenerate_adapters: bool,
    /// What produced the calibration samples, (name, value) — dataset, template, sample count,
    /// length, seed … as the caller names them. Recorded in a covariance file or cache so that
    /// a reuse refused for other samples can say which setting differs.
    pub calibration_settings: Vec<(String, String)>,
    /// Reuse a covariance file or cache without corda provenance (e.g. PEFT's covariances),
    /// unchecked, instead of refusing it.
    pub allow_unchecked_files: bool,
}

impl PreprocessOptions {
    /// What this run will reuse instead of calibrating, by PEFT's rule (the file exists and is
    /// not empty): `Some("decomposition")`, `Some("covariances")` or `None`.
    pub fn reuses(&self) -> Option<&'static str> {
        if self.cache_file.as_deref().is_some_and(is_reusable) {
            Some("decomposition")
        } else if self.covariance_file.as_deref().is_some_and(is_reusable) {
            Some("covariances")
        } else {
            None
        }
    }

    /// The reference defaults (`preprocess.py`): r 128, alpha = r, KPM, the seven projections.
    pub fn new(r: usize) -> Self {
        Self {
            r,
            lora_alpha: r as f64,
            use_rslora: false,
            init: InitMethod::Corda(CordaMode::Kpm),
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
            allow_degenerate_adapters: false,
            calibration_settings: vec![],
            allow_unchecked_files: false,
        }
    }

    /// Refuse what the init method cannot use, before any work: PiSSA and MiLoRA read no
    /// calibration data, so samples, a covariance file, a decomposition cache (PEFT's CorDA
    /// formats) or a half-precision covariance would be ignored.
    pub fn validate(&self, num_samples: usize) -> Result<()> {
        if self.init.needs_calibration() {
            return Ok(());
        }
        let unused = [
            (num_samples > 0, "calibration samples"),
            (self.covariance_file.is_some(), "a covariance file"),
            (self.cache_file.is_some(), "a decomposition cache"),
            (
                self.covariance_precision != CovariancePrecision::Float32,
                "a half-precision covariance",
            ),
        ];
        let given: Vec<&str> = unused.iter().filter(|u| u.0).map(|u| u.1).collect();
        if given.is_empty() {
            Ok(())
        } else {
            Err(CordaError::Invalid(format!(
                "{} decomposes the weights alone and would ignore {}; drop them (they are CorDA's)",
                self.init.label(),
                given.join(", ")
            )))
        }
    }

    /// The PEFT adapter config this run writes: `init_lora_weights: true` for every method, as
    /// PEFT's PiSSA and CorDA examples save the initial adapter (a config saying `"pissa"`
    /// would make `PeftModel.from_pretrained` decompose the residual weights again).
    pub fn adapter_config(&self) -> AdapterConfig {
        let mut targets: Vec<String> = self.target_modules.clone();
        targets.sort();
        let mut c = AdapterConfig::new_lora(self.r, self.lora_alpha, targets);
        c.rank_pattern = self.rank_pattern.clone();
        c.alpha_pattern = self.alpha_pattern.clone();
        c.use_rslora = self.use_rslora;
        c.base_model_name_or_path = Some(self.base_model_name.clone());
        if let Some(mode) = self.init.corda_mode() {
            c.extra.insert(
                "corda_config".into(),
                serde_json::json!({
                    "cache_file": null, "corda_method": mode.as_str(), "covariance_file": null,
                    "prune_temporary_fields": true,
                    "use_float16_for_covariance": self.covariance_precision != CovariancePrecision::Float32,
                    "verbose": false
                }),
            );
        }
        c
    }
}

/// Phase 3: the layer with residual weights and adapters reproduces the original layer's
/// output on the probe batch; returns the relative deviation.
fn identity_check(
    layer: &DecoderLayer,
    targets: &[Target],
    inits: &[ModuleInit],
    probe: &LayerProbe,
    dtype: DType,
    device: &Device,
) -> Result<f64> {
    let mut residual_layer = layer.clone();
    for (t, m) in targets.iter().zip(inits) {
        if let Some(linear) = residual_layer
            .targets_mut()
            .into_iter()
            .find(|x| x.name == t.name)
        {
            linear.set_weight(m.residual.to_device(device)?);
            linear.lora = Some(crate::model::Lora {
                a: candle_core::Var::from_tensor(&m.a.to_device(device)?)?,
                b: candle_core::Var::from_tensor(&m.b.to_device(device)?)?,
                scaling: t.scaling,
            });
        }
    }
    let got = residual_layer.forward(&probe.input, &probe.context, None)?;
    let rel =
        max_abs_diff(&got, &probe.expected)? as f64 / (max_abs(&probe.expected)? as f64).max(1e-30);
    if !rel.is_finite() || rel > deviation_tolerance(dtype) {
        return Err(CordaError::Numerics(format!(
            "layer {}: residual + adapter deviates from the original layer by {rel:.3e} (relative); expected below {:.0e}. The decomposition is inaccurate: check the model for NaN/huge weights or use the float32 dtype",
            layer.index,
            deviation_tolerance(dtype)
        )));
    }
    Ok(rel)
}

/// A layer whose decomposition runs on a background thread while the next layer calibrates.
struct InFlight {
    index: usize,
    layer: DecoderLayer,
    probe: Option<LayerProbe>,
    job: std::thread::JoinHandle<Result<Vec<ModuleInit>>>,
}

/// The input sites of `targets` with their widths.
fn sites(targets: &[Target]) -> BTreeMap<InputSite, usize> {
    targets.iter().map(|t| (t.site, t.shape.1)).collect()
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
    opts.validate(samples.len())?;
    let mut phases = PhaseReport::new();
    let t0 = Instant::now();
    let cfg = ModelConfig::from_dir(model_dir)?;
    let weights = Weights::open(model_dir)?;
    let dtype = resolve_dtype(opts.dtype, &cfg, &weights);
    let precision = opts.covariance_precision.resolve(dtype);
    let device = &opts.device;
    let adapter_cfg = opts.adapter_config();
    let plan = Plan::new(&cfg, &adapter_cfg)?;
    let precision_name = format!("{precision:?}");
    let mut settings = opts.calibration_settings.clone();
    settings.push(("covariance precision".into(), precision_name.clone()));
    let provenance = Provenance {
        model: model_fingerprint(model_dir)?,
        calibration: (!samples.is_empty())
            .then(|| calibration_fingerprint(samples, &precision_name)),
        settings,
    };
    let reused = match opts.init {
        InitMethod::Corda(mode) => Reused::load(
            opts.cache_file.as_deref(),
            opts.covariance_file.as_deref(),
            &plan,
            mode,
            &provenance,
            opts.allow_unchecked_files,
        )?,
        _ => Reused::Nothing,
    };
    let calibrate = opts.init.needs_calibration() && reused.needs_calibration();
    let mut hidden = if calibrate {
        Some(phases.time("embed", || {
            HiddenStates::embed(&weights, &cfg, samples, opts.batch_size, dtype, device)
        })?)
    } else {
        None
    };
    let max_shard = opts.max_shard_bytes.unwrap_or(if weights.num_files() == 1 {
        u64::MAX
    } else {
        weights.max_shard_bytes
    });
    let mut outputs = Outputs::create(
        out,
        max_shard,
        &plan,
        opts.covariance_file.as_deref().filter(|_| calibrate),
        opts.cache_file
            .as_deref()
            .filter(|_| !matches!(reused, Reused::Cache(_)))
            .zip(opts.init.corda_mode())
            .map(|(p, mode)| (p, mode.as_str())),
        &provenance,
        dtype,
    )?;
    let names = weights.names();
    let target_names: BTreeSet<String> = plan
        .targets()
        .map(|t| format!("{}.weight", t.name))
        .collect();
    // Tensors outside the decoder layers (embeddings, final norm, LM head).
    outputs.copy_tensors(
        &weights,
        names.iter().filter(|n| !n.starts_with("model.layers.")),
    )?;
    phases.add("load + setup", t0.elapsed());

    let mut modules = vec![];
    let mut layer_deviation = vec![];
    let pb = opts
        .progress
        .then(|| progress_bar(cfg.num_hidden_layers as u64, "layers"));
    // Phases 3 and 4 of a layer whose decomposition ran in the background.
    let mut finish =
        |done: InFlight, phases: &mut PhaseReport, outputs: &mut Outputs| -> Result<()> {
            let t = Instant::now();
            let inits = done.job.join().map_err(|_| {
                CordaError::Numerics(format!(
                    "layer {}: the decomposition thread panicked",
                    done.index
                ))
            })??;
            phases.add("decomposition (not overlapped)", t.elapsed());
            let targets = &plan.layers[done.index];
            if let Some(probe) = &done.probe {
                let t = Instant::now();
                layer_deviation.push(identity_check(
                    &done.layer,
                    targets,
                    &inits,
                    probe,
                    dtype,
                    device,
                )?);
                phases.add("identity check", t.elapsed());
            }
            let t = Instant::now();
            for (target, m) in targets.iter().zip(&inits) {
                outputs.module(&target.name, m)?;
            }
            let prefix = format!("model.layers.{}.", done.index);
            outputs.copy_tensors(
                &weights,
                names
                    .iter()
                    .filter(|n| n.starts_with(&prefix) && !target_names.contains(*n)),
            )?;
            modules.extend(inits.into_iter().map(|m| m.report));
            phases.add("write", t.elapsed());
            if let Some(pb) = &pb {
                pb.inc(1);
            }
            Ok(())
        };
    let mut in_flight: Option<InFlight> = None;
    for (l, layer_targets) in plan.layers.iter().enumerate() {
        let layer = phases.time("load layer", || {
            DecoderLayer::load(&weights, &cfg, l, dtype, device)
        })?;
        // 1. Covariances of this layer's input sites, while advancing the hidden states (and
        //    while the previous layer decomposes).
        let t = Instant::now();
        let (covs, probe) = match hidden.as_mut() {
            Some(h) => {
                let (covs, probe) =
                    h.advance(&layer, &cfg, &sites(layer_targets), precision, device)?;
                (covs, Some(probe))
            }
            None => (reused.covariances(layer_targets)?, None),
        };
        outputs.covariances(layer_targets, &covs)?;
        if calibrate {
            phases.add("calibration forward + covariance", t.elapsed());
        }
        // 3–4 of the previous layer, in layer order.
        if let Some(done) = in_flight.take() {
            finish(done, &mut phases, &mut outputs)?;
        }
        // 2. Damping, decomposition and corda_init, in the background.
        let source = match reused.cached_eigens(layer_targets)? {
            Some(eigens) => EigenSource::Cached(eigens),
            None if opts.init.needs_calibration() => EigenSource::Covariances(covs),
            None => EigenSource::Weights,
        };
        let w = target_weights(&layer, layer_targets)?;
        let (targets, init, allow) = (
            layer_targets.clone(),
            opts.init,
            opts.allow_degenerate_adapters,
        );
        let job = std::thread::spawn(move || init_layer(&targets, &w, source, init, dtype, allow));
        in_flight = Some(InFlight {
            index: l,
            layer,
            probe,
            job,
        });
    }
    if let Some(done) = in_flight.take() {
        finish(done, &mut phases, &mut outputs)?;
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let mut report = PreprocessReport {
        init: opts.init,
        modules,
        layer_deviation,
        phases,
        // Samples that went through the model (a reused file's run only checks them).
        num_samples: if calibrate { samples.len() } else { 0 },
        num_tokens: hidden.as_ref().map_or(0, |h| h.num_tokens),
        dtype,
    };
    let t = Instant::now();
    outputs.finish(model_dir, &cfg.raw, adapter_cfg, &report)?;
    report.phases.add("write", t.elapsed());
    Ok(report)
}
