//! Checkpoint weights: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped once, or a GGUF file (see [`super::gguf`]);
//! and a streaming shard writer so a residual model can be written layer by layer without
//! holding it in memory.
//!
//! A tensor is copied out of the mapping when loaded and its pages are then released
//! (`MADV_DONTNEED`), so walking through a model layer by layer keeps resident memory at one
//! layer rather than letting the mapped file accumulate in the process's resident set.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use serde_json::{json, Value};

use super::gguf::GgufModel;
use crate::{CordaError, Result};

/// Where a tensor lives in its shard.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// The tensors of a model directory (or GGUF file), memory-mapped.
pub struct Weights {
    files: Vec<PathBuf>,
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
    /// Set for a GGUF model; then `maps` and `entries` are empty.
    gguf: Option<GgufModel>,
    /// Largest shard size in bytes (used to shard written copies like the source).
    pub max_shard_bytes: u64,
}

fn truncated(path: &Path, reason: impl Into<String>) -> CordaError {
    CordaError::Safetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Give back the mapped pages of bytes `start..end` once they have been copied out (they are
/// re-read if needed again), so walking a model keeps resident memory at one layer.
pub(super) fn release_pages(map: &Mmap, start: usize, end: usize) {
    // SAFETY: the mapping is private and read-only and nothing borrows these bytes now.
    unsafe {
        let _ = map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start);
    }
}

/// The shape a caller expects, when it says, against the stored one.
fn check_shape(name: &str, expected: Option<&[usize]>, found: &[usize]) -> Result<()> {
    match expected {
        Some(exp) if exp != found => Err(CordaError::ShapeMismatch {
            name: name.to_string(),
            expected: exp.to_vec(),
            found: found.to_vec(),
        }),
        _ => Ok(()),
    }
}

/// Map a weights file read-only; `missing` is the error when it does not exist.
pub(super) fn map_file(path: &Path, missing: impl FnOnce() -> String) -> Result<Mmap> {
    if !path.is_file() {
        return Err(CordaError::Model(missing()));
    }
    let file = std::fs::File::open(path).map_err(|e| CordaError::io(path, e))?;
    // SAFETY: the file is mapped read-only; like every safetensors or GGUF reader we assume
    // nobody truncates it while we run.
    unsafe { Mmap::map(&file) }.map_err(|e| CordaError::io(path, e))
}

/// Map one shard and read its header.
fn open_shard(path: &Path, shard: usize, entries: &mut HashMap<String, Entry>) -> Result<Mmap> {
    let map = map_file(path, || {
        format!(
            "{} is missing; the model directory is incomplete, re-download it",
            path.display()
        )
    })?;
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map)
        .map_err(|e| truncated(path, format!("invalid header: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = meta.data_len();
    if data_start + data_len != map.len() {
        return Err(truncated(
            path,
            format!(
                "the header declares {} bytes of data but the file holds {}",
                data_len,
                map.len().saturating_sub(data_start)
            ),
        ));
    }
    for (name, info) in meta.tensors() {
        entries.insert(
            name,
            Entry {
                shard,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + info.data_offsets.0,
                end: data_start + info.data_offsets.1,
            },
        );
    }
    Ok(map)
}

/// The shard file names a `model.safetensors.index.json` maps tensors to, sorted, each once.
pub fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| CordaError::io(index, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|source| CordaError::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| CordaError::Model(format!("{}: no `weight_map` object", index.display())))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

impl Weights {
    /// Open the weights of a model directory (single file or sharded with an index), or of a
    /// GGUF model (a `.gguf` file, or a directory holding one and no safetensors).
    pub fn open(dir: &Path) -> Result<Self> {
        if let Some(file) = super::gguf::find_gguf(dir)? {
            let gguf = GgufModel::open(&file)?;
            return Ok(Self {
                files: vec![file],
                maps: vec![],
                entries: HashMap::new(),
                gguf: Some(gguf),
                max_shard_bytes: u64::MAX,
            });
        }
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.is_file() {
            index_shards(&index)?
                .into_iter()
                .map(|f| dir.join(f))
                .collect()
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
        let mut maps = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        let mut max_shard_bytes = 0;
        for (i, f) in files.iter().enumerate() {
            let map = open_shard(f, i, &mut entries)?;
            max_shard_bytes = max_shard_bytes.max(map.len() as u64);
            maps.push(map);
        }
        Ok(Self {
            files,
            maps,
            entries,
            gguf: None,
            max_shard_bytes,
        })
    }

    /// The GGUF model behind these weights, if they come from one.
    pub fn gguf(&self) -> Option<&GgufModel> {
        self.gguf.as_ref()
    }

    /// Number of shard files.
    pub fn num_files(&self) -> usize {
        self.files.len()
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        if let Some(g) = &self.gguf {
            return g.names();
        }
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        if let Some(g) = &self.gguf {
            return g.contains(name);
        }
        self.entries.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| CordaError::MissingTensor {
                name: name.to_string(),
                location: self.location(),
            })
    }

    fn location(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "the {} shards in {}",
                many.len(),
                many[0]
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        }
    }

    /// Shape of a tensor as stored.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        if let Some(g) = &self.gguf {
            return g.shape(name);
        }
        Ok(self.entry(name)?.shape.clone())
    }

    /// The stored dtype of a tensor (for GGUF: what it dequantizes to, float32 when quantized).
    pub fn dtype(&self, name: &str) -> Result<DType> {
        if let Some(g) = &self.gguf {
            return g.dtype(name);
        }
        use safetensors::Dtype as S;
        Ok(match self.entry(name)?.dtype {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F64 => DType::F64,
            other => {
                let file = self.files[self.entry(name)?.shard].display();
                return Err(CordaError::Model(format!(
                    "{file}: tensor `{name}` has dtype {other:?}; only float32, float16 and bfloat16 checkpoints are supported (quantized models must be de-quantized first)"
                )));
            }
        })
    }

    /// Load a tensor in its stored dtype, checking its shape when `expected` is given.
    pub fn get(&self, name: &str, expected: Option<&[usize]>, device: &Device) -> Result<Tensor> {
        if let Some(g) = &self.gguf {
            let shape = g.shape(name)?;
            check_shape(name, expected, &shape)?;
            return g.get(name, device);
        }
        let (e, dtype) = self.checked_entry(name, expected)?;
        let map = &self.maps[e.shard];
        let t = Tensor::from_raw_buffer(&map[e.start..e.end], dtype, &e.shape, device)?;
        release_pages(map, e.start, e.end);
        Ok(t)
    }

    /// A stored (rows, cols) matrix to be read a few rows at a time, checked as [`Self::get`]
    /// checks; `None` for GGUF weights (quantized blocks, not rows).
    pub fn row_reader(&self, name: &str, rows: usize, cols: usize) -> Result<Option<RowReader>> {
        if self.gguf.is_some() {
            return Ok(None);
        }
        let (e, dtype) = self.checked_entry(name, Some(&[rows, cols]))?;
        release_pages(&self.maps[e.shard], e.start, e.end);
        let path = self.files[e.shard].clone();
        let file = std::fs::File::open(&path).map_err(|err| CordaError::io(&path, err))?;
        Ok(Some(RowReader {
            file,
            path,
            start: e.start as u64,
            rows,
            cols,
            dtype,
        }))
    }

    /// The entry of `name` with its dtype, after the shape check and a scan for NaN and
    /// infinity (a damaged checkpoint fails here, not as a NaN loss later).
    fn checked_entry(&self, name: &str, expected: Option<&[usize]>) -> Result<(&Entry, DType)> {
        let e = self.entry(name)?;
        check_shape(name, expected, &e.shape)?;
        let dtype = self.dtype(name)?;
        let bad = non_finite(&self.maps[e.shard][e.start..e.end], dtype);
        if bad > 0 {
            return Err(CordaError::Model(format!(
                "{}: tensor `{name}` has {bad} non-finite values (NaN or infinity); the checkpoint is damaged: re-download or re-save it",
                self.files[e.shard].display()
            )));
        }
        Ok((e, dtype))
    }

    /// The dtype most tensors are stored in (what `--dtype auto` means when the config is silent).
    pub fn dominant_dtype(&self) -> DType {
        let mut counts: BTreeMap<&'static str, (usize, DType)> = BTreeMap::new();
        for name in self.names() {
            if let Ok(d) = self.dtype(&name) {
                counts.entry(d.as_str()).or_insert((0, d)).0 += 1;
            }
        }
        counts
            .values()
            .max_by_key(|(n, _)| *n)
            .map(|(_, d)| *d)
            .unwrap_or(DType::F32)
    }
}

