//! GGUF input. On the real SmolLM2-135M-Instruct Q4_1 file in ../shared/models: logits equal
//! transformers' on the float32-dequantized weights, and the config and tokenizer rebuilt from
//! the metadata equal the Hugging Face files beside it. On GGUF files written here from the
//! PEFT fixture model (with llama.cpp's q/k permutation): logits equal transformers', the
//! quantized path and the tokenizer metadata with BOS; and broken files give clear errors.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value as G};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use corda_core::model::{
    find_gguf, resolve_model_dir, CausalLM, GgufModel, LoadOptions, ModelConfig, ShardWriter,
    TokenizerInfo, Weights,
};
use serde_json::Value;

/// The real model's directory, or `None` (with a notice) when ../shared is absent.
fn real_model() -> Option<PathBuf> {
    corda_testdata::shared("models/smollm2-135m-instruct", "this real-model GGUF test")
}

fn real_gguf(dir: &Path) -> PathBuf {
    dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn fixture_model() -> Option<PathBuf> {
    Some(corda_testdata::peft_tiny_llama().join("base-model"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    corda_core::util::tensor::max_abs_diff(a, b).unwrap()
}

/// A directory holding only a symlink to `file` (a hub snapshot looks like this).
fn linked_dir(file: &Path, name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(file, tmp.path().join(name)).unwrap();
    tmp
}

const TEXTS: [&str; 6] = [
    "<|im_start|>user\nWhat is 123+45? The cat sat.<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is Paris. It has 2,165,423 inhabitants (2019).",
    "fn main() {\n    println!(\"héllo, wörld — ünïcode ✓ 日本語\");\n}\n",
    "  leading spaces,\ttabs\n\n\nand newlines   ",
    "Don't won't I'll we've they're: it's 3.14159!",
    "",
];

#[test]
fn real_model_logits_equal_transformers_on_the_dequantized_weights() {
    let Some(dir) = real_model() else { return };
    let probe =
        candle_core::safetensors::load(dir.join("probe_logits.safetensors"), &Device::Cpu).unwrap();
    let m = CausalLM::load(&real_gguf(&dir), &LoadOptions::default()).unwrap();
    assert_eq!(m.dtype, DType::F32);
    for i in 0..2 {
        let ids = probe[&format!("input_ids_{i}")]
            .to_dtype(DType::U32)
            .unwrap();
        let ids = if ids.rank() == 1 {
            ids.unsqueeze(0).unwrap()
        } else {
            ids
        };
        let expected = &probe[&format!("logits_{i}")];
        let got = m.forward(&ids, None).unwrap();
        let d = max_abs_diff(&got.reshape(expected.dims()).unwrap(), expected);
        assert!(d <= 1e-3, "probe {i}: max |logit diff| = {d}");
    }
}

#[test]
fn real_model_metadata_config_equals_config_json() {
    let Some(dir) = real_model() else { return };
    let g = GgufModel::open(&real_gguf(&dir)).unwrap();
    assert_eq!(g.architecture(), "llama");
    assert_eq!(g.storage_type("model.embed_tokens.weight").unwrap(), "Q8_0");
    assert_eq!(
        g.storage_type("model.layers.3.self_attn.k_proj.weight")
            .unwrap(),
        "Q4_1"
    );
    assert_eq!(g.storage_type("model.norm.weight").unwrap(), "F32");
    assert!(!g.contains("lm_head.weight"));
    let meta = g.config_from_metadata().unwrap();
    let json = ModelConfig::from_dir(&dir).unwrap();
    // What the loaders use for a .gguf with a config.json beside it: that file.
    let beside = ModelConfig::from_dir(&real_gguf(&dir)).unwrap();
    assert_eq!(beside.raw, json.raw);
    let fields = |c: &ModelConfig| {
        (
            c.architecture,
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.max_position_embeddings,
            c.tie_word_embeddings,
            c.bos_token_id,
            c.eos_token_ids.clone(),
        )
    };
    assert_eq!(fields(&meta), fields(&json));
    assert_eq!(meta.rms_norm_eps, 1e-5);
    assert_eq!(meta.rope_theta, 100000.0);
    assert_eq!(meta.rope_inv_freq(), json.rope_inv_freq());
    assert_eq!(meta.raw["pad_token_id"], 2);
}

#[test]
fn real_model_tokenizer_from_metadata_equals_tokenizer_json() {
    let Some(dir) = real_model() else { return };
    let g = GgufModel::open(&real_gguf(&dir)).unwrap();
    let rebuilt = g.tokenizer_from_metadata().unwrap();
    let beside = TokenizerInfo::load(&real_gguf(&dir)).unwrap();
    let reference = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for text in TEXTS {
        let want = reference.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(rebuilt.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(beside.encode(text).unwrap(), want, "{text:?}");
        let back = rebuilt.tokenizer.decode(&want, false).unwrap();
        assert_eq!(back, text);
    }
    assert_eq!(
        rebuilt.encode(TEXTS[0]).unwrap()[0],
        1,
        "<|im_start|> is special"
    );
    for info in [&rebuilt, &beside] {
        assert_eq!(
            (info.bos_id, info.eos_id, info.pad_id),
            (Some(1), Some(2), Some(2))
        );
        assert_eq!(info.eos_token.as_deref(), Some("<|im_end|>"));
    }
}

/// A directory holding only the .gguf (no config.json / tokenizer.json beside it): everything
/// comes from the metadata, and a residual directory gets tokenizer files written from it.
#[test]
fn real_model_alone_in_a_directory() {
    let Some(dir) = real_model() else { return };
    let alone = linked_dir(&real_gguf(&dir), "model.gguf");
    assert_eq!(
        find_gguf(alone.path()).unwrap(),
        Some(alone.path().join("model.gguf"))
    );
    assert_eq!(
        resolve_model_dir(alone.path().to_str().unwrap()).unwrap(),
        alone.path()
    );
    let cfg = ModelConfig::from_dir(alone.path()).unwrap();
    assert_eq!(cfg.num_hidden_layers, 30);
    assert!(cfg.tie_word_embeddings);
    let w = Weights::open(alone.path()).unwrap();
    assert!(w.gguf().is_some());
    assert_eq!(w.names().len(), 2 + 30 * 9);
    assert_eq!(
        w.shape("model.layers.0.self_attn.k_proj.weight").unwrap(),
        [192, 576]
    );
    let tok = TokenizerInfo::load(alone.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    corda_core::model::save::copy_support_files(alone.path(), out.path()).unwrap();
    let written = TokenizerInfo::load(out.path()).unwrap();
    let reference = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for text in TEXTS {
        let want = reference.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(tok.encode(text).unwrap(), want);
        assert_eq!(written.encode(text).unwrap(), want);
    }
    assert_eq!(
        (written.bos_id, written.eos_id, written.pad_id),
        (Some(1), Some(2), Some(2))
    );
    let tc: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert!(tc["chat_template"].as_str().unwrap().contains("im_start"));
    let gc: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(gc["eos_token_id"], 2);

    // Two .gguf files in one directory: the user must pick one.
    std::os::unix::fs::symlink(real_gguf(&dir), alone.path().join("other.gguf")).unwrap();
    let e = Weights::open(alone.path()).err().unwrap().to_string();
    assert!(
        e.contains("2 .gguf files") && e.contains("model.gguf") && e.contains("other.gguf"),
        "{e}"
    );
}

#[test]
fn real_model_config_json_of_another_model_is_refused() {
    let Some(dir) = real_model() else { return };
    let tmp = linked_dir(&real_gguf(&dir), "m.gguf");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["num_key_value_heads"] = 9.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let e = ModelConfig::from_dir(&tmp.path().join("m.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("num_key_value_heads = 9") && e.contains("another model"),
        "{e}"
    );
}

// ---- GGUF files written here from the PEFT fixture model ----

/// llama.cpp's `permute` of q/k rows (convert_hf_to_gguf.py), which the reader must undo.
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, kind) = rest.rsplit_once('.').unwrap();
    let part = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("{other}"),
    };
    format!("blk.{layer}.{part}.{kind}")
}

/// The fixture's tokenizer as GGUF metadata (byte-level BPE, BOS added).
fn tokenizer_metadata(dir: &Path) -> Vec<(String, G)> {
    let t: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = t["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (tok, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = tok.clone();
    }
    let specials: Vec<u64> = t["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_u64().unwrap())
        .collect();
    let merges: Vec<G> = t["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => G::String(s.clone()),
            Value::Array(p) => G::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            _ => panic!("merge {m}"),
        })
        .collect();
    let types: Vec<G> = (0..tokens.len() as u64)
        .map(|i| G::I32(if specials.contains(&i) { 3 } else { 1 }))
        .collect();
    vec![
        ("tokenizer.ggml.model".into(), G::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), G::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            G::Array(tokens.into_iter().map(G::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), G::Array(types)),
        ("tokenizer.ggml.merges".into(), G::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), G::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), G::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), G::Bool(true)),
    ]
}

