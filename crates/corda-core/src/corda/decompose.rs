//! The covariance-oriented decomposition of one weight (PEFT's `collect_eigens_for_layer`,
//! `crop_corda_eigens` and `corda_init`):
//!
//! 1. damping: `Cf = C + δ·mean(diag C)·I`, δ = 0.01 doubled until `‖Cf·Cf⁻¹ − I‖_F < 0.05`,
//!    the test carried out in float32 exactly as PEFT does, so δ is PEFT's;
//! 2. thin SVD `W·Cf = U S Vh`, `Vt = Vh·Cf⁻¹` (so `U S Vt = W`);
//! 3. IPM keeps components [0, r), KPM the last r; `S' = S_r/s`,
//!    `A = diag(√S')·Vt_r`, `B = U_r·diag(√S')`, `W_res = W − (s·B)·A`.
//!
//! Steps 2 and 3 run in float64, with a Cholesky solve instead of PEFT's explicit float32
//! inverse. Real covariances have condition numbers of 1e5–1e10: in float32 the singular vectors
//! of `W·Cf`, and `Cf⁻¹` applied to them, lose most of their digits (PEFT's own adapters are
//! 0.3–70% off on a real layer; KPM's smallest singular values even come back as zeros), while in
//! float64 every module of a real model lands within 1e-9 of the exact product. The inputs (W,
//! the float32 covariance) are the same as PEFT's, so the result is PEFT's decomposition without
//! its rounding; `docs/peft-compat.md` has the figures.
//!
//! The baselines PiSSA and MiLoRA ([`InitMethod`], [`weight_eigens`]) are step 2 with `Cf = I`:
//! the SVD of W itself (PEFT's `pissa_init`, float32 there, float64 here), the r largest (PiSSA)
//! or smallest (MiLoRA) components, then the same step 3.

use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatRef, Par, Side};

use crate::{CordaError, Result};

/// Which r components the adapter trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CordaMode {
    /// Knowledge-preserved mode: the smallest r components train, the principal ones stay frozen.
    Kpm,
    /// Instruction-previewed mode (`--first_eigen`): the largest r components train.
    Ipm,
}

impl CordaMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Kpm => "kpm",
            Self::Ipm => "ipm",
        }
    }

    /// IPM trains the principal components, KPM the minor ones.
    fn keeps_largest(self) -> bool {
        self == Self::Ipm
    }
}

/// How the adapter is initialised: which matrix is decomposed and which r components train.
/// PiSSA and MiLoRA are the baselines the CorDA paper compares against; they decompose the
/// weight alone, so they need no calibration data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitMethod {
    /// CorDA: the SVD of `W·C` (C the covariance of the layer's inputs), KPM or IPM.
    Corda(CordaMode),
    /// PiSSA (PEFT's `init_lora_weights="pissa"`): the r largest singular components of W.
    Pissa,
    /// MiLoRA: the r smallest singular components of W.
    Milora,
}

impl InitMethod {
    /// `corda`, `pissa` or `milora` (the `--init` value, and `init_method` in the report).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Corda(_) => "corda",
            Self::Pissa => "pissa",
            Self::Milora => "milora",
        }
    }

    /// For messages: `CorDA kpm`, `PiSSA`, `MiLoRA`.
    pub fn label(&self) -> String {
        match self {
            Self::Corda(m) => format!("CorDA {}", m.as_str()),
            Self::Pissa => "PiSSA".into(),
            Self::Milora => "MiLoRA".into(),
        }
    }

    /// The CorDA mode, for CorDA.
    pub fn corda_mode(&self) -> Option<CordaMode> {
        match self {
            Self::Corda(m) => Some(*m),
            _ => None,
        }
    }

    /// Only CorDA reads the layers' inputs (covariances); PiSSA and MiLoRA decompose W alone.
    pub fn needs_calibration(&self) -> bool {
        matches!(self, Self::Corda(_))
    }

    /// Whether the r largest components train (CorDA IPM, PiSSA) or the r smallest (KPM, MiLoRA).
    pub fn keeps_largest(&self) -> bool {
        match self {
            Self::Corda(m) => m.keeps_largest(),
            Self::Pissa => true,
            Self::Milora => false,
        }
    }
}

