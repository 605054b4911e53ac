//! The README's first command end to end: `scripts/quickstart.sh` builds the workspace, writes
//! the demo model and data, preprocesses, fine-tunes (a few steps here), converts and verifies,
//! all offline. Also checks that every file in `configs/` names only real flags.

mod common;

use common::{bin_dir, repo_root, tail};
use std::process::Command;

#[test]
fn quickstart_runs_end_to_end_offline() {
    let root = repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let run = Command::new("bash")
        .arg(root.join("scripts/quickstart.sh"))
        .current_dir(&root)
        .env("OUT", &out_dir)
        .env("BIN", bin_dir())
        .env("STEPS", "12")
        // Never download: cargo uses the local registry cache, hub ids the local cache.
        .env("CARGO_NET_OFFLINE", "true")
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("MODEL")
        .env_remove("DATA")
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "quickstart failed ({:?})\n--- stdout\n{}\n--- stderr\n{}",
        run.status,
        tail(&run.stdout, 40),
        tail(&run.stderr, 40)
    );

    for f in [
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/generation_config.json",
        "data/qa.jsonl",
        "data/qa.parquet",
        "data/math.jsonl",
        "data/math.parquet",
        "corda/config.json",
        "corda/model.safetensors",
        "corda/tokenizer.json",
        "corda/corda_init/adapter_config.json",
        "corda/corda_init/adapter_model.safetensors",
        "ft/trainer_state.json",
        "ft/ft/adapter_config.json",
        "ft/ft/adapter_model.safetensors",
        "lora/adapter_config.json",
        "lora/adapter_model.safetensors",
        "logs/preprocess.log",
        "logs/finetune.log",
        "logs/convert.log",
    ] {
        assert!(
            out_dir.join(f).is_file(),
            "{f} is missing\n{}",
            tail(&run.stdout, 40)
        );
    }
    assert!(
        ["svg", "png"]
            .iter()
            .any(|e| out_dir.join(format!("ft/loss.{e}")).is_file()),
        "no loss curve in {}",
        out_dir.join("ft").display()
    );
    for key in [
        "identity check",
        "training loss",
        "verify:",
        "quickstart done",
    ] {
        assert!(
            stdout.contains(key),
            "the summary lacks `{key}`\n{}",
            tail(&run.stdout, 40)
        );
    }

    // The loss falls, and the converted LoRA has twice the rank.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("ft/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let losses: Vec<f64> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("loss").and_then(|l| l.as_f64()))
        .collect();
    assert!(
        losses.len() >= 2 && losses.last() < losses.first(),
        "loss did not fall: {losses:?}"
    );
    let lora: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(lora["r"], 16, "{lora}");

    // Every paper config names only real flags (clap rejects unknown ones before --help).
    let bin = bin_dir();
    for entry in std::fs::read_dir(root.join("configs")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") {
            continue;
        }
        let exe = if name.contains("finetune") {
            "corda-finetune"
        } else {
            "corda-preprocess"
        };
        let check = Command::new(bin.join(exe))
            .arg("--config")
            .arg(&path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

/// docs/cli.md is generated from the binaries' --help; it must match the current flags.
#[test]
fn cli_reference_is_current() {
    let root = repo_root();
    let run = Command::new("bash")
        .arg(root.join("scripts/gen-cli-docs.sh"))
        .arg("--check")
        .env("BIN", bin_dir())
        .current_dir(&root)
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .expect("run bash");
    assert!(
        run.status.success(),
        "{}\n{}",
        tail(&run.stdout, 10),
        tail(&run.stderr, 50)
    );
}

/// The stage scripts look for the binaries in Cargo's target directory, which
/// `CARGO_TARGET_DIR` moves (shared build machines set it); never in a hard-coded target/.
#[test]
fn scripts_honour_cargo_target_dir() {
    let root = repo_root();
    let elsewhere = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(root.join("scripts/target-dir.sh"))
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", elsewhere.path())
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .expect("run bash");
    assert!(run.status.success(), "{}", tail(&run.stderr, 20));
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        elsewhere.path().to_str().unwrap()
    );
    // Every stage script takes its binaries from there (or from BIN).
    for script in [
        "quickstart.sh",
        "gen-cli-docs.sh",
        "finetune.sh",
        "convert.sh",
        "preprocess_kpm_nqopen.sh",
        "preprocess_ipm_metamath.sh",
        "preprocess_pissa.sh",
        "reproduce.sh",
    ] {
        let text = std::fs::read_to_string(root.join("scripts").join(script)).unwrap();
        assert!(
            text.contains(r#"BIN="${BIN:-$("$ROOT/scripts/target-dir.sh")/release}""#)
                && !text.contains("$ROOT/target/release"),
            "{script} does not use scripts/target-dir.sh"
        );
    }
    // With the variable set, the script reports the missing binary under that directory.
    let run = Command::new("bash")
        .arg(root.join("scripts/gen-cli-docs.sh"))
        .arg("--check")
        .current_dir(&root)
        .env("SKIP_BUILD", "1")
        .env_remove("BIN")
        .env("CARGO_TARGET_DIR", elsewhere.path())
        .output()
        .expect("run bash");
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && err.contains(elsewhere.path().to_str().unwrap()),
        "{err}"
    );
}
