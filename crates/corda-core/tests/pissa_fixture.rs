//! The PiSSA and MiLoRA baselines against PEFT 0.21's own PiSSA (`init_lora_weights="pissa"`)
//! and against float64 references (`tests/fixtures/peft-tiny-llama-pissa`, made by
//! `scripts/make_pissa_fixture.py`): r 8, alpha 16, down_proj at rank 4 with alpha 12.
//!
//! PEFT takes the SVD in float32, ours runs in float64 and is rounded once, so ours sits on the
//! float64 truth (measured 4e-8 of max|W|) and differs from PEFT by PEFT's own float32 error
//! (measured 8e-6 of max|W|).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use corda_core::adapter::{convert_to_lora, logits_with_adapter, Adapter, AdapterConfig, LoraPair};
use corda_core::corda::{preprocess, InitMethod, PreprocessOptions, REPORT_FILE};
use corda_core::layout::CORDA_INIT_DIR;
use corda_core::model::Weights;
use corda_testdata::{peft_tiny_llama, peft_tiny_llama_pissa};

/// Ours against the float64 truth, relative to max|W|: float32 rounding of A, B and the residual.
const F64_BOUND: f64 = 1e-6;
/// Ours against PEFT beyond PEFT's own distance to the float64 truth, relative to max|W|.
const PEFT_SLACK: f64 = 1e-6;
/// Ours against PEFT, relative to max|W|: PEFT's float32 SVD error (8e-6 here) with headroom; a
/// wrong component, sign convention or scaling is off by O(1).
const PEFT_BOUND: f64 = 5e-5;

