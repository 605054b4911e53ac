//! The decomposition on one real decoder layer (SmolLM2-135M-Instruct layer 11, PEFT's own
//! float32 covariances on real text, condition numbers 1e5–1e10), against the float64-exact
//! factors in ../shared/fixtures/real-layer: every projection, both modes, within 1e-3 of exact.
//! PEFT's own float32 error is printed beside ours. The PiSSA / MiLoRA baselines on the same
//! weights: residual + s·B·A = W, and the kept components are the largest / smallest, checked
//! against the eigenvalues of the Gram matrix (an algorithm independent of the SVD).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use corda_core::corda::{
    corda_eigens_damped, corda_init, damp_covariance, degeneracy, weight_eigens, CordaMode,
    InitMethod,
};
use corda_core::model::TARGET_PROJECTIONS;
use faer::{Mat, Par};

const RANK: usize = 16;
/// The bound: ‖s·B·A − exact‖_F / ‖exact‖_F per module.
const BOUND: f64 = 1e-3;

fn fixture() -> Option<PathBuf> {
    corda_testdata::shared(
        "fixtures/real-layer/smollm2-layer11.safetensors",
        "the real-layer decomposition tests",
    )
}

struct Fixture {
    tensors: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

impl Fixture {
    fn load(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap();
        let (_, st) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let desc = st.metadata().as_ref().unwrap()["description"].clone();
        Self {
            tensors: candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap(),
            meta: serde_json::from_str(&desc).unwrap(),
        }
    }

    fn mat(&self, key: &str) -> Mat<f64> {
        let t = &self.tensors[key];
        let t = t.to_dtype(candle_core::DType::F64).unwrap();
        let (r, c) = match t.dims() {
            [n] => (*n, 1),
            [r, c] => (*r, *c),
            d => panic!("{key}: shape {d:?}"),
        };
        let v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        Mat::from_fn(r, c, |i, j| v[i * c + j])
    }

    fn mat_f32(&self, key: &str) -> Mat<f32> {
        let m = self.mat(key);
        Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f32)
    }
}

fn product(u: &Mat<f64>, s: &[f64], a: &Mat<f64>) -> Mat<f64> {
    let us = Mat::from_fn(u.nrows(), s.len(), |i, j| u[(i, j)] * s[j]);
    &us * a
}

fn rel_err(got: &Mat<f64>, exact: &Mat<f64>) -> f64 {
    (got - exact).norm_l2() / exact.norm_l2()
}

fn check_mode(mode: CordaMode) {
    let Some(path) = fixture() else { return };
    let fx = Fixture::load(&path);
    let m = mode.as_str();
    let mut worst: f64 = 0.0;
    println!("{m}: module      ours(s·B·A)  ours(U·S·Vt)  PEFT f32   gap     δ     sensitivity");
    for p in TARGET_PROJECTIONS {
        let site = fx.meta["covariance_sites"][p].as_str().unwrap();
        let w = fx.mat_f32(&format!("{p}.weight"));
        let c = fx.mat_f32(&format!("{m}.{site}.covariance"));
        let damped = damp_covariance(c.as_ref(), p).unwrap();
        let peft_damp = fx.mat(&format!("{m}.{p}.damp"))[(0, 0)];
        assert_eq!(damped.damp, peft_damp, "{m}.{p}: δ differs from PEFT's");
        let mut e = corda_eigens_damped(w.as_ref(), &damped, RANK, mode, p, Par::rayon(0)).unwrap();
        // All singular values of W·Cf against float64.
        let s_exact = fx.mat(&format!("{m}.{p}.S"));
        let s_r: Vec<f64> = (0..RANK)
            .map(|i| fx.mat(&format!("{m}.{p}.S_r"))[(i, 0)])
            .collect();
        for (i, (got, want)) in e.s.iter().zip(&s_r).enumerate() {
            assert!(
                (got - want).abs() <= 1e-9 * s_exact[(0, 0)],
                "{m}.{p}: σ_{i} {got} vs {want}"
            );
        }
        let exact = product(
            &fx.mat(&format!("{m}.{p}.U_r")),
            &s_r,
            &fx.mat(&format!("{m}.{p}.A_r")),
        );
        let ours64 = rel_err(&product(&e.u, &e.s, &e.vt), &exact);
        // What is written: the eigens rounded as a cache holds them, float32 A and B, s·B·A.
        e.round_to_f32();
        let scaling = 2.0;
        let init = corda_init(w.as_ref(), &e, scaling);
        assert!(
            degeneracy(&e, init.a.as_ref(), init.b.as_ref()).is_none(),
            "{m}.{p} degenerate"
        );
        let a = Mat::from_fn(init.a.nrows(), init.a.ncols(), |i, j| init.a[(i, j)] as f64);
        let b = Mat::from_fn(init.b.nrows(), init.b.ncols(), |i, j| {
            init.b[(i, j)] as f64 * scaling
        });
        let ours = rel_err(&(&b * &a), &exact);
        // The residual is W minus the same product.
        let res = Mat::from_fn(w.nrows(), w.ncols(), |i, j| {
            w[(i, j)] as f64 - init.residual[(i, j)] as f64
        });
        let res_err = (&res - &exact).norm_l2() / exact.norm_l2().max(1e-300);
        let info = &fx.meta[format!("{m}.{p}")];
        let sp = e.spectrum.unwrap();
        println!(
            "{m}: {p:10}  {ours:.2e}     {ours64:.2e}      {:.2e}  {:.4}  {}  {:.1e}",
            info["peft_f32_rel_err"].as_f64().unwrap(),
            info["gap_at_cut"].as_f64().unwrap(),
            damped.damp,
            sp.sensitivity,
        );
        let gap = info["gap_at_cut"].as_f64().unwrap();
        assert!(
            (sp.gap_at_cut.unwrap() - gap).abs() < 1e-6,
            "{m}.{p}: gap at the cut {:?} vs the fixture's {gap}",
            sp.gap_at_cut
        );
        assert!(
            sp.error_estimate < BOUND,
            "{m}.{p}: error estimate {}",
            sp.error_estimate
        );
        assert!(
            ours < BOUND && ours64 < BOUND,
            "{m}.{p}: {ours:e} / {ours64:e} above {BOUND:e}"
        );
        // Residual rounding to float32 costs ~1e-7·‖W‖, relative to a small product in KPM.
        let w_norm = Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)] as f64).norm_l2();
        assert!(
            res_err * exact.norm_l2() < 1e-6 * w_norm,
            "{m}.{p}: residual off by {res_err:e}"
        );
        worst = worst.max(ours);
    }
    println!("{m}: worst module {worst:.2e} (bound {BOUND:e})");
}

