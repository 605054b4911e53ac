//! `--dataset_split` specs in the Hugging Face `datasets` slicing syntax.
//!
//! The reference fine-tuning script passes strings such as `train[:100000]` straight to
//! `load_dataset(..., split=...)`, so users already know this syntax: `train`, `train[:N]`,
//! `train[N:M]`, `train[N:]`, `train[-N:]`, `train[:10%]`, `train[10%:20%]`.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::{CordaError, Result};

/// One end of a slice: an absolute row index or a percentage of the split, both possibly
/// negative (counted from the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Rows(i64),
    Percent(i64),
}

/// A parsed split spec: the split name plus an optional `[start:end]` slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    name: String,
    start: Option<Bound>,
    end: Option<Bound>,
}

impl Split {
    /// The whole split `name` (no slice).
    pub fn whole(name: impl Into<String>) -> Self {
        Split {
            name: name.into(),
            start: None,
            end: None,
        }
    }

    /// Parses a spec such as `train[10%:20%]`.
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        let bad = |why: &str| {
            CordaError::Data(format!(
                "invalid dataset split `{spec}`: {why}; use e.g. `train`, `train[:1000]`, \
                 `train[100:200]` or `train[:10%]`"
            ))
        };
        let (name, slice) = match spec.find('[') {
            None => (spec, None),
            Some(open) => {
                let inner = spec[open + 1..]
                    .strip_suffix(']')
                    .ok_or_else(|| bad("the slice must end with `]`"))?;
                (&spec[..open], Some(inner))
            }
        };
        if name.is_empty() {
            return Err(bad("the split name is empty"));
        }
        if !name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(bad(
                "the split name may only hold letters, digits, `_`, `-` and `.`",
            ));
        }
        let (start, end) = match slice {
            None => (None, None),
            Some(inner) => {
                let (a, b) = inner
                    .split_once(':')
                    .ok_or_else(|| bad("the slice needs a `:` (`[start:end]`)"))?;
                (
                    parse_bound(a).map_err(|e| bad(&e))?,
                    parse_bound(b).map_err(|e| bad(&e))?,
                )
            }
        };
        Ok(Split {
            name: name.to_string(),
            start,
            end,
        })
    }

    /// The split name (`train` for `train[:100]`), which selects the data files.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the spec has a `[start:end]` slice.
    pub fn is_sliced(&self) -> bool {
        self.start.is_some() || self.end.is_some()
    }

    /// The rows the spec selects from a split of `n_rows` rows.
    ///
    /// Percentages round to the nearest row (ties to even), as `datasets` does. Like `datasets`,
    /// an end past the last row is clamped (the reference recipe asks for `train[:100000]`
    /// whatever the set's size; a warning says so), while a start past the end is an error,
    /// and so is a selection with no rows.
    pub fn apply(&self, n_rows: usize) -> Result<Range<usize>> {
        let start = match self.start {
            None => 0,
            Some(b) => self.resolve(b, n_rows)?,
        };
        let end = match self.end {
            None => n_rows,
            Some(Bound::Rows(v)) if v > n_rows as i64 => {
                tracing::warn!("dataset split `{self}` asks for {v} rows but the split has {n_rows}; using all of them");
                n_rows
            }
            Some(b) => self.resolve(b, n_rows)?,
        };
        if start >= end {
            return Err(CordaError::Data(format!(
                "dataset split `{self}` selects no rows (rows {start}..{end} of a split with \
                 {n_rows} rows); widen the slice"
            )));
        }
        Ok(start..end)
    }

    /// Keeps only the selected rows of `rows` (the whole split).
    pub fn select<T>(&self, mut rows: Vec<T>) -> Result<Vec<T>> {
        let range = self.apply(rows.len())?;
        rows.truncate(range.end);
        rows.drain(..range.start);
        Ok(rows)
    }

    fn resolve(&self, bound: Bound, n_rows: usize) -> Result<usize> {
        let n = n_rows as i64;
        let signed = match bound {
            Bound::Rows(v) => v,
            // `datasets` computes `round(pct * n / 100)` with Python's round (ties to even).
            Bound::Percent(p) => ((p as f64) * (n as f64) / 100.0).round_ties_even() as i64,
        };
        let index = if signed < 0 { n + signed } else { signed };
        if index < 0 || index > n {
            return Err(CordaError::Data(format!(
                "dataset split `{self}` indexes row {signed}, but the split has only {n_rows} \
                 rows; use a slice within 0..{n_rows} (e.g. `{}[:{n_rows}]`) or no slice",
                self.name
            )));
        }
        Ok(index as usize)
    }
}

