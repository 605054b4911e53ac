//! Downloads from a hub: against a small HTTP server on 127.0.0.1 (never the network), into a
//! temporary cache laid out as huggingface_hub lays it out.

#[path = "../../../tests/support/hub_server.rs"]
mod hub_server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use corda_core::data::{lookup, read_rows, RowSource, Split};
use corda_core::hub::{Hub, HubOptions, RepoKind};
use corda_core::model::hub::resolve_model;
use corda_core::model::Weights;
use hub_server::{sha256_hex, FakeRepo, HubServer};
use serde_json::json;

fn fixtures() -> PathBuf {
    corda_testdata::peft_tiny_llama()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fixture model's files; with `sharded`, its weights split in two shards plus an index.
fn model_files(sharded: bool) -> BTreeMap<String, Vec<u8>> {
    let dir = fixtures().join("base-model");
    let mut files = BTreeMap::new();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        files.insert(f.to_string(), read(&dir.join(f)));
    }
    files.insert("README.md".into(), b"# a model card".to_vec());
    files.insert("pytorch_model.bin".into(), b"not wanted".to_vec());
    let weights = read(&dir.join("model.safetensors"));
    if !sharded {
        files.insert("model.safetensors".into(), weights);
        return files;
    }
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let half = tensors.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        for (t, _) in part {
            weight_map.insert(t.clone(), json!(name));
        }
        let bytes = safetensors::serialize(part.iter().map(|(n, v)| (n.clone(), v)), None).unwrap();
        files.insert(name, bytes);
    }
    let index = json!({"metadata": {"total_size": weights.len()}, "weight_map": weight_map});
    files.insert(
        "model.safetensors.index.json".into(),
        serde_json::to_vec_pretty(&index).unwrap(),
    );
    files
}

fn hub(server: &HubServer, cache: &Path, token: Option<&str>, retries: u32) -> Hub {
    let endpoint = server.endpoint.clone();
    let cache = cache.to_path_buf();
    let mut opts = HubOptions::from_env_fn(|key| match key {
        "HF_ENDPOINT" => Some(endpoint.clone().into()),
        "HF_HUB_CACHE" => Some(cache.clone().into()),
        _ => None,
    });
    opts.progress = false;
    opts.retries = retries;
    opts.retry_wait = Duration::ZERO;
    Hub::new(opts).with_token(token.map(str::to_string))
}

fn offline(hub: &Hub) -> Hub {
    let mut opts = hub.options().clone();
    opts.offline = true;
    Hub::new(opts)
}

const SHARD1: &str = "model-00001-of-00002.safetensors";

