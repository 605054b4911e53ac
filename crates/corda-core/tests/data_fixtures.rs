//! Data loading and calibration sampling against the reference fixtures.

use corda_core::data::{
    calibration_samples, llama_chat_template, load_rows, CalibOptions, CalibSampling, RowSource,
    Split, Template,
};
use serde_json::Value;
use tokenizers::Tokenizer;

use corda_testdata::peft_tiny_llama as fixtures;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(fixtures().join("base-model/tokenizer.json")).unwrap()
}

fn rows(file: &str) -> Vec<Value> {
    let path = fixtures().join("data").join(file);
    load_rows(path.to_str().unwrap(), &Split::whole("train"), None).unwrap()
}

fn rows_options(n: usize) -> CalibOptions {
    CalibOptions {
        n,
        max_length: 64,
        seed: 0,
        sampling: CalibSampling::Rows,
    }
}

#[test]
fn parquet_and_jsonl_give_identical_rows() {
    for name in ["qa", "math"] {
        let jsonl = rows(&format!("{name}.jsonl"));
        let parquet = rows(&format!("{name}.parquet"));
        assert_eq!(jsonl.len(), 16, "{name}");
        assert_eq!(jsonl, parquet, "{name}");
    }
    // `answer` is a list of strings.
    assert!(rows("qa.parquet")[0]["answer"].is_array());
}

#[test]
fn a_directory_reads_its_split_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(
        fixtures().join("data/qa.parquet"),
        data.join("train-00000-of-00002.parquet"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("data/qa.jsonl"),
        data.join("train-00001-of-00002.jsonl"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("data/math.parquet"),
        data.join("test-00000-of-00001.parquet"),
    )
    .unwrap();
    // Parquet wins over JSON when both exist, so only the first file is read.
    let train = load_rows(dir.path().to_str().unwrap(), &Split::whole("train"), None).unwrap();
    assert_eq!(train, rows("qa.jsonl"));
    let test = load_rows(
        dir.path().to_str().unwrap(),
        &Split::parse("test[:50%]").unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(test, rows("math.jsonl")[..8].to_vec());
}

#[test]
fn a_fake_hub_cache_serves_parquet_splits() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("datasets--meta-math--MetaMathQA");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "a1b2c3\n").unwrap();
    let data = repo.join("snapshots/a1b2c3/data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(
        fixtures().join("data/math.parquet"),
        data.join("train-00000-of-00001.parquet"),
    )
    .unwrap();
    std::fs::write(repo.join("snapshots/a1b2c3/README.md"), "card").unwrap();
    let loaded = RowSource::new("meta-math/MetaMathQA")
        .cache_root(cache.path())
        .load(&Split::parse("train[:3]").unwrap())
        .unwrap();
    assert_eq!(loaded, rows("math.jsonl")[..3].to_vec());
}

#[test]
fn rows_sampling_reproduces_the_fixture_calibration() {
    let tok = tokenizer();
    let cases = [
        ("qa.jsonl", "{question}"),
        ("math.jsonl", "{query} {response}"),
    ];
    for (file, template) in cases {
        let data = rows(file);
        let template = Template::parse(template).unwrap();
        let samples = calibration_samples(&data, &template, &tok, &rows_options(256)).unwrap();
        assert_eq!(samples.len(), 16, "{file}: every row, in order");
        for (row, sample) in data.iter().zip(&samples) {
            let text = template.format(row).unwrap();
            let full = tok.encode(text.as_str(), true).unwrap().get_ids().to_vec();
            assert_eq!(sample[0], 1, "{file}: BOS first");
            assert!(sample.len() <= 64, "{file}");
            assert_eq!(sample.len(), full.len().min(64), "{file}");
            assert_eq!(sample[..], full[..sample.len()], "{file}");
        }
    }
    // IPM's text is `query + " " + response`.
    let math = rows("math.jsonl");
    let ipm = Template::parse("{query} {response}").unwrap();
    let expected = format!(
        "{} {}",
        math[0]["query"].as_str().unwrap(),
        math[0]["response"].as_str().unwrap()
    );
    assert_eq!(ipm.format(&math[0]).unwrap(), expected);

    let first4 = calibration_samples(&math, &ipm, &tok, &rows_options(4)).unwrap();
    assert_eq!(first4.len(), 4);
    let err = calibration_samples(&[], &ipm, &tok, &rows_options(4)).unwrap_err();
    assert!(err.to_string().contains("no rows"), "{err}");
}

#[test]
fn windows_sampling_is_deterministic_and_bounded() {
    let tok = tokenizer();
    let data = rows("qa.jsonl");
    let template = Template::parse("{question}").unwrap();
    let opts = CalibOptions {
        n: 8,
        max_length: 32,
        seed: 233,
        sampling: CalibSampling::Windows,
    };
    let a = calibration_samples(&data, &template, &tok, &opts).unwrap();
    let b = calibration_samples(&data, &template, &tok, &opts).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 8);
    for s in &a {
        assert_eq!(s.len(), 32, "windows of 320 characters fill 32 tokens");
        assert_eq!(s[0], 1);
    }
    let other =
        calibration_samples(&data, &template, &tok, &CalibOptions { seed: 234, ..opts }).unwrap();
    assert_ne!(a, other);

    // Each window is the tokenization of a slice of the joined text.
    let joined = data
        .iter()
        .map(|r| r["question"].as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n\n");
    let decoded = tok.decode(&a[0][1..], true).unwrap();
    assert!(joined.contains(decoded.trim()), "{decoded:?}");

    // Too little text for one window says how much is needed.
    let tiny = CalibOptions {
        max_length: 4096,
        ..opts
    };
    let err = calibration_samples(&data, &template, &tok, &tiny)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 4097 characters"), "{err}");
}

#[test]
fn chat_sampling_shuffles_with_the_seed() {
    let tok = tokenizer();
    let data = rows("math.jsonl");
    let template = llama_chat_template("{query}", "{response}").unwrap();
    let opts = CalibOptions {
        n: 5,
        max_length: 4096,
        seed: 3,
        sampling: CalibSampling::Chat,
    };
    let a = calibration_samples(&data, &template, &tok, &opts).unwrap();
    assert_eq!(
        a,
        calibration_samples(&data, &template, &tok, &opts).unwrap()
    );
    assert_eq!(a.len(), 5);
    // The tokenizer's BOS plus the template's literal `<s>`, as in the reference.
    for s in &a {
        assert_eq!(&s[..2], &[1, 1]);
    }
    let all =
        calibration_samples(&data, &template, &tok, &CalibOptions { n: 100, ..opts }).unwrap();
    assert_eq!(all.len(), 16);
    let mut sorted = all.clone();
    sorted.sort();
    let mut in_order = calibration_samples(
        &data,
        &template,
        &tok,
        &CalibOptions {
            n: 100,
            sampling: CalibSampling::Rows,
            ..opts
        },
    )
    .unwrap();
    assert_ne!(all, in_order, "seed 3 should not keep the original order");
    in_order.sort();
    assert_eq!(sorted, in_order, "a shuffle is a permutation of the rows");
}
