//! CorDA preprocessing against PEFT's fixture runs (KPM on qa.jsonl `{question}`, IPM on
//! math.jsonl `{query} {response}`, rows sampling, 16 samples of at most 64 tokens, r 8, alpha 16).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use corda_core::adapter::Adapter;
use corda_core::corda::{preprocess, CordaMode, PreprocessOptions};
use corda_core::data::{calibration_samples, read_rows, CalibOptions, CalibSampling, Template};
use corda_core::layout::CORDA_INIT_DIR;
use corda_core::model::{CausalLM, LoadOptions, TokenizerInfo, Weights};

use corda_testdata::peft_tiny_llama as fixtures;

fn samples(file: &str, template: &str) -> Vec<Vec<u32>> {
    let tok = TokenizerInfo::load(&fixtures().join("base-model")).unwrap();
    let rows = read_rows(&fixtures().join("data").join(file)).unwrap();
    let opts = CalibOptions {
        n: 16,
        max_length: 64,
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

fn max_abs(t: &Tensor) -> f32 {
    corda_core::util::tensor::max_abs(t).unwrap()
}

fn fro(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn run_mode(mode: CordaMode) {
    let (dir, file, template) = match mode {
        CordaMode::Kpm => ("kpm", "qa.jsonl", "{question}"),
        CordaMode::Ipm => ("ipm", "math.jsonl", "{query} {response}"),
    };
    let reference = fixtures().join(dir);
    let out = tempfile::tempdir().unwrap();
    let cov_file = out.path().join("cov.safetensors");
    let model_out = out.path().join("model");
    std::fs::create_dir(&model_out).unwrap();
    let mut opts = PreprocessOptions::new(8);
    opts.lora_alpha = 16.0;
    opts.mode = mode;
    opts.batch_size = 5; // padded batches must give PEFT's batch-1 covariances
    opts.covariance_file = Some(cov_file.clone());
    let report = preprocess(
        &fixtures().join("base-model"),
        &samples(file, template),
        &opts,
        Some(&model_out),
    )
    .unwrap();
    assert_eq!(report.modules.len(), 14);
    assert!(
        report.max_deviation() < 1e-5,
        "identity check {}",
        report.max_deviation()
    );

    // Covariances within 1e-5 relative.
    let ours = load(&cov_file);
    let theirs = load(&reference.join("covariance.safetensors"));
    assert_eq!(ours.len(), theirs.len());
    for (name, c) in &theirs {
        let rel = fro(&(&ours[name] - c).unwrap()) / fro(c);
        assert!(rel < 1e-5, "{name}: covariance relative error {rel}");
    }

    // Residual weights and s·B·A within 1e-3·max|W|; norms of A and B within 1e-3.
    let base = Weights::open(&fixtures().join("base-model")).unwrap();
    let res_ours = Weights::open(&model_out).unwrap();
    let res_peft = Weights::open(&reference.join("residual-model")).unwrap();
    let ad_ours = Adapter::load(&model_out.join(CORDA_INIT_DIR)).unwrap();
    let ad_peft = Adapter::load(&reference.join(CORDA_INIT_DIR)).unwrap();
    assert_eq!(ad_ours.config.r, 8);
    assert_eq!(ad_ours.config.lora_alpha, 16.0);
    assert_eq!(
        ad_ours.modules.keys().collect::<Vec<_>>(),
        ad_peft.modules.keys().collect::<Vec<_>>()
    );
    let cpu = Device::Cpu;
    for (m, p) in &ad_peft.modules {
        let w = base.get(&format!("{m}.weight"), None, &cpu).unwrap();
        let tol = 1e-3 * max_abs(&w);
        let r_ours = res_ours.get(&format!("{m}.weight"), None, &cpu).unwrap();
        let r_peft = res_peft.get(&format!("{m}.weight"), None, &cpu).unwrap();
        let d = max_abs(&(&r_ours - &r_peft).unwrap());
        assert!(d < tol, "{m}: residual differs by {d} (tol {tol})");
        let o = &ad_ours.modules[m];
        let s = ad_ours.scaling(m);
        let ba_ours = (o.b.matmul(&o.a).unwrap() * s).unwrap();
        let ba_peft = (p.b.matmul(&p.a).unwrap() * s).unwrap();
        let d = max_abs(&(&ba_ours - &ba_peft).unwrap());
        assert!(d < tol, "{m}: s·B·A differs by {d} (tol {tol})");
        for (x, y, what) in [(&o.a, &p.a, "A"), (&o.b, &p.b, "B")] {
            let rel = (fro(x) - fro(y)).abs() / fro(y);
            assert!(rel < 1e-3, "{m}: ‖{what}‖ relative difference {rel}");
        }
    }
    // Every non-target tensor is copied unchanged.
    for name in base.names().iter().filter(|n| !n.contains("_proj")) {
        let a = base.get(name, None, &cpu).unwrap();
        let b = res_ours.get(name, None, &cpu).unwrap();
        assert_eq!(max_abs(&(&a - &b).unwrap()), 0.0, "{name}");
    }

    // Residual + adapter reproduces the base logits.
    let mut model = CausalLM::load(&model_out, &LoadOptions::default()).unwrap();
    ad_ours.attach_to(&mut model).unwrap();
    let probe = load(&fixtures().join("base_logits.safetensors"));
    let ids = probe["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&ids, None).unwrap().squeeze(0).unwrap();
    let d = max_abs(&(&logits - &probe["logits"]).unwrap());
    assert!(
        d < 1e-4,
        "logits of residual + adapter differ from the base by {d}"
    );

    // The covariance file is reused: same adapter, no calibration needed.
    let again = out.path().join("again");
    std::fs::create_dir(&again).unwrap();
    preprocess(&fixtures().join("base-model"), &[], &opts, Some(&again)).unwrap();
    let ad_again = Adapter::load(&again.join(CORDA_INIT_DIR)).unwrap();
    for (m, p) in &ad_ours.modules {
        assert_eq!(
            max_abs(&(&ad_again.modules[m].a - &p.a).unwrap()),
            0.0,
            "{m}"
        );
    }
    // Deterministic bytes.
    assert_eq!(
        std::fs::read(again.join("model.safetensors")).unwrap(),
        std::fs::read(model_out.join("model.safetensors")).unwrap()
    );
}

#[test]
fn kpm_matches_peft() {
    run_mode(CordaMode::Kpm);
}

#[test]
fn ipm_matches_peft() {
    run_mode(CordaMode::Ipm);
}

#[test]
fn decomposition_cache_roundtrip_and_rank_pattern() {
    let out = tempfile::tempdir().unwrap();
    let mut opts = PreprocessOptions::new(8);
    opts.rank_pattern.insert("down_proj".into(), 4);
    opts.alpha_pattern.insert("q_proj".into(), 2.0);
    opts.cache_file = Some(out.path().join("cache.safetensors"));
    let s = samples("qa.jsonl", "{question}");
    let a = out.path().join("a");
    std::fs::create_dir(&a).unwrap();
    preprocess(&fixtures().join("base-model"), &s, &opts, Some(&a)).unwrap();
    let ad = Adapter::load(&a.join(CORDA_INIT_DIR)).unwrap();
    assert_eq!(
        ad.modules["model.layers.1.mlp.down_proj"].a.dim(0).unwrap(),
        4
    );
    assert_eq!(
        ad.modules["model.layers.1.mlp.up_proj"].a.dim(0).unwrap(),
        8
    );
    assert_eq!(ad.scaling("model.layers.0.self_attn.q_proj"), 2.0 / 8.0);
    let b = out.path().join("b");
    std::fs::create_dir(&b).unwrap();
    preprocess(&fixtures().join("base-model"), &[], &opts, Some(&b)).unwrap();
    assert_eq!(
        std::fs::read(a.join("corda_init/adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("corda_init/adapter_model.safetensors")).unwrap()
    );
    // A different rank cannot reuse the cache.
    opts.r = 4;
    opts.rank_pattern.clear();
    let e = preprocess(&fixtures().join("base-model"), &[], &opts, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cache"), "{e}");
}

#[test]
fn rank_larger_than_a_module_is_refused_before_work() {
    let opts = PreprocessOptions::new(65);
    let e = preprocess(
        &fixtures().join("base-model"),
        &[vec![1, 2, 3]],
        &opts,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("rank 65") && e.contains("--rank_pattern"), "{e}");
}

#[test]
fn bfloat16_output_keeps_the_identity_within_rounding() {
    let out = tempfile::tempdir().unwrap();
    let mut opts = PreprocessOptions::new(8);
    opts.dtype = Some(DType::BF16);
    let report = preprocess(
        &fixtures().join("base-model"),
        &samples("qa.jsonl", "{question}"),
        &opts,
        Some(out.path()),
    )
    .unwrap();
    assert_eq!(report.dtype, DType::BF16);
    let w = Weights::open(out.path()).unwrap();
    assert_eq!(
        w.dtype("model.layers.0.self_attn.q_proj.weight").unwrap(),
        DType::BF16
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
}
