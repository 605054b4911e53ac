//! Acceptance tests of the adapter conversion against the reference produced by PEFT
//! (`tests/fixtures/peft-tiny-llama/{kpm,ipm}`).

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};
use corda_core::adapter::{
    compress_to_rank, convert_to_lora, delta_weights, logits_with_adapter, merge_into_base,
    Adapter, AdapterConfig,
};
use corda_core::model::Weights;

const MODES: [&str; 2] = ["kpm", "ipm"];

use corda_testdata::peft_tiny_llama as fixtures;

fn load(mode: &str, kind: &str) -> Adapter {
    Adapter::load(&fixtures().join(mode).join(kind)).unwrap()
}

fn max_abs_diff(x: &Tensor, y: &Tensor) -> f32 {
    assert_eq!(x.dims(), y.dims());
    corda_core::util::tensor::max_abs_diff(x, y).unwrap()
}

/// (probe ids, the named logits of a mode's logits.safetensors).
fn probe(mode: &str, name: &str) -> (Vec<u32>, Tensor) {
    let base =
        candle_core::safetensors::load(fixtures().join("base_logits.safetensors"), &Device::Cpu)
            .unwrap();
    let ids: Vec<u32> = base["input_ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&i| i as u32)
        .collect();
    let logits = candle_core::safetensors::load(
        fixtures().join(mode).join("logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (ids, logits[name].clone())
}

fn no_adapter() -> Adapter {
    Adapter {
        config: AdapterConfig::new_lora(1, 1.0, vec![]),
        modules: Default::default(),
    }
}

#[test]
fn conversion_reproduces_peft_lora_tensors_and_config() {
    for mode in MODES {
        let ours = convert_to_lora(&load(mode, "corda_init"), &load(mode, "trained")).unwrap();
        let peft = load(mode, "lora");
        assert_eq!(
            ours.modules.keys().collect::<Vec<_>>(),
            peft.modules.keys().collect::<Vec<_>>()
        );
        for (m, p) in &peft.modules {
            let q = &ours.modules[m];
            assert!(max_abs_diff(&q.a, &p.a) <= 1e-6, "{mode} {m} lora_A");
            assert!(max_abs_diff(&q.b, &p.b) <= 1e-6, "{mode} {m} lora_B");
        }
        let (c, e) = (&ours.config, &peft.config);
        assert_eq!(
            (c.r, c.lora_alpha, c.use_rslora),
            (e.r, e.lora_alpha, e.use_rslora),
            "{mode}"
        );
        assert_eq!(
            (&c.rank_pattern, &c.alpha_pattern),
            (&e.rank_pattern, &e.alpha_pattern),
            "{mode}"
        );
        let set = |c: &AdapterConfig| c.target_modules.iter().cloned().collect::<BTreeSet<_>>();
        assert_eq!(set(c), set(e), "{mode}");
        assert_eq!(c.init_lora_weights, serde_json::Value::Bool(true));
    }
}

#[test]
fn base_plus_converted_lora_gives_peft_logits() {
    for mode in MODES {
        let lora = convert_to_lora(&load(mode, "corda_init"), &load(mode, "trained")).unwrap();
        let (ids, expected) = probe(mode, "converted_lora_logits");
        let got =
            logits_with_adapter(&fixtures().join("base-model"), &lora, &ids, &Device::Cpu).unwrap();
        let d = max_abs_diff(&got, &expected);
        assert!(
            d < 1e-4,
            "{mode}: base + converted LoRA differs from PEFT by {d}"
        );
    }
}

#[test]
fn deltas_turn_the_base_into_residual_plus_trained() {
    for mode in MODES {
        let (init, trained) = (load(mode, "corda_init"), load(mode, "trained"));
        let deltas = delta_weights(&init, &trained).unwrap();
        let base = Weights::open(&fixtures().join("base-model")).unwrap();
        let residual = Weights::open(&fixtures().join(mode).join("residual-model")).unwrap();
        for (m, dw) in &deltas {
            let name = format!("{m}.weight");
            let w = base.get(&name, None, &Device::Cpu).unwrap();
            let wr = residual.get(&name, None, &Device::Cpu).unwrap();
            let p = &trained.modules[m];
            let ours = (w + dw).unwrap();
            let theirs = (wr + (p.b.matmul(&p.a).unwrap() * trained.scaling(m)).unwrap()).unwrap();
            let d = max_abs_diff(&ours, &theirs);
            assert!(d < 1e-5, "{mode} {m}: {d}");
        }
    }
}

#[test]
fn merged_model_gives_trained_logits() {
    for mode in MODES {
        let out = tempfile::tempdir().unwrap();
        let report = merge_into_base(
            &fixtures().join("base-model"),
            &load(mode, "corda_init"),
            &load(mode, "trained"),
            out.path(),
            |_, _| {},
        )
        .unwrap();
        assert_eq!(report.merged_modules, 14);
        assert!(
            out.path().join("config.json").is_file() && out.path().join("tokenizer.json").is_file()
        );
        let (ids, expected) = probe(mode, "trained_logits");
        let got = logits_with_adapter(out.path(), &no_adapter(), &ids, &Device::Cpu).unwrap();
        let d = max_abs_diff(&got, &expected);
        assert!(
            d < 1e-4,
            "{mode}: merged model differs from residual + trained by {d}"
        );
    }
}

#[test]
fn rank_16_compression_is_lossless_and_rank_4_is_not() {
    for mode in MODES {
        let (init, trained) = (load(mode, "corda_init"), load(mode, "trained"));
        let peft = load(mode, "lora");
        let mut seen = 0;
        let c16 = compress_to_rank(&init, &trained, 16, |_| seen += 1).unwrap();
        assert_eq!(seen, 14);
        assert_eq!(
            (c16.adapter.config.r, c16.adapter.config.lora_alpha),
            (16, 16.0)
        );
        for m in &c16.report {
            assert!(
                m.relative_error < 1e-5,
                "{mode} {}: {}",
                m.module,
                m.relative_error
            );
            let ours = c16.adapter.modules[&m.module]
                .b
                .matmul(&c16.adapter.modules[&m.module].a)
                .unwrap();
            let p = &peft.modules[&m.module];
            let theirs = (p.b.matmul(&p.a).unwrap() * peft.scaling(&m.module)).unwrap();
            let scale = theirs
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                max_abs_diff(&ours, &theirs) <= 1e-5 * scale.max(1e-6),
                "{mode} {}",
                m.module
            );
        }
        let c4 = compress_to_rank(&init, &trained, 4, |_| {}).unwrap();
        assert!(c4.report.iter().all(|m| m.relative_error > 0.0));
        let pair = c4.adapter.modules.values().next().unwrap();
        assert_eq!(
            (
                pair.rank(),
                c4.adapter.scaling("model.layers.0.mlp.up_proj")
            ),
            (4, 1.0)
        );
    }
}

#[test]
fn adapters_that_do_not_belong_together_are_refused() {
    let init = load("kpm", "corda_init");
    let mut fewer = load("kpm", "trained");
    fewer.modules.remove("model.layers.1.mlp.up_proj");
    let err = convert_to_lora(&init, &fewer).unwrap_err().to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj"), "{err}");
    // A converted (rank 16) adapter is not a trained CorDA adapter of rank 8.
    let err = convert_to_lora(&init, &load("kpm", "lora"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("r is 8"), "{err}");
    let mut reshaped = load("kpm", "trained");
    reshaped.config.r = 8;
    let p = reshaped
        .modules
        .get_mut("model.layers.0.self_attn.k_proj")
        .unwrap();
    p.a = p.a.narrow(0, 0, 4).unwrap();
    p.b = p.b.narrow(1, 0, 4).unwrap();
    let err = convert_to_lora(&init, &reshaped).unwrap_err().to_string();
    assert!(err.contains("model.layers.0.self_attn.k_proj"), "{err}");
    assert!(compress_to_rank(&init, &fewer, 4, |_| {}).is_err());
    assert!(compress_to_rank(&init, &load("kpm", "trained"), 0, |_| {}).is_err());
}

#[test]
fn broken_adapter_files_are_reported() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nope");
    let err = Adapter::load(&missing).unwrap_err().to_string();
    assert!(
        err.contains("does not exist") && err.contains("nope"),
        "{err}"
    );

    // Config only.
    let dir = root.path().join("config-only");
    std::fs::create_dir(&dir).unwrap();
    load("kpm", "corda_init").config.write(&dir).unwrap();
    let err = Adapter::load(&dir).unwrap_err().to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");

    // A module with lora_A but no lora_B, plus a stray non-LoRA key that is ignored.
    let ad = load("kpm", "corda_init");
    let write = |name: &str, tensors: Vec<(String, Tensor)>| {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        ad.config.write(&dir).unwrap();
        safetensors::serialize_to_file(
            tensors.iter().map(|(k, t)| (k.as_str(), t)),
            None,
            &dir.join("adapter_model.safetensors"),
        )
        .unwrap();
        dir
    };
    let q = &ad.modules["model.layers.0.self_attn.q_proj"];
    let key =
        |side: &str| format!("base_model.model.model.layers.0.self_attn.q_proj.lora_{side}.weight");
    let half = write("half", vec![(key("A"), q.a.clone())]);
    let err = Adapter::load(&half).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj") && err.contains("no lora_B"),
        "{err}"
    );

    let skew = write(
        "skew",
        vec![
            (key("A"), q.a.clone()),
            (key("B"), q.b.narrow(1, 0, 4).unwrap()),
        ],
    );
    let err = Adapter::load(&skew).unwrap_err().to_string();
    assert!(err.contains("ranks differ"), "{err}");

    let extra = write(
        "extra",
        vec![
            (key("A"), q.a.to_dtype(DType::BF16).unwrap()),
            (key("B"), q.b.to_dtype(DType::F16).unwrap()),
            ("base_model.model.lm_head.weight".to_string(), q.a.clone()),
        ],
    );
    let loaded = Adapter::load(&extra).unwrap();
    assert_eq!(loaded.modules.len(), 1);
    assert_eq!(
        loaded.modules.values().next().unwrap().a.dtype(),
        DType::F32
    );

    let none = write(
        "none",
        vec![("base_model.model.lm_head.weight".to_string(), q.a.clone())],
    );
    let err = Adapter::load(&none).unwrap_err().to_string();
    assert!(
        err.contains("no `base_model.model.<module>.lora_A.weight`"),
        "{err}"
    );
}
