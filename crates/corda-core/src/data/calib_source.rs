//! Where the calibration rows of preprocessing come from: a registry dataset (from the local
//! hub cache or from given files) or a local data file, plus the template that turns a row into
//! text and the sampling mode, each overridable.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::calibration::CalibSampling;
use super::registry::lookup;
use super::source::read_rows;
use super::template::Template;
use crate::hub::Hub;
use crate::{CordaError, Result};

/// A calibration dataset as the user names it.
#[derive(Debug, Clone, Default)]
pub struct CalibrationSource {
    /// A registry name (`configs/datasets.toml`) or a local .parquet / .jsonl / .json file or
    /// directory. An existing path wins over a registry name.
    pub dataset: String,
    /// For a registry dataset: read these files instead of its hub files.
    pub data_files: Vec<PathBuf>,
    /// Overrides the registry's template (a local file defaults to `{text}`).
    pub template: Option<String>,
    /// Overrides the registry's sampling (a local file defaults to one sample per row).
    pub sampling: Option<CalibSampling>,
}

/// The rows to sample from, with how to sample them.
#[derive(Debug, Clone)]
pub struct CalibrationRows {
    pub rows: Vec<Value>,
    pub template: Template,
    pub sampling: CalibSampling,
}

impl CalibrationSource {
    /// Read the rows and settle the template and the sampling (hub settings from the
    /// environment).
    pub fn load(&self) -> Result<CalibrationRows> {
        self.load_with(&Hub::from_env())
    }

    /// [`Self::load`] with explicit hub settings: a registry dataset not in the cache is
    /// downloaded through `hub`.
    pub fn load_with(&self, hub: &Hub) -> Result<CalibrationRows> {
        let path = Path::new(&self.dataset);
        if path.exists() {
            return Ok(CalibrationRows {
                rows: read_rows(path)?,
                template: Template::parse(self.template.as_deref().unwrap_or("{text}"))?,
                sampling: self.sampling.unwrap_or(CalibSampling::Rows),
            });
        }
        let entry = lookup(&self.dataset).map_err(|e| {
            CordaError::Data(format!(
                "calibration dataset `{}` is neither a registry name nor an existing file ({e})",
                self.dataset
            ))
        })?;
        let rows = if self.data_files.is_empty() {
            entry.load_rows_from(&entry.source().hub(hub.clone()))?
        } else {
            let mut rows = vec![];
            for f in &self.data_files {
                rows.extend(read_rows(f)?);
            }
            entry.filter_rows(rows)?
        };
        let template = match &self.template {
            Some(t) => Template::parse(t)?,
            None => entry.template()?,
        };
        Ok(CalibrationRows {
            rows,
            template,
            sampling: self.sampling.unwrap_or(entry.sampling),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_file_defaults_to_text_rows_and_unknown_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.jsonl");
        std::fs::write(&f, "{\"text\": \"a b c\"}\n{\"text\": \"d e\"}\n").unwrap();
        let src = CalibrationSource {
            dataset: f.display().to_string(),
            ..Default::default()
        };
        let got = src.load().unwrap();
        assert_eq!((got.rows.len(), got.sampling), (2, CalibSampling::Rows));
        let err = CalibrationSource {
            dataset: "no-such-set".into(),
            ..Default::default()
        }
        .load()
        .unwrap_err()
        .to_string();
        assert!(err.contains("no-such-set"), "{err}");
    }
}
