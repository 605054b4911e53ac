//! The real SmolLM2-135M-Instruct GGUF (Q4_1, ../shared/models) through all three binaries:
//! corda-preprocess in KPM and IPM (identity check), corda-finetune for a few steps and
//! corda-convert with verification against the GGUF base. The residual directories are plain
//! Hugging Face directories that load again, and residual + adapter reproduce the GGUF model's
//! logits. Sizes are small (8 short rows, r 8, a subset of the modules) to keep CI fast. The
//! PiSSA / MiLoRA baselines take the same path without calibration data.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use corda_core::adapter::Adapter;
use corda_core::model::{CausalLM, LoadOptions, TokenizerInfo};

fn model_dir() -> Option<PathBuf> {
    corda_testdata::shared(
        "models/smollm2-135m-instruct",
        "the real-model GGUF end-to-end test",
    )
}

/// A binary of this workspace next to corda-preprocess. `cargo test -p corda-preprocess` alone
/// does not build the other packages' binaries, so the workspace is built first, with the
/// same command as the quickstart test (a no-op when everything is fresh).
fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = Path::new(env!("CARGO_BIN_EXE_corda-preprocess"));
    let dir = exe.parent().unwrap();
    BUILT.call_once(|| {
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build
            .args(["build", "--quiet", "--workspace"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace failed");
    });
    dir.join(name)
}

fn run(name: &str, args: &[&str]) -> (String, String) {
    let o: Output = Command::new(workspace_bin(name))
        .args(args)
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(
        o.status.success(),
        "{name} {args:?} failed\n--- stdout\n{out}\n--- stderr\n{err}"
    );
    (out, err)
}

/// Eight short question/answer rows of real text.
fn write_data(path: &Path) {
    let rows = [
        (
            "What is the capital of France?",
            "Paris is the capital of France.",
        ),
        (
            "Who wrote the novel Pride and Prejudice?",
            "Jane Austen wrote it; it was published in 1813.",
        ),
        (
            "How many legs does a spider have?",
            "A spider has eight legs.",
        ),
        (
            "At what temperature does water boil at sea level?",
            "Water boils at 100 degrees Celsius.",
        ),
        (
            "Which planet is known as the red planet?",
            "Mars is called the red planet because of iron oxide.",
        ),
        (
            "What gas do plants take in from the air?",
            "Plants take in carbon dioxide and release oxygen.",
        ),
        (
            "Who painted the Mona Lisa?",
            "Leonardo da Vinci painted the Mona Lisa.",
        ),
        (
            "What is the largest ocean on Earth?",
            "The Pacific Ocean is the largest and deepest ocean.",
        ),
    ];
    let text: String = rows
        .iter()
        .map(|(q, a)| serde_json::json!({"question": q, "answer": a}).to_string() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

fn probe_ids(dir: &Path) -> Vec<Tensor> {
    let t =
        candle_core::safetensors::load(dir.join("probe_logits.safetensors"), &Device::Cpu).unwrap();
    (0..2)
        .map(|i| {
            let ids = t[&format!("input_ids_{i}")].to_dtype(DType::U32).unwrap();
            if ids.rank() == 1 {
                ids.unsqueeze(0).unwrap()
            } else {
                ids
            }
        })
        .collect()
}

fn logits(model: &CausalLM, ids: &[Tensor]) -> Vec<Tensor> {
    ids.iter()
        .map(|i| model.forward(i, None).unwrap())
        .collect()
}

/// The residual directory `tmp/rel` is a complete Hugging Face model directory, and residual +
/// the initial adapter give the GGUF model's logits.
fn check_residual(s: &Setup, rel: &str) {
    let out = &s.tmp.path().join(rel);
    let (base_logits, ids, gguf_tok) = (&s.base_logits, &s.ids, &s.gguf_tok);
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "corda_init/adapter_config.json",
        "corda_init/adapter_model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing in {}", out.display());
    }
    let mut m = CausalLM::load(out, &LoadOptions::default()).unwrap();
    assert!(m.config.tie_word_embeddings);
    Adapter::load(&out.join("corda_init"))
        .unwrap()
        .attach_to(&mut m)
        .unwrap();
    for (got, want) in logits(&m, ids).iter().zip(base_logits) {
        let d = corda_core::util::tensor::max_abs_diff(got, want).unwrap();
        eprintln!(
            "{}: residual + adapter vs GGUF logits, max |diff| {d:.2e}",
            out.display()
        );
        assert!(
            d < 1e-3,
            "{}: residual + adapter logits differ from the GGUF model's by {d}",
            out.display()
        );
    }
    let tok = TokenizerInfo::load(out).unwrap();
    let text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n";
    assert_eq!(tok.encode(text).unwrap(), gguf_tok.encode(text).unwrap());
    assert_eq!(tok.eos_id, Some(2));
}

/// What both tests start from: the GGUF model, a temporary directory with the data rows, the
/// probe ids with the GGUF model's logits, and its tokenizer.
struct Setup {
    dir: PathBuf,
    gguf: PathBuf,
    tmp: tempfile::TempDir,
    ids: Vec<Tensor>,
    base_logits: Vec<Tensor>,
    gguf_tok: TokenizerInfo,
}

fn setup() -> Option<Setup> {
    let dir = model_dir()?;
    let gguf = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let tmp = tempfile::tempdir().unwrap();
    write_data(&tmp.path().join("qa.jsonl"));
    let ids = probe_ids(&dir);
    let base = CausalLM::load(&gguf, &LoadOptions::default()).unwrap();
    let base_logits = logits(&base, &ids);
    let gguf_tok = TokenizerInfo::load(&gguf).unwrap();
    Some(Setup {
        dir,
        gguf,
        tmp,
        ids,
        base_logits,
        gguf_tok,
    })
}

impl Setup {
    /// `tmp/rel` as a string argument.
    fn p(&self, rel: &str) -> String {
        self.tmp.path().join(rel).to_str().unwrap().to_string()
    }

    fn g(&self) -> &str {
        self.gguf.to_str().unwrap()
    }

    /// A few fine-tuning steps on the residual model `tmp/model` into `tmp/ft`.
    fn finetune(&self, model: &str, steps: usize, lr: &str) -> Adapter {
        let steps = steps.to_string();
        let (_, err) = run(
            "corda-finetune",
            &[
                "--model_name_or_path",
                &self.p(model),
                "--output_dir",
                &self.p("ft"),
                "--corda_mode",
                "True",
                "--data_path",
                &self.p("qa.jsonl"),
                "--dataset_field",
                "question",
                "answer",
                "--max_steps",
                &steps,
                "--per_device_train_batch_size",
                "2",
                "--learning_rate",
                lr,
                "--logging_steps",
                "1",
                "--report_to",
                "none",
                "--model_max_length",
                "64",
            ],
        );
        assert!(err.contains(&format!("trained {steps} steps")), "{err}");
        Adapter::load(&self.tmp.path().join("ft/ft")).unwrap()
    }

    /// Convert `tmp/ft/ft` against `tmp/model/corda_init` into a plain LoRA of the GGUF model
    /// (`tmp/lora`), verified against residual + trained adapter.
    fn convert_and_verify(&self, model: &str) -> Adapter {
        let (out, err) = run(
            "corda-convert",
            &[
                "--initial_adapter",
                &self.p(&format!("{model}/corda_init")),
                "--trained_adapter",
                &self.p("ft/ft"),
                "--output_dir",
                &self.p("lora"),
                "--base_model",
                self.g(),
                "--residual_model",
                &self.p(model),
                "--verify",
            ],
        );
        assert!(out.contains("r 8 -> 16"), "{out}\n{err}");
        assert!(out.contains("verify:"), "{out}\n{err}");
        Adapter::load(&self.tmp.path().join("lora")).unwrap()
    }
}

#[test]
fn gguf_model_through_preprocess_finetune_and_convert() {
    let Some(s) = setup() else { return };
    let g = s.g();

    // KPM on questions: every attention projection (q/k carry the rotary permutation) and
    // layer 0's MLP.
    let (_, err) = run(
        "corda-preprocess",
        &[
            "--quiet", "--model_id", g, "--r", "8",
            "--target_modules",
            "q_proj,k_proj,v_proj,o_proj,layers.0.mlp.gate_proj,layers.0.mlp.up_proj,layers.0.mlp.down_proj",
            "--save_model", "--save_path", &s.p("kpm"),
            "--calib_dataset", &s.p("qa.jsonl"), "--calib_template", "{question}",
            "--calib_loader_size", "8", "--calib_max_length", "64",
        ],
    );
    assert!(err.contains("identity check"), "{err}");
    assert!(
        err.contains("decomposed 123 modules (kpm mode, r 8"),
        "{err}"
    );
    check_residual(&s, "kpm");

    // IPM on question + answer, with the model given as its directory (config.json and
    // tokenizer.json beside the only .gguf).
    let (_, err) = run(
        "corda-preprocess",
        &[
            "--quiet",
            "--model_id",
            s.dir.to_str().unwrap(),
            "--r",
            "8",
            "--first_eigen",
            "--target_modules",
            "q_proj,v_proj,layers.29.mlp.gate_proj,layers.29.mlp.up_proj,layers.29.mlp.down_proj",
            "--save_model",
            "--save_path",
            &s.p("ipm"),
            "--calib_dataset",
            &s.p("qa.jsonl"),
            "--calib_template",
            "{question} {answer}",
            "--calib_loader_size",
            "8",
            "--calib_max_length",
            "64",
        ],
    );
    assert!(err.contains("identity check"), "{err}");
    assert!(
        err.contains("decomposed 63 modules (ipm mode, r 8"),
        "{err}"
    );
    check_residual(&s, "ipm");

    // A few fine-tuning steps on the KPM residual model.
    let trained = s.finetune("kpm", 3, "1e-3");
    assert_eq!(trained.modules.len(), 123);
    assert_eq!(
        trained.config.base_model_name_or_path.as_deref(),
        Some(s.p("kpm").as_str())
    );

    // Convert to a plain LoRA of the GGUF model and verify it against residual + trained.
    let lora = s.convert_and_verify("kpm");
    assert_eq!((lora.modules.len(), lora.config.r), (123, 16));
}

#[test]
fn gguf_model_baselines_through_preprocess_finetune_and_convert() {
    let Some(s) = setup() else { return };
    let targets = "q_proj,k_proj,v_proj,o_proj,layers.0.mlp.gate_proj,layers.0.mlp.up_proj,layers.0.mlp.down_proj";
    for init in ["pissa", "milora"] {
        let (_, err) = run(
            "corda-preprocess",
            &[
                "--quiet",
                "--model_id",
                s.g(),
                "--r",
                "8",
                "--init",
                init,
                "--target_modules",
                targets,
                "--save_model",
                "--save_path",
                &s.p(init),
            ],
        );
        let label = if init == "pissa" { "PiSSA" } else { "MiLoRA" };
        assert!(
            err.contains(&format!("decomposed 123 modules ({label}, r 8")),
            "{err}"
        );
        assert!(
            err.contains("identity check: residual + s·B·A vs W"),
            "{err}"
        );
        check_residual(&s, init);
    }

    // The PiSSA residual fine-tunes and converts like a CorDA one.
    s.finetune("pissa", 2, "1e-4");
    let lora = s.convert_and_verify("pissa");
    assert_eq!((lora.modules.len(), lora.config.r), (123, 16));
}
