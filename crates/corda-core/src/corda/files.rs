//! The covariance file (`{module: C}`, C already divided by the sample count, as PEFT's
//! `covariance_file`) and the decomposition cache (`{module}.eigens.{S_WC,U_WC,V_WC}`, already
//! cropped, as PEFT's `cache_file`), in safetensors.
//!
//! Both are written while the layers stream by, so the header (every name and shape) is written
//! first and the data appended in the same order: nothing is held for the whole model.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use faer::Mat;

use crate::{CordaError, Result};

/// A float32 safetensors file written entry by entry in a fixed, pre-declared order, into a
/// temporary file renamed into place by [`StreamingSafetensors::finish`].
pub struct StreamingSafetensors {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<std::fs::File>,
    order: Vec<(String, usize)>,
    next: usize,
}

impl StreamingSafetensors {
    /// `entries`: (name, shape) in the order the data will be written.
    pub fn create(
        path: &Path,
        entries: &[(String, Vec<usize>)],
        metadata: &[(&str, String)],
    ) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| CordaError::io(parent, e))?;
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
        let tmp = path.with_extension("safetensors.partial");
        let file = std::fs::File::create(&tmp).map_err(|e| CordaError::io(&tmp, e))?;
        let mut out = BufWriter::new(file);
        out.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(|e| CordaError::io(&tmp, e))?;
        out.write_all(text.as_bytes())
            .map_err(|e| CordaError::io(&tmp, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            out,
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
                .map_err(|e| CordaError::io(&self.tmp, e))?;
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
        self.out.flush().map_err(|e| CordaError::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| CordaError::io(&self.path, e))
    }
}

impl Drop for StreamingSafetensors {
    fn drop(&mut self) {
        if self.next != self.order.len() {
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

/// Tensors by name and the file's string metadata.
pub type SavedTensors = (HashMap<String, Tensor>, HashMap<String, String>);

/// A previously saved file of tensors, loaded on the CPU; `None` when absent or empty (PEFT's
/// "exists and has size > 0").
pub fn load_existing(path: &Path, what: &str) -> Result<Option<SavedTensors>> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > 0 => {}
        _ => return Ok(None),
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
