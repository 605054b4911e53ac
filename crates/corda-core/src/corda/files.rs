//! The covariance file (`{module: C}`, C already divided by the sample count, as PEFT's
//! `covariance_file`) and the decomposition cache (`{module}.eigens.{S_WC,U_WC,V_WC}`, already
//! cropped, as PEFT's `cache_file`), in safetensors.
//!
//! Both are written while the layers stream by, so the header (every name and shape) is written
//! first and the data appended in the same order: nothing is held for the whole model.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use faer::Mat;

use super::decompose::{CordaEigens, CordaMode};
use super::plan::{Plan, Target};
use crate::model::InputSite;
use crate::{CordaError, Result};

/// A float32 safetensors file written entry by entry in a fixed, pre-declared order, into a
/// temporary file renamed into place by [`StreamingSafetensors::finish`].
pub struct StreamingSafetensors {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<std::fs::File>,
    parent: PathBuf,
    order: Vec<(String, usize)>,
    next: usize,
    /// Renamed into place; until then dropping removes the temporary file (a write error such
    /// as a full disk included).
    done: bool,
    _cleanup: crate::util::process::TempGuard,
}

impl StreamingSafetensors {
    /// `entries`: (name, shape) in the order the data will be written.
    pub fn create(
        path: &Path,
        entries: &[(String, Vec<usize>)],
        metadata: &[(&str, String)],
    ) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::util::atomic::create_dir_all(parent)?;
        }
        let mut header = serde_json::Map::new();
        let meta: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
        let mut offset = 0usize;
        let mut order = vec![];
        for (name, shape) in entries {
            let bytes = shape.iter().product::<usize>() * 4;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
            order.push((name.clone(), bytes));
        }
        let mut text = serde_json::to_string(&header).expect("json");
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        // Unique per process, so two runs writing the same file never interleave; the rename in
        // `finish` publishes one whole file. Leftovers of killed runs go first.
        let (parent, name) = crate::util::process::split_target(path)?;
        crate::util::atomic::clean_leftovers(&parent, &name)?;
        let tmp = parent.join(crate::util::atomic::temp_dir_name(
            &name,
            std::process::id(),
        ));
        let cleanup = crate::util::process::register_temp(&tmp);
        let file = std::fs::File::create(&tmp).map_err(|e| CordaError::io(path, e))?;
        let mut out = BufWriter::new(file);
        let head = out
            .write_all(&(text.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(text.as_bytes()));
        if let Err(e) = head {
            drop(out);
            let _ = std::fs::remove_file(&tmp);
            return Err(CordaError::io(path, e));
        }
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            out,
            parent,
            done: false,
            _cleanup: cleanup,
            order,
            next: 0,
        })
    }

    /// Append the next entry (must come in the declared order).
    pub fn write(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let (expected, bytes) = self.order.get(self.next).ok_or_else(|| {
            CordaError::Invalid(format!(
                "{}: unexpected extra entry {name}",
                self.path.display()
            ))
        })?;
        if expected != name || *bytes != data.len() * 4 {
            return Err(CordaError::Invalid(format!(
                "{}: expected entry {expected} next, got {name}",
                self.path.display()
            )));
        }
        for v in data {
            self.out
                .write_all(&v.to_le_bytes())
                .map_err(|e| CordaError::io(&self.path, e))?;
        }
        self.next += 1;
        Ok(())
    }

    /// Flush and move into place; fails if entries are missing.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.order.len() {
            return Err(CordaError::Invalid(format!(
                "{}: only {} of {} entries were written",
                self.path.display(),
                self.next,
                self.order.len()
            )));
        }
        let path = self.path.clone();
        self.out.flush().map_err(|e| CordaError::io(&path, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| CordaError::io(&path, e))?;
        let publishing = crate::util::process::publishing();
        std::fs::rename(&self.tmp, &path).map_err(|e| CordaError::io(&path, e))?;
        self.done = true;
        drop(publishing);
        crate::util::atomic::sync_dir(&self.parent)
    }
}

impl Drop for StreamingSafetensors {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Row-major data of a faer matrix.
pub fn mat_data(m: &Mat<f32>) -> Vec<f32> {
    let mut v = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            v.push(m[(i, j)]);
        }
    }
    v
}

/// A (rows, cols) float32 tensor as a faer matrix.
pub fn tensor_to_mat(t: &Tensor) -> Result<Mat<f32>> {
    let (r, c) = t.dims2()?;
    let data = t
        .to_dtype(candle_core::DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(Mat::from_fn(r, c, |i, j| data[i * c + j]))
}

/// A faer matrix as a (rows, cols) float32 tensor.
pub fn mat_to_tensor(m: &Mat<f32>, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        mat_data(m),
        (m.nrows(), m.ncols()),
        device,
    )?)
}