/// Initial damping and acceptance threshold of PEFT's loop.
pub const DAMP_START: f64 = 0.01;
pub const INVERSE_TOLERANCE: f64 = 0.05;
/// PEFT doubles forever on a NaN covariance; we stop after this many doublings.
pub const MAX_DAMP_DOUBLINGS: usize = 40;
/// A kept singular value below this fraction of the largest one is numerically zero: float64
/// rounding of `W·Cf` alone is ~1e-14 of it, so such a component carries no information and its
/// adapter factors (√σ) are noise or exact zeros that never receive a gradient. Real KPM runs keep
/// values down to ~1e-10 (SmolLM2-135M, tests/real_model.rs), well above it.
pub const DEGENERATE_FLOOR: f64 = 1e-12;
/// The smallest kept σ/σ_max for which the long-side vectors are recovered as `M·v/σ` (their
/// error grows as σ_max/σ: here at most ~1e3·ε relative); below it the SVD computes both sides.
pub const ONE_SIDED_FLOOR: f64 = 1e-3;

/// A damped covariance `Cf` in float64 and its factorization, shared by the modules that read
/// the same input.
pub struct Damped {
    /// `C + δ·mean(diag C)·I`, float64.
    pub cf: Mat<f64>,
    factor: Factor,
    /// The δ that was accepted.
    pub damp: f64,
    /// PEFT's float32 ‖Cf·Cf⁻¹ − I‖_F at that δ.
    pub inverse_error: f64,
    /// Estimated condition number λ_max/λ_min of Cf (power and inverse iteration).
    pub condition: f64,
}

/// Cholesky when Cf is numerically positive definite (always, for a real covariance plus
/// damping), partial-pivoting LU otherwise.
enum Factor {
    Llt(faer::linalg::solvers::Llt<f64>),
    Lu(faer::linalg::solvers::PartialPivLu<f64>),
}

impl Factor {
    /// `lhs ← lhs · Cf⁻¹`.
    fn rsolve_in_place(&self, lhs: faer::MatMut<'_, f64>) {
        match self {
            Self::Llt(f) => f.rsolve_in_place(lhs),
            Self::Lu(f) => f.rsolve_in_place(lhs),
        }
    }

    /// `rhs ← Cf⁻¹ · rhs`.
    fn solve_in_place(&self, rhs: faer::MatMut<'_, f64>) {
        match self {
            Self::Llt(f) => f.solve_in_place(rhs),
            Self::Lu(f) => f.solve_in_place(rhs),
        }
    }
}

/// PEFT's float32 inverse check at damping `damp`: ‖Cf·inv(Cf) − I‖_F with an LU inverse.
fn float32_inverse_error(c: MatRef<'_, f32>, add: f32) -> f64 {
    let n = c.nrows();
    let cf = Mat::from_fn(
        n,
        n,
        |i, j| if i == j { c[(i, j)] + add } else { c[(i, j)] },
    );
    // As torch.linalg.inv does it: an LU factorization, then solves against the identity.
    let inv = cf.partial_piv_lu().solve(Mat::<f32>::identity(n, n));
    let mut prod = Mat::<f32>::zeros(n, n);
    faer::linalg::matmul::matmul(
        prod.as_mut(),
        Accum::Replace,
        cf.as_ref(),
        inv.as_ref(),
        1.0f32,
        faer::get_global_parallelism(),
    );
    let mut err = 0.0f64;
    for j in 0..n {
        for i in 0..n {
            let e = prod[(i, j)] as f64 - if i == j { 1.0 } else { 0.0 };
            err += e * e;
        }
    }
    err.sqrt()
}

/// PEFT's damping loop (float32 test, so the same δ), capped; then Cf in float64, factored.
pub fn damp_covariance(c: MatRef<'_, f32>, module: &str) -> Result<Damped> {
    let n = c.nrows();
    if c.ncols() != n || n == 0 {
        return Err(CordaError::Invalid(format!(
            "{module}: covariance must be square, got {}x{}",
            n,
            c.ncols()
        )));
    }
    // torch.mean sums accurately (pairwise); a float64 sum rounded once is as close to it.
    let diag_mean = ((0..n).map(|i| c[(i, i)] as f64).sum::<f64>() / n as f64) as f32;
    if !diag_mean.is_finite() || (0..n).any(|j| (0..n).any(|i| !c[(i, j)].is_finite())) {
        return Err(CordaError::Numerics(format!(
            "{module}: the covariance contains NaN or inf; the calibration forward overflowed (try the float32 dtype) or the model has NaN weights"
        )));
    }
    let mut damp = DAMP_START;
    for _ in 0..=MAX_DAMP_DOUBLINGS {
        let err = float32_inverse_error(c, diag_mean * damp as f32);
        if err < INVERSE_TOLERANCE {
            let add = damp * (0..n).map(|i| c[(i, i)] as f64).sum::<f64>() / n as f64;
            let cf = Mat::from_fn(n, n, |i, j| {
                c[(i, j)] as f64 + if i == j { add } else { 0.0 }
            });
            let factor = match cf.llt(Side::Lower) {
                Ok(llt) => Factor::Llt(llt),
                Err(_) => Factor::Lu(cf.partial_piv_lu()),
            };
            let condition = condition_estimate(cf.as_ref(), &factor);
            return Ok(Damped {
                cf,
                factor,
                damp,
                inverse_error: err,
                condition,
            });
        }
        damp *= 2.0;
    }
    Err(CordaError::Numerics(format!(
        "{module}: the covariance stays singular after {MAX_DAMP_DOUBLINGS} damping doublings (δ = {damp:e}); it is degenerate (all-zero inputs?): check the calibration data"
    )))
}

