//! Property tests over the files a user hands the library: `config.json`, safetensors headers
//! (model, adapter, optimizer state), `model.safetensors.index.json`, `adapter_config.json` with
//! its rank/alpha patterns, dataset rows (jsonl / json / parquet / txt), checkpoint state files,
//! and the template, split and module-pattern strings. No input may panic; errors are fine.
//! Seeds: `tests/fuzz-corpus/<target>/`; the harness is `tests/support/fuzz.rs`.

#[path = "../../../tests/support/fuzz.rs"]
mod fuzz;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use corda_core::adapter::pattern::full_match;
use corda_core::adapter::{Adapter, AdapterConfig};
use corda_core::data::{read_rows, Split, Template};
use corda_core::model::{ModelConfig, Weights};
use corda_core::train::checkpoint::{Progress, SchedulerState};
use corda_core::train::{factor_names, AdamW, AdamWConfig, TrainerState};
use fuzz::{fuzz, Scratch};

/// The module of the tiny adapter seeds (and of the optimizer state seed).
const MODULE: &str = "model.layers.0.self_attn.q_proj";
const MODULES: [&str; 4] = [
    MODULE,
    "model.layers.1.mlp.down_proj",
    "model.layers.10.self_attn.v_proj",
    "",
];

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Two small weight shards for the index target.
fn shards() -> [(&'static str, Vec<u8>); 2] {
    let one = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let two = Tensor::new(&[0.5f32, -0.5], &Device::Cpu).unwrap();
    [
        ("model-00001-of-00002.safetensors", st_bytes(&[("a", &one)])),
        ("model-00002-of-00002.safetensors", st_bytes(&[("b", &two)])),
    ]
}

fn st_bytes(tensors: &[(&str, &Tensor)]) -> Vec<u8> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(tensors.iter().map(|(k, t)| (*k, *t)), Some(meta)).unwrap()
}

fn read_all_weights(dir: &Path) {
    if let Ok(w) = Weights::open(dir) {
        for name in w.names() {
            let _ = w.shape(&name);
            let _ = w.dtype(&name);
            let _ = w.get(&name, None, &Device::Cpu);
        }
        let _ = w.dominant_dtype();
    }
}

#[test]
fn model_config_json() {
    let s = Scratch::new();
    fuzz("model_config", 1.0, |_, bytes| {
        let d = s.dir();
        write(&d, "config.json", bytes);
        if let Ok(c) = ModelConfig::from_dir(&d) {
            let _ = format!("{c:?}");
        }
    });
}

#[test]
fn model_safetensors_headers() {
    let s = Scratch::new();
    fuzz("model_weights", 1.0, |_, bytes| {
        let d = s.dir();
        write(&d, "model.safetensors", bytes);
        read_all_weights(&d);
    });
}

#[test]
fn model_safetensors_index_json() {
    let s = Scratch::new();
    let shards = shards();
    fuzz("model_index", 1.0, |_, bytes| {
        let d = s.dir();
        write(&d, "model.safetensors.index.json", bytes);
        for (name, b) in &shards {
            write(&d, name, b);
        }
        read_all_weights(&d);
    });
}

fn use_adapter(a: &Adapter) {
    for m in MODULES {
        let _ = a.config.rank_for(m);
        let _ = a.config.scaling_for(m);
    }
    let _ = corda_core::adapter::convert_to_lora(a, a);
}

#[test]
fn adapter_config_json_and_patterns() {
    let s = Scratch::new();
    let weights = &fuzz::seeds("adapter_weights")[0].1;
    fuzz("adapter_config", 1.0, |_, bytes| {
        let d = s.dir();
        write(&d, "adapter_config.json", bytes);
        write(&d, "adapter_model.safetensors", weights);
        if let Ok(c) = AdapterConfig::read(&d) {
            for m in MODULES {
                let _ = (c.rank_for(m), c.alpha_for(m), c.scaling_for(m));
            }
        }
        if let Ok(a) = Adapter::load(&d) {
            use_adapter(&a);
        }
    });
}

