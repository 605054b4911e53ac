//! Results of a corda-eval run: one record per (model, task), written as JSON, printed as a
//! table, and drawn as a grouped bar chart when several models or adapters are compared.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::util::plot::bar_chart_svg;
use crate::{CordaError, Result};

/// The score of one evaluated model on one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// How the model is named in tables and charts.
    pub label: String,
    /// The model directory (or hub id / GGUF file).
    pub model: String,
    /// The adapter attached to it, if any.
    pub adapter: Option<String>,
    pub task: String,
    pub dataset: String,
    /// `perplexity`, `exact_match` or `accuracy`.
    pub metric: String,
    pub value: f64,
    /// Windows (perplexity) or questions scored.
    pub count: usize,
    /// Tokens scored (perplexity) or generated.
    pub tokens: usize,
    pub seconds: f64,
    /// Task-specific detail: per-window NLL, or each question's generation and prediction.
    #[serde(default)]
    pub details: Value,
}

impl EvalRecord {
    pub fn tokens_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tokens as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Every record of a run (and of earlier runs it is compared with).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalResults {
    pub records: Vec<EvalRecord>,
    /// The run's settings (task options, dtype, limits), for the record.
    #[serde(default)]
    pub settings: Value,
}

impl EvalResults {
    /// Read a results file written by [`Self::write_json`].
    pub fn read_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| CordaError::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| CordaError::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|source| CordaError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        crate::util::atomic::write_file_atomic(path, format!("{text}\n").as_bytes())
    }

    /// The distinct model labels, in order of first appearance.
    pub fn labels(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.records
            .iter()
            .filter(|r| seen.insert(r.label.clone()))
            .map(|r| r.label.clone())
            .collect()
    }

    /// A plain-text table: one row per record.
    pub fn table(&self) -> String {
        let head = ["model", "task", "dataset", "metric", "value", "n", "tok/s"];
        let rows: Vec<[String; 7]> = self
            .records
            .iter()
            .map(|r| {
                let value = if r.metric == "perplexity" {
                    format!("{:.4}", r.value)
                } else {
                    format!("{:.2}%", 100.0 * r.value)
                };
                [
                    r.label.clone(),
                    r.task.clone(),
                    r.dataset.clone(),
                    r.metric.clone(),
                    value,
                    r.count.to_string(),
                    format!("{:.1}", r.tokens_per_second()),
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..head.len())
            .map(|c| {
                rows.iter()
                    .map(|r| r[c].chars().count())
                    .chain([head[c].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<&str>| -> String {
            cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, w))| {
                    if i >= 4 {
                        format!("{c:>w$}")
                    } else {
                        format!("{c:<w$}")
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let mut out = line(head.to_vec());
        out.push('\n');
        out.push_str(&line(
            widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect(),
        ));
        out.push('\n');
        for r in &rows {
            out.push_str(&line(r.iter().map(String::as_str).collect()));
            out.push('\n');
        }
        out
    }

    /// A grouped bar chart (one group per task and dataset, one bar per model), when more
    /// than one model is compared. Scores are in percent; perplexities as they are.
    pub fn chart(&self, title: &str) -> Option<String> {
        let labels = self.labels();
        if labels.len() < 2 {
            return None;
        }
        let mut categories: Vec<String> = Vec::new();
        for r in &self.records {
            let c = category(r);
            if !categories.contains(&c) {
                categories.push(c);
            }
        }
        let series: Vec<(String, Vec<f64>)> = labels
            .iter()
            .map(|l| {
                let values = categories
                    .iter()
                    .map(|c| {
                        self.records
                            .iter()
                            .find(|r| &r.label == l && &category(r) == c)
                            .map_or(f64::NAN, |r| {
                                if r.metric == "perplexity" {
                                    r.value
                                } else {
                                    100.0 * r.value
                                }
                            })
                    })
                    .collect();
                (l.clone(), values)
            })
            .collect();
        let metrics: BTreeSet<&str> = self.records.iter().map(|r| r.metric.as_str()).collect();
        let y = if metrics.len() == 1 && metrics.contains("perplexity") {
            "perplexity"
        } else if metrics.contains("perplexity") {
            "score (%) / perplexity"
        } else {
            "score (%)"
        };
        Some(bar_chart_svg(title, y, &categories, &series))
    }
}

fn category(r: &EvalRecord) -> String {
    if r.task == r.dataset {
        r.task.clone()
    } else {
        format!("{} {}", r.task, r.dataset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(label: &str, task: &str, metric: &str, value: f64) -> EvalRecord {
        EvalRecord {
            label: label.into(),
            model: "m".into(),
            adapter: None,
            task: task.into(),
            dataset: task.into(),
            metric: metric.into(),
            value,
            count: 10,
            tokens: 100,
            seconds: 2.0,
            details: Value::Null,
        }
    }

    #[test]
    fn table_json_and_chart() {
        let mut r = EvalResults::default();
        r.records.push(rec("base", "nqopen", "exact_match", 0.25));
        assert!(r.chart("t").is_none());
        r.records.push(rec("corda", "nqopen", "exact_match", 0.3));
        let t = r.table();
        assert!(
            t.contains("25.00%") && t.contains("30.00%") && t.contains("50.0"),
            "{t}"
        );
        let svg = r.chart("nqopen").unwrap();
        assert!(svg.contains(">corda<") && svg.contains(">30<"), "{svg}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        r.write_json(&p).unwrap();
        assert_eq!(EvalResults::read_json(&p).unwrap(), r);
    }
}