#[test]
fn kpm_is_exact_on_a_real_layer() {
    check_mode(CordaMode::Kpm);
}

#[test]
fn ipm_is_exact_on_a_real_layer() {
    check_mode(CordaMode::Ipm);
}

/// PiSSA / MiLoRA on the real weights: the identity within CorDA's residual bound (1e-6·‖W‖),
/// and the kept σ² and both parts of the split (Eckart–Young: ‖s·B·A‖² = Σ kept σ²,
/// ‖W − s·B·A‖² = Σ the others) against the eigenvalues of the Gram matrix W·Wᵀ or Wᵀ·W.
fn check_baseline(init: InitMethod) {
    let Some(path) = fixture() else { return };
    let fx = Fixture::load(&path);
    let label = init.label();
    for p in TARGET_PROJECTIONS {
        let w = fx.mat_f32(&format!("{p}.weight"));
        let w64 = fx.mat(&format!("{p}.weight"));
        let e = weight_eigens(w.as_ref(), RANK, init.keeps_largest(), p, Par::rayon(0)).unwrap();
        let scaling = 2.0;
        let out = corda_init(w.as_ref(), &e, scaling);
        assert!(
            degeneracy(&e, out.a.as_ref(), out.b.as_ref()).is_none(),
            "{label} {p} degenerate"
        );
        let a = Mat::from_fn(out.a.nrows(), out.a.ncols(), |i, j| out.a[(i, j)] as f64);
        let b = Mat::from_fn(out.b.nrows(), out.b.ncols(), |i, j| {
            out.b[(i, j)] as f64 * scaling
        });
        let sba = &b * &a;
        let res = Mat::from_fn(w.nrows(), w.ncols(), |i, j| out.residual[(i, j)] as f64);
        let w_norm = w64.norm_l2();
        let identity = (&(&res + &sba) - &w64).norm_l2() / w_norm;
        assert!(
            identity < 1e-6,
            "{label} {p}: residual + s·B·A off W by {identity:e}"
        );

        let gram = if w64.nrows() <= w64.ncols() {
            &w64 * w64.transpose()
        } else {
            w64.transpose() * &w64
        };
        let mut lambda = gram.self_adjoint_eigenvalues(faer::Side::Lower).unwrap();
        lambda.reverse();
        let k = lambda.len();
        let kept: Vec<usize> = if init.keeps_largest() {
            (0..RANK).collect()
        } else {
            (k - RANK..k).collect()
        };
        let floor = 1e-12 * lambda[0];
        for (s, &i) in e.s.iter().zip(&kept) {
            assert!(
                (s * s - lambda[i]).abs() <= 1e-9 * lambda[i] + floor,
                "{label} {p}: σ² {} vs λ_{i} {}",
                s * s,
                lambda[i]
            );
        }
        let kept_sum: f64 = kept.iter().map(|&i| lambda[i]).sum();
        let rest_sum: f64 = lambda.iter().sum::<f64>() - kept_sum;
        let split = sba.squared_norm_l2();
        let remainder = (&w64 - &sba).squared_norm_l2();
        assert!(
            (split - kept_sum).abs() <= 1e-5 * kept_sum + floor,
            "{label} {p}: ‖s·B·A‖² {split:e} vs Σ kept σ² {kept_sum:e}"
        );
        assert!(
            (remainder - rest_sum).abs() <= 1e-5 * rest_sum + floor,
            "{label} {p}: ‖W − s·B·A‖² {remainder:e} vs Σ other σ² {rest_sum:e}"
        );
        println!(
            "{label}: {p:10} identity {identity:.1e}, kept σ² share {:.2e}, Eckart–Young {:.1e}",
            kept_sum / (kept_sum + rest_sum),
            (split - kept_sum).abs() / kept_sum
        );
    }
}

#[test]
fn pissa_is_exact_on_a_real_layer() {
    check_baseline(InitMethod::Pissa);
}

#[test]
fn milora_is_exact_on_a_real_layer() {
    check_baseline(InitMethod::Milora);
}
