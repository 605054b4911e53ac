//! `corda-finetune --data_path owner/name` against a local hub (HTTP on 127.0.0.1, never the
//! network): the dataset's parquet conversion is downloaded into an empty cache, then reused
//! offline.

#[path = "../../../tests/support/hub_server.rs"]
mod hub_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hub_server::{FakeRepo, HubServer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/peft-tiny-llama")
}

/// A corda-preprocess output directory: the fixture's residual model, tokenizer and corda_init.
fn corda_out(root: &Path) -> PathBuf {
    let out = root.join("OUT");
    std::fs::create_dir_all(out.join("corda_init")).unwrap();
    let kpm = fixtures().join("kpm");
    let copies = [
        (kpm.join("residual-model/config.json"), "config.json"),
        (
            kpm.join("residual-model/model.safetensors"),
            "model.safetensors",
        ),
        (
            fixtures().join("base-model/tokenizer.json"),
            "tokenizer.json",
        ),
        (
            fixtures().join("base-model/tokenizer_config.json"),
            "tokenizer_config.json",
        ),
        (
            kpm.join("corda_init/adapter_config.json"),
            "corda_init/adapter_config.json",
        ),
        (
            kpm.join("corda_init/adapter_model.safetensors"),
            "corda_init/adapter_model.safetensors",
        ),
    ];
    for (from, to) in copies {
        std::fs::copy(from, out.join(to)).unwrap();
    }
    out
}

fn finetune(server: &HubServer, home: &Path, args: &[String], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_corda-finetune"));
    for var in [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_ENDPOINT", &server.endpoint)
        .env("HF_HOME", home)
        .env("RUST_LOG", "warn")
        .args(args)
        .envs(env.iter().copied());
    cmd.output().unwrap()
}

fn args(model: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--data_path",
        "meta-math/MetaMathQA",
        "--dataset_split",
        "train[:8]",
        "--dataset_field",
        "query",
        "response",
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "1",
        "--model_max_length",
        "128",
        "--disable_tqdm",
    ]
    .iter()
    .map(|s| s.to_string())
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
    let o = finetune(&server, home.path(), &args(&model, &out, &[]), &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert!(out.join("ft/adapter_model.safetensors").is_file(), "{err}");
    assert!(home
        .path()
        .join("hub/datasets--meta-math--MetaMathQA/refs/refs/convert/parquet")
        .is_file());

    server.clear_seen();
    let out = home.path().join("ft-offline");
    let o = finetune(
        &server,
        home.path(),
        &args(&model, &out, &[]),
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(server.seen().is_empty(), "{:?}", server.seen());

    // --revision is for hub model ids; a local model directory with it is refused up front.
    let out = home.path().join("ft-pinned");
    let o = finetune(
        &server,
        home.path(),
        &args(&model, &out, &["--revision", "v1"]),
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("local directory"),
        "{err}"
    );
    assert!(!out.join("ft").exists());
}
