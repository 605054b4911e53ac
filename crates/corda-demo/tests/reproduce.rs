//! `scripts/reproduce.sh --demo` end to end: the seed's comparison (LoRA, PiSSA, CorDA KPM
//! fine-tuned on a math set, evaluated on QA, GSM8K and MATH) on the demo model and
//! `tests/data`, offline. The numbers mean nothing; the plumbing is the real one: the table has
//! three methods by three tasks, the JSON nine records, and the chart exists. A second run
//! resumes (every stage skipped), `CONVERT=1` evaluates converted LoRAs on the base model, bad
//! settings fail before anything runs and a failing stage names its log.

mod common;

use common::{bin_dir, repo_root, tail};
use std::path::Path;
use std::process::{Command, Output};

fn reproduce(out: &Path, extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/reproduce.sh"))
        .arg("--demo")
        .current_dir(repo_root())
        .env("OUT", out)
        .env("BIN", bin_dir())
        // Never download: cargo uses the local registry cache, hub ids the local cache.
        .env("CARGO_NET_OFFLINE", "true")
        .env("HF_HUB_OFFLINE", "1");
    for v in [
        "MODEL",
        "METHODS",
        "R",
        "ALPHA",
        "STEPS",
        "LIMIT",
        "CONVERT",
        "DEVICE",
        "DTYPE",
        "TRAIN_FIELDS",
        "SKIP_BUILD",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().expect("run bash")
}

#[test]
fn reproduce_demo_writes_the_comparison_table_and_chart() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("repro");
    let run = reproduce(&out, &[]);
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "reproduce.sh failed ({:?})\n--- stdout\n{}\n--- stderr\n{}",
        run.status,
        tail(&run.stdout, 40),
        tail(&run.stderr, 40)
    );

    // Markdown: a header and one row per method, a number in every task's column.
    let md = std::fs::read_to_string(out.join("results/comparison.md")).unwrap();
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(rows.len(), 5, "{md}");
    for head in ["NQ-open EM", "GSM8K acc.", "MATH acc."] {
        assert!(rows[0].contains(head), "{md}");
    }
    for (row, method) in rows[2..].iter().zip(["LoRA", "PiSSA", "CorDA (KPM"]) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert!(cells[0].starts_with(method), "{row}");
        assert_eq!(cells.len(), 4, "{row}");
        for c in &cells[1..] {
            let value: f64 = c.split_whitespace().next().unwrap().parse().unwrap();
            assert!(
                (0.0..=100.0).contains(&value) && c.ends_with("(n = 6)"),
                "{row}"
            );
        }
    }
    assert!(
        stdout.contains("reproduction done") && stdout.contains(&md),
        "{}",
        tail(&run.stdout, 30)
    );

    // JSON: three methods by three tasks, each on the adapter its stage trained.
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results/comparison.json")).unwrap(),
    )
    .unwrap();
    let records = json["records"].as_array().unwrap();
    assert_eq!(records.len(), 9, "{json}");
    for task in ["nqopen", "gsm8k", "math"] {
        for method in ["lora", "pissa", "corda"] {
            let adapter = out.join(format!("ft-{method}/ft"));
            let r = records
                .iter()
                .find(|r| r["task"] == task && r["adapter"] == adapter.to_str().unwrap())
                .unwrap_or_else(|| panic!("no {task} record of {method}"));
            assert_eq!(r["count"], 6, "{r}");
            let metric = if task == "nqopen" {
                "exact_match"
            } else {
                "accuracy"
            };
            assert_eq!(r["metric"], metric, "{r}");
            assert!(adapter.join("adapter_model.safetensors").is_file());
        }
    }
    // CorDA and PiSSA are evaluated on their own residual models, plain LoRA on the base.
    let model_of = |m: &str| {
        records
            .iter()
            .find(|r| r["adapter"] == out.join(format!("ft-{m}/ft")).to_str().unwrap())
            .unwrap()["model"]
            .clone()
    };
    assert_eq!(model_of("lora"), out.join("model").to_str().unwrap());
    assert_eq!(model_of("corda"), out.join("corda").to_str().unwrap());
    assert_eq!(model_of("pissa"), out.join("pissa").to_str().unwrap());

    let svg = std::fs::read_to_string(out.join("results/comparison.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{svg:.80}"
    );
    assert!(
        svg.contains(">nqopen, gsm8k, math</text>"),
        "the chart's title names the three tasks"
    );
    for label in ["ft-lora/ft", "ft-pissa/ft", "ft-corda/ft"] {
        assert!(svg.contains(label), "the chart lacks {label}");
    }
    for log in [
        "preprocess-corda",
        "preprocess-pissa",
        "finetune-lora",
        "eval-math-corda",
    ] {
        assert!(out.join(format!("logs/{log}.log")).is_file(), "{log}");
    }

    // A rerun with the same settings skips every stage and leaves the results as they were.
    let again = reproduce(&out, &[("SKIP_BUILD", "1")]);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{}", tail(&again.stderr, 20));
    assert!(
        !stdout.contains("(corda-") && stdout.matches(": done (").count() == 1 + 2 + 3 + 9,
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("results/comparison.md")).unwrap(),
        md
    );

    // CONVERT=1 reuses the trained adapters, converts CorDA and PiSSA to plain LoRAs of the base
    // model (checked on a probe text) and evaluates every method on the base model; `base` adds
    // the pre-trained model's own row.
    let conv = reproduce(
        &out,
        &[
            ("SKIP_BUILD", "1"),
            ("CONVERT", "1"),
            ("METHODS", "base lora pissa corda"),
        ],
    );
    let stdout = String::from_utf8_lossy(&conv.stdout);
    assert!(conv.status.success(), "{}", tail(&conv.stderr, 20));
    assert!(
        stdout.contains("corda fine-tuning: done") && stdout.matches("verify:").count() == 2,
        "{stdout}"
    );
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results/comparison.json")).unwrap(),
    )
    .unwrap();
    let records = json["records"].as_array().unwrap();
    assert_eq!(records.len(), 12, "{json}");
    assert_eq!(
        records.iter().filter(|r| r["adapter"].is_null()).count(),
        3,
        "{json}"
    );
    let md = std::fs::read_to_string(out.join("results/comparison.md")).unwrap();
    assert!(md.lines().any(|l| l.starts_with("| pre-trained |")), "{md}");
    let base = out.join("model");
    for r in records {
        assert_eq!(r["model"], base.to_str().unwrap(), "{r}");
    }
    for m in ["corda", "pissa"] {
        let lora = out.join(format!("lora-{m}"));
        assert_eq!(
            records
                .iter()
                .filter(|r| r["adapter"] == lora.to_str().unwrap())
                .count(),
            3,
            "{m}"
        );
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(lora.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            config["r"], 16,
            "the converted {m} LoRA has rank 2r: {config}"
        );
    }
}