/// λ_max/λ_min of a symmetric positive definite matrix by 30 steps of power iteration on `a`
/// and on its inverse (through the factorization): O(n²) per step, against the O(n³) SVD.
fn condition_estimate(a: MatRef<'_, f64>, factor: &Factor) -> f64 {
    let n = a.nrows();
    let start = || Mat::from_fn(n, 1, |i, _| 1.0 + (i % 7) as f64 / 7.0);
    let normalize = |v: &mut Mat<f64>| -> f64 {
        let norm = v.norm_l2();
        if norm > 0.0 {
            for i in 0..n {
                v[(i, 0)] /= norm;
            }
        }
        norm
    };
    let mut v = start();
    normalize(&mut v);
    let mut lmax = 0.0;
    for _ in 0..30 {
        let mut w = Mat::<f64>::zeros(n, 1);
        faer::linalg::matmul::matmul(w.as_mut(), Accum::Replace, a, v.as_ref(), 1.0, Par::Seq);
        lmax = normalize(&mut w);
        v = w;
    }
    let mut v = start();
    normalize(&mut v);
    let mut inv_lmin = 0.0;
    for _ in 0..30 {
        factor.solve_in_place(v.as_mut());
        inv_lmin = normalize(&mut v);
    }
    lmax * inv_lmin
}

/// How well the kept components are determined (reported per module).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Spectrum {
    /// Largest singular value of W·Cf.
    pub sigma_max: f64,
    /// Smallest kept singular value.
    pub smallest_kept: f64,
    /// (σ above the cut − σ below the cut) / σ below the cut; `None` when r = min(d_out, d_in).
    pub gap_at_cut: Option<f64>,
    /// Estimated relative error of the kept subspace as computed (float64): the residuals
    /// ‖(W·Cf)·V_r − U_r·S_r‖, ‖(W·Cf)ᵀ·U_r − V_r·S_r‖ over the absolute gap (Wedin).
    pub error_estimate: f64,
    /// How far a float32-sized perturbation of W·Cf (the precision its inputs are stored in)
    /// could turn the kept subspace: ε₃₂·σ_max/gap. Above ~0.1 the selection is ill-determined
    /// by the data (KPM's smallest components in a tight cluster).
    pub sensitivity: f64,
}

/// The cropped decomposition of one weight (PEFT's `CordaEigens` after cropping): the r kept
/// singular values and their vectors, float64.
pub struct CordaEigens {
    /// (r,), descending.
    pub s: Vec<f64>,
    /// (d_out, r).
    pub u: Mat<f64>,
    /// (r, d_in): rows of `Vh·Cf⁻¹` (PEFT's `V_WCᵀ`).
    pub vt: Mat<f64>,
    pub damp: f64,
    /// `None` when read from a decomposition cache.
    pub spectrum: Option<Spectrum>,
}

impl CordaEigens {
    /// Round the kept values and vectors to float32, as a decomposition cache stores them, so a
    /// run that reuses the cache writes the same bytes as the run that made it. Costs ~1e-7
    /// relative, the precision the float32 adapter factors are stored in anyway.
    pub fn round_to_f32(&mut self) {
        let round = |m: &mut Mat<f64>| {
            for j in 0..m.ncols() {
                for i in 0..m.nrows() {
                    m[(i, j)] = m[(i, j)] as f32 as f64;
                }
            }
        };
        self.s.iter_mut().for_each(|v| *v = *v as f32 as f64);
        round(&mut self.u);
        round(&mut self.vt);
    }
}

