//! The `corda-finetune` binary on the tiny fixture: a CorDA run and a plain-LoRA run write the
//! expected outputs, and bad input fails with a clear message before any training.

#[path = "../../../tests/support/hub_server.rs"]
mod hub_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use corda_core::layout::CORDA_INIT_DIR;
use corda_testdata::peft_tiny_llama as fixtures;
use hub_server::{hub_command, FakeRepo, HubServer};

/// A corda-preprocess-like output directory: residual model + corda_init (+ tokenizer).
fn corda_out(root: &Path) -> PathBuf {
    corda_out_of(root, "OUT", "kpm")
}

/// [`corda_out`] of the fixture's `method` (`kpm` or `ipm`) run, in `root/name`.
fn corda_out_of(root: &Path, name: &str, method: &str) -> PathBuf {
    let out = root.join(name);
    std::fs::create_dir_all(out.join(CORDA_INIT_DIR)).unwrap();
    let kpm = fixtures().join(method);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(kpm.join("residual-model").join(f), out.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("base-model").join(f), out.join(f)).unwrap();
    }
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            kpm.join(CORDA_INIT_DIR).join(f),
            out.join(CORDA_INIT_DIR).join(f),
        )
        .unwrap();
    }
    out
}

fn finetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corda-finetune"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn math() -> String {
    fixtures().join("data/math.jsonl").display().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A command line that works, with `extra` appended (later flags win).
fn base_args<'a>(model: &'a str, out: &'a str, data: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--model_name_or_path",
        model,
        "--output_dir",
        out,
        "--data_path",
        data,
        "--dataset_split",
        "train",
        "--dataset_field",
        "query",
        "response",
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "2",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--model_max_length",
        "192",
    ];
    v.extend_from_slice(extra);
    v
}

fn assert_nothing_trained(out: &Path) {
    if out.exists() {
        let names: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.is_empty(),
            "output written before the error: {names:?}"
        );
    }
}

#[test]
fn corda_run_writes_adapter_state_curve_and_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = corda_out(tmp.path());
    let ft = tmp.path().join("FT");
    let (m, f, d) = (model.to_str().unwrap(), ft.to_str().unwrap(), math());
    let o = finetune(&base_args(
        m,
        f,
        &d,
        &[
            "--corda_mode",
            "True",
            "--bf16",
            "--report_to",
            "none",
            "--lr_scheduler_type",
            "cosine",
            "--warmup_ratio",
            "0.03",
        ],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    for p in [
        "ft/adapter_model.safetensors",
        "ft/adapter_config.json",
        "trainer_state.json",
        "loss.svg",
    ] {
        assert!(ft.join(p).is_file(), "missing {p}");
    }
    for p in [
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "scheduler.json",
        "rng_state.json",
        "trainer_state.json",
    ] {
        assert!(
            ft.join("checkpoint-2").join(p).is_file(),
            "missing checkpoint-2/{p}"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ft.join("ft/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["init_lora_weights"], serde_json::Value::Bool(true));
    assert_eq!(cfg["r"], 8);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ft.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], 2);
    let first = &state["log_history"][0];
    for k in [
        "loss",
        "grad_norm",
        "learning_rate",
        "epoch",
        "step",
        "tokens_per_second",
    ] {
        assert!(first.get(k).is_some(), "log entry lacks {k}: {first}");
    }
    assert!(stderr(&o).contains("tokens/s"), "{}", stderr(&o));

    // Resuming the finished run continues from checkpoint-2 and ends at once.
    let o = finetune(&base_args(m, f, &d, &["--resume_from_checkpoint"]));
    assert!(o.status.success(), "{}", stderr(&o));

    // A fresh run into the finished one is refused and leaves it alone...
    let o = finetune(&base_args(m, f, &d, &[]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--overwrite_output_dir"),
        "{}",
        stderr(&o)
    );
    assert!(ft.join("checkpoint-2").is_dir() && ft.join("ft").is_dir());
    // ...unless --overwrite_output_dir, which replaces the previous run's outputs.
    std::fs::write(ft.join("notes.txt"), "mine").unwrap();
    let o = finetune(&base_args(
        m,
        f,
        &d,
        &[
            "--overwrite_output_dir",
            "--max_steps",
            "1",
            "--save_steps",
            "1",
        ],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!ft.join("checkpoint-2").exists() && ft.join("checkpoint-1").is_dir());
    assert!(ft.join("notes.txt").is_file(), "files of the user are kept");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ft.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], 1);
}

#[test]
fn plain_lora_run_and_foreign_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("base-model");
    let lora_ft = tmp.path().join("LORA");
    let d = math();
    let o = finetune(&base_args(
        base.to_str().unwrap(),
        lora_ft.to_str().unwrap(),
        &d,
        &[
            "--corda_mode",
            "False",
            "--lora_r",
            "4",
            "--gradient_checkpointing",
            "True",
        ],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    // The flag reaches the training loop (and is recorded with the checkpoint).
    let args: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lora_ft.join("checkpoint-2/training_args.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(args["gradient_checkpointing"].as_bool(), Some(true));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lora_ft.join("ft/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()),
        (Some(4), Some(4.0))
    );
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);

    // A CorDA run must refuse the plain-LoRA checkpoint before training.
    let model = corda_out(tmp.path());
    let ft = tmp.path().join("FT");
    let ckpt = lora_ft.join("checkpoint-2");
    let o = finetune(&base_args(
        model.to_str().unwrap(),
        ft.to_str().unwrap(),
        &d,
        &["--resume_from_checkpoint", ckpt.to_str().unwrap()],
    ));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not belong to this model"),
        "{}",
        stderr(&o)
    );
    assert_nothing_trained(&ft);
}

