//! Synthetic, seeded datasets in the shape of the paper's calibration and training sets, so
//! the quickstart, tests and benchmarks need no download.
//!
//! - `qa`: the shape of `nq_open` (`question`: string, `answer`: list of strings), templated
//!   facts such as "what is the capital of France?" → `["Paris"]`. KPM calibrates on
//!   questions like these: the knowledge a fine-tune should not forget.
//! - `math`: the shape of MetaMathQA (`query`, `response`), templated arithmetic such as
//!   "What is 23 plus 48?" → "We add 23 and 48. The answer is: 71". IPM calibrates on it and
//!   the quickstart fine-tunes on it.
//!
//! The patterns are deliberately learnable: a response is a fixed template of numbers that
//! appear in the query, so even a short LoRA fine-tune of a random model visibly lowers the
//! loss. Every word the generators can emit is listed in [`vocabulary_text`], which is what the
//! demo tokenizer is built from, so nothing tokenizes to `<unk>`.
//!
//! Each file is written as JSON Lines and as parquet (Utf8 strings, `list<Utf8>` answers, like
//! the hub's files), and both read back identically through [`corda_core::data::read_rows`].

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use corda_core::{CordaError, Result};

/// (country, capital, language, continent).
const COUNTRIES: &[(&str, &str, &str, &str)] = &[
    ("France", "Paris", "French", "Europe"),
    ("Germany", "Berlin", "German", "Europe"),
    ("Italy", "Rome", "Italian", "Europe"),
    ("Spain", "Madrid", "Spanish", "Europe"),
    ("Portugal", "Lisbon", "Portuguese", "Europe"),
    ("Greece", "Athens", "Greek", "Europe"),
    ("Norway", "Oslo", "Norwegian", "Europe"),
    ("Sweden", "Stockholm", "Swedish", "Europe"),
    ("Finland", "Helsinki", "Finnish", "Europe"),
    ("Poland", "Warsaw", "Polish", "Europe"),
    ("Hungary", "Budapest", "Hungarian", "Europe"),
    ("Japan", "Tokyo", "Japanese", "Asia"),
    ("China", "Beijing", "Chinese", "Asia"),
    ("Thailand", "Bangkok", "Thai", "Asia"),
    ("India", "New Delhi", "Hindi", "Asia"),
    ("Turkey", "Ankara", "Turkish", "Asia"),
    ("Egypt", "Cairo", "Arabic", "Africa"),
    ("Kenya", "Nairobi", "Swahili", "Africa"),
    ("Brazil", "Brasilia", "Portuguese", "South America"),
    ("Argentina", "Buenos Aires", "Spanish", "South America"),
    ("Peru", "Lima", "Spanish", "South America"),
    ("Chile", "Santiago", "Spanish", "South America"),
    ("Mexico", "Mexico City", "Spanish", "North America"),
    ("Canada", "Ottawa", "English", "North America"),
    ("Australia", "Canberra", "English", "Oceania"),
];

/// (animal, legs).
const ANIMALS: &[(&str, u32)] = &[
    ("dog", 4),
    ("cat", 4),
    ("horse", 4),
    ("spider", 8),
    ("bird", 2),
    ("ant", 6),
    ("bee", 6),
    ("chicken", 2),
    ("octopus", 8),
    ("cow", 4),
];

/// (word, opposite).
const OPPOSITES: &[(&str, &str)] = &[
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("old", "young"),
    ("light", "dark"),
    ("high", "low"),
    ("early", "late"),
    ("open", "closed"),
    ("full", "empty"),
    ("strong", "weak"),
];