/// Steps 1–2 plus cropping for weight `w` (d_out × d_in) and covariance `c` (d_in × d_in).
pub fn corda_eigens(
    w: MatRef<'_, f32>,
    c: MatRef<'_, f32>,
    r: usize,
    mode: CordaMode,
    module: &str,
) -> Result<CordaEigens> {
    let damped = damp_covariance(c, module)?;
    corda_eigens_damped(w, &damped, r, mode, module, Par::rayon(0))
}

/// Step 2 plus cropping with an already damped covariance. Modules that read the same input
/// (q/k/v, gate/up) share one covariance, hence one damping loop and one factorization: PEFT
/// runs the loop per module on identical matrices and gets the same δ each time.
/// `par` is the parallelism of the products (the SVD follows faer's global setting).
pub fn corda_eigens_damped(
    w: MatRef<'_, f32>,
    damped: &Damped,
    r: usize,
    mode: CordaMode,
    module: &str,
    par: Par,
) -> Result<CordaEigens> {
    let (d_out, d_in) = (w.nrows(), w.ncols());
    if damped.cf.nrows() != d_in {
        return Err(CordaError::Invalid(format!(
            "{module}: covariance is {n}x{n} but the weight has {d_in} inputs; the covariance file belongs to another model",
            n = damped.cf.nrows()
        )));
    }
    check_rank(d_out, d_in, r, module)?;
    let w64 = Mat::from_fn(d_out, d_in, |i, j| w[(i, j)] as f64);
    let mut wc = Mat::<f64>::zeros(d_out, d_in);
    faer::linalg::matmul::matmul(
        wc.as_mut(),
        Accum::Replace,
        w64.as_ref(),
        damped.cf.as_ref(),
        1.0,
        par,
    );
    let kept = svd_crop(wc.as_ref(), r, mode.keeps_largest(), module, par)?;
    // Vt_r = V_rᵀ · Cf⁻¹, by the factorization rather than an explicit inverse.
    let mut vt = kept.v.transpose().to_owned();
    damped.factor.rsolve_in_place(vt.as_mut());
    Ok(CordaEigens {
        s: kept.s,
        u: kept.u,
        vt,
        damp: damped.damp,
        spectrum: Some(kept.spectrum),
    })
}

/// PiSSA / MiLoRA: the thin SVD `W = U S Vh` of the weight itself in float64 (PEFT's `pissa_init`
/// runs it in float32), cropped to the r largest (`largest`, PiSSA) or smallest (MiLoRA)
/// components; `vt` holds the rows of Vh. `damp` is NaN: there is no covariance.
pub fn weight_eigens(
    w: MatRef<'_, f32>,
    r: usize,
    largest: bool,
    module: &str,
    par: Par,
) -> Result<CordaEigens> {
    let (d_out, d_in) = (w.nrows(), w.ncols());
    check_rank(d_out, d_in, r, module)?;
    if (0..d_in).any(|j| (0..d_out).any(|i| !w[(i, j)].is_finite())) {
        return Err(CordaError::Numerics(format!(
            "{module}: the weight contains NaN or inf; check the model file"
        )));
    }
    let w64 = Mat::from_fn(d_out, d_in, |i, j| w[(i, j)] as f64);
    let kept = svd_crop(w64.as_ref(), r, largest, module, par)?;
    Ok(CordaEigens {
        s: kept.s,
        u: kept.u,
        vt: kept.v.transpose().to_owned(),
        damp: f64::NAN,
        spectrum: Some(kept.spectrum),
    })
}

/// Refuse a rank outside 1..=min(d_out, d_in).
fn check_rank(d_out: usize, d_in: usize, r: usize, module: &str) -> Result<()> {
    let k = d_out.min(d_in);
    if r == 0 || r > k {
        return Err(CordaError::Invalid(format!(
            "{module}: rank {r} is not in 1..={k} (min(d_in, d_out) of its {d_out}x{d_in} weight); lower r or give this module a smaller rank in the rank pattern"
        )));
    }
    Ok(())
}

/// The r kept singular triplets of a matrix and the figures of its cut.
struct Kept {
    s: Vec<f64>,
    u: Mat<f64>,
    v: Mat<f64>,
    spectrum: Spectrum,
}