#[test]
fn bad_input_fails_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let model = corda_out(tmp.path());
    let ft = tmp.path().join("FT");
    let (m, f, d) = (model.to_str().unwrap(), ft.to_str().unwrap(), math());
    let base = fixtures().join("base-model");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            base_args(m, f, &d, &["--dataset_field", "question", "response"]),
            "question",
        ),
        (
            base_args(m, f, &d, &["--dataset_split", "train[5:5]"]),
            "no rows",
        ),
        (
            base_args(m, f, &d, &["--dataset_split", "train[100:200]"]),
            "train[100:200]",
        ),
        (
            base_args(base.to_str().unwrap(), f, &d, &["--corda_mode", "True"]),
            "corda_init",
        ),
        (base_args(m, f, &d, &["--corda_mode", "false"]), "--lora_r"),
        (base_args(m, f, "missing.jsonl", &[]), "missing.jsonl"),
        (
            base_args(m, f, &d, &["--resume_from_checkpoint", "True"]),
            "no valid checkpoint",
        ),
        (
            base_args(m, f, &d, &["--model_max_length", "20"]),
            "model_max_length",
        ),
        (
            base_args(m, f, &d, &["--tf32", "True", "--device", "cpu"]),
            "--tf32 True needs a CUDA device",
        ),
        (
            base_args(m, f, &d, &["--learning_rate", "-1"]),
            "learning_rate must be a non-negative number",
        ),
        (
            base_args(m, f, &d, &["--learning_rate", "nan"]),
            "learning_rate must be a non-negative number",
        ),
        (
            base_args(m, f, &d, &["--per_device_train_batch_size", "0"]),
            "per_device_train_batch_size must be at least 1",
        ),
        // Issue 14 case 9: negative numbers reach the flag's range check (they were "unexpected
        // argument '-1'"), with --max_steps set too; non-finite values are refused.
        (
            base_args(m, f, &d, &["--num_train_epochs", "-1"]),
            "num_train_epochs must be a finite number above 0",
        ),
        (
            base_args(m, f, &d, &["--adam_epsilon", "-1"]),
            "adam_epsilon must be a finite non-negative number",
        ),
        (
            base_args(m, f, &d, &["--weight_decay", "inf"]),
            "weight_decay must be a finite non-negative number",
        ),
        (
            base_args(m, f, &d, &["--max_grad_norm", "inf"]),
            "max_grad_norm must be a finite non-negative number",
        ),
        (
            base_args(m, f, &d, &["--warmup_ratio", "-0.5"]),
            "warmup_ratio (-0.5) must be non-negative",
        ),
    ];
    for (args, needle) in cases {
        let o = finetune(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(needle),
            "{args:?}: expected `{needle}` in: {err}"
        );
        assert_nothing_trained(&ft);
    }
}