/// A row-major matrix read from its checkpoint file row by row (see [`Weights::row_reader`]):
/// a lookup reads the rows it needs with `pread`, so the matrix never enters the process's
/// memory. (Read through the mapping instead, the kernel's fault-around mapped 16 pages per
/// touched page, and one batch's lookups made most of a 131 MB table resident.)
pub struct RowReader {
    file: std::fs::File,
    path: PathBuf,
    /// Byte offset of row 0 in the file.
    start: u64,
    rows: usize,
    cols: usize,
    /// The stored dtype.
    dtype: DType,
}

impl RowReader {
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `ids` as an (ids, cols) CPU tensor in the stored dtype; an id past the last row is
    /// an error naming it.
    pub fn gather(&self, ids: &[u32]) -> Result<Tensor> {
        use std::os::unix::fs::FileExt;
        let row_bytes = self.cols * self.dtype.size_in_bytes();
        let mut out = vec![0u8; ids.len() * row_bytes];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(row_bytes)) {
            let id = id as usize;
            if id >= self.rows {
                return Err(CordaError::Invalid(format!(
                    "token id {id} is outside the embedding table ({} rows); the tokenizer does not belong to this model",
                    self.rows
                )));
            }
            self.file
                .read_exact_at(dst, self.start + (id * row_bytes) as u64)
                .map_err(|e| CordaError::io(&self.path, e))?;
        }
        Ok(Tensor::from_raw_buffer(
            &out,
            self.dtype,
            &[ids.len(), self.cols],
            &Device::Cpu,
        )?)
    }
}