/// (thing, colour).
const COLOURS: &[(&str, &str)] = &[
    ("the sky", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("a banana", "yellow"),
    ("coal", "black"),
    ("a ripe tomato", "red"),
    ("an orange", "orange"),
];

/// Spelled-out small numbers, so "how many legs" answers have an alias like nq_open's lists.
const NUMBER_WORDS: &[&str] = &[
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
];

const NAMES: &[&str] = &[
    "Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack",
];
const ITEMS: &[&str] = &["apples", "books", "coins", "marbles", "pencils", "stickers"];

/// Every fixed piece of text the generators put into a question, answer, query or response
/// (numbers are written with digits, which the tokenizer splits one by one).
pub fn vocabulary_text() -> Vec<String> {
    let mut v: Vec<String> = [
        "what is the capital of ?",
        "which city is the capital of ?",
        "is the capital of which country ?",
        "what language is spoken in ?",
        "on which continent is ?",
        "how many legs does a have ?",
        "what is the opposite of ?",
        "what color is ?",
        "What is plus ? minus times divided by",
        "We add and . We subtract from . We multiply We divide by",
        "The answer is :",
        "has and buys more . How many does have now ?",
        "has and gives away . How many are left ?",
        "starts with and buys more , so we add and . gives away , so we subtract from .",
        "Washington D . C .",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (c, cap, lang, cont) in COUNTRIES {
        v.extend([c, cap, lang, cont].iter().map(|s| s.to_string()));
    }
    v.extend(ANIMALS.iter().map(|(a, _)| a.to_string()));
    v.extend(
        OPPOSITES
            .iter()
            .flat_map(|(a, b)| [a.to_string(), b.to_string()]),
    );
    v.extend(
        COLOURS
            .iter()
            .flat_map(|(a, b)| [a.to_string(), b.to_string()]),
    );
    v.extend(NUMBER_WORDS.iter().map(|s| s.to_string()));
    v.extend(NAMES.iter().map(|s| s.to_string()));
    v.extend(ITEMS.iter().map(|s| s.to_string()));
    v
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    items.choose(rng).expect("non-empty table")
}

/// `n` rows shaped like `nq_open`: `{"question": str, "answer": [str, ...]}`.
pub fn qa_rows(n: usize, seed: u64) -> Vec<Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Separate streams: changing one dataset never changes the other.
    rng.set_stream(1);
    (0..n)
        .map(|_| {
            let (question, answer): (String, Vec<String>) = match rng.gen_range(0..7) {
                0 | 1 => {
                    let (c, cap, _, _) = pick(&mut rng, COUNTRIES);
                    let q = if rng.gen_bool(0.5) {
                        format!("what is the capital of {c}?")
                    } else {
                        format!("which city is the capital of {c}?")
                    };
                    (q, vec![cap.to_string()])
                }
                2 => {
                    let (c, cap, _, _) = pick(&mut rng, COUNTRIES);
                    (
                        format!("{cap} is the capital of which country?"),
                        vec![c.to_string()],
                    )
                }
                3 => {
                    let (c, _, lang, cont) = pick(&mut rng, COUNTRIES);
                    if rng.gen_bool(0.5) {
                        (
                            format!("what language is spoken in {c}?"),
                            vec![lang.to_string()],
                        )
                    } else {
                        (
                            format!("on which continent is {c}?"),
                            vec![cont.to_string()],
                        )
                    }
                }
                4 => {
                    let (a, legs) = pick(&mut rng, ANIMALS);
                    (
                        format!("how many legs does a {a} have?"),
                        vec![legs.to_string(), NUMBER_WORDS[*legs as usize].to_string()],
                    )
                }
                5 => {
                    let (w, o) = pick(&mut rng, OPPOSITES);
                    (format!("what is the opposite of {w}?"), vec![o.to_string()])
                }
                _ => {
                    let (t, c) = pick(&mut rng, COLOURS);
                    (format!("what color is {t}?"), vec![c.to_string()])
                }
            };
            json!({"question": question, "answer": answer})
        })
        .collect()
}

/// `n` rows shaped like MetaMathQA: `{"query": str, "response": str}`; every response ends
/// with MetaMathQA's "The answer is: N".
pub fn math_rows(n: usize, seed: u64) -> Vec<Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(2);
    (0..n)
        .map(|_| {
            let (query, response) = match rng.gen_range(0..6) {
                0 | 1 => {
                    let (a, b) = (rng.gen_range(1..100u32), rng.gen_range(1..100u32));
                    (
                        format!("What is {a} plus {b}?"),
                        format!("We add {a} and {b}. The answer is: {}", a + b),
                    )
                }
                2 => {
                    let (x, y) = (rng.gen_range(1..100u32), rng.gen_range(1..100u32));
                    let (a, b) = (x.max(y), x.min(y));
                    (
                        format!("What is {a} minus {b}?"),
                        format!("We subtract {b} from {a}. The answer is: {}", a - b),
                    )
                }
                3 => {
                    let (a, b) = (rng.gen_range(2..13u32), rng.gen_range(2..13u32));
                    (
                        format!("What is {a} times {b}?"),
                        format!("We multiply {a} and {b}. The answer is: {}", a * b),
                    )
                }
                4 => {
                    let (b, q) = (rng.gen_range(2..13u32), rng.gen_range(2..13u32));
                    let a = b * q;
                    (
                        format!("What is {a} divided by {b}?"),
                        format!("We divide {a} by {b}. The answer is: {q}"),
                    )
                }
                _ => {
                    let name = pick(&mut rng, NAMES);
                    let item = pick(&mut rng, ITEMS);
                    let (a, b) = (rng.gen_range(10..60u32), rng.gen_range(1..10u32));
                    if rng.gen_bool(0.5) {
                        (
                            format!("{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"),
                            format!(
                                "{name} starts with {a} {item} and buys {b} more, so we add {a} and {b}. The answer is: {}",
                                a + b
                            ),
                        )
                    } else {
                        (
                            format!("{name} has {a} {item} and gives away {b}. How many {item} are left?"),
                            format!(
                                "{name} gives away {b}, so we subtract {b} from {a}. The answer is: {}",
                                a - b
                            ),
                        )
                    }
                }
            };
            json!({"query": query, "response": response})
        })
        .collect()
}

