//! Short training runs on the tiny fixture model: the loss goes down, a resumed run is the
//! uninterrupted run, checkpoints are pruned and trusted only when complete, and a checkpoint
//! of another model is refused before any step.

use std::path::Path;

use candle_core::{DType, Device};
use corda_core::adapter::Adapter;
use corda_core::data::{build_sft_examples, load_rows, SftExample, SftOptions, Split};
use corda_core::layout::CORDA_INIT_DIR;
use corda_core::model::{CausalLM, LoadOptions, TokenizerInfo};
use corda_core::train::{
    causal_lm_loss, list_checkpoints, plain_lora_adapter, ResumeFrom, SaveStrategy, SchedulerType,
    StepLog, TrainConfig, TrainOutcome, Trainer,
};

use corda_testdata::peft_tiny_llama as fixtures;

fn examples() -> (Vec<SftExample>, u32) {
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
    (
        build_sft_examples(&rows, &tok.tokenizer, &opts).unwrap(),
        tok.eos_id.unwrap(),
    )
}

fn corda_model() -> (CausalLM, Adapter) {
    let root = fixtures().join("kpm");
    let mut model = CausalLM::load(&root.join("residual-model"), &LoadOptions::default()).unwrap();
    let adapter = Adapter::load(&root.join(CORDA_INIT_DIR)).unwrap();
    adapter.attach_to(&mut model).unwrap();
    (model, adapter)
}

fn quiet(dir: &Path) -> TrainConfig {
    let mut c = TrainConfig::new(dir);
    c.progress = false;
    c.print_logs = false;
    c
}

fn run(cfg: TrainConfig, stop_at: Option<u64>) -> corda_core::Result<TrainOutcome> {
    let (ex, pad) = examples();
    let (model, adapter) = corda_model();
    let trainer = Trainer::new(&model, &ex, pad, adapter.config.clone(), cfg)?;
    match stop_at {
        Some(k) => trainer.on_step(move |s| s.global_step >= k).train(),
        None => trainer.train(),
    }
}

fn logs(o: &TrainOutcome) -> Vec<StepLog> {
    o.state.step_logs().cloned().collect()
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    Adapter::load(dir)
        .unwrap()
        .modules
        .into_iter()
        .flat_map(|(m, p)| {
            [
                (
                    format!("{m}.A"),
                    p.a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                ),
                (
                    format!("{m}.B"),
                    p.b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                ),
            ]
        })
        .collect()
}

#[test]
fn short_run_lowers_the_loss() {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = quiet(out.path());
    cfg.per_device_train_batch_size = 4;
    cfg.num_train_epochs = 3.0;
    cfg.learning_rate = 1e-2;
    cfg.lr_scheduler_type = SchedulerType::Constant;
    cfg.logging_steps = 1;
    cfg.save_strategy = SaveStrategy::No;
    let o = run(cfg, None).unwrap();
    let l = logs(&o);
    assert_eq!(l.len(), 12, "16 rows / 4 per step * 3 epochs");
    let first: f64 = l[..4].iter().map(|s| s.loss).sum::<f64>() / 4.0;
    let last: f64 = l[8..].iter().map(|s| s.loss).sum::<f64>() / 4.0;
    eprintln!("epoch 1 mean loss {first:.4}, epoch 3 mean loss {last:.4}");
    assert!(
        last < first - 0.2,
        "loss did not go down: {first} -> {last}"
    );
    assert!((l[11].epoch - 3.0).abs() < 1e-12);
    assert!(o.tokens_per_second() > 0.0);
    assert!(list_checkpoints(out.path()).unwrap().is_empty());
}

fn resume_config(dir: &Path) -> TrainConfig {
    let mut c = quiet(dir);
    c.per_device_train_batch_size = 2;
    c.gradient_accumulation_steps = 2; // 8 micro-batches, 4 steps per epoch
    c.max_steps = Some(6); // crosses the epoch boundary after step 4
    c.learning_rate = 1e-2;
    c.weight_decay = 0.01;
    c.lr_scheduler_type = SchedulerType::Cosine;
    c.warmup_steps = 2.0;
    c.logging_steps = 2; // the checkpoint at step 3 falls inside a logging window
    c.save_steps = 3;
    c.save_total_limit = Some(1);
    c
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let full_dir = tempfile::tempdir().unwrap();
    let full = run(resume_config(full_dir.path()), None).unwrap();
    let steps: Vec<u64> = list_checkpoints(full_dir.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![6], "save_total_limit 1 keeps only the newest");

    let dir = tempfile::tempdir().unwrap();
    let stopped = run(resume_config(dir.path()), Some(5)).unwrap();
    assert_eq!(stopped.state.global_step, 5);
    // Leftovers of an interrupted save and an incomplete directory are never resumed from.
    std::fs::create_dir(dir.path().join(".checkpoint-6.tmp-999999999")).unwrap();
    std::fs::create_dir(dir.path().join("checkpoint-5")).unwrap();
    std::fs::copy(
        dir.path().join("checkpoint-3/adapter_config.json"),
        dir.path().join("checkpoint-5/adapter_config.json"),
    )
    .unwrap();

    let mut cfg = resume_config(dir.path());
    cfg.resume_from_checkpoint = Some(ResumeFrom::Latest);
    let resumed = run(cfg, None).unwrap();
    assert_eq!(
        resumed.resumed_from.as_deref(),
        Some(dir.path().join("checkpoint-3").as_path())
    );
    assert_eq!(resumed.steps_this_run, 3);
    assert!(!dir.path().join(".checkpoint-6.tmp-999999999").exists());

    let (a, b) = (logs(&full), logs(&resumed));
    assert_eq!(a.len(), 3);
    assert_eq!(a.iter().map(|s| s.step).collect::<Vec<_>>(), vec![2, 4, 6]);
    assert_eq!(b.iter().map(|s| s.step).collect::<Vec<_>>(), vec![2, 4, 6]);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (x.loss, x.grad_norm, x.learning_rate, x.epoch),
            (y.loss, y.grad_norm, y.learning_rate, y.epoch)
        );
    }
    let summary = |o: &TrainOutcome| match o.state.log_history.last() {
        Some(corda_core::train::LogEntry::Summary(s)) => s.train_loss,
        other => panic!("no summary: {other:?}"),
    };
    assert_eq!(summary(&full), summary(&resumed));
    assert_eq!(
        adapter_tensors(&full.adapter_dir),
        adapter_tensors(&resumed.adapter_dir)
    );
}

