//! `corda-preprocess` with a hub model id and a registry dataset name, against a local hub
//! (HTTP on 127.0.0.1, never the network) and an empty cache: the seed's first command.

#[path = "../../../tests/support/hub_server.rs"]
mod hub_server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use hub_server::{hub_command, FakeRepo, HubServer};

fn fixtures() -> PathBuf {
    corda_testdata::peft_tiny_llama()
}

fn model_files() -> BTreeMap<String, Vec<u8>> {
    let dir = fixtures().join("base-model");
    [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ]
    .iter()
    .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
    .collect()
}

fn nq_open() -> FakeRepo {
    let qa = std::fs::read(fixtures().join("data/qa.parquet")).unwrap();
    FakeRepo::new("datasets", "google-research-datasets/nq_open")
        .renamed_from("nq_open")
        .revision("main", [("README.md".to_string(), b"card".to_vec())].into())
        .revision(
            "refs/convert/parquet",
            [("nq_open/train/0000.parquet".to_string(), qa)].into(),
        )
}

/// Runs corda-preprocess with only the hub variables the test sets (none of the user's).
fn preprocess(server: &HubServer, home: &Path, out: &Path, extra: &[&str]) -> Output {
    preprocess_with(server, home, out, extra, &[])
}

fn preprocess_with(
    server: &HubServer,
    home: &Path,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = hub_command(env!("CARGO_BIN_EXE_corda-preprocess"), server, home);
    cmd.args([
        "--quiet",
        "--r",
        "8",
        "--save_model",
        "--overwrite",
        "--save_path",
    ])
    .arg(out)
    .args(["--calib_loader_size", "8", "--calib_max_length", "32"])
    .args(extra)
    .envs(env.iter().copied());
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn hub_model_and_registry_dataset_from_an_empty_cache() {
    let server = HubServer::start(vec![
        FakeRepo::new("models", "Org/tiny-llama").revision("main", model_files()),
        nq_open(),
    ]);
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("out");
    let args = ["--model_id", "Org/tiny-llama", "--calib_dataset", "nqopen"];
    let o = preprocess(&server, home.path(), &out, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("corda_init/adapter_config.json").is_file());
    assert!(out.join("model.safetensors").is_file());
    let cache = home.path().join("hub");
    assert!(cache.join("models--Org--tiny-llama/refs/main").is_file());
    assert!(cache
        .join("datasets--nq_open/refs/refs/convert/parquet")
        .is_file());
    assert!(
        stderr(&o).contains("calibration: 8 samples"),
        "{}",
        stderr(&o)
    );

    // Fully offline from the cache it filled: the same command, no request.
    server.clear_seen();
    let o = preprocess_with(
        &server,
        home.path(),
        &out,
        &args,
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(server.seen().is_empty(), "{:?}", server.seen());
}

#[test]
fn gated_model_needs_the_token_flag_or_hf_token() {
    let server = HubServer::start(vec![
        FakeRepo::new("models", "Org/gated")
            .revision("main", model_files())
            .gated("hf_granted"),
        nq_open(),
    ]);
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("out");
    let args = ["--model_id", "Org/gated", "--calib_dataset", "nq_open"];
    let o = preprocess(&server, home.path(), &out, &args);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("accept its licence") && err.contains("--token"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written on failure");

    let mut with_token = args.to_vec();
    with_token.extend(["--token", "hf_granted"]);
    let o = preprocess(&server, home.path(), &out, &with_token);
    assert!(o.status.success(), "{}", stderr(&o));

    // The token file `huggingface-cli login` writes works too (fresh cache).
    let home2 = tempfile::tempdir().unwrap();
    std::fs::write(home2.path().join("token"), "hf_granted\n").unwrap();
    let o = preprocess(&server, home2.path(), &home2.path().join("out"), &args);
    assert!(o.status.success(), "{}", stderr(&o));
}