fn parse_bound(text: &str) -> std::result::Result<Option<Bound>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let (digits, percent) = match text.strip_suffix('%') {
        Some(d) => (d.trim(), true),
        None => (text, false),
    };
    let value: i64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not an integer or an integer percentage"))?;
    if percent {
        if !(-100..=100).contains(&value) {
            return Err(format!("percentage `{text}` is outside -100%..100%"));
        }
        Ok(Some(Bound::Percent(value)))
    } else {
        Ok(Some(Bound::Rows(value)))
    }
}

impl FromStr for Split {
    type Err = CordaError;

    fn from_str(s: &str) -> Result<Self> {
        Split::parse(s)
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if self.is_sliced() {
            let show = |b: Option<Bound>| match b {
                None => String::new(),
                Some(Bound::Rows(v)) => v.to_string(),
                Some(Bound::Percent(p)) => format!("{p}%"),
            };
            write!(f, "[{}:{}]", show(self.start), show(self.end))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(spec: &str, n: usize) -> Range<usize> {
        Split::parse(spec).unwrap().apply(n).unwrap()
    }

    #[test]
    fn parses_the_datasets_forms() {
        assert_eq!(range("train", 16), 0..16);
        assert_eq!(range("train[:4]", 16), 0..4);
        assert_eq!(range("train[2:6]", 16), 2..6);
        assert_eq!(range("train[10:]", 16), 10..16);
        assert_eq!(range("train[-3:]", 16), 13..16);
        assert_eq!(range("train[:-3]", 16), 0..13);
        assert_eq!(range("train[:16]", 16), 0..16);
        assert_eq!(range(" validation[ 1 : 2 ] ", 16), 1..2);
    }

    #[test]
    fn percentages_round_half_to_even() {
        assert_eq!(range("train[:10%]", 100), 0..10);
        assert_eq!(range("train[10%:20%]", 100), 10..20);
        // 10% of 16 = 1.6 -> 2; 25% of 10 = 2.5 -> 2 (ties to even, like Python's round).
        assert_eq!(range("train[:10%]", 16), 0..2);
        assert_eq!(range("train[:25%]", 10), 0..2);
        assert_eq!(range("train[:35%]", 10), 0..4);
        assert_eq!(range("train[-50%:]", 16), 8..16);
        assert_eq!(range("train[:100%]", 7), 0..7);
    }

    #[test]
    fn name_and_display_round_trip() {
        for spec in ["train", "train[:100000]", "test[10%:20%]", "train[-5:]"] {
            let split: Split = spec.parse().unwrap();
            assert_eq!(split.to_string(), spec);
        }
        assert_eq!(Split::parse("train[:3]").unwrap().name(), "train");
        assert!(!Split::whole("train").is_sliced());
    }

    #[test]
    fn malformed_specs_are_errors() {
        for spec in [
            "",
            "[:3]",
            "train[",
            "train[3]",
            "train[a:b]",
            "train[:3",
            "train[:150%]",
            "tr ain",
            "train[1.5:]",
        ] {
            let err = Split::parse(spec).unwrap_err().to_string();
            assert!(err.contains("invalid dataset split"), "{spec}: {err}");
        }
    }

    #[test]
    fn out_of_range_and_empty_selections_name_the_row_count() {
        assert_eq!(
            Split::parse("train[:100000]").unwrap().apply(16).unwrap(),
            0..16
        );
        let err = Split::parse("train[200:300]")
            .unwrap()
            .apply(16)
            .unwrap_err();
        assert!(err.to_string().contains("only 16 rows"), "{err}");
        let err = Split::parse("train[-20:]").unwrap().apply(16).unwrap_err();
        assert!(err.to_string().contains("only 16 rows"), "{err}");
        let err = Split::parse("train[5:5]").unwrap().apply(16).unwrap_err();
        assert!(err.to_string().contains("selects no rows"), "{err}");
        assert!(err.to_string().contains("16 rows"), "{err}");
        let err = Split::whole("train").apply(0).unwrap_err();
        assert!(err.to_string().contains("0 rows"), "{err}");
        let err = Split::parse("train[:1%]").unwrap().apply(10).unwrap_err();
        assert!(err.to_string().contains("selects no rows"), "{err}");
    }

    #[test]
    fn select_keeps_the_slice() {
        let rows: Vec<u32> = (0..10).collect();
        let picked = Split::parse("train[3:6]").unwrap().select(rows).unwrap();
        assert_eq!(picked, vec![3, 4, 5]);
    }
}
