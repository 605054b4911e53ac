//! `--model_id`: a local directory, a `.gguf` file, or a Hugging Face hub id. A hub model whose config and
//! weights are all in the cache (`HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`) is
//! used from there without contacting the hub; otherwise, unless `HF_HUB_OFFLINE` is set, its
//! config, tokenizer, generation config and safetensors weights are downloaded into the cache.

use std::path::{Path, PathBuf};

use crate::hub::{is_repo_id, Hub, RepoKind};
use crate::model::gguf::{find_gguf, is_gguf_path};
use crate::model::save::SUPPORT_FILES;
use crate::model::weights::index_shards;
use crate::{CordaError, Result};

pub use crate::hub::{cache_root, cache_root_from};

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// Resolve a local directory or a hub model id (revision `main`, settings from the
/// environment) to a model directory, downloading what the cache lacks.
pub fn resolve_model_dir(id: &str) -> Result<PathBuf> {
    resolve_model(id, "main", &Hub::from_env())
}

/// [`resolve_model_dir`] at `revision` (a branch, tag or commit) with explicit hub settings.
pub fn resolve_model(id: &str, revision: &str, hub: &Hub) -> Result<PathBuf> {
    resolve(id, revision, hub, Need::Model)
}

/// The config and tokenizer files of a local directory or hub model, without its weights
/// (a tokenizer taken from the base model should not cost a download of the whole model).
pub fn resolve_tokenizer(id: &str, revision: &str, hub: &Hub) -> Result<PathBuf> {
    resolve(id, revision, hub, Need::Tokenizer)
}

/// The directory with `tokenizer.json` for a run on `model_dir`: the explicit one, else the
/// model directory, else the adapter's base model (`base_model_name_or_path`; preprocessing
/// records the original model there, and the residual model may have no tokenizer).
pub fn find_tokenizer_dir(
    explicit: Option<&str>,
    model_dir: &Path,
    adapter_base: Option<&str>,
    hub: &Hub,
) -> Result<PathBuf> {
    if let Some(t) = explicit {
        return resolve_tokenizer(t, "main", hub);
    }
    if super::TokenizerInfo::available(model_dir) {
        return Ok(model_dir.to_path_buf());
    }
    if let Some(base) = adapter_base {
        if let Ok(dir) = resolve_tokenizer(base, "main", hub) {
            if super::TokenizerInfo::available(&dir) {
                tracing::info!(
                    "no tokenizer in {}; using the one of {}",
                    model_dir.display(),
                    dir.display()
                );
                return Ok(dir);
            }
        }
    }
    Err(CordaError::Model(format!(
        "{} has no tokenizer.json; give the location of the original model's tokenizer (tokenizer_name_or_path)",
        model_dir.display()
    )))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Model,
    Tokenizer,
}

fn resolve(id: &str, revision: &str, hub: &Hub, need: Need) -> Result<PathBuf> {
    let local = Path::new(id);
    if local.is_dir() {
        if revision != "main" {
            return Err(CordaError::Invalid(format!(
                "--revision `{revision}` selects a version of a hub model, but `{id}` is a local \
                 directory; drop --revision or pass the hub id"
            )));
        }
        return Ok(local.to_path_buf());
    }
    if is_gguf_path(local) {
        return if local.is_file() {
            Ok(local.to_path_buf())
        } else {
            Err(CordaError::Model(format!(
                "GGUF file `{id}` does not exist"
            )))
        };
    }
    if !looks_like_model_id(id) {
        return Err(CordaError::Model(format!(
            "model directory `{id}` does not exist; pass a Hugging Face model directory or a hub id such as meta-llama/Llama-2-7b-hf"
        )));
    }
    let cache = hub.repo_cache(RepoKind::Model, id)?;
    let cached = cache.snapshot(revision)?;
    if let Some(snap) = &cached {
        if missing_files(snap, need)?.is_empty() {
            return Ok(snap.clone());
        }
    }
    if hub.offline() {
        let what = match &cached {
            Some(snap) => format!(
                "{} at revision `{revision}`",
                missing_files(snap, need)?.join(", ")
            ),
            None => format!("revision `{revision}`"),
        };
        return Err(hub.offline_error(RepoKind::Model, id, &what));
    }
    download_model(hub, id, revision, need)
}

/// Whether `id` has the shape of a hub model id (`owner/name`).
pub fn looks_like_model_id(id: &str) -> bool {
    is_repo_id(id, false)
}