/// How a column is stored in parquet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// `Utf8`.
    Text,
    /// `list<Utf8>` (nq_open's `answer`).
    TextList,
}

/// Write rows as JSON Lines (keys in the order given by the rows).
pub fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    let file = File::create(path).map_err(|e| CordaError::io(path, e))?;
    let mut w = BufWriter::new(file);
    for row in rows {
        let line = serde_json::to_string(row).expect("json value");
        writeln!(w, "{line}").map_err(|e| CordaError::io(path, e))?;
    }
    w.flush().map_err(|e| CordaError::io(path, e))
}

fn text_of<'a>(row: &'a Value, col: &str, i: usize) -> Result<&'a str> {
    row.get(col)
        .and_then(Value::as_str)
        .ok_or_else(|| CordaError::Data(format!("row {i}: column `{col}` is not a string")))
}

/// Write rows as one snappy-compressed parquet file with the given columns. The writer
/// records no timestamps, so the same rows give the same bytes.
pub fn write_parquet(path: &Path, rows: &[Value], columns: &[(&str, ColumnKind)]) -> Result<()> {
    let mut arrays: Vec<(&str, ArrayRef)> = Vec::with_capacity(columns.len());
    for &(col, kind) in columns {
        let array: ArrayRef = match kind {
            ColumnKind::Text => Arc::new(
                rows.iter()
                    .enumerate()
                    .map(|(i, r)| text_of(r, col, i).map(Some))
                    .collect::<Result<StringArray>>()?,
            ),
            ColumnKind::TextList => {
                let mut b = ListBuilder::new(StringBuilder::new());
                for (i, r) in rows.iter().enumerate() {
                    let items = r.get(col).and_then(Value::as_array).ok_or_else(|| {
                        CordaError::Data(format!("row {i}: column `{col}` is not a list"))
                    })?;
                    for item in items {
                        let s = item.as_str().ok_or_else(|| {
                            CordaError::Data(format!("row {i}: column `{col}` holds a non-string"))
                        })?;
                        b.values().append_value(s);
                    }
                    b.append(true);
                }
                Arc::new(b.finish())
            }
        };
        arrays.push((col, array));
    }
    let parquet_err = |e: &dyn std::fmt::Display| {
        CordaError::Data(format!("{}: cannot write parquet: {e}", path.display()))
    };
    let batch = RecordBatch::try_from_iter(arrays).map_err(|e| parquet_err(&e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let file = File::create(path).map_err(|e| CordaError::io(path, e))?;
    let mut writer =
        ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(|e| parquet_err(&e))?;
    writer.write(&batch).map_err(|e| parquet_err(&e))?;
    writer.close().map_err(|e| parquet_err(&e))?;
    Ok(())
}

/// What [`write_datasets`] should generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoDataSpec {
    /// Rows per dataset.
    pub rows: usize,
    pub seed: u64,
}

/// The files [`write_datasets`] wrote.
#[derive(Debug, Clone)]
pub struct DemoDataFiles {
    pub qa_jsonl: PathBuf,
    pub qa_parquet: PathBuf,
    pub math_jsonl: PathBuf,
    pub math_parquet: PathBuf,
}

impl DemoDataFiles {
    pub fn all(&self) -> [&Path; 4] {
        [
            &self.qa_jsonl,
            &self.qa_parquet,
            &self.math_jsonl,
            &self.math_parquet,
        ]
    }
}

/// Write `qa.{jsonl,parquet}` and `math.{jsonl,parquet}` into `dir` (created if needed).
pub fn write_datasets(dir: &Path, spec: &DemoDataSpec) -> Result<DemoDataFiles> {
    if spec.rows == 0 {
        return Err(CordaError::Invalid(
            "the demo datasets need at least one row; pass --rows N with N >= 1".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| CordaError::io(dir, e))?;
    let files = DemoDataFiles {
        qa_jsonl: dir.join("qa.jsonl"),
        qa_parquet: dir.join("qa.parquet"),
        math_jsonl: dir.join("math.jsonl"),
        math_parquet: dir.join("math.parquet"),
    };
    let qa = qa_rows(spec.rows, spec.seed);
    write_jsonl(&files.qa_jsonl, &qa)?;
    write_parquet(
        &files.qa_parquet,
        &qa,
        &[
            ("question", ColumnKind::Text),
            ("answer", ColumnKind::TextList),
        ],
    )?;
    let math = math_rows(spec.rows, spec.seed);
    write_jsonl(&files.math_jsonl, &math)?;
    write_parquet(
        &files.math_parquet,
        &math,
        &[("query", ColumnKind::Text), ("response", ColumnKind::Text)],
    )?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use corda_core::data::read_rows;

    #[test]
    fn demo_datasets_read_back_identically_from_jsonl_and_parquet() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_datasets(dir.path(), &DemoDataSpec { rows: 40, seed: 5 }).unwrap();
        let qa = qa_rows(40, 5);
        assert_eq!(read_rows(&files.qa_jsonl).unwrap(), qa);
        assert_eq!(read_rows(&files.qa_parquet).unwrap(), qa);
        let math = math_rows(40, 5);
        assert_eq!(read_rows(&files.math_jsonl).unwrap(), math);
        assert_eq!(read_rows(&files.math_parquet).unwrap(), math);
    }

    #[test]
    fn demo_datasets_same_seed_same_bytes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let fa = write_datasets(a.path(), &DemoDataSpec { rows: 25, seed: 9 }).unwrap();
        let fb = write_datasets(b.path(), &DemoDataSpec { rows: 25, seed: 9 }).unwrap();
        for (x, y) in fa.all().iter().zip(fb.all()) {
            assert_eq!(
                std::fs::read(x).unwrap(),
                std::fs::read(y).unwrap(),
                "{}",
                x.display()
            );
        }
        assert_ne!(qa_rows(25, 9), qa_rows(25, 10));
        assert_ne!(math_rows(25, 9), math_rows(25, 10));
    }

    #[test]
    fn demo_math_answers_are_right() {
        for row in math_rows(300, 1) {
            let q = row["query"].as_str().unwrap();
            let r = row["response"].as_str().unwrap();
            let nums: Vec<i64> = q
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            let ans: i64 = r.rsplit("The answer is: ").next().unwrap().parse().unwrap();
            let (a, b) = (nums[0], nums[1]);
            let want = if q.contains("plus") || q.contains("buys") {
                a + b
            } else if q.contains("minus") || q.contains("gives away") {
                a - b
            } else if q.contains("times") {
                a * b
            } else {
                a / b
            };
            assert_eq!(ans, want, "{q} -> {r}");
        }
    }

    #[test]
    fn demo_datasets_refuse_zero_rows() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_datasets(dir.path(), &DemoDataSpec { rows: 0, seed: 1 })
            .unwrap_err()
            .to_string();
        assert!(e.contains("--rows"), "{e}");
    }
}