/// PEFT's reuse rule for a covariance file or cache: it exists and is not empty.
pub fn is_reusable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

/// Tensors by name and the file's string metadata.
pub type SavedTensors = (HashMap<String, Tensor>, HashMap<String, String>);

/// A previously saved file of tensors, loaded on the CPU; `None` when absent or empty (PEFT's
/// "exists and has size > 0").
pub fn load_existing(path: &Path, what: &str) -> Result<Option<SavedTensors>> {
    if !is_reusable(path) {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| CordaError::io(path, e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
        CordaError::Safetensors {
            path: path.to_path_buf(),
            reason: format!("{what}: {e}; delete it to recompute"),
        }
    })?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| CordaError::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let meta = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    Ok(Some((tensors, meta)))
}

/// FNV-1a, 64 bit: a stable, dependency-free fingerprint (not a security hash).
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf29ce484222325;

/// A fingerprint of a model: its `config.json` and, of every weight file, the size and 16
/// samples of 4 KiB spread over it. Cheap for a 7B model, and different for another model or
/// another fine-tune of the same architecture.
pub fn model_fingerprint(model: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut files = vec![];
    if model.is_dir() {
        let entries = std::fs::read_dir(model).map_err(|e| CordaError::io(model, e))?;
        for e in entries {
            let p = e.map_err(|e| CordaError::io(model, e))?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name == "config.json" || name.ends_with(".safetensors") || name.ends_with(".gguf") {
                files.push(p);
            }
        }
    } else {
        files.push(model.to_path_buf());
    }
    files.sort();
    let mut h = FNV_OFFSET;
    for p in files {
        let mut f = std::fs::File::open(&p).map_err(|e| CordaError::io(&p, e))?;
        let len = f.metadata().map_err(|e| CordaError::io(&p, e))?.len();
        h = fnv1a(
            h,
            p.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h = fnv1a(h, &len.to_le_bytes());
        let mut buf = vec![0u8; 4096];
        for i in 0..16u64 {
            let at = (len.saturating_sub(4096)) * i / 15;
            f.seek(SeekFrom::Start(at))
                .map_err(|e| CordaError::io(&p, e))?;
            let n = f.read(&mut buf).map_err(|e| CordaError::io(&p, e))?;
            h = fnv1a(h, &buf[..n]);
        }
    }
    Ok(format!("{h:016x}"))
}

/// A fingerprint of the tokenized calibration samples and the covariance precision.
pub fn calibration_fingerprint(samples: &[Vec<u32>], precision: &str) -> String {
    let mut h = fnv1a(FNV_OFFSET, precision.as_bytes());
    for s in samples {
        h = fnv1a(h, &(s.len() as u64).to_le_bytes());
        for id in s {
            h = fnv1a(h, &id.to_le_bytes());
        }
    }
    format!("{h:016x}")
}

/// What produced a covariance file or cache, kept in its metadata and compared on reuse.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    pub model: String,
    /// [`calibration_fingerprint`] of the run's samples; `None` when it has none (then a file
    /// cannot be checked and is not reused).
    pub calibration: Option<String>,
    /// The settings that produced the samples, (name, value), as the caller describes them
    /// ([`super::PreprocessOptions::calibration_settings`] plus the covariance precision);
    /// recorded so that a refused reuse can say which one differs.
    pub settings: Vec<(String, String)>,
}

impl Provenance {
    pub const MODEL_KEY: &str = "corda_model";
    pub const CALIBRATION_KEY: &str = "corda_calibration";
    pub const SETTINGS_KEY: &str = "corda_calibration_settings";

