//! corda-eval against transformers (references from scripts/eval/make_references.py in
//! tests/fixtures/eval): tokenization of a real text and of the prompts, the mean NLL of every
//! perplexity window within 1e-4 relative, and greedy generation with a KV cache over a
//! left-padded batch token for token equal to `generate(do_sample=False)`. On the PEFT fixture
//! model and on the real SmolLM2-135M-Instruct GGUF (transformers on its float32 conversion).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use corda_core::eval::perplexity::perplexity;
use corda_core::eval::{greedy_generate, GenerationOptions};
use corda_core::model::{CausalLM, LoadOptions, TokenizerInfo};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/eval")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn rows(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

fn text() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/public_domain.txt");
    std::fs::read_to_string(p).unwrap()
}

/// Everything the reference holds, checked against `model` and `tok`.
fn check(model: &CausalLM, tok: &TokenizerInfo, r: &Value) {
    // Tokenization of the text.
    let text_ids = tok.encode(&text()).unwrap();
    assert_eq!(text_ids, ids(&r["text_ids"]), "text tokenization differs");

    // Perplexity windows.
    let seq_len = r["seq_len"].as_u64().unwrap() as usize;
    let expected: Vec<f64> = r["window_nll"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let got = perplexity(model, &text_ids, seq_len, None, 3, &mut |_| {}).unwrap();
    assert_eq!(got.windows, expected.len());
    let mut worst = 0f64;
    for (w, (a, b)) in got.window_nll.iter().zip(&expected).enumerate() {
        let rel = (a - b).abs() / b.abs();
        worst = worst.max(rel);
        assert!(
            rel <= 1e-4,
            "window {w}: NLL {a} vs transformers {b} (relative {rel:.2e})"
        );
    }
    let mean = expected.iter().sum::<f64>() / expected.len() as f64;
    assert!((got.mean_nll - mean).abs() / mean <= 1e-4);
    println!(
        "windows {}: max relative NLL difference {worst:.2e}, perplexity {:.4} vs {:.4}",
        expected.len(),
        got.perplexity,
        mean.exp()
    );

    // Prompts and greedy generation (one left-padded batch, then one prompt at a time).
    let prompts: Vec<String> = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p).unwrap()).collect();
    assert_eq!(
        prompt_ids,
        rows(&r["prompt_ids"]),
        "prompt tokenization differs"
    );
    let eos = ids(&r["eos_ids"]);
    assert!(eos.contains(&tok.eos_id.unwrap()));
    let expected = rows(&r["new_tokens"]);
    for batch_size in [prompts.len(), 1] {
        let opts = GenerationOptions {
            max_new_tokens: r["max_new_tokens"].as_u64().unwrap() as usize,
            batch_size,
            eos_ids: eos.clone(),
            pad_id: r["pad_id"].as_u64().unwrap() as u32,
            stop_strings: Vec::new(),
        };
        let mut steps = 0;
        let got = greedy_generate(model, &tok.tokenizer, &prompt_ids, &opts, &mut |t, _| {
            steps += t
        })
        .unwrap();
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(
                g, e,
                "prompt {i} (batch size {batch_size}): greedy tokens differ from transformers"
            );
        }
        assert_eq!(steps, expected.iter().map(Vec::len).sum::<usize>());
    }
}

#[test]
fn fixture_model_perplexity_and_generation_equal_transformers() {
    let dir = corda_testdata::peft_tiny_llama().join("base-model");
    let model = CausalLM::load(
        &dir,
        &LoadOptions {
            dtype: Some(DType::F32),
            device: Device::Cpu,
        },
    )
    .unwrap();
    let tok = TokenizerInfo::load(&dir).unwrap();
    check(&model, &tok, &fixture("peft-tiny-llama.json"));
}

fn real_gguf() -> Option<PathBuf> {
    corda_testdata::shared(
        "models/smollm2-135m-instruct",
        "the real-model eval parity test",
    )
    .map(|d| d.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
}

#[test]
fn real_gguf_model_perplexity_and_generation_equal_transformers() {
    let Some(gguf) = real_gguf() else { return };
    let model = CausalLM::load(&gguf, &LoadOptions::default()).unwrap();
    let tok = TokenizerInfo::load(&gguf).unwrap();
    check(&model, &tok, &fixture("smollm2-135m.json"));
}

/// A stop string ends a row early without changing the tokens before it.
#[test]
fn stop_strings_cut_generation_at_the_first_newline() {
    let Some(gguf) = real_gguf() else { return };
    let r = fixture("smollm2-135m.json");
    let model = CausalLM::load(&gguf, &LoadOptions::default()).unwrap();
    let tok = TokenizerInfo::load(&gguf).unwrap();
    let prompt = tok.encode(r["prompts"][0].as_str().unwrap()).unwrap();
    let opts = GenerationOptions {
        max_new_tokens: 40,
        batch_size: 1,
        eos_ids: vec![tok.eos_id.unwrap()],
        pad_id: 2,
        stop_strings: vec!["\n".into()],
    };
    let got = greedy_generate(&model, &tok.tokenizer, &[prompt], &opts, &mut |_, _| {}).unwrap();
    let full = rows(&r["new_tokens"])[0].clone();
    assert!(got[0].len() < full.len() && full.starts_with(&got[0]));
    let text = tok.tokenizer.decode(&got[0], true).unwrap();
    assert!(text.contains('\n'), "{text:?}");
    assert_eq!(text.trim(), "Sydney");
}
