//! Gradient checkpointing (`gradient_checkpointing`): recomputing each decoder layer in the
//! backward pass gives the gradients of the plain pass, and a short run with it takes the same
//! steps (losses, gradient norms, trained factors) as one without it.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use corda_core::adapter::Adapter;
use corda_core::data::{build_sft_examples, load_rows, SftOptions, Split};
use corda_core::layout::CORDA_INIT_DIR;
use corda_core::model::{CausalLM, LoadOptions, TokenizerInfo};
use corda_core::train::{
    Gradients, MicroBatch, SaveStrategy, StepLog, TrainConfig, TrainOutcome, TrainableModel,
    Trainer,
};
use corda_core::util::PhaseReport;

use corda_testdata::peft_tiny_llama as fixtures;

fn model() -> (CausalLM, Adapter) {
    let root = fixtures().join("kpm");
    let mut model = CausalLM::load(&root.join("residual-model"), &LoadOptions::default()).unwrap();
    let adapter = Adapter::load(&root.join(CORDA_INIT_DIR)).unwrap();
    adapter.attach_to(&mut model).unwrap();
    (model, adapter)
}

/// The loss and every factor's gradient for the stored PEFT training batch.
fn loss_and_grads(checkpoint: bool) -> (f64, Vec<Tensor>) {
    let (model, _) = model();
    let step =
        candle_core::safetensors::load(fixtures().join("kpm/train_step.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = step["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = step["attention_mask"].to_dtype(DType::U8).unwrap();
    let batch = MicroBatch {
        input_ids: &ids,
        attention_mask: &mask,
        labels: &step["labels"],
    };
    let vars: Vec<_> = model
        .lora_vars()
        .into_iter()
        .flat_map(|(_, a, b)| [a, b])
        .collect();
    let mut grads = Gradients::new(vars.len());
    let mut report = PhaseReport::new();
    let loss = model
        .forward_backward(
            &batch,
            &|n| n as f64,
            checkpoint,
            &vars,
            &mut grads,
            &mut report,
        )
        .unwrap()
        .expect("the batch has target tokens");
    let grads = grads
        .as_slice()
        .iter()
        .map(|g| g.clone().expect("every factor gets a gradient"))
        .collect();
    (loss, grads)
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30) as f64;
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64 / scale)
        .fold(0.0, f64::max)
}

#[test]
fn recomputed_layers_give_the_plain_gradients() {
    let (loss, plain) = loss_and_grads(false);
    let (loss_ck, ck) = loss_and_grads(true);
    assert_eq!(plain.len(), ck.len());
    assert!(plain.len() >= 14, "a factor pair per target of two layers");
    assert!(
        (loss - loss_ck).abs() <= 1e-7 * loss.abs(),
        "loss {loss} vs {loss_ck}"
    );
    let mut worst = 0.0f64;
    for (p, c) in plain.iter().zip(&ck) {
        assert_eq!(p.dims(), c.dims());
        worst = worst.max(max_rel_diff(c, p));
    }
    eprintln!("worst relative gradient difference with checkpointing: {worst:e}");
    assert!(worst <= 1e-6, "gradients differ by {worst}");
}

fn run(dir: &Path, checkpoint: bool) -> TrainOutcome {
    let root = fixtures();
    let tok = TokenizerInfo::load(&root.join("base-model")).unwrap();
    let rows = load_rows(
        root.join("data/math.jsonl").to_str().unwrap(),
        &Split::parse("train").unwrap(),
        None,
    )
    .unwrap();
    let opts = SftOptions {
        query_field: "query".into(),
        response_field: "response".into(),
        model_max_length: 192,
        eos_token: tok.eos_token.clone().unwrap(),
    };
    let ex = build_sft_examples(&rows, &tok.tokenizer, &opts).unwrap();
    let (model, adapter) = model();
    let mut cfg = TrainConfig::new(dir);
    cfg.progress = false;
    cfg.print_logs = false;
    cfg.per_device_train_batch_size = 2;
    cfg.gradient_accumulation_steps = 2;
    cfg.max_steps = Some(3);
    cfg.learning_rate = 1e-2;
    cfg.logging_steps = 1;
    cfg.save_strategy = SaveStrategy::No;
    cfg.gradient_checkpointing = checkpoint;
    Trainer::new(
        &model,
        &ex,
        tok.eos_id.unwrap(),
        adapter.config.clone(),
        cfg,
    )
    .unwrap()
    .train()
    .unwrap()
}

#[test]
fn a_checkpointed_run_takes_the_same_steps() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (plain, ck) = (run(d1.path(), false), run(d2.path(), true));
    let logs = |o: &TrainOutcome| o.state.step_logs().cloned().collect::<Vec<StepLog>>();
    let (a, b) = (logs(&plain), logs(&ck));
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x.loss - y.loss).abs() <= 1e-6 * x.loss.abs(),
            "step {}: loss {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
        assert!(
            (x.grad_norm - y.grad_norm).abs() <= 1e-5 * x.grad_norm.abs(),
            "step {}: grad norm {} vs {}",
            x.step,
            x.grad_norm,
            y.grad_norm
        );
    }
    let (fa, fb) = (
        Adapter::load(&plain.adapter_dir).unwrap(),
        Adapter::load(&ck.adapter_dir).unwrap(),
    );
    for (m, p) in &fa.modules {
        let q = &fb.modules[m];
        assert!(max_rel_diff(&q.a, &p.a) <= 1e-5, "{m} A");
        assert!(max_rel_diff(&q.b, &p.b) <= 1e-5, "{m} B");
    }
}
