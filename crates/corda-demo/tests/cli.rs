//! `corda-demo` end to end: what it writes loads with the library, outputs are refused unless
//! `--overwrite`, and the same seed writes the same bytes.

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use corda_core::data::read_rows;
use corda_core::model::{CausalLM, LoadOptions, ModelConfig, TokenizerInfo, Weights};

fn demo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corda-demo"))
        .args(args)
        .output()
        .expect("run corda-demo")
}

fn ok(args: &[&str]) -> String {
    let out = demo(args);
    assert!(
        out.status.success(),
        "corda-demo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn out_arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn writes_a_loadable_model_and_datasets() {
    let tmp = tempfile::tempdir().unwrap();
    let stdout = ok(&[
        "--out",
        out_arg(tmp.path()),
        "--layers",
        "2",
        "--hidden",
        "64",
        "--intermediate",
        "128",
        "--rows",
        "20",
    ]);
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    assert!(
        stdout.contains(model.to_str().unwrap()) && stdout.contains(data.to_str().unwrap()),
        "{stdout}"
    );

    let m = CausalLM::load(&model, &LoadOptions::default()).unwrap();
    assert_eq!(
        (
            m.config.num_hidden_layers,
            m.config.hidden_size,
            m.config.num_key_value_heads
        ),
        (2, 64, 2)
    );
    let tok = TokenizerInfo::load(&model).unwrap();
    let ids = tok.encode("what is the capital of France?").unwrap();
    assert_eq!(ids[0], 1);
    let n = ids.len();
    let logits = m
        .forward(&Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap(), None)
        .unwrap();
    let v = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));

    for (f, cols) in [
        ("qa", ["question", "answer"]),
        ("math", ["query", "response"]),
    ] {
        let jsonl = read_rows(&data.join(format!("{f}.jsonl"))).unwrap();
        let parquet = read_rows(&data.join(format!("{f}.parquet"))).unwrap();
        assert_eq!(jsonl.len(), 20);
        assert_eq!(jsonl, parquet);
        for c in cols {
            assert!(jsonl[0].get(c).is_some(), "{f} lacks {c}");
        }
    }
}

#[test]
fn refuses_existing_output_unless_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--out",
        out_arg(tmp.path()),
        "--layers",
        "1",
        "--hidden",
        "32",
        "--intermediate",
        "64",
        "--rows",
        "4",
    ];
    ok(&args);
    let again = demo(&args);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("--overwrite"), "{err}");
    let mut with = args.to_vec();
    with.push("--overwrite");
    ok(&with);
}

#[test]
fn same_seed_same_bytes_and_sharding_and_v5() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = |p: &Path| {
        vec![
            "--out".to_string(),
            p.to_str().unwrap().to_string(),
            "--layers=2".into(),
            "--hidden=64".into(),
            "--intermediate=128".into(),
            "--rows=10".into(),
            "--max_shard_size=60KB".into(),
            "--config_style=v5".into(),
            "--dtype=bfloat16".into(),
        ]
    };
    let run = |p: &Path| {
        let v = args(p);
        ok(&v.iter().map(String::as_str).collect::<Vec<_>>());
    };
    run(a.path());
    run(b.path());
    let model = a.path().join("model");
    let w = Weights::open(&model).unwrap();
    assert!(w.num_files() > 1, "expected shards, got {}", w.num_files());
    let cfg = ModelConfig::from_dir(&model).unwrap();
    assert_eq!(cfg.dtype, Some(candle_core::DType::BF16));
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert!(raw.get("rope_parameters").is_some() && raw.get("dtype").is_some());
    let mut files: Vec<_> = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    files.sort();
    for f in files {
        assert_eq!(
            std::fs::read(model.join(&f)).unwrap(),
            std::fs::read(b.path().join("model").join(&f)).unwrap(),
            "{f:?}"
        );
    }
    for f in ["qa.jsonl", "qa.parquet", "math.jsonl", "math.parquet"] {
        assert_eq!(
            std::fs::read(a.path().join("data").join(f)).unwrap(),
            std::fs::read(b.path().join("data").join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn bad_shapes_say_which_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = demo(&[
        "--out",
        out_arg(tmp.path()),
        "--hidden",
        "100",
        "--heads",
        "3",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--heads"), "{err}");
    assert!(
        !tmp.path().join("model").exists(),
        "nothing is written on a bad shape"
    );
}

#[test]
fn config_file_sets_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("demo.yaml");
    std::fs::write(
        &cfg,
        "layers: 1\nhidden: 32\nintermediate: 48\nrows: 3\nskip_data: true\n",
    )
    .unwrap();
    ok(&[
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out_arg(tmp.path()),
    ]);
    assert!(!tmp.path().join("data").exists());
    let c = ModelConfig::from_dir(&tmp.path().join("model")).unwrap();
    assert_eq!((c.num_hidden_layers, c.intermediate_size), (1, 48));
}
