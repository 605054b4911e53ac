//! Damping, decomposition and `corda_init` for the targets of one layer: one damping loop per
//! input site, the modules' SVDs side by side, then A, B and the residual of each module, with
//! the degenerate-adapter guard. PiSSA and MiLoRA take the same path without the damping.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex};

use candle_core::{DType, Device, Tensor};
use faer::{Mat, Par};

use super::decompose::{
    corda_eigens_damped, corda_init, damp_covariance, degeneracy, weight_eigens, CordaEigens,
    CordaMode, Damped, InitMethod,
};
use super::files::{mat_to_tensor, tensor_to_mat};
use super::plan::Target;
use super::report::ModuleReport;
use crate::model::{DecoderLayer, InputSite};
use crate::{CordaError, Result};

/// Where a layer's decomposition comes from.
pub enum EigenSource {
    /// Covariances of the layer's input sites: damp and decompose.
    Covariances(BTreeMap<InputSite, Mat<f32>>),
    /// Already cropped eigens from a decomposition cache, in target order.
    Cached(Vec<CordaEigens>),
    /// No covariance: decompose the weights themselves (PiSSA, MiLoRA).
    Weights,
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
fn weight_identity(
    w: &Mat<f32>,
    residual: &Tensor,
    a: &Mat<f32>,
    b: &Mat<f32>,
    scaling: f64,
) -> Result<f64> {
    let mut sum = tensor_to_mat(residual)?;
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

/// The damped covariance of each input site of a layer.
type DampedSites = BTreeMap<InputSite, Arc<Damped>>;

/// One unit of a layer's decomposition.
#[derive(Clone, Copy)]
enum Task {
    /// The damping loop of an input site.
    Damp(InputSite),
    /// The SVD and crop of module i, once its site is damped.
    Eigens(usize),
}

/// A layer's decomposition as a task graph on the machine's cores: the damping loop of each
/// input site, then the SVD of each module that reads it as soon as the site is damped (damping
/// first, since it gates the rest; then the largest SVD first). One task per thread, each
/// single-threaded: independent decompositions scale with the cores while faer's SVD gains
/// little from a second one, and the results do not depend on the core count. Without
/// covariances (PiSSA, MiLoRA) every module's SVD of its weight is ready from the start.
fn layer_eigens(
    targets: &[Target],
    weights: &[Mat<f32>],
    covs: Option<&BTreeMap<InputSite, Mat<f32>>>,
    largest: bool,
) -> Result<(Vec<CordaEigens>, DampedSites)> {
    struct State {
        ready: Vec<Task>,
        damped: BTreeMap<InputSite, Arc<Damped>>,
        eigens: Vec<Option<CordaEigens>>,
        left: usize,
        error: Option<CordaError>,
    }
    let sites: BTreeSet<InputSite> = match covs {
        Some(_) => targets.iter().map(|t| t.site).collect(),
        None => BTreeSet::new(),
    };
    if let Some(t) = covs.and_then(|c| targets.iter().find(|t| !c.contains_key(&t.site))) {
        return Err(CordaError::Invalid(format!(
            "no covariance for the input of {}",
            t.name
        )));
    }
    let cost = |task: &Task| -> (bool, usize) {
        match *task {
            Task::Damp(site) => (true, covs.map_or(0, |c| c[&site].nrows().pow(3))),
            Task::Eigens(i) => {
                let (o, n) = targets[i].shape;
                (false, o * n * o.min(n))
            }
        }
    };
    let ready = match covs {
        Some(_) => sites.iter().map(|&s| Task::Damp(s)).collect(),
        None => (0..targets.len()).map(Task::Eigens).collect(),
    };
    let state = Mutex::new(State {
        ready,
        damped: BTreeMap::new(),
        eigens: targets.iter().map(|_| None).collect(),
        left: sites.len() + targets.len(),
        error: None,
    });
    let wake = Condvar::new();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let previous = faer::get_global_parallelism();
    faer::set_global_parallelism(Par::Seq);
    std::thread::scope(|scope| {
        for _ in 0..workers.min(targets.len()) {
            scope.spawn(|| loop {
                let (task, damped) = {
                    let mut st = lock();
                    loop {
                        if st.error.is_some() || st.left == 0 {
                            return;
                        }
                        let best = (0..st.ready.len()).max_by_key(|&i| cost(&st.ready[i]));
                        if let Some(i) = best {
                            let task = st.ready.swap_remove(i);
                            let damped = match task {
                                Task::Eigens(m) => st.damped.get(&targets[m].site).cloned(),
                                Task::Damp(_) => None,
                            };
                            break (task, damped);
                        }
                        st = wake.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                };
                match (task, damped) {
                    (Task::Damp(site), _) => {
                        let name = &targets
                            .iter()
                            .find(|t| t.site == site)
                            .expect("site of a target")
                            .name;
                        let covs = covs.expect("damping tasks exist only with covariances");
                        let result = damp_covariance(covs[&site].as_ref(), name);
                        let mut st = lock();
                        match result {
                            Ok(d) => {
                                st.damped.insert(site, Arc::new(d));
                                let next = (0..targets.len()).filter(|&i| targets[i].site == site);
                                st.ready.extend(next.map(Task::Eigens));
                            }
                            Err(e) => st.error = Some(e),
                        }
                        st.left -= 1;
                    }
                    (Task::Eigens(i), damped) => {
                        let t = &targets[i];
                        let w = weights[i].as_ref();
                        let result = match damped {
                            Some(d) => {
                                let mode = if largest {
                                    CordaMode::Ipm
                                } else {
                                    CordaMode::Kpm
                                };
                                corda_eigens_damped(w, &d, t.rank, mode, &t.name, Par::Seq)
                            }
                            None => weight_eigens(w, t.rank, largest, &t.name, Par::Seq),
                        };
                        let mut st = lock();
                        match result {
                            Ok(e) => st.eigens[i] = Some(e),
                            Err(e) => st.error = Some(e),
                        }
                        st.left -= 1;
                    }
                }
                wake.notify_all();
            });
        }
    });
    faer::set_global_parallelism(previous);
    let st = state.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = st.error {
        return Err(e);
    }
    let eigens = st
        .eigens
        .into_iter()
        .map(|e| e.expect("every task ran"))
        .collect();
    Ok((eigens, st.damped))
}

/// Decompose and initialise every target of a layer. Unless `allow_degenerate`, a module whose
/// adapter is degenerate ([`degeneracy`]) is an error naming it and what to do.
pub fn init_layer(
    targets: &[Target],
    weights: &[Mat<f32>],
    source: EigenSource,
    method: InitMethod,
    dtype: DType,
    allow_degenerate: bool,
) -> Result<Vec<ModuleInit>> {
    let largest = method.keeps_largest();
    let (all_eigens, damped) = match source {
        EigenSource::Cached(e) => (e, BTreeMap::new()),
        EigenSource::Covariances(covs) => {
            let (mut eigens, damped) = layer_eigens(targets, weights, Some(&covs), largest)?;
            eigens.iter_mut().for_each(CordaEigens::round_to_f32);
            (eigens, damped)
        }
        // No cache to agree with: the float64 factors go straight into A, B and the residual,
        // rounded once.
        EigenSource::Weights => layer_eigens(targets, weights, None, largest)?,
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
        // The factors as stored, once, for the guard and the identity check.
        let (a_stored, b_stored) = (tensor_to_mat(&a)?, tensor_to_mat(&b)?);
        let degenerate = degeneracy(&eigens, a_stored.as_ref(), b_stored.as_ref());
        let residual = mat_to_tensor(&init.residual, &Device::Cpu)?.to_dtype(dtype)?;
        let dev = weight_identity(w, &residual, &a_stored, &b_stored, t.scaling)?;
        let site = damped.get(&t.site);
        let report = ModuleReport {
            name: t.name.clone(),
            rank: t.rank,
            scaling: t.scaling,
            damp: site.map(|d| d.damp),
            condition: site.map(|d| d.condition),
            spectrum: eigens.spectrum,
            degenerate,
            weight_deviation: dev,
        };
        let init = ModuleInit {
            eigens,
            a,
            b,
            residual,
            report,
        };
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
            "degenerate {} adapter (it would never train or carries only rounding noise): {}. {}a smaller rank for these modules (rank pattern), a float32 model dtype, or accept them with allow_degenerate_adapters",
            method.label(),
            bad.join("; "),
            if method.needs_calibration() {
                "Use more or longer calibration samples, "
            } else {
                "Use "
            }
        )));
    }
    Ok(out)
}
