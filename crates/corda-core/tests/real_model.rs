//! CorDA end to end on a real pretrained model: SmolLM2-135M-Instruct (../shared/models, the GGUF
//! dequantized to float32; 30 layers, covariances with condition numbers up to 1e10), r 16,
//! alpha 32, 64 calibration rows of max length 128: real questions (KPM) and math word problems
//! with worked answers (IPM) from tests/data. Every module of every layer is checked against an
//! independent float64 recomputation of PEFT's algorithm from the run's own covariance file
//! (explicit LU inverse, SVD of the transpose: other routes than the library's), within 1e-3; no
//! adapter is degenerate; residual + adapter reproduce the model's logits.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use corda_core::adapter::Adapter;
use corda_core::corda::{preprocess, CordaMode, InitMethod, PreprocessOptions};
use corda_core::data::{calibration_samples, read_rows, CalibOptions, CalibSampling, Template};
use corda_core::layout::CORDA_INIT_DIR;
use corda_core::model::{CausalLM, LoadOptions, TokenizerInfo, Weights, TARGET_PROJECTIONS};
use faer::linalg::solvers::DenseSolveCore;
use faer::Mat;

const RANK: usize = 16;
const BOUND: f64 = 1e-3;

fn model_dir(test: &str) -> Option<PathBuf> {
    corda_testdata::shared("models/smollm2-135m-instruct", test)
}

fn samples(model: &Path, file: &str, template: &str) -> Vec<Vec<u32>> {
    let tok = TokenizerInfo::load(model).unwrap();
    let rows = read_rows(&corda_testdata::repo_root().join("tests/data").join(file)).unwrap();
    let opts = CalibOptions {
        n: 64,
        max_length: 128,
        seed: 233,
        sampling: CalibSampling::Rows,
    };
    calibration_samples(
        &rows,
        &Template::parse(template).unwrap(),
        &tok.tokenizer,
        &opts,
    )
    .unwrap()
}

fn mat64(t: &Tensor) -> Mat<f64> {
    let t = t.to_dtype(DType::F64).unwrap();
    let (r, c) = t.dims2().unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    Mat::from_fn(r, c, |i, j| v[i * c + j])
}

/// PEFT's decomposition of one module in float64 by other routes than the library: the explicit
/// LU inverse of Cf and the SVD of (W·Cf)ᵀ. Returns U_r·S_r·(V_rᵀ·Cf⁻¹).
fn reference(w: &Mat<f64>, c: &Mat<f64>, damp: f64, mode: CordaMode) -> Mat<f64> {
    let n = c.nrows();
    let add = damp * (0..n).map(|i| c[(i, i)]).sum::<f64>() / n as f64;
    let cf = Mat::from_fn(n, n, |i, j| c[(i, j)] + if i == j { add } else { 0.0 });
    let inv = cf.partial_piv_lu().inverse();
    let m_t = (w * &cf).transpose().to_owned();
    let svd = m_t.thin_svd().unwrap();
    // (W·Cf)ᵀ = P S Qᵀ, so W·Cf = Q S Pᵀ: left vectors Q, right vectors P.
    let k = svd.S().column_vector().nrows();
    let start = match mode {
        CordaMode::Ipm => 0,
        CordaMode::Kpm => k - RANK,
    };
    let s = svd.S().column_vector();
    let u = Mat::from_fn(w.nrows(), RANK, |i, j| {
        svd.V()[(i, start + j)] * s[start + j]
    });
    let vt = svd.U().subcols(start, RANK).transpose() * &inv;
    &u * &vt
}

fn run(mode: CordaMode, test: &str) {
    let Some(model) = model_dir(test) else { return };
    let (file, template) = match mode {
        CordaMode::Kpm => ("knowledge.jsonl", "{question}"),
        CordaMode::Ipm => ("math.jsonl", "{query} {response}"),
    };
    let s = samples(&model, file, template);
    assert_eq!(s.len(), 64);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut opts = PreprocessOptions::new(RANK);
    opts.lora_alpha = 32.0;
    opts.init = InitMethod::Corda(mode);
    opts.covariance_file = Some(tmp.path().join("cov.safetensors"));
    let report = preprocess(&model, &s, &opts, Some(&out)).unwrap();
    assert_eq!(report.modules.len(), 210);
    assert!(report.modules.iter().all(|m| m.degenerate.is_none()));
    assert!(
        report.max_error_estimate().unwrap() < 1e-6,
        "{:?}",
        report.max_error_estimate()
    );
    println!(
        "{}: smallest kept singular value {:.1e} of its module's largest; {} of 210 modules ill-determined by the data",
        mode.as_str(),
        report.min_relative_kept().unwrap(),
        report.ill_determined().count()
    );

    // Every module against the independent float64 reference, two threads.
    let base = Weights::open(&model).unwrap();
    let covs = candle_core::safetensors::load(opts.covariance_file.as_ref().unwrap(), &Device::Cpu)
        .unwrap();
    let adapter = Adapter::load(&out.join(CORDA_INIT_DIR)).unwrap();
    let jobs: Vec<_> = report.modules.iter().collect();
    let errors: Vec<(String, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(2))
            .map(|chunk| {
                let (base, covs, adapter) = (&base, &covs, &adapter);
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|m| {
                            let w = mat64(
                                &base
                                    .get(&format!("{}.weight", m.name), None, &Device::Cpu)
                                    .unwrap(),
                            );
                            let exact =
                                reference(&w, &mat64(&covs[&m.name]), m.damp.unwrap(), mode);
                            let pair = &adapter.modules[&m.name];
                            let ba = &mat64(&pair.b) * &mat64(&pair.a) * faer::Scale(m.scaling);
                            (m.name.clone(), (&ba - &exact).norm_l2() / exact.norm_l2())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    for proj in TARGET_PROJECTIONS {
        let worst = errors
            .iter()
            .filter(|(n, _)| n.ends_with(proj))
            .map(|(_, e)| *e)
            .fold(0.0, f64::max);
        println!(
            "{}: {proj:10} worst ‖s·B·A − exact‖/‖exact‖ = {worst:.2e}",
            mode.as_str()
        );
    }
    for (name, e) in &errors {
        assert!(
            *e < BOUND,
            "{name}: {e:e} from the float64 reference (bound {BOUND:e})"
        );
    }

    // Residual + adapter reproduce the original model's logits.
    let ids = Tensor::new(&s[0][..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let original = CausalLM::load(&model, &LoadOptions::default()).unwrap();
    let expected = original.forward(&ids, None).unwrap();
    let mut residual = CausalLM::load(&out, &LoadOptions::default()).unwrap();
    adapter.attach_to(&mut residual).unwrap();
    let got = residual.forward(&ids, None).unwrap();
    let d = corda_core::util::tensor::max_abs_diff(&got, &expected).unwrap();
    println!(
        "{}: residual + adapter vs the model, max |Δ logit| {d:.1e}",
        mode.as_str()
    );
    assert!(d < 1e-3, "logits differ by {d}");
}

#[test]
fn kpm_on_the_real_model_is_exact_and_never_degenerate() {
    run(
        CordaMode::Kpm,
        "kpm_on_the_real_model_is_exact_and_never_degenerate",
    );
}

#[test]
fn ipm_on_the_real_model_is_exact() {
    run(CordaMode::Ipm, "ipm_on_the_real_model_is_exact");
}