#[test]
fn adapter_safetensors_headers() {
    let s = Scratch::new();
    let config = &fuzz::seeds("adapter_config")
        .into_iter()
        .find(|(n, _)| n == "tiny.json")
        .unwrap()
        .1;
    fuzz("adapter_weights", 1.0, |_, bytes| {
        let d = s.dir();
        write(&d, "adapter_config.json", config);
        write(&d, "adapter_model.safetensors", bytes);
        if let Ok(a) = Adapter::load(&d) {
            use_adapter(&a);
        }
    });
}

#[test]
fn dataset_rows() {
    let s = Scratch::new();
    fuzz("rows", 1.0, |name, bytes| {
        let d = s.dir();
        let p = write(&d, name, bytes);
        if let Ok(rows) = read_rows(&p) {
            if let Ok(t) = Template::parse("{question} {answer}") {
                let _ = t.format_rows(&rows);
            }
        }
    });
}

/// An optimizer over the tiny adapter's two factors.
fn tiny_optimizer() -> AdamW {
    let (na, nb) = factor_names(MODULE);
    let a = Var::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let b = Var::zeros((4, 2), DType::F32, &Device::Cpu).unwrap();
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    AdamW::new(vec![(na, a), (nb, b)], config).unwrap()
}

#[test]
fn checkpoint_state_files() {
    let s = Scratch::new();
    fuzz("checkpoint", 1.0, |name, bytes| {
        let d = s.dir();
        let p = write(&d, name, bytes);
        match name {
            "trainer_state.json" => {
                if let Ok(st) = TrainerState::read(&p) {
                    let _ = st.loss_points();
                    let _ = corda_core::train::loss_curve_svg(&st.loss_points(), "t");
                    let _ = st.write(&d.join("back.json"));
                }
            }
            "scheduler.json" => {
                let _ = serde_json::from_slice::<SchedulerState>(bytes);
            }
            "rng_state.json" => {
                let _ = serde_json::from_slice::<Progress>(bytes);
            }
            "optimizer.safetensors" => {
                let _ = tiny_optimizer().load(&p);
            }
            other => panic!("no parser for seed {other}"),
        }
    });
}

#[test]
fn template_split_and_module_pattern_strings() {
    let row = serde_json::json!({"question": "q", "answer": ["a", {"text": "t"}], "n": 3});
    fuzz("strings", 2.0, |name, bytes| {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end_matches('\n');
        if name.starts_with("template") {
            if let Ok(t) = Template::parse(text) {
                let _ = t.format(&row);
            }
        } else if name.starts_with("split") {
            if let Ok(s) = Split::parse(text) {
                for n in [0, 1, 7, 100_000] {
                    let _ = s.apply(n);
                }
            }
        } else if name.starts_with("pattern") {
            for m in MODULES {
                let _ = full_match(text, m);
            }
        } else {
            panic!("no parser for seed {name}");
        }
    });
}

/// Writes the binary seeds (run once with `--ignored` after changing a format; the text seeds
/// are written by hand).
#[test]
#[ignore]
fn write_seed_corpus() {
    let dev = Device::Cpu;
    let root = fuzz::corpus_dir("");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let d = root.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    let e = Tensor::new(&[[0.25f32, -1.0], [2.0, 0.0], [1.5, 3.0]], &dev).unwrap();
    let n = Tensor::new(&[1.0f32, 0.5], &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let h = Tensor::new(&[[1.0f32, 2.0]], &dev)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    put(
        "model_weights",
        "model.safetensors",
        &st_bytes(&[
            ("model.embed_tokens.weight", &e),
            ("model.norm.weight", &n),
            ("lm_head.weight", &h),
        ]),
    );
    let (ka, kb) = factor_names(MODULE);
    let a = Tensor::new(&[[0.1f32, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], &dev).unwrap();
    let b = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 2.0]], &dev).unwrap();
    put(
        "adapter_weights",
        "adapter_model.safetensors",
        &st_bytes(&[(&ka, &a), (&kb, &b)]),
    );
    let opt = tiny_optimizer();
    let tmp = tempfile::tempdir().unwrap();
    opt.save(&tmp.path().join("o")).unwrap();
    put(
        "checkpoint",
        "optimizer.safetensors",
        &std::fs::read(tmp.path().join("o")).unwrap(),
    );
}
