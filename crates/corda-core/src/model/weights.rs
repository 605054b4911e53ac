//! Checkpoint weights: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped once; and a streaming shard writer so a
//! residual model can be written layer by layer without holding it in memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::{CordaError, Result};

/// The tensors of a model directory, memory-mapped.
pub struct Weights {
    files: Vec<PathBuf>,
    shards: Vec<MmapedSafetensors>,
    /// tensor name -> index into `shards`
    routing: HashMap<String, usize>,
    /// Largest shard size in bytes (used to shard written copies like the source).
    pub max_shard_bytes: u64,
}

fn open_shard(path: &Path) -> Result<MmapedSafetensors> {
    if !path.is_file() {
        return Err(CordaError::Model(format!(
            "{} is missing; the model directory is incomplete, re-download it",
            path.display()
        )));
    }
    // SAFETY: the file is mapped read-only; like every safetensors reader we assume nobody
    // truncates it while we run.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| CordaError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string().lines().next().unwrap_or("invalid header").to_string(),
    })
}

impl Weights {
    /// Open the weights of a model directory (single file or sharded with an index).
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| CordaError::io(&index, e))?;
            let v: Value =
                serde_json::from_str(&text).map_err(|source| CordaError::Json { path: index.clone(), source })?;
            let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| {
                CordaError::Model(format!("{}: no `weight_map` object", index.display()))
            })?;
            let mut names: Vec<String> =
                map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else if single.is_file() {
            vec![single]
        } else if !dir.is_dir() {
            return Err(CordaError::Model(format!(
                "model directory {} does not exist; pass a Hugging Face model directory or a cached hub id",
                dir.display()
            )));
        } else {
            return Err(CordaError::Model(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json; only safetensors checkpoints are supported (convert .bin files with transformers' save_pretrained)",
                dir.display()
            )));
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut routing = HashMap::new();
        let mut max_shard_bytes = 0;
        for (i, f) in files.iter().enumerate() {
            let st = open_shard(f)?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            max_shard_bytes = max_shard_bytes.max(std::fs::metadata(f).map(|m| m.len()).unwrap_or(0));
            shards.push(st);
        }
        Ok(Self { files, shards, routing, max_shard_bytes })
    }

    /// Number of shard files.
    pub fn num_files(&self) -> usize {
        self.files.len()
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.routing.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        let i = *self.routing.get(name).ok_or_else(|| CordaError::MissingTensor {
            name: name.to_string(),
            location: self.location(),
        })?;
        self.shards[i].get(name).map_err(|e| CordaError::Safetensors {
            path: self.files[i].clone(),
            reason: e.to_string(),
        })
    }

    fn location(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "the {} shards in {}",
                many.len(),
                many[0].parent().map(|p| p.display().to_string()).unwrap_or_default()
            ),
        }
    }

    /// Shape of a tensor as stored.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.view(name)?.shape().to_vec())
    }

    /// The stored dtype of a tensor.
    pub fn dtype(&self, name: &str) -> Result<DType> {
        use safetensors::Dtype as S;
        Ok(match self.view(name)?.dtype() {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F64 => DType::F64,
            other => {
                return Err(CordaError::Model(format!(
                    "tensor `{name}` has dtype {other:?}; only float32, float16 and bfloat16 checkpoints are supported (quantized models must be de-quantized first)"
                )))
            }
        })
    }

    /// Load a tensor in its stored dtype, checking its shape when `expected` is given.
    pub fn get(&self, name: &str, expected: Option<&[usize]>, device: &Device) -> Result<Tensor> {
        let shape = self.shape(name)?;
        if let Some(exp) = expected {
            if exp != shape.as_slice() {
                return Err(CordaError::ShapeMismatch {
                    name: name.to_string(),
                    expected: exp.to_vec(),
                    found: shape,
                });
            }
        }
        self.dtype(name)?;
        let i = self.routing[name];
        self.shards[i].load(name, device).map_err(|e| CordaError::Safetensors {
            path: self.files[i].clone(),
            reason: e.to_string(),
        })
    }

    /// The dtype most tensors are stored in (what `--dtype auto` means when the config is silent).
    pub fn dominant_dtype(&self) -> DType {
        let mut counts: BTreeMap<&'static str, (usize, DType)> = BTreeMap::new();
        for name in self.routing.keys() {
            if let Ok(d) = self.dtype(name) {
                counts.entry(d.as_str()).or_insert((0, d)).0 += 1;
            }
        }
        counts.values().max_by_key(|(n, _)| *n).map(|(_, d)| *d).unwrap_or(DType::F32)
    }
}

/// Writes a model's tensors into safetensors shards as they arrive, in the Hugging Face layout:
/// `model.safetensors` when everything fits in one shard, otherwise
/// `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
pub struct ShardWriter {
    dir: PathBuf,
    max_shard_bytes: u64,
    pending: Vec<(String, Tensor)>,
    pending_bytes: u64,
    /// (temporary file name, tensor names) per flushed shard
    written: Vec<(PathBuf, Vec<String>)>,
    total_bytes: u64,
}

impl ShardWriter {
    /// `max_shard_bytes = u64::MAX` gives a single file.
    pub fn new(dir: &Path, max_shard_bytes: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            max_shard_bytes: max_shard_bytes.max(1),
            pending: vec![],
            pending_bytes: 0,
            written: vec![],
            total_bytes: 0,
        }
    }

    /// Queue a tensor; a full shard is written to disk at once.
    pub fn push(&mut self, name: impl Into<String>, t: Tensor) -> Result<()> {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        if !self.pending.is_empty() && self.pending_bytes + bytes > self.max_shard_bytes {
            self.flush()?;
        }
        self.pending_bytes += bytes;
        self.total_bytes += bytes;
        self.pending.push((name.into(), t.contiguous()?));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut items = std::mem::take(&mut self.pending);
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let path = self.dir.join(format!(".shard-{}.safetensors", self.written.len()));
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(items.iter().map(|(k, v)| (k.as_str(), v)), Some(meta), &path)
            .map_err(|e| CordaError::Safetensors { path: path.clone(), reason: e.to_string() })?;
        crate::util::atomic::make_readable(&path)?;
        self.written.push((path, items.into_iter().map(|(k, _)| k).collect()));
        self.pending_bytes = 0;
        Ok(())
    }

    /// Write the last shard, give the shards their final names and write the index.
    pub fn finish(mut self) -> Result<()> {
        self.flush()?;
        let n = self.written.len();
        if n == 1 {
            let (tmp, _) = &self.written[0];
            let dst = self.dir.join("model.safetensors");
            return std::fs::rename(tmp, &dst).map_err(|e| CordaError::io(&dst, e));
        }
        let mut weight_map = BTreeMap::new();
        for (i, (tmp, names)) in self.written.iter().enumerate() {
            let fname = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            let dst = self.dir.join(&fname);
            std::fs::rename(tmp, &dst).map_err(|e| CordaError::io(&dst, e))?;
            for name in names {
                weight_map.insert(name.clone(), fname.clone());
            }
        }
        let index = json!({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map});
        let path = self.dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).expect("json");
        std::fs::write(&path, text + "\n").map_err(|e| CordaError::io(&path, e))
    }
}