#[test]
fn epoch_strategy_saves_at_epoch_ends_and_at_the_last_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = resume_config(dir.path());
    cfg.save_strategy = SaveStrategy::Epoch;
    cfg.save_total_limit = None;
    run(cfg, None).unwrap();
    let steps: Vec<u64> = list_checkpoints(dir.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![4, 6]);
}

#[test]
fn checkpoint_of_another_model_is_refused_before_training() {
    // A plain LoRA of rank 4 on the base model writes a checkpoint...
    let (ex, pad) = examples();
    let mut base = CausalLM::load(&fixtures().join("base-model"), &LoadOptions::default()).unwrap();
    let lora = plain_lora_adapter(&base.target_shapes(), 4, 42).unwrap();
    lora.attach_to(&mut base).unwrap();
    let other = tempfile::tempdir().unwrap();
    let mut cfg = quiet(other.path());
    cfg.per_device_train_batch_size = 4;
    cfg.max_steps = Some(1);
    cfg.save_steps = 1;
    Trainer::new(&base, &ex, pad, lora.config.clone(), cfg)
        .unwrap()
        .train()
        .unwrap();
    let ckpt = other.path().join("checkpoint-1");
    assert!(ckpt.is_dir());

    // ... which a CorDA (rank 8) run must not resume from.
    let out = tempfile::tempdir().unwrap();
    let mut cfg = quiet(out.path());
    cfg.resume_from_checkpoint = Some(ResumeFrom::Path(ckpt));
    let err = run(cfg, None).expect_err("must fail").to_string();
    assert!(err.contains("does not belong to this model"), "{err}");
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "nothing written before the error"
    );
}

#[test]
fn plain_lora_starts_at_the_base_model() {
    let (ex, pad) = examples();
    let dir = fixtures().join("base-model");
    let plain = CausalLM::load(&dir, &LoadOptions::default()).unwrap();
    let first: Vec<SftExample> = ex[..3].to_vec();
    let batch = corda_core::data::collate(&first, pad)
        .unwrap()
        .to_tensors(&Device::Cpu, DType::U8)
        .unwrap();
    let base_loss = causal_lm_loss(
        &plain
            .forward(&batch.input_ids, Some(&batch.attention_mask))
            .unwrap(),
        &batch.labels,
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap() as f64;

    let mut model = CausalLM::load(&dir, &LoadOptions::default()).unwrap();
    let lora = plain_lora_adapter(&model.target_shapes(), 4, 1).unwrap();
    lora.attach_to(&mut model).unwrap();
    let with = causal_lm_loss(
        &model
            .forward(&batch.input_ids, Some(&batch.attention_mask))
            .unwrap(),
        &batch.labels,
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap() as f64;
    assert_eq!(
        base_loss, with,
        "B = 0: the plain LoRA starts exactly at the base model"
    );
}

#[test]
fn accumulation_matches_one_large_batch() {
    // With transformers' token-count normalisation, 4 x 1, 2 x 2 and 1 x 4 (batch x
    // accumulation) give the same step loss and gradient norm over the same examples.
    let mut logs_by_split = Vec::new();
    for (b, acc) in [(4, 1), (2, 2), (1, 4)] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = quiet(dir.path());
        cfg.per_device_train_batch_size = b;
        cfg.gradient_accumulation_steps = acc;
        cfg.max_steps = Some(2);
        cfg.logging_steps = 1;
        cfg.learning_rate = 1e-2;
        cfg.lr_scheduler_type = SchedulerType::Constant;
        cfg.save_strategy = SaveStrategy::No;
        logs_by_split.push(logs(&run(cfg, None).unwrap()));
    }
    let reference = &logs_by_split[0];
    for other in &logs_by_split[1..] {
        for (x, y) in reference.iter().zip(other) {
            assert!(
                (x.loss - y.loss).abs() / x.loss < 1e-5,
                "{} vs {}",
                x.loss,
                y.loss
            );
            assert!(
                (x.grad_norm - y.grad_norm).abs() / x.grad_norm < 1e-4,
                "{} vs {}",
                x.grad_norm,
                y.grad_norm
            );
        }
    }
}