#[test]
fn sharded_model_downloads_into_the_standard_layout_and_is_reused_offline() {
    let files = model_files(true);
    let mut v1 = files.clone();
    v1.insert("config.json".into(), {
        let mut cfg: serde_json::Value = serde_json::from_slice(&files["config.json"]).unwrap();
        cfg["v1_marker"] = json!(true);
        serde_json::to_vec(&cfg).unwrap()
    });
    let repo = FakeRepo::new("models", "Org/tiny-llama")
        .revision("main", files.clone())
        .revision("v1", v1.clone());
    let (main_sha, v1_sha) = (repo.sha("main"), repo.sha("v1"));
    let server = HubServer::start(vec![repo]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path(), None, 0);

    let snap = resolve_model("Org/tiny-llama", "main", &hub).unwrap();
    let repo_dir = cache.path().join("models--Org--tiny-llama");
    assert_eq!(snap, repo_dir.join("snapshots").join(&main_sha));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        main_sha
    );
    for name in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        SHARD1,
        "model-00002-of-00002.safetensors",
    ] {
        assert_eq!(read(&snap.join(name)), files[name], "{name}");
        let link = std::fs::read_link(snap.join(name)).unwrap();
        assert!(
            link.starts_with("../../blobs"),
            "{name} → {}",
            link.display()
        );
    }
    // LFS blobs are named by their sha256, like huggingface_hub names them.
    assert!(repo_dir
        .join("blobs")
        .join(sha256_hex(&files[SHARD1]))
        .is_file());
    assert!(!snap.join("README.md").exists() && !snap.join("pytorch_model.bin").exists());
    let leftovers: Vec<_> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty());
    let original = Weights::open(&fixtures().join("base-model")).unwrap();
    let downloaded = Weights::open(&snap).unwrap();
    assert_eq!(downloaded.names(), original.names());
    assert_eq!(downloaded.num_files(), 2);

    // A complete cache is used as it is: no request, online or offline.
    server.clear_seen();
    assert_eq!(resolve_model("Org/tiny-llama", "main", &hub).unwrap(), snap);
    assert_eq!(
        resolve_model("Org/tiny-llama", "main", &offline(&hub)).unwrap(),
        snap
    );
    assert!(server.seen().is_empty(), "{:?}", server.seen());

    // --revision pins a tag (its own snapshot and ref), or a commit.
    let tagged = resolve_model("Org/tiny-llama", "v1", &hub).unwrap();
    assert_eq!(tagged, repo_dir.join("snapshots").join(&v1_sha));
    assert_eq!(read(&tagged.join("config.json")), v1["config.json"]);
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/v1")).unwrap(),
        v1_sha
    );
    // Shards identical to main's are the same blobs, not downloaded twice.
    let shard_gets = server
        .seen()
        .iter()
        .filter(|s| s.method == "GET" && s.path.starts_with("/cdn/"))
        .count();
    assert_eq!(shard_gets, 0, "{:?}", server.seen());
    assert_eq!(
        resolve_model("Org/tiny-llama", &v1_sha, &offline(&hub)).unwrap(),
        tagged
    );
    let err = resolve_model("Org/tiny-llama", "v2", &offline(&hub))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("v2"),
        "{err}"
    );
    let err = resolve_model("Org/tiny-llama", "v2", &hub)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no revision `v2`"), "{err}");
}

#[test]
fn single_file_model_and_offline_without_cache() {
    let files = model_files(false);
    let server = HubServer::start(vec![
        FakeRepo::new("models", "Org/single").revision("main", files.clone())
    ]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path(), None, 0);
    let err = resolve_model("Org/single", "main", &offline(&hub))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("huggingface-cli download Org/single"),
        "{err}"
    );
    assert!(server.seen().is_empty());
    let snap = resolve_model("Org/single", "main", &hub).unwrap();
    assert_eq!(
        read(&snap.join("model.safetensors")),
        files["model.safetensors"]
    );
}

#[test]
fn gated_repo_needs_an_accepted_token() {
    let files = model_files(false);
    let repo = FakeRepo::new("models", "Org/gated")
        .revision("main", files.clone())
        .gated("hf_granted");
    let server = HubServer::start(vec![repo]);
    let cache = tempfile::tempdir().unwrap();

    let err = resolve_model("Org/gated", "main", &hub(&server, cache.path(), None, 0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gated") && err.contains("accept its licence") && err.contains("HF_TOKEN"),
        "{err}"
    );
    let err = resolve_model(
        "Org/gated",
        "main",
        &hub(&server, cache.path(), Some("hf_other"), 0),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("refused with the token given") && err.contains("HTTP 403"),
        "{err}"
    );
    assert!(
        !err.contains("hf_other"),
        "the token is never printed: {err}"
    );
    let snap = resolve_model(
        "Org/gated",
        "main",
        &hub(&server, cache.path(), Some("hf_granted"), 0),
    )
    .unwrap();
    assert_eq!(read(&snap.join("config.json")), files["config.json"]);
    // The token goes to the hub, never to the CDN its LFS redirects point at.
    let seen = server.seen();
    let granted: Vec<_> = seen
        .iter()
        .filter(|s| s.authorization.as_deref() == Some("Bearer hf_granted"))
        .collect();
    assert!(
        granted.iter().any(|s| s.path.contains("/resolve/")),
        "{seen:?}"
    );
    let cdn: Vec<_> = seen
        .iter()
        .filter(|s| s.path.starts_with("/cdn/"))
        .collect();
    assert!(
        !cdn.is_empty() && cdn.iter().all(|s| s.authorization.is_none()),
        "{seen:?}"
    );
}

#[test]
fn missing_repo_revision_and_file_are_told_apart() {
    let mut no_config = model_files(false);
    no_config.remove("config.json");
    let mut broken_index = model_files(true);
    broken_index.remove(SHARD1);
    let server = HubServer::start(vec![
        FakeRepo::new("models", "Org/model").revision("main", model_files(false)),
        FakeRepo::new("models", "Org/no-config").revision("main", no_config),
        FakeRepo::new("models", "Org/broken").revision("main", broken_index),
    ]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path(), None, 0);
    let err = resolve_model("Org/absent", "main", &hub)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model `Org/absent` does not exist") && err.contains("private"),
        "{err}"
    );
    let err = resolve_model("Org/model", "nope", &hub)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no revision `nope`"), "{err}");
    let err = resolve_model("Org/no-config", "main", &hub)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no config.json"), "{err}");
    let err = resolve_model("Org/broken", "main", &hub)
        .unwrap_err()
        .to_string();
    assert!(err.contains(SHARD1) && err.contains("incomplete"), "{err}");
    // A file the hub does not have (404 EntryNotFound).
    let info = hub
        .revision_info(RepoKind::Model, "Org/model", "main")
        .unwrap();
    let err = hub
        .download(
            RepoKind::Model,
            "Org/model",
            "main",
            &info.sha,
            &["nope.json".to_string()],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("exists but has no file `nope.json`"), "{err}");
}

