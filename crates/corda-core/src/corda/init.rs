//! Damping, decomposition and `corda_init` for the targets of one layer: one damping loop per
//! input site, the modules' SVDs side by side, then A, B and the residual of each module, with
//! the degenerate-adapter guard.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use faer::Mat;

use super::decompose::{
    corda_eigens_parallel, corda_init, damp_covariance, degeneracy, CordaEigens, CordaMode, Damped,
};
use super::files::{mat_to_tensor, tensor_to_mat};
use super::plan::Target;
use super::report::ModuleReport;
use crate::model::{DecoderLayer, InputSite};
use crate::{CordaError, Result};

/// Where a layer's decomposition comes from.
pub enum EigenSource<'a> {
    /// Covariances of the layer's input sites: damp and decompose.
    Covariances(&'a BTreeMap<InputSite, Mat<f32>>),
    /// Already cropped eigens from a decomposition cache, in target order.
    Cached(Vec<CordaEigens>),
}

/// Tolerated relative deviation of residual + adapter from the original, by dtype.
pub fn deviation_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-3,
        DType::F16 => 2e-2,
        _ => 8e-2,
    }
}

/// The weight-level identity: max|W − (W_res + s·B·A)| relative to max|W|, on every path (a
/// reused cache included), so a broken decomposition never reaches the files.
fn weight_identity(w: &Mat<f32>, m: &ModuleInit, scaling: f64) -> Result<f64> {
    let residual = tensor_to_mat(&m.residual)?;
    let (a, b) = (tensor_to_mat(&m.a)?, tensor_to_mat(&m.b)?);
    let mut sum = residual;
    faer::linalg::matmul::matmul(
        sum.as_mut(),
        faer::Accum::Add,
        b.as_ref(),
        a.as_ref(),
        scaling as f32,
        faer::Par::Seq,
    );
    let (mut dev, mut scale) = (0.0f64, 0.0f64);
    for j in 0..w.ncols() {
        for i in 0..w.nrows() {
            dev = dev.max((w[(i, j)] - sum[(i, j)]).abs() as f64);
            scale = scale.max(w[(i, j)].abs() as f64);
        }
    }
    Ok(dev / scale.max(1e-30))
}

/// One module's initial adapter and residual weight.
pub struct ModuleInit {
    pub eigens: CordaEigens,
    /// (r, d_in) float32, rounded through the model dtype as PEFT stores it.
    pub a: Tensor,
    /// (d_out, r) float32, likewise.
    pub b: Tensor,
    /// W − s·B·A in the model dtype.
    pub residual: Tensor,
    pub report: ModuleReport,
}

/// The weights of `targets` in `layer` as float32 matrices.
pub fn target_weights(layer: &DecoderLayer, targets: &[Target]) -> Result<Vec<Mat<f32>>> {
    targets
        .iter()
        .map(|t| {
            let linear = layer
                .targets()
                .into_iter()
                .find(|x| x.name == t.name)
                .ok_or_else(|| CordaError::Model(format!("{} is not in its layer", t.name)))?;
            tensor_to_mat(&linear.weight)
        })
        .collect()
}

/// Decompose and initialise every target of a layer. Unless `allow_degenerate`, a module whose
/// adapter is degenerate ([`degeneracy`]) is an error naming it and what to do.
pub fn init_layer(
    targets: &[Target],
    weights: &[Mat<f32>],
    source: EigenSource<'_>,
    mode: CordaMode,
    dtype: DType,
    allow_degenerate: bool,
) -> Result<Vec<ModuleInit>> {
    let (all_eigens, damped) = match source {
        EigenSource::Cached(e) => (e, BTreeMap::new()),
        EigenSource::Covariances(covs) => {
            let mut damped: BTreeMap<InputSite, Damped> = BTreeMap::new();
            for t in targets {
                if let std::collections::btree_map::Entry::Vacant(e) = damped.entry(t.site) {
                    let c = covs.get(&t.site).ok_or_else(|| {
                        CordaError::Invalid(format!("no covariance for the input of {}", t.name))
                    })?;
                    e.insert(damp_covariance(c.as_ref(), &t.name)?);
                }
            }
            let jobs: Vec<_> = targets
                .iter()
                .zip(weights)
                .map(|(t, w)| (w.as_ref(), &damped[&t.site], t.rank, t.name.as_str()))
                .collect();
            let mut eigens = corda_eigens_parallel(&jobs, mode)?;
            eigens.iter_mut().for_each(CordaEigens::round_to_f32);
            (eigens, damped)
        }
    };
    let mut out = Vec::with_capacity(targets.len());
    for ((t, w), eigens) in targets.iter().zip(weights).zip(all_eigens) {
        let init = corda_init(w.as_ref(), &eigens, t.scaling);
        // PEFT: W_res cast to the model dtype; A, B rounded through it and stored as float32.
        let round = |m: &Mat<f32>| -> Result<Tensor> {
            Ok(mat_to_tensor(m, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?)
        };
        let (a, b) = (round(&init.a)?, round(&init.b)?);
        let degenerate = degeneracy(
            &eigens,
            tensor_to_mat(&a)?.as_ref(),
            tensor_to_mat(&b)?.as_ref(),
        );
        let residual = mat_to_tensor(&init.residual, &Device::Cpu)?.to_dtype(dtype)?;
        let site = damped.get(&t.site);
        let report = ModuleReport {
            name: t.name.clone(),
            rank: t.rank,
            scaling: t.scaling,
            damp: site.map(|d| d.damp),
            condition: site.map(|d| d.condition),
            spectrum: eigens.spectrum,
            degenerate,
        };
        let init = ModuleInit {
            eigens,
            a,
            b,
            residual,
            report,
        };
        let dev = weight_identity(w, &init, t.scaling)?;
        if dev.is_nan() || dev > deviation_tolerance(dtype) {
            return Err(CordaError::Numerics(format!(
                "{}: residual + s·B·A deviates from the weight by {dev:.3e} of max|W| (expected below {:.0e}); the decomposition (or a reused cache) is broken: delete the cache file, check the model for NaN/huge weights",
                t.name,
                deviation_tolerance(dtype)
            )));
        }
        out.push(init);
    }
    let bad: Vec<String> = out
        .iter()
        .filter_map(|m| {
            m.report
                .degenerate
                .as_ref()
                .map(|why| format!("{}: {why}", m.report.name))
        })
        .collect();
    if !bad.is_empty() && !allow_degenerate {
        return Err(CordaError::Numerics(format!(
            "degenerate {} adapter (it would never train or carries only rounding noise): {}. Use more or longer calibration samples, a smaller rank for these modules (rank pattern), a float32 model dtype, or accept them with allow_degenerate_adapters",
            mode.as_str(),
            bad.join("; ")
        )));
    }
    Ok(out)
}