    /// The metadata entries to write.
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        let mut m = vec![(Self::MODEL_KEY, self.model.clone())];
        if let Some(c) = &self.calibration {
            m.push((Self::CALIBRATION_KEY, c.clone()));
            let settings: serde_json::Map<String, serde_json::Value> = self
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            m.push((
                Self::SETTINGS_KEY,
                serde_json::Value::Object(settings).to_string(),
            ));
        }
        m
    }

    /// Why a file with metadata `meta` cannot be reused by this run, if it cannot.
    /// `allow_unchecked`: reuse a file without provenance (with a warning) instead of refusing it.
    fn mismatch(
        &self,
        meta: &HashMap<String, String>,
        path: &Path,
        allow_unchecked: bool,
    ) -> Option<String> {
        let (Some(model), Some(theirs)) =
            (meta.get(Self::MODEL_KEY), meta.get(Self::CALIBRATION_KEY))
        else {
            if allow_unchecked {
                tracing::warn!(
                    "{} has no corda provenance; reused unchecked (allow_unchecked_files)",
                    path.display()
                );
                return None;
            }
            return Some(format!(
                "has no corda provenance ({} / {} metadata: it was not written by corda-preprocess, or by an older version), so whether it matches this model and calibration cannot be checked; if you know it does (e.g. PEFT's covariances), set allow_unchecked_files",
                Self::MODEL_KEY,
                Self::CALIBRATION_KEY
            ));
        };
        if *model != self.model {
            return Some("was made from another model".into());
        }
        let Some(ours) = &self.calibration else {
            return Some(
                "cannot be checked: this run has no calibration samples to compare with the ones that made it".into(),
            );
        };
        if theirs == ours {
            return None;
        }
        let recorded: BTreeMap<String, String> = meta
            .get(Self::SETTINGS_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        let differ: Vec<String> = self
            .settings
            .iter()
            .filter_map(|(k, v)| {
                let was = recorded
                    .get(k)
                    .map(String::as_str)
                    .unwrap_or("(not recorded)");
                (was != v).then(|| format!("{k} `{was}` there, `{v}` in this run"))
            })
            .collect();
        Some(if differ.is_empty() {
            "was made from other calibration samples (same recorded settings: the data itself differs)".into()
        } else {
            format!(
                "was made from other calibration samples ({})",
                differ.join("; ")
            )
        })
    }
}

/// What a run reuses instead of computing (PEFT: a cache skips everything, a covariance file
/// skips the calibration pass).
pub enum Reused {
    Nothing,
    Covariances(HashMap<String, Tensor>),
    Cache(HashMap<String, Tensor>),
}

impl Reused {
    /// Load `cache_file` or else `covariance_file` when it exists, and check that it holds a
    /// finite entry of the right shape for every target (a cache also the mode and ranks).
    pub fn load(
        cache_file: Option<&Path>,
        covariance_file: Option<&Path>,
        plan: &Plan,
        mode: CordaMode,
        provenance: &Provenance,
        allow_unchecked: bool,
    ) -> Result<Self> {
        if let Some(p) = cache_file {
            if let Some((t, meta)) = load_existing(p, "decomposition cache")? {
                let bad = |what: String| {
                    CordaError::Invalid(format!(
                        "the decomposition cache {} {what}; delete it to recompute or use another cache file",
                        p.display()
                    ))
                };
                if let Some(why) = provenance.mismatch(&meta, p, allow_unchecked) {
                    return Err(bad(why));
                }
                if let Some(m) = meta.get("corda_method").filter(|m| *m != mode.as_str()) {
                    return Err(bad(format!(
                        "was made for {m} but this run is {}",
                        mode.as_str()
                    )));
                }
                for target in plan.targets() {
                    let (o, i) = target.shape;
                    let r = target.rank;
                    for (key, shape) in [
                        ("S_WC", vec![r]),
                        ("U_WC", vec![o, r]),
                        ("V_WC", vec![i, r]),
                    ] {
                        let name = format!("{}.eigens.{key}", target.name);
                        let found = t.get(&name).ok_or_else(|| bad(format!("lacks {name}")))?;
                        if found.dims() != shape.as_slice() {
                            return Err(bad(format!(
                                "holds {name} with shape {:?} but this run needs {shape:?} (rank {r})",
                                found.dims()
                            )));
                        }
                        check_values(found, &name, key == "S_WC").map_err(bad)?;
                        if key == "U_WC" {
                            check_orthonormal(found, &name).map_err(bad)?;
                        }
                    }
                }
                return Ok(Self::Cache(t));
            }
        }
        if let Some(p) = covariance_file {
            if let Some((t, meta)) = load_existing(p, "covariance file")? {
                let bad = |what: String| {
                    CordaError::Invalid(format!(
                        "the covariance file {} {what}; delete it to recompute or pass another covariance file",
                        p.display()
                    ))
                };
                if let Some(why) = provenance.mismatch(&meta, p, allow_unchecked) {
                    return Err(bad(why));
                }
                for target in plan.targets() {
                    let d = target.shape.1;
                    let found = t
                        .get(&target.name)
                        .ok_or_else(|| bad(format!("lacks {}", target.name)))?;
                    if found.dims() != [d, d] {
                        return Err(bad(format!(
                            "holds {} with shape {:?} but its input has {d} features",
                            target.name,
                            found.dims()
                        )));
                    }
                    check_values(found, &target.name, false).map_err(bad)?;
                }
                return Ok(Self::Covariances(t));
            }
        }
        Ok(Self::Nothing)
    }

