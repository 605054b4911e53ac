//! CorDA preprocessing against PEFT's fixture runs (KPM on qa.jsonl `{question}`, IPM on
//! math.jsonl `{query} {response}`, rows sampling, 16 samples of at most 64 tokens, r 8, alpha 16).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use corda_core::adapter::Adapter;
use corda_core::corda::{
    preprocess, CordaMode, CovariancePrecision, InitMethod, PreprocessOptions, REPORT_FILE,
};
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

/// The string metadata of a safetensors file.
fn metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

/// Save `tensors` with `meta` (a file keeps its provenance through a damage).
fn save_with(tensors: &HashMap<String, Tensor>, meta: &HashMap<String, String>, path: &Path) {
    safetensors::serialize_to_file(tensors.iter(), Some(meta.clone()), path).unwrap();
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
    opts.init = InitMethod::Corda(mode);
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
    preprocess(
        &fixtures().join("base-model"),
        &samples(file, template),
        &opts,
        Some(&again),
    )
    .unwrap();
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
    preprocess(&fixtures().join("base-model"), &s, &opts, Some(&b)).unwrap();
    assert_eq!(
        std::fs::read(a.join("corda_init/adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("corda_init/adapter_model.safetensors")).unwrap()
    );
    // A different rank cannot reuse the cache.
    opts.r = 4;
    opts.rank_pattern.clear();
    let e = preprocess(&fixtures().join("base-model"), &s, &opts, None)
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
    assert!(e.contains("rank 65") && e.contains("rank pattern"), "{e}");
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

/// The fixture model with one projection's weight replaced by zeros: its CorDA adapter has only
/// zero singular values, so A = B = 0 and it could never train.
fn model_with_zero_weight(dir: &Path, module: &str) {
    let src = fixtures().join("base-model");
    std::fs::create_dir_all(dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let mut t = load(&src.join("model.safetensors"));
    let w = t[module].zeros_like().unwrap();
    t.insert(module.to_string(), w);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

#[test]
fn degenerate_adapters_are_refused_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    model_with_zero_weight(&model, "model.layers.1.self_attn.k_proj.weight");
    let s = samples("qa.jsonl", "{question}");
    let mut opts = PreprocessOptions::new(8);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let e = preprocess(&model, &s, &opts, Some(&out))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.1.self_attn.k_proj")
            && e.contains("degenerate")
            && e.contains("rank pattern")
            && e.contains("allow_degenerate_adapters"),
        "{e}"
    );
    assert!(
        !e.contains("layers.0."),
        "only the zero module is named: {e}"
    );
    // Allowed: written, and the report says which module and why.
    opts.allow_degenerate_adapters = true;
    let report = preprocess(&model, &s, &opts, Some(&out)).unwrap();
    let bad: Vec<_> = report
        .modules
        .iter()
        .filter(|m| m.degenerate.is_some())
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(bad, ["model.layers.1.self_attn.k_proj"]);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("corda_init").join(REPORT_FILE)).unwrap(),
    )
    .unwrap();
    let k = json["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "model.layers.1.self_attn.k_proj")
        .unwrap();
    assert!(k["degenerate"].as_str().unwrap().contains("singular value"));
    // IPM on the same model is degenerate too (every singular value of a zero weight is 0).
    opts.allow_degenerate_adapters = false;
    opts.init = InitMethod::Corda(CordaMode::Ipm);
    assert!(preprocess(&model, &s, &opts, None).is_err());
}

#[test]
fn the_report_has_every_module_with_its_figures() {
    let out = tempfile::tempdir().unwrap();
    let opts = PreprocessOptions::new(8);
    let report = preprocess(
        &fixtures().join("base-model"),
        &samples("qa.jsonl", "{question}"),
        &opts,
        Some(out.path()),
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("corda_init").join(REPORT_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(json["corda_method"], "kpm");
    assert_eq!(json["init_method"], "corda");
    let modules = json["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 14);
    for m in modules {
        assert!(m["damp"].as_f64().unwrap() >= 0.01, "{m}");
        assert!(m["condition"].as_f64().unwrap() >= 1.0, "{m}");
        let s = &m["spectrum"];
        assert!(s["gap_at_cut"].as_f64().unwrap() >= 0.0, "{m}");
        assert!(s["error_estimate"].as_f64().unwrap() < 1e-6, "{m}");
        assert!(s["smallest_kept"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["degenerate"].is_null(), "{m}");
    }
    assert!(report.max_error_estimate().unwrap() < 1e-6);
}

/// `--use_float16_for_covariance`: the running sum in half precision stays within the bound
/// documented in docs/peft-compat.md of the float64-summed covariance, and the adapter it gives
/// still reproduces the model.
#[test]
fn half_precision_covariance_meets_its_bound() {
    let s = samples("qa.jsonl", "{question}");
    let tmp = tempfile::tempdir().unwrap();
    let mut covs = vec![];
    for (i, precision) in [
        CovariancePrecision::Float32,
        CovariancePrecision::Half(DType::F16),
        CovariancePrecision::Half(DType::BF16),
    ]
    .into_iter()
    .enumerate()
    {
        let mut opts = PreprocessOptions::new(8);
        opts.covariance_precision = precision;
        opts.covariance_file = Some(tmp.path().join(format!("cov{i}.safetensors")));
        let report = preprocess(&fixtures().join("base-model"), &s, &opts, None).unwrap();
        assert!(report.max_deviation() < 1e-5, "{precision:?}");
        covs.push(load(opts.covariance_file.as_ref().unwrap()));
    }
    for (name, exact) in &covs[0] {
        for (got, bound, what) in [(&covs[1], 2e-3, "float16"), (&covs[2], 1.6e-2, "bfloat16")] {
            let rel = fro(&(&got[name] - exact).unwrap()) / fro(exact);
            println!("{what} {name}: {rel:.2e}");
            assert!(
                rel < bound,
                "{what} covariance of {name}: {rel:e} (bound {bound:e})"
            );
        }
    }
}

/// A covariance file or cache records the model and calibration that made it; reusing it with
/// another model, or with other calibration samples, is refused.
#[test]
fn reuse_of_files_from_another_model_or_calibration_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = samples("qa.jsonl", "{question}");
    let mut opts = PreprocessOptions::new(8);
    opts.covariance_file = Some(tmp.path().join("cov.safetensors"));
    opts.cache_file = Some(tmp.path().join("cache.safetensors"));
    preprocess(&fixtures().join("base-model"), &s, &opts, None).unwrap();
    let other = tmp.path().join("other");
    model_with_zero_weight(&other, "model.layers.0.mlp.up_proj.weight");
    let e = preprocess(&other, &[], &opts, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another model") && e.contains("cache.safetensors"),
        "{e}"
    );
    opts.cache_file = None;
    let e = preprocess(&other, &[], &opts, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another model") && e.contains("cov.safetensors"),
        "{e}"
    );
    let fewer = &s[..8];
    let e = preprocess(&fixtures().join("base-model"), fewer, &opts, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other calibration samples"), "{e}");
    // The same model and samples reuse it; no partial files are left behind.
    preprocess(&fixtures().join("base-model"), &s, &opts, None).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["cache.safetensors", "cov.safetensors", "other"]);
}

/// Issue 14 case 3: a refused reuse names the calibration setting that differs; a file
/// without provenance metadata, or a run without samples to compare, cannot be checked and is
/// refused.
#[test]
fn reuse_names_the_differing_setting_and_needs_provenance() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("base-model");
    let qa = samples("qa.jsonl", "{question}");
    let math = samples("math.jsonl", "{query}");
    let settings = |d: &str, t: &str| {
        vec![
            ("dataset".to_string(), d.to_string()),
            ("template".to_string(), t.to_string()),
            ("seed".to_string(), "233".to_string()),
        ]
    };
    for which in ["cache", "cov"] {
        let path = tmp.path().join(format!("{which}.safetensors"));
        let mut opts = PreprocessOptions::new(8);
        if which == "cache" {
            opts.cache_file = Some(path.clone());
        } else {
            opts.covariance_file = Some(path.clone());
        }
        opts.calibration_settings = settings("qa.jsonl", "{question}");
        preprocess(&base, &qa, &opts, None).unwrap();
        let mut other = opts.clone();
        other.calibration_settings = settings("math.jsonl", "{query}");
        let e = preprocess(&base, &math, &other, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("other calibration samples")
                && e.contains("dataset `qa.jsonl` there, `math.jsonl` in this run")
                && e.contains("template `{question}` there, `{query}` in this run")
                && !e.contains("seed")
                && e.contains(&path.display().to_string())
                && e.contains("delete it"),
            "{which}: {e}"
        );
        let e = preprocess(&base, &[], &opts, None).unwrap_err().to_string();
        assert!(e.contains("cannot be checked"), "{which}: {e}");
        // The same samples reuse it.
        preprocess(&base, &qa, &opts, None).unwrap();
        // Without its metadata it cannot be checked.
        candle_core::safetensors::save(&load(&path), &path).unwrap();
        let e = preprocess(&base, &qa, &opts, None).unwrap_err().to_string();
        assert!(
            e.contains("no corda provenance") && e.contains(&path.display().to_string()),
            "{which}: {e}"
        );
        // Unless unchecked files are allowed (PEFT's covariances, say).
        let mut unchecked = opts.clone();
        unchecked.allow_unchecked_files = true;
        preprocess(&base, &qa, &unchecked, None).unwrap();
    }
}

/// A damaged decomposition cache (a missing entry, a wrong shape, NaN or negative singular
/// values, vectors that are no singular vectors) is an error naming the problem, never a
/// panic or a silently wrong model.
#[test]
fn damaged_caches_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache.safetensors");
    let mut opts = PreprocessOptions::new(8);
    opts.cache_file = Some(cache.clone());
    let s = samples("qa.jsonl", "{question}");
    preprocess(&fixtures().join("base-model"), &s, &opts, None).unwrap();
    let good = load(&cache);
    let meta = metadata(&cache);
    let m = "model.layers.0.self_attn.q_proj.eigens";
    type Damage<'a> = Box<dyn Fn(&mut HashMap<String, Tensor>) + 'a>;
    let cases: Vec<(&str, Damage)> = vec![
        ("lacks", Box::new(|t| drop(t.remove(&format!("{m}.U_WC"))))),
        (
            "shape",
            Box::new(|t| {
                let u = t[&format!("{m}.U_WC")].narrow(1, 0, 4).unwrap();
                t.insert(format!("{m}.U_WC"), u);
            }),
        ),
        (
            "NaN",
            Box::new(|t| {
                let s = (t[&format!("{m}.S_WC")].clone() * f64::NAN).unwrap();
                t.insert(format!("{m}.S_WC"), s);
            }),
        ),
        (
            "negative",
            Box::new(|t| {
                let s = t[&format!("{m}.S_WC")].neg().unwrap();
                t.insert(format!("{m}.S_WC"), s);
            }),
        ),
        (
            "orthonormal",
            Box::new(|t| {
                let u = (t[&format!("{m}.U_WC")].clone() * 2.0).unwrap();
                t.insert(format!("{m}.U_WC"), u);
            }),
        ),
    ];
    for (expect, damage) in cases {
        let mut t = good.clone();
        damage(&mut t);
        save_with(&t, &meta, &cache);
        let e = preprocess(&fixtures().join("base-model"), &s, &opts, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(expect) && e.contains("q_proj"), "{expect}: {e}");
    }
}
