//! The SFT batch of the reference fine-tuning script, reproduced token for token: the first
//! three rows of the fixture's `math.jsonl`, Alpaca prompt, `model_max_length` 192, pad = EOS.

use candle_core::{DType, Device};
use corda_core::data::{build_sft_examples, collate, load_rows, SftOptions, Split, IGNORE_INDEX};
use tokenizers::Tokenizer;

use corda_testdata::peft_tiny_llama as fixtures;

fn manifest_max_length() -> usize {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    manifest["train_step"]["model_max_length"].as_u64().unwrap() as usize
}

#[test]
fn sft_batch_matches_the_reference_train_step() {
    let root = fixtures();
    let tokenizer = Tokenizer::from_file(root.join("base-model/tokenizer.json")).unwrap();
    let rows = load_rows(
        root.join("data/math.jsonl").to_str().unwrap(),
        &Split::parse("train[:3]").unwrap(),
        None,
    )
    .unwrap();
    let opts = SftOptions {
        query_field: "query".into(),
        response_field: "response".into(),
        model_max_length: manifest_max_length(),
        eos_token: "</s>".into(),
    };
    assert_eq!(opts.model_max_length, 192);
    let examples = build_sft_examples(&rows, &tokenizer, &opts).unwrap();
    let eos = tokenizer.token_to_id("</s>").unwrap();
    assert_eq!(eos, 2);
    let batch = collate(&examples, eos).unwrap();
    assert_eq!((batch.batch_size(), batch.seq_len), (3, 135));

    let as_i64 = |v: &[Vec<u32>]| -> Vec<Vec<i64>> {
        v.iter()
            .map(|r| r.iter().map(|&x| i64::from(x)).collect())
            .collect()
    };
    let mask_i64: Vec<Vec<i64>> = batch
        .attention_mask
        .iter()
        .map(|r| r.iter().map(|&x| i64::from(x)).collect())
        .collect();

    for mode in ["kpm", "ipm"] {
        let path = root.join(mode).join("train_step.safetensors");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let get = |name: &str| -> Vec<Vec<i64>> {
            let t = &tensors[name];
            assert_eq!(t.dtype(), DType::I64, "{mode}/{name}");
            t.to_vec2::<i64>().unwrap()
        };
        assert_eq!(
            as_i64(&batch.input_ids),
            get("input_ids"),
            "{mode} input_ids"
        );
        assert_eq!(batch.labels, get("labels"), "{mode} labels");
        assert_eq!(mask_i64, get("attention_mask"), "{mode} attention_mask");
    }

    // Sanity on the structure: BOS first, prompt masked, each example's EOS trained on.
    for (example, labels) in examples.iter().zip(&batch.labels) {
        assert_eq!(example.input_ids[0], 1);
        assert_eq!(*example.input_ids.last().unwrap(), eos);
        assert_eq!(labels[0], IGNORE_INDEX);
        assert_eq!(labels[example.input_ids.len() - 1], i64::from(eos));
    }

    let t = batch.to_tensors(&Device::Cpu, DType::U8).unwrap();
    assert_eq!(t.input_ids.dims(), [3, 135]);
    assert_eq!(t.labels.to_vec2::<i64>().unwrap(), batch.labels);
}

#[test]
fn sft_truncates_at_model_max_length() {
    let root = fixtures();
    let tokenizer = Tokenizer::from_file(root.join("base-model/tokenizer.json")).unwrap();
    let rows = load_rows(
        root.join("data/math.jsonl").to_str().unwrap(),
        &Split::parse("train[:3]").unwrap(),
        None,
    )
    .unwrap();
    let opts = SftOptions {
        query_field: "query".into(),
        response_field: "response".into(),
        model_max_length: 40,
        eos_token: "</s>".into(),
    };
    let examples = build_sft_examples(&rows, &tokenizer, &opts).unwrap();
    for e in &examples {
        assert_eq!(e.input_ids.len(), 40);
        assert_eq!(e.input_ids[0], 1);
        // The prompt alone is longer than 40 tokens, so nothing is trained on.
        assert!(e.labels.iter().all(|&l| l == IGNORE_INDEX));
    }

    let missing = SftOptions {
        query_field: "question".into(),
        ..opts.clone()
    };
    let err = build_sft_examples(&rows, &tokenizer, &missing)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`question`") && err.contains("`query`, `response`"),
        "{err}"
    );
    let bad_eos = SftOptions {
        eos_token: "<|endoftext|>".into(),
        ..opts
    };
    assert!(build_sft_examples(&rows, &tokenizer, &bad_eos).is_err());
}