/// Thin SVD of `m` in float64, cropped to its r largest or smallest components.
///
/// When the largest are kept (IPM, PiSSA), the SVD computes only the short side's singular
/// vectors: back-transforming all k long-side vectors is 30–40% of its time (faer 0.24, one
/// thread, 1024–2816 wide), and only r are kept. Those r come from the short side as `M·v/σ`
/// (tall `M`) or `Mᵀ·u/σ` (wide), with an error of ~ε·σ_max/σ along the other components, which
/// the residuals in [`Spectrum`] measure. That amplification rules it out for KPM's smallest
/// components (measured: the fixture's o_proj error estimate rose to 1.1e-6, over its 1e-6), and for
/// any kept σ below [`ONE_SIDED_FLOOR`]·σ_max, where both sides come from the full SVD.
fn svd_crop(m: MatRef<'_, f64>, r: usize, largest: bool, module: &str, par: Par) -> Result<Kept> {
    let (rows, cols) = m.shape();
    let k = rows.min(cols);
    let start = if largest { 0 } else { k - r };
    let no_convergence =
        |e| CordaError::Numerics(format!("{module}: SVD did not converge ({e:?})"));
    let finite = |s: faer::ColRef<'_, f64>| {
        if s.iter().all(|v| v.is_finite()) {
            Ok(())
        } else {
            Err(CordaError::Numerics(format!(
                "{module}: singular values are not finite"
            )))
        }
    };
    if largest {
        let tall = rows >= cols;
        let (s_all, short) = short_side_svd(m, tall).map_err(no_convergence)?;
        finite(s_all.as_ref())?;
        let s: Vec<f64> = (0..r).map(|i| s_all[i]).collect();
        if s[r - 1] >= ONE_SIDED_FLOOR * s_all[0] {
            let short = short.subcols(0, r).to_owned();
            let (lhs, len) = if tall {
                (m, rows)
            } else {
                (m.transpose(), cols)
            };
            let mut long = Mat::<f64>::zeros(len, r);
            faer::linalg::matmul::matmul(
                long.as_mut(),
                Accum::Replace,
                lhs,
                short.as_ref(),
                1.0,
                par,
            );
            for (j, sigma) in s.iter().enumerate() {
                long.col_mut(j).iter_mut().for_each(|x| *x /= sigma);
            }
            let (u, v) = if tall { (long, short) } else { (short, long) };
            let spectrum = spectrum(m, s_all.as_ref(), u.as_ref(), v.as_ref(), 0, par);
            return Ok(Kept { s, u, v, spectrum });
        }
    }
    let svd = m.thin_svd().map_err(no_convergence)?;
    let s_all = svd.S().column_vector();
    finite(s_all)?;
    let s: Vec<f64> = (start..start + r).map(|i| s_all[i]).collect();
    let u = svd.U().subcols(start, r).to_owned();
    let v = svd.V().subcols(start, r).to_owned();
    let spectrum = spectrum(m, s_all, u.as_ref(), v.as_ref(), start, par);
    Ok(Kept { s, u, v, spectrum })
}

/// The singular values of `m` (descending) and the singular vectors of its short side: V when
/// `tall`, U otherwise (min(rows, cols) columns).
fn short_side_svd(
    m: MatRef<'_, f64>,
    tall: bool,
) -> std::result::Result<(faer::Col<f64>, Mat<f64>), faer::linalg::svd::SvdError> {
    use faer::linalg::svd::{self, ComputeSvdVectors};
    let (rows, cols) = m.shape();
    let k = rows.min(cols);
    let par = faer::get_global_parallelism();
    let (cu, cv) = if tall {
        (ComputeSvdVectors::No, ComputeSvdVectors::Thin)
    } else {
        (ComputeSvdVectors::Thin, ComputeSvdVectors::No)
    };
    let mut s = faer::diag::Diag::<f64>::zeros(k);
    let mut short = Mat::<f64>::zeros(if tall { cols } else { rows }, k);
    let (u, v) = if tall {
        (None, Some(short.as_mut()))
    } else {
        (Some(short.as_mut()), None)
    };
    let req = svd::svd_scratch::<f64>(rows, cols, cu, cv, par, Default::default());
    let mut buf = faer::dyn_stack::MemBuffer::new(req);
    svd::svd(
        m,
        s.as_mut(),
        u,
        v,
        par,
        faer::dyn_stack::MemStack::new(&mut buf),
        Default::default(),
    )?;
    Ok((s.column_vector().to_owned(), short))
}