/// Write the fixture model as a llama GGUF; `quant` picks each tensor's storage type.
fn write_fixture_gguf(
    src: &Path,
    dst: &Path,
    arch: &str,
    quant: impl Fn(&str, &[usize]) -> GgmlDType,
) {
    let cfg = ModelConfig::from_dir(src).unwrap();
    let w = Weights::open(src).unwrap();
    let mut tensors = vec![];
    for name in w.names() {
        let mut t = w
            .get(&name, None, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        // llama.cpp permutes q/k only for its `llama` architecture.
        let heads = match name.rsplit('.').nth(1) {
            Some("q_proj") if name.ends_with(".weight") => cfg.num_attention_heads,
            Some("k_proj") if name.ends_with(".weight") => cfg.num_key_value_heads,
            _ => 0,
        };
        if arch == "llama" && heads > 0 {
            t = permute(&t, heads);
        }
        let q = QTensor::quantize(&t, quant(&name, t.dims())).unwrap();
        tensors.push((gguf_name(&name), q));
    }
    let a = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, G)> = vec![
        ("general.architecture".into(), G::String(arch.into())),
        (
            a("context_length"),
            G::U32(cfg.max_position_embeddings as u32),
        ),
        (a("embedding_length"), G::U32(cfg.hidden_size as u32)),
        (
            a("feed_forward_length"),
            G::U32(cfg.intermediate_size as u32),
        ),
        (a("block_count"), G::U32(cfg.num_hidden_layers as u32)),
        (
            a("attention.head_count"),
            G::U32(cfg.num_attention_heads as u32),
        ),
        (
            a("attention.head_count_kv"),
            G::U32(cfg.num_key_value_heads as u32),
        ),
        (a("rope.freq_base"), G::F32(cfg.rope_theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            G::F32(cfg.rms_norm_eps as f32),
        ),
        (a("vocab_size"), G::U32(cfg.vocab_size as u32)),
    ];
    meta.extend(tokenizer_metadata(src));
    let meta_refs: Vec<(&str, &G)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

fn fixture_probe() -> (Tensor, Tensor) {
    let t = candle_core::safetensors::load(
        corda_testdata::peft_tiny_llama().join("base_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = t["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    (ids, t["logits"].clone())
}

#[test]
fn fixture_as_float32_gguf_has_transformers_logits_config_and_tokenizer() {
    let Some(src) = fixture_model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tiny.gguf");
    write_fixture_gguf(&src, &file, "llama", |_, _| GgmlDType::F32);
    let (ids, expected) = fixture_probe();
    let m = CausalLM::load(&file, &LoadOptions::default()).unwrap();
    let got = m.forward(&ids, None).unwrap().squeeze(0).unwrap();
    let d = max_abs_diff(&got, &expected);
    assert!(d < 1e-4, "max |logit diff| = {d}");
    // Every tensor equals the original bit for bit (q/k rows back in transformers' order).
    let (g, hf) = (Weights::open(&file).unwrap(), Weights::open(&src).unwrap());
    assert_eq!(g.names(), hf.names());
    for n in hf.names() {
        let a = g.get(&n, None, &Device::Cpu).unwrap();
        let b = hf.get(&n, None, &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{n}");
    }
    // Config from the metadata (untied head, GQA 4/2), tokenizer with BOS from the metadata.
    let cfg = ModelConfig::from_dir(&file).unwrap();
    let want = ModelConfig::from_dir(&src).unwrap();
    assert!(!cfg.tie_word_embeddings);
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.rms_norm_eps
        ),
        (
            want.num_attention_heads,
            want.num_key_value_heads,
            want.rms_norm_eps
        )
    );
    let tok = TokenizerInfo::load(&file).unwrap();
    let reference = TokenizerInfo::load(&src).unwrap();
    for text in TEXTS {
        let ids = reference.encode(text).unwrap();
        assert_eq!(ids[0], 1, "the fixture tokenizer adds <s>");
        assert_eq!(tok.encode(text).unwrap(), ids, "{text:?}");
    }
    assert_eq!((tok.bos_id, tok.eos_id), (Some(1), Some(2)));
}

/// The fixture turned into a Qwen2 model (q/k/v biases), as a Hugging Face directory.
fn qwen2_fixture(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "qwen2".into();
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let w = Weights::open(src).unwrap();
    let mut out = ShardWriter::new(dst, u64::MAX);
    for name in w.names() {
        let t = w.get(&name, None, &Device::Cpu).unwrap();
        if let Some(stem) = name
            .strip_suffix("_proj.weight")
            .filter(|s| s.ends_with(".q") || s.ends_with(".k") || s.ends_with(".v"))
        {
            let n = t.dim(0).unwrap();
            let bias = Tensor::arange(0u32, n as u32, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .affine(0.37, 0.0)
                .unwrap()
                .sin()
                .unwrap();
            out.push(format!("{stem}_proj.bias"), bias).unwrap();
        }
        out.push(name, t).unwrap();
    }
    out.finish().unwrap();
}

#[test]
fn fixture_as_qwen2_gguf_keeps_rows_and_biases() {
    let Some(src) = fixture_model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("qwen2-hf");
    qwen2_fixture(&src, &hf);
    let file = tmp.path().join("qwen2.gguf");
    write_fixture_gguf(&hf, &file, "qwen2", |_, _| GgmlDType::F32);
    let cfg = ModelConfig::from_dir(&file).unwrap();
    assert_eq!(cfg.architecture.as_str(), "qwen2");
    assert!(cfg.qkv_bias && !cfg.o_bias);
    let (g, want) = (Weights::open(&file).unwrap(), Weights::open(&hf).unwrap());
    assert_eq!(g.names(), want.names());
    assert!(g.contains("model.layers.1.self_attn.k_proj.bias"));
    for n in want.names() {
        let a = g.get(&n, None, &Device::Cpu).unwrap();
        let b = want.get(&n, None, &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{n}");
    }
    let (ids, _) = fixture_probe();
    let a = CausalLM::load(&file, &LoadOptions::default()).unwrap();
    let b = CausalLM::load(&hf, &LoadOptions::default()).unwrap();
    let d = max_abs_diff(
        &a.forward(&ids, None).unwrap(),
        &b.forward(&ids, None).unwrap(),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn fixture_as_quantized_gguf_dequantizes_each_type() {
    let Some(src) = fixture_model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("q.gguf");
    // Quantized where rows hold whole blocks (in-dim 64), half precision elsewhere.
    let kinds = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_1,
    ];
    let pick = |name: &str, dims: &[usize]| -> GgmlDType {
        if dims.len() == 1 {
            GgmlDType::F32
        } else if !dims[1].is_multiple_of(32) {
            GgmlDType::BF16
        } else if name.contains("embed") {
            GgmlDType::F16
        } else {
            kinds[name.len() % kinds.len()]
        }
    };
    write_fixture_gguf(&src, &file, "llama", pick);
    let (g, hf) = (
        GgufModel::open(&file).unwrap(),
        Weights::open(&src).unwrap(),
    );
    let mut seen = std::collections::BTreeSet::new();
    for n in hf.names() {
        let a = g
            .get(&n, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let b = hf.get(&n, None, &Device::Cpu).unwrap();
        let ty = g.storage_type(&n).unwrap();
        seen.insert(ty);
        // Block quantization error bound: a 4-bit step of the block's range at most.
        let scale = corda_core::util::tensor::max_abs(&b).unwrap();
        let tol = match ty {
            "F32" => 0.0,
            "F16" | "BF16" => scale / 128.0,
            "Q8_0" => scale / 100.0,
            _ => scale / 6.0,
        };
        let d = max_abs_diff(&a, &b);
        assert!(d <= tol, "{n} ({ty}): {d} > {tol}");
        // A wrong row order would be off by the weights' own size, far beyond quantization.
        if n.contains("q_proj") || n.contains("k_proj") {
            let rel = d / scale;
            assert!(rel < 0.2, "{n}: rows out of order? rel {rel}");
        }
    }
    assert!(seen.len() >= 5, "types exercised: {seen:?}");
    let m = CausalLM::load(&file, &LoadOptions::default()).unwrap();
    let (ids, expected) = fixture_probe();
    let got = m.forward(&ids, None).unwrap().squeeze(0).unwrap();
    // A smoke check only (4-bit random weights move these small logits by ~15%); the
    // per-tensor bounds above are the real check of each dequantizer.
    let d = max_abs_diff(&got, &expected);
    let scale = corda_core::util::tensor::max_abs(&expected).unwrap();
    assert!(
        d < 0.3 * scale,
        "quantized logits drifted: {d} (max |logit| {scale})"
    );
}

#[test]
fn broken_files_give_clear_errors() {
    let Some(src) = fixture_model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.gguf");
    write_fixture_gguf(&src, &good, "llama", |_, _| GgmlDType::F32);
    let bytes = std::fs::read(&good).unwrap();
    let err_of = |name: &str, data: &[u8]| -> String {
        let p = tmp.path().join(name);
        std::fs::write(&p, data).unwrap();
        let e = Weights::open(&p).err().expect("must fail").to_string();
        assert!(e.contains(name), "the error names the file: {e}");
        e
    };

    // Cut off in the tensor data: the download was interrupted.
    let e = err_of("cut.gguf", &bytes[..bytes.len() - 1000]);
    assert!(e.contains("truncated") && e.contains("re-download"), "{e}");
    // Cut off inside the header.
    let e = err_of("header.gguf", &bytes[..200]);
    assert!(
        e.contains("cannot read GGUF") && e.contains("header"),
        "{e}"
    );
    // Not GGUF at all.
    let e = err_of("text.gguf", b"this is not a model\n");
    assert!(e.contains("no GGUF magic"), "{e}");
    // A tensor type without a dequantizer (20 = IQ4_NL): patch the first tensor's type id.
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor info");
    let ty_at = at + name.len() + 4 + 2 * 8;
    let mut patched = bytes.clone();
    assert_eq!(patched[ty_at..ty_at + 4], 0u32.to_le_bytes(), "F32 type id");
    patched[ty_at..ty_at + 4].copy_from_slice(&20u32.to_le_bytes());
    let e = err_of("iq.gguf", &patched);
    assert!(e.contains("type 20") && e.contains("Q4_1"), "{e}");
    // An architecture this crate cannot run.
    let other = tmp.path().join("gpt2.gguf");
    write_fixture_gguf(&src, &other, "gpt2", |_, _| GgmlDType::F32);
    let e = Weights::open(&other).err().unwrap().to_string();
    assert!(
        e.contains("architecture `gpt2` is not supported") && e.contains("llama"),
        "{e}"
    );
    let e = ModelConfig::from_dir(&other).unwrap_err().to_string();
    assert!(e.contains("`gpt2`"), "{e}");
    // A .gguf that does not exist.
    let e = resolve_model_dir(tmp.path().join("none.gguf").to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("none.gguf") && e.contains("does not exist"),
        "{e}"
    );
}
