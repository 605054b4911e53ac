//! The covariance-oriented decomposition of one weight (PEFT's `collect_eigens_for_layer`,
//! `crop_corda_eigens` and `corda_init`), in float32 as PEFT computes it:
//!
//! 1. damping: `Cf = C + δ·mean(diag C)·I`, δ = 0.01 doubled until `‖Cf·Cf⁻¹ − I‖_F < 0.05`;
//! 2. thin SVD `W·Cf = U S Vh`, `Vt = Vh·Cf⁻¹` (so `U S Vt = W`);
//! 3. IPM keeps components [0, r), KPM the last r; `S' = S_r/s`,
//!    `A = diag(√S')·Vt_r`, `B = U_r·diag(√S')`, `W_res = W − (s·B)·A`.

use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, MatRef, Par};

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
}

/// Initial damping and acceptance threshold of PEFT's loop.
pub const DAMP_START: f64 = 0.01;
pub const INVERSE_TOLERANCE: f64 = 0.05;
/// PEFT doubles forever on a NaN covariance; we stop after this many doublings.
pub const MAX_DAMP_DOUBLINGS: usize = 40;

/// A damped covariance and its explicit inverse.
pub struct Damped {
    pub cf: Mat<f32>,
    pub inv: Mat<f32>,
    /// The δ that was accepted.
    pub damp: f64,
    /// ‖Cf·Cf⁻¹ − I‖_F at that δ.
    pub inverse_error: f64,
}

/// PEFT's damping loop with an explicit (LU) inverse, capped.
pub fn damp_covariance(c: MatRef<'_, f32>, module: &str) -> Result<Damped> {
    let n = c.nrows();
    if c.ncols() != n || n == 0 {
        return Err(CordaError::Invalid(format!(
            "{module}: covariance must be square, got {}x{}",
            n,
            c.ncols()
        )));
    }
    let diag_mean = (0..n).map(|i| c[(i, i)]).sum::<f32>() / n as f32;
    if !diag_mean.is_finite() || (0..n).any(|j| (0..n).any(|i| !c[(i, j)].is_finite())) {
        return Err(CordaError::Numerics(format!(
            "{module}: the covariance contains NaN or inf; the calibration forward overflowed (try --dtype float32) or the model has NaN weights"
        )));
    }
    let mut damp = DAMP_START;
    for _ in 0..=MAX_DAMP_DOUBLINGS {
        let add = diag_mean * damp as f32;
        let cf = Mat::from_fn(
            n,
            n,
            |i, j| if i == j { c[(i, j)] + add } else { c[(i, j)] },
        );
        let inv = cf.partial_piv_lu().inverse();
        let mut prod = Mat::<f32>::zeros(n, n);
        faer::linalg::matmul::matmul(
            prod.as_mut(),
            Accum::Replace,
            cf.as_ref(),
            inv.as_ref(),
            1.0f32,
            Par::rayon(0),
        );
        let mut err = 0.0f64;
        for j in 0..n {
            for i in 0..n {
                let e = prod[(i, j)] as f64 - if i == j { 1.0 } else { 0.0 };
                err += e * e;
            }
        }
        let err = err.sqrt();
        if err < INVERSE_TOLERANCE {
            return Ok(Damped {
                cf,
                inv,
                damp,
                inverse_error: err,
            });
        }
        damp *= 2.0;
    }
    Err(CordaError::Numerics(format!(
        "{module}: the covariance stays singular after {MAX_DAMP_DOUBLINGS} damping doublings (δ = {damp:e}); it is degenerate (all-zero inputs?): check the calibration data"
    )))
}

