//! The fine-tuning run the library puts together (`train::FineTuneSpec`): the CorDA adapter or a
//! fresh plain LoRA attached, the tokenizer found by its fallback chain, EOS as the pad, and the
//! checks that come before anything heavy is loaded.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use corda_core::adapter::Adapter;
use corda_core::data::Split;
use corda_core::layout::CORDA_INIT_DIR;
use corda_core::model::TokenizerInfo;
use corda_core::train::{AdapterChoice, FineTuneSpec};
use corda_testdata::peft_tiny_llama as fixtures;

/// A corda-preprocess-like output without a tokenizer: the residual model and corda_init, whose
/// config names `base` (or nothing) as the base model.
fn residual_without_tokenizer(root: &Path, base: Option<&Path>) -> PathBuf {
    let out = root.join("OUT");
    std::fs::create_dir_all(&out).unwrap();
    let kpm = fixtures().join("kpm");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(kpm.join("residual-model").join(f), out.join(f)).unwrap();
    }
    let mut adapter = Adapter::load(&kpm.join(CORDA_INIT_DIR)).unwrap();
    adapter.config.base_model_name_or_path = base.map(|b| b.display().to_string());
    adapter.save(&out.join(CORDA_INIT_DIR)).unwrap();
    out
}

fn spec(model: &Path, adapter: AdapterChoice) -> FineTuneSpec {
    FineTuneSpec {
        model_name_or_path: model.display().to_string(),
        revision: "main".into(),
        hub: corda_core::hub::Hub::from_env(),
        adapter,
        tokenizer_name_or_path: None,
        data_path: fixtures().join("data/math.jsonl").display().to_string(),
        split: Split::parse("train").unwrap(),
        query_field: "query".into(),
        response_field: "response".into(),
        model_max_length: 192,
        dtype: DType::F32,
        device: Device::Cpu,
    }
}

#[test]
fn corda_run_finds_the_tokenizer_of_the_base_model_and_pads_with_eos() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("base-model");
    let out = residual_without_tokenizer(tmp.path(), Some(&base));
    let run = spec(&out, AdapterChoice::Corda).load().unwrap();
    let tok = TokenizerInfo::load(&base).unwrap();
    assert_eq!(Some(run.pad_id), tok.eos_id);
    assert_eq!(run.examples.len(), 16);
    // Every example ends its target with EOS.
    assert!(run
        .examples
        .iter()
        .all(|e| e.input_ids.last() == tok.eos_id.as_ref()));
    // The CorDA adapter (r = 8 on seven projections) is attached and trains.
    assert_eq!(run.adapter_config.r, 8);
    let expected: usize = run
        .model
        .target_shapes()
        .iter()
        .map(|(_, d_out, d_in)| 8 * (d_out + d_in))
        .sum();
    assert_eq!(run.model.lora_parameter_count(), expected);
    assert_eq!(run.model.lora_vars().len(), run.model.target_shapes().len());
    assert_eq!(
        run.adapter_config.base_model_name_or_path.as_deref(),
        Some(out.display().to_string().as_str()),
        "the trained adapter names the model it was trained on"
    );

    // Without a base model to fall back on, the error says what to give.
    let tmp2 = tempfile::tempdir().unwrap();
    let bare = residual_without_tokenizer(tmp2.path(), None);
    let err = spec(&bare, AdapterChoice::Corda)
        .load()
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("tokenizer_name_or_path"),
        "{err}"
    );
    // An explicit tokenizer location wins.
    let mut explicit = spec(&bare, AdapterChoice::Corda);
    explicit.tokenizer_name_or_path = Some(base.display().to_string());
    assert_eq!(explicit.load().unwrap().pad_id, tok.eos_id.unwrap());
}

#[test]
fn plain_lora_covers_every_target_and_checks_come_first() {
    let base = fixtures().join("base-model");
    let run = spec(&base, AdapterChoice::PlainLora { r: 4, seed: 1 })
        .load()
        .unwrap();
    let shapes = run.model.target_shapes();
    let expected: usize = shapes.iter().map(|(_, o, i)| 4 * (o + i)).sum();
    assert_eq!(run.model.lora_vars().len(), shapes.len());
    assert_eq!(run.model.lora_parameter_count(), expected);
    assert_eq!(run.adapter_config.r, 4);

    // CorDA mode on a model without corda_init fails in the cheap check, naming the directory.
    let err = spec(&base, AdapterChoice::Corda)
        .check()
        .unwrap_err()
        .to_string();
    assert!(err.contains(CORDA_INIT_DIR), "{err}");
    // Nothing survives truncation: the error names the option to raise.
    let mut short = spec(&base, AdapterChoice::PlainLora { r: 4, seed: 1 });
    short.model_max_length = 20;
    let err = short.load().err().unwrap().to_string();
    assert!(err.contains("model_max_length 20"), "{err}");
}