#[test]
fn a_cut_off_body_resumes_and_never_passes_as_complete() {
    let files = model_files(true);
    let server = HubServer::start(vec![
        FakeRepo::new("models", "Org/tiny").revision("main", files.clone())
    ]);
    let cache = tempfile::tempdir().unwrap();
    let half = files[SHARD1].len() / 2;

    // Within one run: the retry asks for the rest with Range.
    server.cut_next(SHARD1);
    let snap = resolve_model("Org/tiny", "main", &hub(&server, cache.path(), None, 2)).unwrap();
    assert_eq!(read(&snap.join(SHARD1)), files[SHARD1]);
    let ranges: Vec<_> = server.seen().into_iter().filter_map(|s| s.range).collect();
    assert!(ranges.contains(&format!("bytes={half}-")), "{ranges:?}");

    // Across runs: the first stops with the part kept, the rerun resumes it.
    let cache = tempfile::tempdir().unwrap();
    let no_retry = hub(&server, cache.path(), None, 0);
    server.cut_next(SHARD1);
    server.clear_seen();
    let err = resolve_model("Org/tiny", "main", &no_retry)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("stopped at {half} of {}", files[SHARD1].len()))
            && err.contains("rerun"),
        "{err}"
    );
    let repo_dir = cache.path().join("models--Org--tiny");
    let part = repo_dir
        .join("blobs")
        .join(format!("{}.incomplete", sha256_hex(&files[SHARD1])));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), half as u64);
    let err = resolve_model("Org/tiny", "main", &offline(&no_retry))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(SHARD1),
        "a partial shard is not a cached one: {err}"
    );
    server.clear_seen();
    let snap = resolve_model("Org/tiny", "main", &no_retry).unwrap();
    assert_eq!(read(&snap.join(SHARD1)), files[SHARD1]);
    assert!(!part.exists());
    let ranges: Vec<_> = server.seen().into_iter().filter_map(|s| s.range).collect();
    assert_eq!(ranges, vec![format!("bytes={half}-")]);
    Weights::open(&snap).unwrap();
}