/// What a cached snapshot still lacks: the config and every weight file for a model,
/// tokenizer.json for a tokenizer.
fn missing_files(snap: &Path, need: Need) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    if need == Need::Tokenizer {
        if !snap.join("tokenizer.json").is_file() && find_gguf(snap)?.is_none() {
            missing.push("tokenizer.json".to_string());
        }
        return Ok(missing);
    }
    // A GGUF-only snapshot (one .gguf, no safetensors) carries its config in the file.
    if find_gguf(snap)?.is_some() {
        return Ok(missing);
    }
    if !snap.join("config.json").is_file() {
        missing.push("config.json".to_string());
    }
    if snap.join(INDEX).is_file() {
        for shard in index_shards(&snap.join(INDEX))? {
            if !snap.join(&shard).is_file() {
                missing.push(shard);
            }
        }
    } else if !snap.join(SINGLE).is_file() {
        missing.push(format!("{SINGLE} (or {INDEX} and its shards)"));
    }
    Ok(missing)
}

fn download_model(hub: &Hub, id: &str, revision: &str, need: Need) -> Result<PathBuf> {
    let info = hub.revision_info(RepoKind::Model, id, revision)?;
    let has = |file: &str| info.files.iter().any(|f| f == file);
    // The files a saved model directory carries besides its weights (Python reuses them too).
    let side: Vec<String> = ["config.json"]
        .iter()
        .chain(SUPPORT_FILES.iter())
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    if need == Need::Tokenizer {
        if !has("tokenizer.json") {
            return Err(CordaError::Model(format!(
                "hub model `{id}` (revision `{revision}`) has no tokenizer.json (a fast \
                 tokenizer); pass a tokenizer directory that has one"
            )));
        }
        return hub.download(RepoKind::Model, id, revision, &info.sha, &side);
    }
    let ggufs: Vec<&String> = info
        .files
        .iter()
        .filter(|f| is_gguf_path(Path::new(f)))
        .collect();
    if !has(INDEX) && !has(SINGLE) && !ggufs.is_empty() {
        // A GGUF repo: its one .gguf (config and tokenizer inside), with the side files it has.
        if ggufs.len() > 1 {
            return Err(CordaError::Model(format!(
                "hub model `{id}` (revision `{revision}`) holds {} .gguf files ({}); download the \
                 one you want and pass its path as the model",
                ggufs.len(),
                ggufs
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mut files = side;
        files.push(ggufs[0].clone());
        return hub.download(RepoKind::Model, id, revision, &info.sha, &files);
    }
    if !has("config.json") {
        return Err(CordaError::Model(format!(
            "hub model `{id}` (revision `{revision}`) has no config.json, so it is not a \
             transformers model directory; pass a repo or directory with config.json and \
             safetensors weights"
        )));
    }
    let weights = if has(INDEX) {
        INDEX
    } else if has(SINGLE) {
        SINGLE
    } else if info.files.iter().any(|f| f.ends_with(".bin")) {
        return Err(CordaError::Model(format!(
            "hub model `{id}` (revision `{revision}`) has only PyTorch .bin weights; corda reads \
             safetensors: load it in transformers, save_pretrained(dir, \
             safe_serialization=True), and pass the directory"
        )));
    } else {
        return Err(CordaError::Model(format!(
            "hub model `{id}` (revision `{revision}`) has neither {SINGLE} nor {INDEX}"
        )));
    };
    let mut first = side;
    first.push(weights.to_string());
    let snap = hub.download(RepoKind::Model, id, revision, &info.sha, &first)?;
    if weights == INDEX {
        let shards = index_shards(&snap.join(INDEX))?;
        if let Some(absent) = shards.iter().find(|s| !has(s)) {
            return Err(CordaError::Model(format!(
                "hub model `{id}`: {INDEX} names the shard `{absent}`, which the repo does not \
                 hold at revision `{revision}`; the repo is incomplete"
            )));
        }
        hub.download(RepoKind::Model, id, revision, &info.sha, &shards)?;
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::HubOptions;

    fn offline_hub(root: &Path) -> Hub {
        let mut opts = HubOptions::from_env_fn(|_| None);
        opts.offline = true;
        Hub::new(opts).with_cache_dir(root)
    }

    #[test]
    fn finds_a_cached_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let hub = offline_hub(root.path());
        let repo = root.path().join("models--TinyOrg--tiny-llama");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        let e = resolve_model("TinyOrg/tiny-llama", "main", &hub)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        std::fs::write(snap.join("model.safetensors"), "").unwrap();
        assert_eq!(
            resolve_model("TinyOrg/tiny-llama", "main", &hub).unwrap(),
            snap
        );
        let e = resolve_model("TinyOrg/tiny-llama", "v2", &hub)
            .unwrap_err()
            .to_string();
        assert!(e.contains("revision `v2`"), "{e}");
        let e = resolve_model("TinyOrg/other", "main", &hub)
            .unwrap_err()
            .to_string();
        assert!(e.contains("huggingface-cli download TinyOrg/other"), "{e}");
        let e = resolve_model("./no/such/dir", "main", &hub)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = resolve_model(root.path().to_str().unwrap(), "v1", &hub)
            .unwrap_err()
            .to_string();
        assert!(e.contains("local directory"), "{e}");
    }
}