#[test]
fn config_file_with_command_line_override() {
    let tmp = tempfile::tempdir().unwrap();
    let model = corda_out(tmp.path());
    let ft = tmp.path().join("FT");
    let cfg = tmp.path().join("run.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model_name_or_path: {}\noutput_dir: {}\ndata_path: {}\ndataset_split: \"train[:8]\"\n\
             dataset_field: [query, response]\ncorda_mode: true\nbf16: true\nmax_steps: 1\n\
             per_device_train_batch_size: 4\nsave_strategy: \"no\"\nmodel_max_length: 192\n",
            model.display(),
            ft.display(),
            math()
        ),
    )
    .unwrap();
    let o = finetune(&["--config", cfg.to_str().unwrap(), "--max_steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ft.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(
        state["global_step"], 2,
        "the command line wins over the file"
    );
    assert!(
        list_dirs(&ft).iter().all(|n| !n.starts_with("checkpoint-")),
        "save_strategy no"
    );
}

/// corda-finetune against the local hub `server`, with `home` as HF_HOME.
fn hub_finetune(server: &HubServer, home: &Path, args: &[String], env: &[(&str, &str)]) -> Output {
    hub_command(env!("CARGO_BIN_EXE_corda-finetune"), server, home)
        .env("RUST_LOG", "warn")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `--data_path owner/name` from a hub: one training step on 8 rows.
fn hub_args(model: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = base_args(
        model.to_str().unwrap(),
        out.to_str().unwrap(),
        "meta-math/MetaMathQA",
        &[
            "--dataset_split",
            "train[:8]",
            "--max_steps",
            "1",
            "--disable_tqdm",
        ],
    )
    .into_iter()
    .map(str::to_string)
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn data_path_hub_id_downloads_the_parquet_split_then_runs_offline() {
    let math = std::fs::read(fixtures().join("data/math.parquet")).unwrap();
    let server = HubServer::start(vec![FakeRepo::new("datasets", "meta-math/MetaMathQA")
        .revision("main", [("README.md".to_string(), b"card".to_vec())].into())
        .revision(
            "refs/convert/parquet",
            [("default/train/0000.parquet".to_string(), math)].into(),
        )]);
    let home = tempfile::tempdir().unwrap();
    let model = corda_out(home.path());
    let out = home.path().join("ft-online");
    let o = hub_finetune(&server, home.path(), &hub_args(&model, &out, &[]), &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert!(out.join("ft/adapter_model.safetensors").is_file(), "{err}");
    assert!(home
        .path()
        .join("hub/datasets--meta-math--MetaMathQA/refs/refs/convert/parquet")
        .is_file());

    server.clear_seen();
    let out = home.path().join("ft-offline");
    let o = hub_finetune(
        &server,
        home.path(),
        &hub_args(&model, &out, &[]),
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(server.seen().is_empty(), "{:?}", server.seen());

    // --revision is for hub model ids; a local model directory with it is refused up front.
    let out = home.path().join("ft-pinned");
    let o = hub_finetune(
        &server,
        home.path(),
        &hub_args(&model, &out, &["--revision", "v1"]),
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("local directory"),
        "{err}"
    );
    assert!(!out.join("ft").exists());
}

fn list_dirs(p: &Path) -> Vec<String> {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Issue 14 case 7: `--learning_rate 1e6` used to exit 0 with factors around 3e6 and the loss
/// pinned at ln(vocab); now the run stops at the first diverged step, saving no adapter.
#[test]
fn a_diverged_run_fails_instead_of_passing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = corda_out(tmp.path());
    let ft = tmp.path().join("FT");
    let (m, f, d) = (model.to_str().unwrap(), ft.to_str().unwrap(), math());
    let o = finetune(&base_args(
        m,
        f,
        &d,
        &[
            "--learning_rate",
            "1e6",
            "--max_steps",
            "10",
            "--save_steps",
            "1",
        ],
    ));
    let err = stderr(&o);
    assert!(!o.status.success(), "a diverged run passed: {err}");
    assert!(
        err.contains("training diverged at step 1") && err.contains("learning_rate"),
        "{err}"
    );
    assert!(!ft.join("ft").exists() && !ft.join("checkpoint-1").exists());
}

/// A finetune child whose stderr is read until its first logged step; later stderr lines
/// arrive on the receiver.
fn started_training(args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_corda-finetune"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines
            .next()
            .expect("the run ended before its first step")
            .unwrap();
        if line.contains("\"loss\"") {
            break;
        }
    }
    // Keep draining stderr so the child never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

fn interrupt(child: &std::process::Child) {
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Issue 14 case 11: the first SIGINT finishes the step, writes a resumable checkpoint and
/// exits non-zero saying how to resume; the resumed run completes. A second SIGINT aborts at
/// once, leaving no temporaries and no lock.
#[test]
fn ctrl_c_saves_a_resumable_checkpoint_and_twice_aborts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = corda_out(tmp.path());
    let ft = tmp.path().join("FT");
    let (m, f, d) = (model.to_str().unwrap(), ft.to_str().unwrap(), math());
    let long = ["--max_steps", "1000", "--save_strategy", "no"];
    let (child, _) = started_training(&base_args(m, f, &d, &long));
    interrupt(&child);
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    let ckpts: Vec<String> = list_dirs(&ft)
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpts.len(), 1, "{:?}", list_dirs(&ft));
    let step: u64 = ckpts[0]["checkpoint-".len()..].parse().unwrap();
    assert!((1..1000).contains(&step));
    assert!(
        !ft.join("ft").exists(),
        "an interrupted run wrote a final adapter"
    );
    let ckpt = ft.join(&ckpts[0]);
    let next = (step + 1).to_string();
    let c = ckpt.to_str().unwrap();
    let o = finetune(&base_args(
        m,
        f,
        &d,
        &["--max_steps", &next, "--resume_from_checkpoint", c],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ft.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], step + 1);
    assert!(ft.join("ft/adapter_model.safetensors").is_file());
    // The initial adapter's fingerprint travels with every trained adapter (issue 14 case 8).
    assert!(ckpt.join("corda_provenance.json").is_file());
    assert!(ft.join("ft/corda_provenance.json").is_file());

    let ft2 = tmp.path().join("FT2");
    let f2 = ft2.to_str().unwrap();
    // Longer steps, so that the second interrupt lands inside the step the first one lets finish.
    let slow = [&long[..], &["--gradient_accumulation_steps", "8"]].concat();
    let (child, lines) = started_training(&base_args(m, f2, &d, &slow));
    interrupt(&child);
    // Two signals sent at once may merge into one: wait until the first was taken.
    while !lines.recv().unwrap().contains("interrupt again") {}
    interrupt(&child);
    let status = child.wait_with_output().unwrap().status;
    assert_eq!(status.code(), Some(130));
    assert!(
        list_dirs(&ft2).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        list_dirs(&ft2)
    );
    assert!(!tmp.path().join(".FT2.lock").exists());
}

/// Issue 14 case 6: a second run into an output directory in use is refused, naming the
/// process holding it; a lock file left by a dead process is taken over.
#[test]
fn a_locked_output_dir_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = corda_out(tmp.path());
    let ft = tmp.path().join("FT");
    let (m, f, d) = (model.to_str().unwrap(), ft.to_str().unwrap(), math());
    let lock = corda_core::util::process::OutputLock::acquire(&ft).unwrap();
    let o = finetune(&base_args(m, f, &d, &[]));
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("another corda run") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    assert_nothing_trained(&ft);
    let path = lock.path().to_path_buf();
    drop(lock);
    std::fs::write(&path, "999999999\n").unwrap();
    let o = finetune(&base_args(m, f, &d, &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!path.exists());
}

/// Issue 14 case 8 (finetune side): a checkpoint of a run trained from another residual model
/// (KPM vs IPM) or of a plain LoRA is not resumed on this model's initial adapter, and the
/// finished run's provenance stays as it was.
#[test]
fn resume_on_another_initial_adapter_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let kpm = corda_out_of(tmp.path(), "KPM", "kpm");
    let ipm = corda_out_of(tmp.path(), "IPM", "ipm");
    let ft = tmp.path().join("FT");
    let (f, d) = (ft.to_str().unwrap(), math());
    let o = finetune(&base_args(kpm.to_str().unwrap(), f, &d, &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let provenance = std::fs::read(ft.join("ft/corda_provenance.json")).unwrap();
    let ckpt = ft.join("checkpoint-2");
    let c = ckpt.to_str().unwrap();
    let base = fixtures().join("base-model");
    for (model, extra, expect) in [
        (
            ipm.to_str().unwrap(),
            vec![],
            "kpm initial adapter but this model's is ipm",
        ),
        (
            base.to_str().unwrap(),
            vec!["--corda_mode", "False", "--lora_r", "8"],
            "this run trains a plain LoRA",
        ),
    ] {
        let mut args = extra.clone();
        args.extend(["--resume_from_checkpoint", c, "--max_steps", "3"]);
        let o = finetune(&base_args(model, f, &d, &args));
        assert!(!o.status.success(), "resumed on {model}");
        let err = stderr(&o);
        assert!(
            err.contains(expect) && err.contains("checkpoint-2"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(ft.join("ft/corda_provenance.json")).unwrap(),
            provenance
        );
        assert!(!ft.join("checkpoint-3").exists());
    }
    // The model it was trained from resumes it.
    let o = finetune(&base_args(
        kpm.to_str().unwrap(),
        f,
        &d,
        &["--resume_from_checkpoint", c, "--max_steps", "3"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Issue 14 (minor, extras): a corda_init whose adapter_config.json says r 4 while its tensors
/// have rank 8 is refused before training (it trained and wrote an ft/ PEFT cannot load); an
/// --output_dir that is, contains or lies inside the model is refused too.
#[test]
fn inconsistent_initial_adapter_and_output_in_the_model_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = corda_out(tmp.path());
    let ft = tmp.path().join("FT");
    let (m, f, d) = (model.to_str().unwrap(), ft.to_str().unwrap(), math());
    let config = model.join(CORDA_INIT_DIR).join("adapter_config.json");
    let good = std::fs::read_to_string(&config).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&good).unwrap();
    cfg["r"] = 4.into();
    std::fs::write(&config, cfg.to_string()).unwrap();
    let o = finetune(&base_args(m, f, &d, &[]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("implies r = 4") && stderr(&o).contains("adapter_config.json"),
        "{}",
        stderr(&o)
    );
    assert_nothing_trained(&ft);
    std::fs::write(&config, good).unwrap();

    let inner = model.join("run");
    for (out, how) in [
        (model.clone(), "is the input"),
        (tmp.path().to_path_buf(), "contains the input"),
        (inner.clone(), "lies inside the input"),
    ] {
        let o = finetune(&base_args(
            m,
            out.to_str().unwrap(),
            &d,
            &["--overwrite_output_dir"],
        ));
        assert!(!o.status.success(), "{}", out.display());
        assert!(
            stderr(&o).contains(how) && stderr(&o).contains("--model_name_or_path"),
            "{}",
            stderr(&o)
        );
    }
    assert!(!inner.exists() && !model.join("ft").exists());
}