fn base_model() -> PathBuf {
    peft_tiny_llama().join("base-model")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn f64_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    f64_of(t)
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn fro(t: &Tensor) -> f64 {
    f64_of(t)
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

/// s·B·A of one module in float64.
fn sba(ad: &Adapter, m: &str) -> Tensor {
    let p = &ad.modules[m];
    (f64_of(&p.b).matmul(&f64_of(&p.a)).unwrap() * ad.scaling(m)).unwrap()
}

/// U_r·diag(S_r)·Vh_r of the float64 reference (`kind`: pissa or milora).
fn exact(reference: &HashMap<String, Tensor>, m: &str, kind: &str) -> Tensor {
    let u = &reference[&format!("{m}.{kind}.U_r")];
    let s = &reference[&format!("{m}.{kind}.S_r")];
    let vh = &reference[&format!("{m}.{kind}.Vh_r")];
    u.broadcast_mul(&s.unsqueeze(0).unwrap())
        .unwrap()
        .matmul(vh)
        .unwrap()
}

/// Run `init` with the fixture's settings into a temporary directory.
fn run(init: InitMethod) -> (tempfile::TempDir, Adapter) {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = PreprocessOptions::new(8);
    opts.lora_alpha = 16.0;
    opts.init = init;
    opts.rank_pattern.insert("down_proj".into(), 4);
    opts.alpha_pattern.insert("down_proj".into(), 12.0);
    let report = preprocess(&base_model(), &[], &opts, Some(tmp.path())).unwrap();
    assert_eq!(report.modules.len(), 14);
    assert!(
        report.layer_deviation.is_empty(),
        "no inputs, no layer check"
    );
    assert!(report.max_weight_deviation() < F64_BOUND);
    let ad = Adapter::load(&tmp.path().join(CORDA_INIT_DIR)).unwrap();
    (tmp, ad)
}

/// The probe ids and the named logits of the PiSSA fixture.
fn probe(name: &str) -> (Vec<u32>, Tensor) {
    let l = load(&peft_tiny_llama_pissa().join("pissa/logits.safetensors"));
    let ids = l["input_ids"]
        .flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect();
    (ids, l[name].squeeze(0).unwrap())
}

fn logits_diff(model: &Path, adapter: &Adapter, expected: &str) -> f64 {
    let (ids, want) = probe(expected);
    let got = logits_with_adapter(model, adapter, &ids, &Device::Cpu).unwrap();
    let got = got.reshape(want.dims()).unwrap();
    max_abs(&(got - want).unwrap())
}

/// Residual + s·B·A is W, and s·B·A is the float64 truth, for every module of a run.
fn check_against_float64(out: &Path, ours: &Adapter, kind: &str) -> f64 {
    let reference = load(&peft_tiny_llama_pissa().join("reference.safetensors"));
    let base = Weights::open(&base_model()).unwrap();
    let residual = Weights::open(out).unwrap();
    let mut worst: f64 = 0.0;
    for m in ours.modules.keys() {
        let name = format!("{m}.weight");
        let w = f64_of(&base.get(&name, None, &Device::Cpu).unwrap());
        let wmax = max_abs(&w);
        let ba = sba(ours, m);
        let d = max_abs(&(&ba - exact(&reference, m, kind)).unwrap()) / wmax;
        assert!(
            d < F64_BOUND,
            "{kind} {m}: s·B·A is {d:.2e} of max|W| from float64"
        );
        worst = worst.max(d);
        let res = f64_of(&residual.get(&name, None, &Device::Cpu).unwrap());
        let id = max_abs(&((res + &ba).unwrap() - &w).unwrap()) / wmax;
        assert!(
            id < F64_BOUND,
            "{kind} {m}: residual + s·B·A is {id:.2e} of max|W| from W"
        );
        // ‖s·B·A‖_F² is the sum of the kept σ², so the kept components are the right ones.
        let s_r = reference[&format!("{m}.{kind}.S_r")]
            .to_vec1::<f64>()
            .unwrap();
        let want = s_r.iter().map(|s| s * s).sum::<f64>().sqrt();
        assert!((fro(&ba) - want).abs() <= 1e-6 * want, "{kind} {m}");
    }
    worst
}

#[test]
fn pissa_matches_peft_and_the_float64_truth() {
    let (tmp, ours) = run(InitMethod::Pissa);
    let fx = peft_tiny_llama_pissa();
    let peft = Adapter::load(&fx.join("pissa/corda_init")).unwrap();
    let reference = load(&fx.join("reference.safetensors"));
    let base = Weights::open(&base_model()).unwrap();
    let res_ours = Weights::open(tmp.path()).unwrap();
    let res_peft = Weights::open(&fx.join("pissa/residual-model")).unwrap();
    assert_eq!(
        ours.modules.keys().collect::<Vec<_>>(),
        peft.modules.keys().collect::<Vec<_>>()
    );
    let (mut worst_peft, mut worst_peft_f64): (f64, f64) = (0.0, 0.0);
    for (m, p) in &peft.modules {
        let o = &ours.modules[m];
        assert_eq!((o.a.dims(), o.b.dims()), (p.a.dims(), p.b.dims()), "{m}");
        assert_eq!(ours.scaling(m), peft.scaling(m), "{m}");
        let name = format!("{m}.weight");
        let wmax = max_abs(&base.get(&name, None, &Device::Cpu).unwrap());
        let truth = exact(&reference, m, "pissa");
        let peft_err = max_abs(&(sba(&peft, m) - &truth).unwrap()) / wmax;
        let d = max_abs(&(sba(&ours, m) - sba(&peft, m)).unwrap()) / wmax;
        assert!(
            d < PEFT_BOUND && d <= peft_err + PEFT_SLACK,
            "{m}: s·B·A differs from PEFT's by {d:.2e} of max|W| (PEFT's own float32 error {peft_err:.2e})"
        );
        let r_ours = res_ours.get(&name, None, &Device::Cpu).unwrap();
        let r_peft = res_peft.get(&name, None, &Device::Cpu).unwrap();
        let dr = max_abs(&(f64_of(&r_ours) - f64_of(&r_peft)).unwrap()) / wmax;
        assert!(
            dr < PEFT_BOUND && dr <= peft_err + PEFT_SLACK,
            "{m}: residual differs from PEFT's by {dr:.2e} of max|W|"
        );
        for (x, y, what) in [(&o.a, &p.a, "A"), (&o.b, &p.b, "B")] {
            let rel = (fro(x) - fro(y)).abs() / fro(y);
            assert!(rel < 1e-4, "{m}: ‖{what}‖ differs from PEFT's by {rel:.2e}");
        }
        worst_peft = worst_peft.max(d);
        worst_peft_f64 = worst_peft_f64.max(peft_err);
    }
    let worst_f64 = check_against_float64(tmp.path(), &ours, "pissa");
    println!(
        "PiSSA, max over modules, relative to max|W|: ours vs float64 {worst_f64:.2e}, ours vs PEFT {worst_peft:.2e}, PEFT vs float64 {worst_peft_f64:.2e}"
    );

    // The config says what PEFT's saved PiSSA adapter says.
    let (c, e) = (&ours.config, &peft.config);
    assert_eq!(
        (c.r, c.lora_alpha, c.use_rslora),
        (e.r, e.lora_alpha, e.use_rslora)
    );
    assert_eq!(
        (&c.rank_pattern, &c.alpha_pattern),
        (&e.rank_pattern, &e.alpha_pattern)
    );
    let set = |c: &AdapterConfig| c.target_modules.iter().cloned().collect::<BTreeSet<_>>();
    assert_eq!(set(c), set(e));
    assert_eq!(c.init_lora_weights, e.init_lora_weights);
    assert_eq!(c.init_lora_weights, serde_json::Value::Bool(true));
    assert!(!c.extra.contains_key("corda_config"));

    // The report names the method; there is no covariance, hence no δ.
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join(CORDA_INIT_DIR).join(REPORT_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(json["init_method"], "pissa");
    assert!(json["corda_method"].is_null() && json["max_layer_deviation"].is_null());
    for m in json["modules"].as_array().unwrap() {
        assert!(m["damp"].is_null() && m["condition"].is_null(), "{m}");
        assert!(
            m["spectrum"]["error_estimate"].as_f64().unwrap() < 1e-9,
            "{m}"
        );
    }

    // Residual + adapter is the base model, as it is in PEFT.
    let d = logits_diff(tmp.path(), &ours, "base_logits");
    assert!(
        d < 1e-4,
        "residual + PiSSA adapter differs from the base by {d}"
    );
}

#[test]
fn milora_keeps_the_smallest_components_exactly() {
    let (tmp, ours) = run(InitMethod::Milora);
    let worst = check_against_float64(tmp.path(), &ours, "milora");
    println!("MiLoRA, max over modules: ours vs float64 {worst:.2e} of max|W|");
    assert_eq!(
        ours.modules["model.layers.0.mlp.down_proj"].a.dims(),
        &[4, 176]
    );
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join(CORDA_INIT_DIR).join(REPORT_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(json["init_method"], "milora");
    // MiLoRA trains the minor components: the smallest kept σ is the weight's smallest.
    let reference = load(&peft_tiny_llama_pissa().join("reference.safetensors"));
    for m in json["modules"].as_array().unwrap() {
        let all = reference[&format!("{}.S", m["name"].as_str().unwrap())]
            .to_vec1::<f64>()
            .unwrap();
        let kept = m["spectrum"]["smallest_kept"].as_f64().unwrap();
        assert!((kept - all[all.len() - 1]).abs() <= 1e-9 * all[0], "{m}");
    }
    let d = logits_diff(tmp.path(), &ours, "base_logits");
    assert!(
        d < 1e-4,
        "residual + MiLoRA adapter differs from the base by {d}"
    );
}

#[test]
fn peft_pissa_adapters_convert_like_peft() {
    let fx = peft_tiny_llama_pissa().join("pissa");
    let init = Adapter::load(&fx.join("corda_init")).unwrap();
    let trained = Adapter::load(&fx.join("trained")).unwrap();
    let ours = convert_to_lora(&init, &trained).unwrap();
    let peft = Adapter::load(&fx.join("lora")).unwrap();
    for (m, p) in &peft.modules {
        let q = &ours.modules[m];
        assert!(max_abs(&(&q.a - &p.a).unwrap()) <= 1e-6, "{m} lora_A");
        assert!(max_abs(&(&q.b - &p.b).unwrap()) <= 1e-6, "{m} lora_B");
    }
    assert_eq!(
        (
            ours.config.r,
            ours.config.lora_alpha,
            &ours.config.rank_pattern
        ),
        (
            peft.config.r,
            peft.config.lora_alpha,
            &peft.config.rank_pattern
        )
    );
    let d = logits_diff(&base_model(), &ours, "converted_lora_logits");
    assert!(d < 1e-4, "base + converted LoRA differs from PEFT's by {d}");
    let d = logits_diff(&base_model(), &ours, "trained_logits");
    assert!(
        d < 1e-4,
        "base + converted LoRA differs from residual + trained by {d}"
    );
}

#[test]
fn our_baselines_round_trip_through_conversion() {
    for init in [InitMethod::Pissa, InitMethod::Milora] {
        let (tmp, ours) = run(init);
        // A deterministic change standing in for training.
        let mut trained = ours.clone();
        for (k, p) in trained.modules.iter_mut() {
            let bump = |t: &Tensor, f: f64| {
                let n = t.elem_count();
                let v: Vec<f32> = (0..n)
                    .map(|i| (f * ((i + k.len()) as f64 * 0.61).sin()) as f32)
                    .collect();
                (t + Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()).unwrap()
            };
            *p = LoraPair {
                a: bump(&p.a, 0.02),
                b: bump(&p.b, 0.02),
            };
        }
        let lora = convert_to_lora(&ours, &trained).unwrap();
        assert_eq!((lora.config.r, lora.config.lora_alpha), (16, 32.0));
        let ids: Vec<u32> = (1..20).collect();
        let on_residual = logits_with_adapter(tmp.path(), &trained, &ids, &Device::Cpu).unwrap();
        let on_base = logits_with_adapter(&base_model(), &lora, &ids, &Device::Cpu).unwrap();
        let moved = logits_with_adapter(tmp.path(), &ours, &ids, &Device::Cpu).unwrap();
        let d = max_abs(&(&on_base - &on_residual).unwrap());
        assert!(
            d < 1e-4,
            "{}: base + LoRA differs from residual + trained by {d}",
            init.label()
        );
        // The change is real, so the comparison can fail.
        assert!(
            max_abs(&(&moved - &on_residual).unwrap()) > 1e-2,
            "{}",
            init.label()
        );
    }
}

#[test]
fn baselines_refuse_calibration_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = PreprocessOptions::new(8);
    opts.init = InitMethod::Pissa;
    let e = preprocess(&base_model(), &[vec![1, 2, 3]], &opts, Some(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PiSSA") && e.contains("calibration samples"),
        "{e}"
    );
    opts.init = InitMethod::Milora;
    opts.covariance_file = Some(tmp.path().join("cov.safetensors"));
    let e = preprocess(&base_model(), &[], &opts, Some(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("MiLoRA") && e.contains("covariance file"), "{e}");
    assert!(!tmp.path().join("cov.safetensors").exists());
}