#[test]
fn a_corrupt_body_is_rejected_by_its_sha256() {
    let files = model_files(false);
    let server = HubServer::start(vec![
        FakeRepo::new("models", "Org/tiny").revision("main", files.clone())
    ]);
    let cache = tempfile::tempdir().unwrap();
    server.corrupt_next("model.safetensors");
    let err = resolve_model("Org/tiny", "main", &hub(&server, cache.path(), None, 0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt") && err.contains("sha256"), "{err}");
    let blob = cache
        .path()
        .join("models--Org--tiny/blobs")
        .join(sha256_hex(&files["model.safetensors"]));
    assert!(!blob.exists());
    server.corrupt_next("model.safetensors");
    let snap = resolve_model("Org/tiny", "main", &hub(&server, cache.path(), None, 1)).unwrap();
    assert_eq!(
        read(&snap.join("model.safetensors")),
        files["model.safetensors"]
    );
}

fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap()
}

fn files(pairs: &[(&str, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[test]
fn registry_datasets_download_their_parquet_files_or_data_files() {
    let qa = read(&fixtures().join("data/qa.parquet"));
    let math = read(&fixtures().join("data/math.parquet"));
    // nq_open moved to google-research-datasets/nq_open; the hub redirects the old id.
    let nq = FakeRepo::new("datasets", "google-research-datasets/nq_open")
        .renamed_from("nq_open")
        .revision(
            "main",
            files(&[
                ("README.md", b"card".to_vec()),
                ("nq_open/train.py", b"# a loading script".to_vec()),
            ]),
        )
        .revision(
            "refs/convert/parquet",
            files(&[
                ("nq_open/train/0000.parquet", qa.clone()),
                ("nq_open/validation/0000.parquet", math.clone()),
            ]),
        );
    let c4 = FakeRepo::new("datasets", "allenai/c4").revision(
        "main",
        files(&[
            (
                "en/c4-train.00000-of-01024.json.gz",
                gzip("{\"text\": \"first\"}\n{\"text\": \"second\"}\n"),
            ),
            (
                "en/c4-train.00001-of-01024.json.gz",
                gzip("{\"text\": \"x\"}\n"),
            ),
        ]),
    );
    let metamath = FakeRepo::new("datasets", "iboing/MetaMathQA-395K").revision(
        "main",
        files(&[(
            "MetaMathQA-395K.json",
            b"[{\"query\": \"1+1?\", \"response\": \"2\"}]".to_vec(),
        )]),
    );
    let parquet_sha = nq.sha("refs/convert/parquet");
    let server = HubServer::start(vec![nq, c4, metamath]);
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path(), None, 0);

    let entry = lookup("nqopen").unwrap();
    let rows = entry
        .load_rows_from(&entry.source().hub(hub.clone()))
        .unwrap();
    assert_eq!(
        rows,
        read_rows(&fixtures().join("data/qa.parquet")).unwrap()
    );
    assert!(
        server.seen().iter().any(|s| s.status == 307),
        "the renamed id was followed: {:?}",
        server.seen()
    );
    let repo_dir = cache.path().join("datasets--nq_open");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/refs/convert/parquet")).unwrap(),
        parquet_sha
    );
    let snap = repo_dir.join("snapshots").join(&parquet_sha);
    assert!(snap.join("nq_open/train/0000.parquet").is_file());
    assert!(
        !snap.join("nq_open/validation").exists(),
        "only the split asked for"
    );

    // Offline: the same rows from the cache, no request.
    server.clear_seen();
    let again = entry
        .load_rows_from(&entry.source().hub(offline(&hub)))
        .unwrap();
    assert_eq!(again, rows);
    assert!(server.seen().is_empty());
    let err = RowSource::new("nq_open")
        .hub(offline(&hub))
        .load(&Split::whole("validation"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("validation"), "{err}");
    let rows = RowSource::new("nq_open")
        .hub(hub.clone())
        .load(&Split::whole("validation"))
        .unwrap();
    assert_eq!(
        rows,
        read_rows(&fixtures().join("data/math.parquet")).unwrap()
    );

    // c4: an explicit .json.gz file from main, read through gzip.
    let c4 = lookup("c4").unwrap();
    let rows = c4.load_rows_from(&c4.source().hub(hub.clone())).unwrap();
    assert_eq!(
        rows,
        vec![json!({"text": "first"}), json!({"text": "second"})]
    );
    assert!(!cache
        .path()
        .join("datasets--allenai--c4/snapshots")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("en/c4-train.00001-of-01024.json.gz")
        .exists());

    // No parquet conversion: the files of main (as `--data_path owner/name` reads them).
    let rows = RowSource::new("iboing/MetaMathQA-395K")
        .hub(hub.clone())
        .load(&Split::parse("train[:1]").unwrap())
        .unwrap();
    assert_eq!(rows, vec![json!({"query": "1+1?", "response": "2"})]);

    let err = RowSource::new("owner/absent")
        .hub(hub.clone())
        .load(&Split::whole("train"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dataset `owner/absent` does not exist"),
        "{err}"
    );
}