/// The gap, residual and sensitivity figures of the kept components `start..start + r`.
fn spectrum(
    wc: MatRef<'_, f64>,
    s_all: faer::ColRef<'_, f64>,
    u: MatRef<'_, f64>,
    v: MatRef<'_, f64>,
    start: usize,
    par: Par,
) -> Spectrum {
    let (k, r) = (s_all.nrows(), u.ncols());
    let sigma_max = s_all[0];
    let smallest_kept = s_all[start + r - 1];
    // The cut lies above `start` (KPM) or below `start + r` (IPM).
    let (above, below) = if start > 0 {
        (s_all[start - 1], s_all[start])
    } else if r < k {
        (s_all[r - 1], s_all[r])
    } else {
        (f64::NAN, f64::NAN)
    };
    let gap_abs = above - below;
    let gap_at_cut = gap_abs.is_finite().then(|| gap_abs / below);
    // Residuals of the kept singular triplets.
    let mut r1 = Mat::from_fn(u.nrows(), r, |i, j| -u[(i, j)] * s_all[start + j]);
    faer::linalg::matmul::matmul(r1.as_mut(), Accum::Add, wc, v, 1.0, par);
    let mut r2 = Mat::from_fn(v.nrows(), r, |i, j| -v[(i, j)] * s_all[start + j]);
    faer::linalg::matmul::matmul(r2.as_mut(), Accum::Add, wc.transpose(), u, 1.0, par);
    // √(a² + b²) written out: f64::hypot binds to glibc 2.35's `hypot`, and the binaries are
    // meant to run on glibc 2.34 (GPU machines; see scripts/cuda/package.sh). Norms of finite
    // residuals are far from overflowing when squared.
    let (n1, n2) = (r1.norm_l2(), r2.norm_l2());
    let residual = (n1 * n1 + n2 * n2).sqrt();
    let (error_estimate, sensitivity) = match gap_at_cut {
        Some(_) if gap_abs > 0.0 => (
            residual / gap_abs,
            f32::EPSILON as f64 * sigma_max / gap_abs,
        ),
        Some(_) => (f64::INFINITY, f64::INFINITY),
        // All components kept: the product is W itself, whatever the vectors.
        None => (residual / sigma_max, 0.0),
    };
    Spectrum {
        sigma_max,
        smallest_kept,
        gap_at_cut,
        error_estimate,
        sensitivity,
    }
}

/// The adapter factors and residual weight of one module, float32.
pub struct CordaInit {
    /// (r, d_in)
    pub a: Mat<f32>,
    /// (d_out, r)
    pub b: Mat<f32>,
    /// W − s·B·A, (d_out, d_in), before the cast to the model dtype.
    pub residual: Mat<f32>,
}

/// Step 3 (PEFT's `corda_init`): scale, split the singular values between A and B, subtract.
/// Computed in float64 and rounded once.
pub fn corda_init(w: MatRef<'_, f32>, eigens: &CordaEigens, scaling: f64) -> CordaInit {
    let r = eigens.s.len();
    let sqrt_s: Vec<f64> = eigens.s.iter().map(|v| (v / scaling).sqrt()).collect();
    let a = Mat::from_fn(r, eigens.vt.ncols(), |i, j| eigens.vt[(i, j)] * sqrt_s[i]);
    let sb = Mat::from_fn(eigens.u.nrows(), r, |i, j| {
        eigens.u[(i, j)] * sqrt_s[j] * scaling
    });
    let mut residual = Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)] as f64);
    faer::linalg::matmul::matmul(
        residual.as_mut(),
        Accum::Add,
        sb.as_ref(),
        a.as_ref(),
        -1.0,
        Par::rayon(0),
    );
    CordaInit {
        a: Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] as f32),
        b: Mat::from_fn(sb.nrows(), r, |i, j| (sb[(i, j)] / scaling) as f32),
        residual: Mat::from_fn(w.nrows(), w.ncols(), |i, j| residual[(i, j)] as f32),
    }
}