/// The cropped decomposition of one weight (PEFT's `CordaEigens` after cropping): the r kept
/// singular values and their vectors.
pub struct CordaEigens {
    /// (r,), descending.
    pub s: Vec<f32>,
    /// (d_out, r).
    pub u: Mat<f32>,
    /// (r, d_in): rows of `Vh·Cf⁻¹` (PEFT's `V_WCᵀ`).
    pub vt: Mat<f32>,
    pub damp: f64,
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

fn check_covariance_fits(w: MatRef<'_, f32>, n: usize, module: &str) -> Result<()> {
    if n != w.ncols() {
        return Err(CordaError::Invalid(format!(
            "{module}: covariance is {n}x{n} but the weight has {} inputs; the covariance file belongs to another model",
            w.ncols()
        )));
    }
    Ok(())
}

/// Step 2 plus cropping with an already damped covariance. Modules that read the same input
/// (q/k/v, gate/up) share one covariance, hence one damping loop and one inverse: PEFT runs
/// the loop per module on identical matrices and gets the same δ and inverse each time.
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
    check_covariance_fits(w, damped.cf.nrows(), module)?;
    let k = d_out.min(d_in);
    if r == 0 || r > k {
        return Err(CordaError::Invalid(format!(
            "{module}: rank {r} is not in 1..={k} (min(d_in, d_out) of its {d_out}x{d_in} weight); lower --r or set a smaller rank for it with --rank_pattern"
        )));
    }
    let mut wc = Mat::<f32>::zeros(d_out, d_in);
    faer::linalg::matmul::matmul(
        wc.as_mut(),
        Accum::Replace,
        w,
        damped.cf.as_ref(),
        1.0f32,
        par,
    );
    let svd = wc
        .thin_svd()
        .map_err(|e| CordaError::Numerics(format!("{module}: SVD did not converge ({e:?})")))?;
    let start = match mode {
        CordaMode::Ipm => 0,
        CordaMode::Kpm => k - r,
    };
    let s_all = svd.S().column_vector();
    let s: Vec<f32> = (start..start + r).map(|i| s_all[i]).collect();
    let u = svd.U().subcols(start, r).to_owned();
    // Vt_r = (V_r)ᵀ · Cf⁻¹
    let mut vt = Mat::<f32>::zeros(r, d_in);
    faer::linalg::matmul::matmul(
        vt.as_mut(),
        Accum::Replace,
        svd.V().subcols(start, r).transpose(),
        damped.inv.as_ref(),
        1.0f32,
        par,
    );
    if s.iter().any(|v| !v.is_finite()) {
        return Err(CordaError::Numerics(format!(
            "{module}: singular values are not finite"
        )));
    }
    Ok(CordaEigens {
        s,
        u,
        vt,
        damp: damped.damp,
    })
}

/// [`corda_eigens_damped`] for several modules at once, one module per thread, each
/// single-threaded. faer's SVD gains little from a second core (8.4 s on two threads against
/// 10.2 s on one for a 4-layer, 1024-wide model), while independent SVDs scale with the cores.
/// Every module is computed sequentially whatever the thread count, so the results do not depend
/// on the machine. Results come back in the order of `jobs`.
pub fn corda_eigens_parallel(
    jobs: &[(MatRef<'_, f32>, &Damped, usize, &str)],
    mode: CordaMode,
) -> Result<Vec<CordaEigens>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len())
        .max(1);
    // Largest first, so the last job to start is a small one.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(jobs[i].0.nrows() * jobs[i].0.ncols()));
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<CordaEigens>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    let previous = faer::get_global_parallelism();
    faer::set_global_parallelism(Par::Seq);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                let (w, damped, r, module) = jobs[i];
                let out = corda_eigens_damped(w, damped, r, mode, module, Par::Seq);
                *results[i].lock().expect("no poisoned job") = Some(out);
            });
        }
    });
    faer::set_global_parallelism(previous);
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .expect("no poisoned job")
                .expect("every job ran")
        })
        .collect()
}

/// The adapter factors and residual weight of one module, all float32.
pub struct CordaInit {
    /// (r, d_in)
    pub a: Mat<f32>,
    /// (d_out, r)
    pub b: Mat<f32>,
    /// W − s·B·A, (d_out, d_in), before the cast to the model dtype.
    pub residual: Mat<f32>,
}

/// Step 3 (PEFT's `corda_init`): scale, split the singular values between A and B, subtract.
pub fn corda_init(w: MatRef<'_, f32>, eigens: &CordaEigens, scaling: f64) -> CordaInit {
    let r = eigens.s.len();
    let sqrt_s: Vec<f32> = eigens
        .s
        .iter()
        .map(|v| (v / scaling as f32).sqrt())
        .collect();
    let a = Mat::from_fn(r, eigens.vt.ncols(), |i, j| eigens.vt[(i, j)] * sqrt_s[i]);
    let b = Mat::from_fn(eigens.u.nrows(), r, |i, j| eigens.u[(i, j)] * sqrt_s[j]);
    let sb = Mat::from_fn(b.nrows(), r, |i, j| b[(i, j)] * scaling as f32);
    let mut residual = w.to_owned();
    faer::linalg::matmul::matmul(
        residual.as_mut(),
        Accum::Add,
        sb.as_ref(),
        a.as_ref(),
        -1.0f32,
        Par::rayon(0),
    );
    CordaInit { a, b, residual }
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
            let init = corda_init(w.as_ref(), &e, 2.0);
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
        assert!(e.contains("k_proj") && e.contains("--rank_pattern"), "{e}");
    }
}