/// How many values of the little-endian float buffer `bytes` are NaN or infinite (an exponent
/// of all ones), read straight from the stored bits.
fn non_finite(bytes: &[u8], dtype: DType) -> usize {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000)
            .count(),
        DType::F16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00)
            .count(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80)
            .count(),
        DType::F64 => bytes
            .chunks_exact(8)
            .filter(|c| {
                let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                v & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
            })
            .count(),
        _ => 0,
    }
}

/// Writes a model's tensors into safetensors shards as they arrive, in the Hugging Face layout:
/// `model.safetensors` when everything fits in one shard, otherwise
/// `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
///
/// Tensor bytes go straight to a temporary data file per shard, so memory holds one tensor at a
/// time; `finish` writes each shard's header and streams its data behind it.
pub struct ShardWriter {
    dir: PathBuf,
    max_shard_bytes: u64,
    shards: Vec<PendingShard>,
    total_bytes: u64,
}

struct PendingShard {
    data_path: PathBuf,
    data: std::io::BufWriter<std::fs::File>,
    bytes: u64,
    /// (name, dtype, shape, start, end) in arrival order
    tensors: Vec<(String, safetensors::Dtype, Vec<usize>, u64, u64)>,
}

impl ShardWriter {
    /// `max_shard_bytes = u64::MAX` gives a single file.
    pub fn new(dir: &Path, max_shard_bytes: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            max_shard_bytes: max_shard_bytes.max(1),
            shards: vec![],
            total_bytes: 0,
        }
    }

    /// Write a tensor's bytes (a new shard starts when the current one would exceed the limit).
    pub fn push(&mut self, name: impl Into<String>, t: Tensor) -> Result<()> {
        use safetensors::View;
        use std::io::Write;
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let full = self
            .shards
            .last()
            .is_none_or(|s| !s.tensors.is_empty() && s.bytes + bytes > self.max_shard_bytes);
        if full {
            let data_path = self.dir.join(format!(".shard-{}.data", self.shards.len()));
            let file =
                std::fs::File::create(&data_path).map_err(|e| CordaError::io(&data_path, e))?;
            self.shards.push(PendingShard {
                data_path,
                data: std::io::BufWriter::new(file),
                bytes: 0,
                tensors: vec![],
            });
        }
        let shard = self.shards.last_mut().expect("a shard");
        let t = t.to_device(&Device::Cpu)?;
        let data = t.data();
        shard
            .data
            .write_all(&data)
            .map_err(|e| CordaError::io(&shard.data_path, e))?;
        shard.tensors.push((
            name.into(),
            View::dtype(&t),
            t.dims().to_vec(),
            shard.bytes,
            shard.bytes + bytes,
        ));
        shard.bytes += bytes;
        self.total_bytes += bytes;
        Ok(())
    }

    /// Write the shards under their final names, and the index when there are several.
    pub fn finish(self) -> Result<()> {
        use std::io::Write;
        let n = self.shards.len();
        let mut weight_map = BTreeMap::new();
        for (i, shard) in self.shards.into_iter().enumerate() {
            let fname = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            };
            let mut header = serde_json::Map::new();
            header.insert("__metadata__".into(), json!({"format": "pt"}));
            for (name, dtype, shape, start, end) in &shard.tensors {
                header.insert(
                    name.clone(),
                    json!({"dtype": dtype, "shape": shape, "data_offsets": [start, end]}),
                );
                weight_map.insert(name.clone(), fname.clone());
            }
            let mut text = serde_json::to_string(&header).expect("json");
            while !text.len().is_multiple_of(8) {
                text.push(' ');
            }
            let data_file = shard
                .data
                .into_inner()
                .map_err(|e| CordaError::io(&shard.data_path, e.into_error()))?;
            drop(data_file);
            let dst = self.dir.join(&fname);
            let out = std::fs::File::create(&dst).map_err(|e| CordaError::io(&dst, e))?;
            let mut out = std::io::BufWriter::new(out);
            out.write_all(&(text.len() as u64).to_le_bytes())
                .map_err(|e| CordaError::io(&dst, e))?;
            out.write_all(text.as_bytes())
                .map_err(|e| CordaError::io(&dst, e))?;
            let mut data = std::fs::File::open(&shard.data_path)
                .map_err(|e| CordaError::io(&shard.data_path, e))?;
            std::io::copy(&mut data, &mut out).map_err(|e| CordaError::io(&dst, e))?;
            out.flush().map_err(|e| CordaError::io(&dst, e))?;
            std::fs::remove_file(&shard.data_path)
                .map_err(|e| CordaError::io(&shard.data_path, e))?;
        }
        if n == 0 {
            return Err(CordaError::Invalid("no tensors to write".into()));
        }
        if n > 1 {
            let index =
                json!({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map});
            let path = self.dir.join("model.safetensors.index.json");
            let text = serde_json::to_string_pretty(&index).expect("json");
            std::fs::write(&path, text + "\n").map_err(|e| CordaError::io(&path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_counted_from_the_stored_bits() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN, f32::INFINITY, -0.0, f32::MAX]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(non_finite(&f32s, DType::F32), 2);
        let f16s: Vec<u8> = [half::f16::ONE, half::f16::NAN, half::f16::NEG_INFINITY]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(non_finite(&f16s, DType::F16), 2);
        let bf16s: Vec<u8> = [half::bf16::ONE, half::bf16::MAX, half::bf16::INFINITY]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(non_finite(&bf16s, DType::BF16), 1);
    }
}
