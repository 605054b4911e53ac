//! The token embedding table: read by row, never multiplied (unless tied to the LM head).

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::weights::{RowReader, Weights};
use crate::Result;

const NAME: &str = "model.embed_tokens.weight";

/// Token embeddings, (vocab, hidden), in the storage dtype.
pub fn load_embeddings(
    w: &Weights,
    cfg: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Ok(
        w.get(NAME, Some(&[cfg.vocab_size, cfg.hidden_size]), device)?
            .to_dtype(dtype)?,
    )
}

/// Look up `ids` (batch, seq) in `table`; the result is float32 (batch, seq, hidden).
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
    let h = table.index_select(&flat, 0)?.to_dtype(DType::F32)?;
    Ok(h.reshape((b, t, table.dim(1)?))?)
}

/// A model's embedding table.
pub enum Embeddings {
    /// In memory: tied to the LM head (which multiplies all of it), from a GGUF file, or on
    /// a GPU.
    Dense(Tensor),
    /// Left in the checkpoint file, each lookup reading its rows: an untied table is a
    /// (vocab × hidden) block of memory that training and evaluation only index, 131 MB on
    /// the benchmark model and 1 GB on Llama 3 8B.
    OnDisk {
        table: RowReader,
        /// The storage dtype the rows are rounded through, as a loaded table would be.
        dtype: DType,
    },
}

impl Embeddings {
    /// The table of `w` in the storage dtype `dtype`; `dense` keeps it in memory (the LM head
    /// is tied to it).
    pub fn load(
        w: &Weights,
        cfg: &ModelConfig,
        dtype: DType,
        device: &Device,
        dense: bool,
    ) -> Result<Self> {
        if !dense && device.is_cpu() {
            if let Some(table) = w.row_reader(NAME, cfg.vocab_size, cfg.hidden_size)? {
                return Ok(Self::OnDisk { table, dtype });
            }
        }
        Ok(Self::Dense(load_embeddings(w, cfg, dtype, device)?))
    }

    /// Look up `ids` (batch, seq): float32 (batch, seq, hidden), the same values either way.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(table) => embed(table, ids),
            Self::OnDisk { table, dtype } => {
                let (b, t) = ids.dims2()?;
                let flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let rows = table
                    .gather(&flat)?
                    .to_dtype(*dtype)?
                    .to_dtype(DType::F32)?;
                Ok(rows.reshape((b, t, table.cols()))?)
            }
        }
    }

    /// The whole table in memory, when it is held there.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(table) => Some(table),
            Self::OnDisk { .. } => None,
        }
    }
}