/// Why an adapter could never train or carries no information, if it is so: a kept singular
/// value that is zero or below [`DEGENERATE_FLOOR`] of the largest, or a component whose row of
/// A and column of B are both all zero (no gradient reaches either). `a` and `b` are the factors
/// as stored.
pub fn degeneracy(eigens: &CordaEigens, a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Option<String> {
    let sigma_max = eigens.spectrum.map_or(f64::NAN, |s| s.sigma_max);
    if let Some((i, &s)) = eigens
        .s
        .iter()
        .enumerate()
        .find(|(_, &s)| s.is_nan() || s <= 0.0 || s < DEGENERATE_FLOOR * sigma_max)
    {
        return Some(format!(
            "kept singular value {} of {} is {s:.3e} ({:.1e} of the largest, floor {DEGENERATE_FLOOR:.0e})",
            i + 1,
            eigens.s.len(),
            s / sigma_max
        ));
    }
    let zero_components: Vec<usize> = (0..a.nrows())
        .filter(|&i| {
            (0..a.ncols()).all(|j| a[(i, j)] == 0.0) && (0..b.nrows()).all(|j| b[(j, i)] == 0.0)
        })
        .collect();
    (!zero_components.is_empty()).then(|| {
        format!(
            "{} of its {} components have all-zero A rows and B columns",
            zero_components.len(),
            a.nrows()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// The one-sided route (largest kept, long side as `M·v/σ`) gives the full SVD's triplets,
    /// tall and wide, and a spectrum whose kept σ fall below [`ONE_SIDED_FLOOR`] takes the full
    /// SVD (same triplets by construction).
    #[test]
    fn one_sided_largest_matches_the_full_svd() {
        let mut seed = 11u64;
        for (rows, cols, decades) in [(60, 24, 2.0), (24, 60, 2.0), (40, 40, 2.0), (60, 24, 8.0)] {
            let scale = |j: usize| 10f64.powf(-decades * j as f64 / cols as f64);
            let m = Mat::from_fn(rows, cols, |_, j| lcg(&mut seed) as f64 * scale(j));
            let r = 12;
            let kept = svd_crop(m.as_ref(), r, true, "m", Par::Seq).unwrap();
            let full = m.thin_svd().unwrap();
            for j in 0..r {
                let s = full.S().column_vector()[j];
                assert!((kept.s[j] - s).abs() <= 1e-13 * full.S().column_vector()[0]);
                // Same vectors up to sign.
                let sign = if (0..rows)
                    .map(|i| kept.u[(i, j)] * full.U()[(i, j)])
                    .sum::<f64>()
                    < 0.0
                {
                    -1.0
                } else {
                    1.0
                };
                for i in 0..rows {
                    assert!(
                        (kept.u[(i, j)] - sign * full.U()[(i, j)]).abs() < 1e-9,
                        "u {rows}x{cols} {j}"
                    );
                }
                for i in 0..cols {
                    assert!(
                        (kept.v[(i, j)] - sign * full.V()[(i, j)]).abs() < 1e-9,
                        "v {rows}x{cols} {j}"
                    );
                }
            }
            assert!(
                kept.spectrum.error_estimate < 1e-9,
                "{rows}x{cols}: {:?}",
                kept.spectrum
            );
            let one_sided = kept.s[r - 1] >= ONE_SIDED_FLOOR * kept.spectrum.sigma_max;
            assert_eq!(one_sided, decades < 3.0, "{rows}x{cols}, {decades} decades");
        }
    }

    #[test]
    fn residual_plus_adapter_is_the_weight_in_both_modes() {
        let mut seed = 7;
        let (d_out, d_in, n) = (12, 9, 40);
        let w = Mat::from_fn(d_out, d_in, |_, _| lcg(&mut seed));
        let x = Mat::from_fn(n, d_in, |_, _| lcg(&mut seed));
        let c = Mat::from_fn(d_in, d_in, |i, j| {
            (0..n).map(|t| x[(t, i)] * x[(t, j)]).sum::<f32>() / n as f32
        });
        for mode in [CordaMode::Kpm, CordaMode::Ipm] {
            let e = corda_eigens(w.as_ref(), c.as_ref(), 4, mode, "m").unwrap();
            assert!(e.s.windows(2).all(|p| p[0] >= p[1]));
            let sp = e.spectrum.unwrap();
            assert!(sp.error_estimate < 1e-10 && sp.gap_at_cut.unwrap() > 0.0);
            let init = corda_init(w.as_ref(), &e, 2.0);
            assert!(degeneracy(&e, init.a.as_ref(), init.b.as_ref()).is_none());
            for i in 0..d_out {
                for j in 0..d_in {
                    let ba: f32 = (0..4).map(|k| init.b[(i, k)] * init.a[(k, j)]).sum();
                    assert!((init.residual[(i, j)] + 2.0 * ba - w[(i, j)]).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn damping_grows_for_a_singular_covariance_and_stops_on_nan() {
        let c = Mat::from_fn(4, 4, |i, j| if i == 0 && j == 0 { 1.0f32 } else { 0.0 });
        let d = damp_covariance(c.as_ref(), "m").unwrap();
        assert!(d.damp >= 0.01 && d.inverse_error < 0.05);
        // diag(1 + δ/4, δ/4, δ/4, δ/4): condition (1 + δ/4)/(δ/4).
        let expected = (1.0 + d.damp / 4.0) / (d.damp / 4.0);
        assert!(
            (d.condition / expected - 1.0).abs() < 1e-6,
            "{}",
            d.condition
        );
        let nan = Mat::from_fn(3, 3, |_, _| f32::NAN);
        assert!(damp_covariance(nan.as_ref(), "m")
            .err()
            .unwrap()
            .to_string()
            .contains("NaN"));
        let zero = Mat::<f32>::zeros(3, 3);
        assert!(damp_covariance(zero.as_ref(), "m").is_err());
    }

    #[test]
    fn a_zero_weight_is_degenerate() {
        let w = Mat::<f32>::zeros(4, 6);
        let c = Mat::<f32>::identity(6, 6);
        let e = corda_eigens(w.as_ref(), c.as_ref(), 2, CordaMode::Kpm, "m").unwrap();
        let init = corda_init(w.as_ref(), &e, 1.0);
        let why = degeneracy(&e, init.a.as_ref(), init.b.as_ref()).unwrap();
        assert!(why.contains("singular value"), "{why}");
        // A weight of rank 2 in KPM with r = 3: one kept singular value is (numerically) zero.
        let w = Mat::from_fn(5, 6, |i, j| if i == j && i < 2 { 1.0f32 } else { 0.0 });
        let e = corda_eigens(w.as_ref(), c.as_ref(), 3, CordaMode::Kpm, "m").unwrap();
        let init = corda_init(w.as_ref(), &e, 1.0);
        assert!(degeneracy(&e, init.a.as_ref(), init.b.as_ref()).is_some());
        let e = corda_eigens(w.as_ref(), c.as_ref(), 2, CordaMode::Ipm, "m").unwrap();
        let init = corda_init(w.as_ref(), &e, 1.0);
        assert!(degeneracy(&e, init.a.as_ref(), init.b.as_ref()).is_none());
    }

    #[test]
    fn pissa_and_milora_split_the_weight_itself() {
        let mut seed = 11;
        let (d_out, d_in, r) = (10, 7, 3);
        let w = Mat::from_fn(d_out, d_in, |_, _| lcg(&mut seed));
        let all = Mat::from_fn(d_out, d_in, |i, j| w[(i, j)] as f64)
            .singular_values()
            .unwrap();
        for (init, kept) in [
            (InitMethod::Pissa, 0..r),
            (InitMethod::Milora, d_in - r..d_in),
        ] {
            let e = weight_eigens(w.as_ref(), r, init.keeps_largest(), "m", Par::Seq).unwrap();
            assert!(e.damp.is_nan() && e.spectrum.unwrap().error_estimate < 1e-12);
            for (got, want) in e.s.iter().zip(&all[kept]) {
                assert!((got - want).abs() < 1e-12, "{init:?}: {got} vs {want}");
            }
            let init_ = corda_init(w.as_ref(), &e, 0.5);
            for i in 0..d_out {
                for j in 0..d_in {
                    let ba: f32 = (0..r).map(|k| init_.b[(i, k)] * init_.a[(k, j)]).sum();
                    assert!((init_.residual[(i, j)] + 0.5 * ba - w[(i, j)]).abs() < 1e-6);
                }
            }
        }
        // A weight of rank 2: MiLoRA's r = 3 smallest include a zero, PiSSA's r = 2 do not.
        let w = Mat::from_fn(5, 6, |i, j| if i == j && i < 2 { 1.0f32 } else { 0.0 });
        let e = weight_eigens(w.as_ref(), 3, false, "m", Par::Seq).unwrap();
        let init_ = corda_init(w.as_ref(), &e, 1.0);
        assert!(degeneracy(&e, init_.a.as_ref(), init_.b.as_ref()).is_some());
        let e = weight_eigens(w.as_ref(), 2, true, "m", Par::Seq).unwrap();
        let init_ = corda_init(w.as_ref(), &e, 1.0);
        assert!(degeneracy(&e, init_.a.as_ref(), init_.b.as_ref()).is_none());
        let nan = Mat::from_fn(3, 3, |_, _| f32::NAN);
        let err = weight_eigens(nan.as_ref(), 1, true, "m", Par::Seq)
            .err()
            .unwrap();
        assert!(err.to_string().contains("NaN"), "{err}");
        assert!(weight_eigens(w.as_ref(), 6, true, "m", Par::Seq).is_err());
    }

    #[test]
    fn rank_too_large_is_refused() {
        let w = Mat::<f32>::identity(3, 5);
        let c = Mat::<f32>::identity(5, 5);
        let e = corda_eigens(
            w.as_ref(),
            c.as_ref(),
            4,
            CordaMode::Kpm,
            "model.layers.0.self_attn.k_proj",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("k_proj") && e.contains("rank pattern"), "{e}");
    }
}
