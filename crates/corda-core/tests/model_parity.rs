//! The decoder against transformers: logits of the fixture model on the probe sentence, with
//! the transformers-4 config, a transformers-5 config and a sharded copy of the weights.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use corda_core::model::{CausalLM, LoadOptions, ShardWriter, Weights};

use corda_testdata::peft_tiny_llama as fixtures;

fn probe() -> (Tensor, Tensor) {
    let t =
        candle_core::safetensors::load(fixtures().join("base_logits.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = t["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    (ids, t["logits"].clone())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    corda_core::util::tensor::max_abs_diff(a, b).unwrap()
}

fn logits_of(dir: &Path) -> Tensor {
    let m = CausalLM::load(dir, &LoadOptions::default()).unwrap();
    let (ids, _) = probe();
    m.forward(&ids, None).unwrap().squeeze(0).unwrap()
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn logits_match_transformers() {
    let (_, expected) = probe();
    let got = logits_of(&fixtures().join("base-model"));
    let d = max_abs_diff(&got, &expected);
    assert!(d < 1e-4, "max |logit diff| = {d}");
}

#[test]
fn padded_batch_matches_single_sequence() {
    let m = CausalLM::load(&fixtures().join("base-model"), &LoadOptions::default()).unwrap();
    let (ids, expected) = probe();
    let t = ids.dim(1).unwrap();
    let pad = Tensor::zeros((1, 5), DType::U32, &Device::Cpu).unwrap();
    let padded = Tensor::cat(&[&ids, &pad], 1).unwrap();
    let short = ids.narrow(1, 0, 9).unwrap();
    let short = Tensor::cat(
        &[
            &short,
            &Tensor::zeros((1, t + 5 - 9), DType::U32, &Device::Cpu).unwrap(),
        ],
        1,
    )
    .unwrap();
    let batch = Tensor::cat(&[&padded, &short], 0).unwrap();
    let mut mask = vec![0u8; 2 * (t + 5)];
    mask[..t].fill(1);
    mask[t + 5..t + 5 + 9].fill(1);
    let mask = Tensor::from_vec(mask, (2, t + 5), &Device::Cpu).unwrap();
    let out = m.forward(&batch, Some(&mask)).unwrap();
    let first = out.get(0).unwrap().narrow(0, 0, t).unwrap();
    assert!(max_abs_diff(&first, &expected) < 1e-4);
    let second = out.get(1).unwrap().narrow(0, 0, 9).unwrap();
    assert!(max_abs_diff(&second, &expected.narrow(0, 0, 9).unwrap()) < 1e-4);
}

#[test]
fn transformers5_config_gives_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("base-model"), tmp.path());
    let cfg_path = tmp.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    let theta = o.remove("rope_theta").unwrap();
    o.remove("rope_scaling");
    let dtype = o.remove("torch_dtype").unwrap();
    o.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_theta": theta, "rope_type": "default"}),
    );
    o.insert("dtype".into(), dtype);
    o.insert("head_dim".into(), serde_json::json!(16));
    std::fs::write(&cfg_path, serde_json::to_string(&v).unwrap()).unwrap();
    let (_, expected) = probe();
    assert!(max_abs_diff(&logits_of(tmp.path()), &expected) < 1e-4);
}

#[test]
fn sharded_copy_loads_the_same() {
    let src = fixtures().join("base-model");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let w = Weights::open(&src).unwrap();
    let mut writer = ShardWriter::new(tmp.path(), 200_000);
    for name in w.names() {
        writer
            .push(name.clone(), w.get(&name, None, &Device::Cpu).unwrap())
            .unwrap();
    }
    writer.finish().unwrap();
    assert!(tmp.path().join("model.safetensors.index.json").is_file());
    assert!(!tmp.path().join("model.safetensors").exists());
    let shards = Weights::open(tmp.path()).unwrap();
    assert!(shards.num_files() > 1, "expected several shards");
    assert_eq!(shards.names(), w.names());
    let (_, expected) = probe();
    assert!(max_abs_diff(&logits_of(tmp.path()), &expected) < 1e-4);
}

