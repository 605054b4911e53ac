//! The `corda-eval` binary on the fixture model: perplexity of the residual model with its
//! CorDA adapter equals the original model's (the decomposition is exact before training), a
//! comparison writes JSON, a table and a chart; QA from a hub dataset served on 127.0.0.1 and
//! math from a file run end to end; bad input fails with a clear message.

#[path = "../../../tests/support/hub_server.rs"]
mod hub_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use corda_testdata::peft_tiny_llama as fixtures;
use hub_server::{hub_command, FakeRepo, HubServer};
use serde_json::Value;

fn eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corda-eval"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

/// The binary against `server`, with `home` as HF_HOME (an empty cache at first).
fn hub_eval(server: &HubServer, home: &Path, args: &[&str]) -> Output {
    hub_command(env!("CARGO_BIN_EXE_corda-eval"), server, home)
        .env("RUST_LOG", "warn")
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn repo_file(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
        .display()
        .to_string()
}

fn base() -> PathBuf {
    fixtures().join("base-model")
}

/// The KPM residual model with its tokenizer (the fixture's residual directory has none).
fn residual(root: &Path) -> PathBuf {
    let out = root.join("OUT");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("kpm/residual-model").join(f), out.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base().join(f), out.join(f)).unwrap();
    }
    out
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn residual_plus_corda_adapter_has_the_original_perplexity() {
    let tmp = tempfile::tempdir().unwrap();
    let out = residual(tmp.path());
    let init = fixtures().join("kpm/corda_init");
    let json = tmp.path().join("res/ppl.json");
    let o = eval(&[
        "--model_name_or_path",
        out.to_str().unwrap(),
        "--adapter",
        init.to_str().unwrap(),
        "--eval_base",
        "--compare_model",
        base().to_str().unwrap(),
        "--task",
        "ppl",
        "--dataset",
        &repo_file("tests/data/public_domain.txt"),
        "--seq_len",
        "128",
        "--limit",
        "3",
        "--batch_size",
        "2",
        "--output",
        json.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("perplexity") && stdout.contains("corda_init"),
        "{stdout}"
    );
    let r = read_json(&json);
    let recs = r["records"].as_array().unwrap();
    assert_eq!(recs.len(), 3);
    let ppl: Vec<f64> = recs.iter().map(|r| r["value"].as_f64().unwrap()).collect();
    assert!(recs.iter().all(|r| r["count"] == 3), "{r}");
    // Residual + corda_init reproduces the original model; the residual alone does not.
    let (residual_alone, with_adapter, original) = (ppl[0], ppl[1], ppl[2]);
    assert!((with_adapter - original).abs() / original < 1e-4, "{ppl:?}");
    assert!(
        (residual_alone - original).abs() / original > 1e-3,
        "{ppl:?}"
    );
    assert_eq!(recs[1]["adapter"], init.display().to_string());
    let svg = std::fs::read_to_string(json.with_extension("svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("corda_init"));
}

fn nq_open_hub() -> HubServer {
    let qa = std::fs::read(fixtures().join("data/qa.parquet")).unwrap();
    HubServer::start(vec![FakeRepo::new(
        "datasets",
        "google-research-datasets/nq_open",
    )
    .renamed_from("nq_open")
    .revision("main", [("README.md".to_string(), b"card".to_vec())].into())
    .revision(
        "refs/convert/parquet",
        [
            ("nq_open/train/0000.parquet".to_string(), qa.clone()),
            ("nq_open/validation/0000.parquet".to_string(), qa),
        ]
        .into(),
    )])
}

#[test]
fn nqopen_from_the_hub_and_gsm8k_from_a_file_run_end_to_end() {
    let server = nq_open_hub();
    let home = tempfile::tempdir().unwrap();
    let json = home.path().join("nq.json");
    let o = hub_eval(
        &server,
        home.path(),
        &[
            "--model_name_or_path",
            base().to_str().unwrap(),
            "--task",
            "nqopen",
            "--limit",
            "4",
            "--num_fewshot",
            "2",
            "--max_new_tokens",
            "6",
            "--batch_size",
            "3",
            "--output",
            json.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("exact_match"), "{stdout}");
    let r = read_json(&json);
    let rec = &r["records"][0];
    assert_eq!(rec["count"], 4);
    assert_eq!(rec["dataset"], "nqopen");
    let samples = rec["details"]["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 4);
    for s in samples {
        // The prediction is the generation up to its first newline.
        let g = s["generated"].as_str().unwrap();
        assert_eq!(
            s["prediction"].as_str().unwrap(),
            g.split('\n').next().unwrap().trim()
        );
        assert!(g.matches('\n').count() <= 1 || !g.contains('\n'));
    }
    assert!(!json.with_extension("svg").exists(), "one model: no chart");

    // Math from a local file, with the training prompt, compared with the earlier QA run.
    let math = fixtures().join("data/math.jsonl");
    let json2 = home.path().join("gsm.json");
    let o = eval(&[
        "--model_name_or_path",
        base().to_str().unwrap(),
        "--task",
        "gsm8k",
        "--dataset",
        math.to_str().unwrap(),
        "--question_field",
        "query",
        "--answer_field",
        "response",
        "--limit",
        "2",
        "--max_new_tokens",
        "5",
        "--dtype",
        "bf16",
        "--compare_with",
        json.to_str().unwrap(),
        "--output",
        json2.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("gsm8k") && stdout.contains("nqopen"),
        "{stdout}"
    );
    let r = read_json(&json2);
    assert_eq!(r["records"].as_array().unwrap().len(), 2);
    assert_eq!(r["settings"]["dtype"], "bfloat16");
    assert_eq!(
        r["records"][1]["details"]["samples"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn bad_input_fails_with_clear_messages() {
    let b = base();
    let m = b.to_str().unwrap();
    let txt = repo_file("tests/data/public_domain.txt");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model_name_or_path", m, "--task", "mmlu"],
            "unknown task `mmlu`",
        ),
        (
            vec!["--model_name_or_path", m, "--task", "ppl"],
            "--task ppl needs --dataset",
        ),
        (
            vec![
                "--model_name_or_path",
                m,
                "--task",
                "ppl",
                "--dataset",
                "nosuchset",
            ],
            "nosuchset",
        ),
        (
            vec![
                "--model_name_or_path",
                m,
                "--task",
                "ppl",
                "--dataset",
                &txt,
                "--adapter",
                m,
            ],
            "no adapter_config.json",
        ),
        (
            vec![
                "--model_name_or_path",
                m,
                "--task",
                "gsm8k",
                "--num_fewshot",
                "3",
            ],
            "few-shot applies to nqopen and trivia_qa",
        ),
        (
            vec![
                "--model_name_or_path",
                m,
                "--task",
                "ppl",
                "--dataset",
                &txt,
                "--seq_len",
                "100000",
            ],
            "fewer than one window",
        ),
        (
            vec![
                "--model_name_or_path",
                m,
                "--task",
                "ppl",
                "--dataset",
                &txt,
                "--seq_len",
                "64",
                "--limit",
                "1",
                "--chart",
                "/tmp/x.svg",
            ],
            "compares two or more models",
        ),
        (
            vec![
                "--model_name_or_path",
                m,
                "--task",
                "nqopen",
                "--seq_len",
                "64",
            ],
            "apply to --task ppl",
        ),
        (
            vec![
                "--model_name_or_path",
                m,
                "--task",
                "ppl",
                "--dataset",
                &txt,
                "--dtype",
                "f16",
            ],
            "--dtype",
        ),
    ];
    for (args, want) in cases {
        let o = eval(&args);
        let (_, stderr) = text(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(stderr.starts_with("Error: "), "{stderr}");
    }
}

/// `--dataset c4` reads GPTQ's C4 evaluation text: the first validation shard from the main
/// branch (gzip JSON Lines), its first 1100 documents joined with spaces.
#[test]
fn builtin_c4_perplexity_reads_the_validation_shard_from_the_hub() {
    use std::io::Write;
    let paragraphs: Vec<String> =
        std::fs::read_to_string(repo_file("tests/data/public_domain.txt"))
            .unwrap()
            .split("\n\n")
            .map(|p| serde_json::json!({ "text": p.trim() }).to_string())
            .collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all((paragraphs.join("\n") + "\n").as_bytes())
        .unwrap();
    let server = HubServer::start(vec![FakeRepo::new("datasets", "allenai/c4").revision(
        "main",
        [(
            "en/c4-validation.00000-of-00008.json.gz".to_string(),
            gz.finish().unwrap(),
        )]
        .into(),
    )]);
    let home = tempfile::tempdir().unwrap();
    let json = home.path().join("c4.json");
    let o = hub_eval(
        &server,
        home.path(),
        &[
            "--model_name_or_path",
            base().to_str().unwrap(),
            "--task",
            "ppl",
            "--dataset",
            "c4",
            "--seq_len",
            "128",
            "--output",
            json.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("c4"), "{stdout}");
    let r = read_json(&json);
    let rec = &r["records"][0];
    assert!(rec["count"].as_u64().unwrap() >= 2, "{rec}");
    // The paragraphs joined by single spaces, tokenized once.
    assert!(
        rec["details"]["text_tokens"].as_u64().unwrap() > 1000,
        "{rec}"
    );
    assert!(rec["value"].as_f64().unwrap() > 1.0);
}

/// Issue 14 (extras, lost input): result files that would replace or land in a model or adapter
/// being evaluated, a directory, or one file for both the JSON and the chart are refused before
/// any evaluation; the inputs are left as they were.
#[test]
fn result_files_over_the_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = residual(tmp.path());
    let adapter = tmp.path().join("A");
    std::fs::create_dir(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixtures().join("kpm/corda_init").join(f), adapter.join(f)).unwrap();
    }
    let config = out.join("config.json");
    let before = std::fs::read(&config).unwrap();
    let weights = adapter.join("adapter_model.safetensors");
    for (flag, path, expect) in [
        (
            "--output",
            config.clone(),
            "lies inside the input --model_name_or_path",
        ),
        (
            "--chart",
            weights.clone(),
            "lies inside the input --adapter",
        ),
        ("--output", tmp.path().to_path_buf(), "contains the input"),
        (
            "--output",
            tmp.path().join("r.svg"),
            "--output and the chart are both",
        ),
    ] {
        let o = eval(&[
            "--model_name_or_path",
            out.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--eval_base",
            "--task",
            "ppl",
            "--dataset",
            &repo_file("tests/data/public_domain.txt"),
            "--seq_len",
            "128",
            "--limit",
            "1",
            flag,
            path.to_str().unwrap(),
        ]);
        let (_, stderr) = text(&o);
        assert!(!o.status.success(), "{flag} {}", path.display());
        assert!(stderr.contains(expect) && stderr.contains(flag), "{stderr}");
    }
    assert_eq!(std::fs::read(&config).unwrap(), before);
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        std::fs::read(fixtures().join("kpm/corda_init/adapter_model.safetensors")).unwrap()
    );
    assert!(!tmp.path().join("r.svg").exists());
}