    /// Whether the calibration pass must run.
    pub fn needs_calibration(&self) -> bool {
        matches!(self, Self::Nothing)
    }

    /// The covariance of each of `targets`' input sites from a reused covariance file.
    pub fn covariances(&self, targets: &[Target]) -> Result<BTreeMap<InputSite, Mat<f32>>> {
        let mut covs = BTreeMap::new();
        if let Self::Covariances(t) = self {
            for target in targets {
                if let std::collections::btree_map::Entry::Vacant(e) = covs.entry(target.site) {
                    e.insert(tensor_to_mat(&t[&target.name])?);
                }
            }
        }
        Ok(covs)
    }

    /// The cached eigens of `targets` (checked by [`Reused::load`]).
    pub fn cached_eigens(&self, targets: &[Target]) -> Result<Option<Vec<CordaEigens>>> {
        let Self::Cache(t) = self else {
            return Ok(None);
        };
        let get = |target: &Target, key: &str| -> Result<Mat<f64>> {
            let m = tensor_to_mat(&t[&format!("{}.eigens.{key}", target.name)])?;
            Ok(Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64))
        };
        targets
            .iter()
            .map(|target| {
                let s = t[&format!("{}.eigens.S_WC", target.name)]
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1::<f64>()?;
                Ok(CordaEigens {
                    s,
                    u: get(target, "U_WC")?,
                    vt: get(target, "V_WC")?.transpose().to_owned(),
                    damp: f64::NAN,
                    spectrum: None,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// The left singular vectors of a cache have orthonormal columns (to float32 rounding); vectors
/// that do not were damaged or belong to no decomposition.
fn check_orthonormal(t: &Tensor, name: &str) -> std::result::Result<(), String> {
    let u = tensor_to_mat(t).map_err(|e| format!("has an unreadable {name} ({e})"))?;
    let gram = u.transpose() * &u;
    let worst = (0..gram.ncols())
        .flat_map(|j| (0..gram.nrows()).map(move |i| (i, j)))
        .map(|(i, j)| (gram[(i, j)] - if i == j { 1.0 } else { 0.0 }).abs())
        .fold(0.0f32, f32::max);
    if worst.is_nan() || worst > 1e-3 {
        return Err(format!(
            "holds {name} whose columns are not orthonormal (off by {worst:.1e})"
        ));
    }
    Ok(())
}

/// Refuse NaN/inf (and, for singular values, negative) entries in a reused file.
fn check_values(t: &Tensor, name: &str, non_negative: bool) -> std::result::Result<(), String> {
    let v = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| format!("has an unreadable {name} ({e})"))?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(format!("holds NaN or inf in {name}"));
    }
    if non_negative && v.iter().any(|x| *x < 0.0) {
        return Err(format!("holds negative singular values in {name}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::atomic::testing::names;

    /// Issue 14 case 5: a write that fails (a wrong entry, a rename that cannot happen) leaves
    /// no temporary file; one left by a killed run is removed by the next writer.
    #[test]
    fn failed_writes_leave_no_temporary_file() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("cache.safetensors");
        let entries = vec![("a".to_string(), vec![2])];
        let mut w = StreamingSafetensors::create(&path, &entries, &[]).unwrap();
        assert!(w.write("b", &[1.0, 2.0]).is_err());
        drop(w);
        assert!(names(root.path()).is_empty());

        // The target is a non-empty directory: the publishing rename fails.
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("x"), b"1").unwrap();
        let mut w = StreamingSafetensors::create(&path, &entries, &[]).unwrap();
        w.write("a", &[1.0, 2.0]).unwrap();
        let err = w.finish().unwrap_err().to_string();
        assert!(
            err.contains("cache.safetensors") && !err.contains(".tmp-"),
            "{err}"
        );
        assert_eq!(names(root.path()), ["cache.safetensors"]);
        std::fs::remove_dir_all(&path).unwrap();

        let dead = crate::util::atomic::testing::dead_pid();
        let stale = root.path().join(format!(".cache.safetensors.tmp-{dead}"));
        std::fs::write(&stale, b"half").unwrap();
        let mut w = StreamingSafetensors::create(&path, &entries, &[]).unwrap();
        w.write("a", &[1.0, 2.0]).unwrap();
        w.finish().unwrap();
        assert_eq!(names(root.path()), ["cache.safetensors"]);
    }
}