#[test]
fn half_precision_checkpoints_load() {
    let src = fixtures().join("base-model");
    let w = Weights::open(&src).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let tmp = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
        }
        let mut writer = ShardWriter::new(tmp.path(), u64::MAX);
        for name in w.names() {
            writer
                .push(
                    name.clone(),
                    w.get(&name, None, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
        }
        writer.finish().unwrap();
        let m = CausalLM::load(
            tmp.path(),
            &LoadOptions {
                dtype: None,
                device: Device::Cpu,
            },
        )
        .unwrap();
        assert_eq!(m.dtype, DType::F32, "config.json says float32");
        let m = CausalLM::load(
            tmp.path(),
            &LoadOptions {
                dtype: Some(dtype),
                device: Device::Cpu,
            },
        )
        .unwrap();
        let (ids, expected) = probe();
        let got = m.forward(&ids, None).unwrap().squeeze(0).unwrap();
        let d = max_abs_diff(&got, &expected);
        assert!(d < 0.1, "{dtype:?}: {d}");
    }
}

fn load_err(dir: &Path) -> String {
    match CausalLM::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_model_directories_give_clear_errors() {
    let src = fixtures().join("base-model");
    let e = load_err(Path::new("/no/such/model"));
    assert!(e.contains("does not exist") || e.contains("missing"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&src, tmp.path());
    std::fs::write(tmp.path().join("config.json"), "{not json").unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");

    copy_dir(&src, tmp.path());
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("truncated"), "{e}");

    // A tensor with the wrong shape names both shapes; a missing tensor is named.
    copy_dir(&src, tmp.path());
    let w = Weights::open(&src).unwrap();
    let mut writer = ShardWriter::new(tmp.path(), u64::MAX);
    for name in w.names() {
        let t = w.get(&name, None, &Device::Cpu).unwrap();
        if name == "model.layers.1.mlp.up_proj.weight" {
            writer.push(name, t.narrow(0, 0, 100).unwrap()).unwrap();
        } else if name != "model.norm.weight" {
            writer.push(name, t).unwrap();
        }
    }
    writer.finish().unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("up_proj") && e.contains("[100, 64]") && e.contains("[176, 64]"),
        "{e}"
    );

    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

/// An untied embedding table stays in the checkpoint file; its lookups give the loaded
/// table's values bit for bit, in the storage dtype's rounding too, and an id past the table is
/// an error that names it.
#[test]
fn mapped_embeddings_match_the_loaded_table() {
    use corda_core::model::{load_embeddings, Embeddings, ModelConfig};
    let dir = fixtures().join("base-model");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let w = Weights::open(&dir).unwrap();
    let (ids, _) = probe();
    for dtype in [DType::F32, DType::BF16] {
        let mapped = Embeddings::load(&w, &cfg, dtype, &Device::Cpu, false).unwrap();
        assert!(
            mapped.dense().is_none(),
            "an untied CPU table is read from the file"
        );
        let dense = Embeddings::Dense(load_embeddings(&w, &cfg, dtype, &Device::Cpu).unwrap());
        let (a, b) = (mapped.lookup(&ids).unwrap(), dense.lookup(&ids).unwrap());
        assert_eq!(a.dims(), b.dims());
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{dtype:?}");
        let tied = Embeddings::load(&w, &cfg, dtype, &Device::Cpu, true).unwrap();
        assert!(
            tied.dense().is_some(),
            "a table tied to the head is held in memory"
        );
    }
    let mapped = Embeddings::load(&w, &cfg, DType::F32, &Device::Cpu, false).unwrap();
    let bad = Tensor::new(&[[3u32, cfg.vocab_size as u32]], &Device::Cpu).unwrap();
    let err = mapped.lookup(&bad).unwrap_err().to_string();
    assert!(
        err.contains(&format!("token id {}", cfg.vocab_size)) && err.contains("tokenizer"),
        "{err}"
    );
}
