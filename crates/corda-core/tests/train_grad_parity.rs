//! One training step on the CorDA-initialised fixture model against PEFT: the loss and the
//! gradient of every LoRA factor, for the batch stored in `train_step.safetensors`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use corda_core::adapter::Adapter;
use corda_core::data::{build_sft_examples, load_rows, SftOptions, Split};
use corda_core::layout::CORDA_INIT_DIR;
use corda_core::model::{CausalLM, LoadOptions, TokenizerInfo};
use corda_core::train::{
    causal_lm_loss, factor_names, LogEntry, SaveStrategy, TrainConfig, Trainer, TRAINER_STATE_FILE,
};

use corda_testdata::peft_tiny_llama as fixtures;

fn load_step(mode: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(mode).join("train_step.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn model_with_adapter(mode: &str, dtype: DType) -> CausalLM {
    let root = fixtures().join(mode);
    let opts = LoadOptions {
        dtype: Some(dtype),
        device: Device::Cpu,
    };
    let mut model = CausalLM::load(&root.join("residual-model"), &opts).unwrap();
    Adapter::load(&root.join(CORDA_INIT_DIR))
        .unwrap()
        .attach_to(&mut model)
        .unwrap();
    model
}

fn frob(t: &Tensor) -> f64 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt() as f64
}

/// (relative loss error, worst relative gradient error, number of gradients compared)
fn parity(mode: &str, dtype: DType) -> (f64, f64, usize) {
    let step = load_step(mode);
    let model = model_with_adapter(mode, dtype);
    let ids = step["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = step["attention_mask"].to_dtype(DType::U8).unwrap();
    let labels = &step["labels"];
    let logits = model.forward(&ids, Some(&mask)).unwrap();
    let loss = causal_lm_loss(&logits, labels).unwrap();
    let want = step["loss"]
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    let loss_err = (got - want).abs() / want.abs();

    let grads = loss.backward().unwrap();
    let mut worst = 0.0f64;
    let mut n = 0;
    for (module, a, b) in model.lora_vars() {
        let (ka, kb) = factor_names(&module);
        for (key, var) in [(ka, a), (kb, b)] {
            let reference = step
                .get(&key)
                .unwrap_or_else(|| panic!("{mode}: no stored gradient {key}"));
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{mode}: no gradient for {key}"));
            assert_eq!(g.dims(), reference.dims(), "{key}");
            let err = frob(&(g - reference).unwrap()) / frob(reference);
            assert!(err.is_finite(), "{key}");
            worst = worst.max(err);
            n += 1;
        }
    }
    (loss_err, worst, n)
}

#[test]
fn loss_and_lora_gradients_match_peft() {
    for mode in ["kpm", "ipm"] {
        let (loss_err, grad_err, n) = parity(mode, DType::F32);
        eprintln!("{mode}: loss rel err {loss_err:e}, worst grad rel err {grad_err:e}");
        assert_eq!(n, 28, "{mode}: every lora_A / lora_B of the 14 modules");
        assert!(loss_err < 1e-5, "{mode}: loss relative error {loss_err:e}");
        assert!(
            grad_err < 1e-4,
            "{mode}: worst gradient relative error {grad_err:e}"
        );
    }
}

#[test]
fn bf16_base_weights_stay_close() {
    // The frozen weights in bfloat16 change the numbers at the bf16 rounding level only.
    let (loss_err, grad_err, _) = parity("kpm", DType::BF16);
    eprintln!("bf16: loss rel err {loss_err:e}, worst grad rel err {grad_err:e}");
    assert!(loss_err < 1e-2, "loss relative error {loss_err:e}");
    assert!(grad_err < 0.1, "worst gradient relative error {grad_err:e}");
}

/// The same step through the whole pipeline (rows -> tokens -> trainer): the logged loss is
/// PEFT's loss and the logged grad_norm the norm of PEFT's gradients.
#[test]
fn trainer_first_step_logs_peft_loss_and_grad_norm() {
    let root = fixtures();
    let step = load_step("kpm");
    let tok = TokenizerInfo::load(&root.join("base-model")).unwrap();
    let rows = load_rows(
        root.join("data/math.jsonl").to_str().unwrap(),
        &Split::parse("train[:3]").unwrap(),
        None,
    )
    .unwrap();
    let opts = SftOptions {
        query_field: "query".into(),
        response_field: "response".into(),
        model_max_length: 192,
        eos_token: tok.eos_token.clone().unwrap(),
    };
    let examples = build_sft_examples(&rows, &tok.tokenizer, &opts).unwrap();
    let model = model_with_adapter("kpm", DType::F32);
    let adapter = Adapter::load(&root.join("kpm/corda_init")).unwrap();

    let out = tempfile::tempdir().unwrap();
    let mut cfg = TrainConfig::new(out.path());
    cfg.per_device_train_batch_size = 3;
    cfg.max_steps = Some(1);
    cfg.logging_steps = 1;
    cfg.save_strategy = SaveStrategy::No;
    cfg.progress = false;
    cfg.print_logs = false;
    let outcome = Trainer::new(
        &model,
        &examples,
        tok.eos_id.unwrap(),
        adapter.config.clone(),
        cfg,
    )
    .unwrap()
    .train()
    .unwrap();
    let log = outcome.state.step_logs().next().unwrap().clone();
    let want_loss = step["loss"]
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert!(
        (log.loss - want_loss).abs() / want_loss < 1e-5,
        "{} vs {want_loss}",
        log.loss
    );
    let want_norm = step
        .iter()
        .filter(|(k, _)| k.ends_with(".weight"))
        .map(|(_, t)| frob(t).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        (log.grad_norm - want_norm).abs() / want_norm < 1e-4,
        "{} vs {want_norm}",
        log.grad_norm
    );
    assert_eq!(log.step, 1);
    assert_eq!(log.epoch, 1.0);
    // The default linear schedule without warmup: lr(1) = 5e-5 * (1 - 1/1) = 0.
    assert_eq!(log.learning_rate, 0.0);

    // Outputs: PEFT-format adapter with init_lora_weights true, trainer_state, loss curve.
    let ft = Adapter::load(&outcome.adapter_dir).unwrap();
    assert_eq!(ft.config.init_lora_weights, serde_json::Value::Bool(true));
    assert_eq!(ft.modules.len(), 14);
    assert!(out.path().join(TRAINER_STATE_FILE).is_file());
    assert!(std::fs::read_to_string(&outcome.loss_curve)
        .unwrap()
        .contains("<polyline"));
    assert!(matches!(
        outcome.state.log_history.last(),
        Some(LogEntry::Summary(_))
    ));
}