#[test]
fn reproduce_names_the_log_of_a_failed_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("repro");
    let run = reproduce(
        &out,
        // It builds (a no-op after the other tests' build): run alone, the binaries may be missing.
        &[
            ("METHODS", "lora"),
            ("TRAIN_FIELDS", "query no_such_column"),
        ],
    );
    let err = String::from_utf8_lossy(&run.stderr);
    let log = out.join("logs/finetune-lora.log");
    assert!(
        !run.status.success()
            && err.contains(&format!(
                "stage finetune-lora failed; see {}",
                log.display()
            )),
        "{err}"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("no_such_column"),
        "the log does not say what went wrong"
    );
    assert!(!out.join("results/comparison.md").exists());
}

#[test]
fn reproduce_refuses_bad_settings_before_running() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("repro");
    for (env, needle) in [
        (("METHODS", "lora dora"), "unknown method `dora`"),
        (("ALPHA", "16"), "lora_alpha = r"),
        (("R", "0"), "R=0"),
        (("LIMIT", "-3"), "QA_LIMIT=-3"),
        (("CONVERT", "yes"), "CONVERT=yes"),
    ] {
        let run = reproduce(&out, &[("SKIP_BUILD", "1"), env]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            !run.status.success() && err.contains(needle),
            "{env:?}: {err}"
        );
        assert!(!out.exists(), "{env:?} wrote {}", out.display());
    }
}
