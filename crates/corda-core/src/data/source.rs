//! Tables of rows from local files, directories or cached hub datasets.
//!
//! The reference scripts call `load_dataset(name_or_path, split=...)`; this is the counterpart.
//! A source is a `.jsonl`, `.json`, `.parquet` or `.txt` file (optionally `.gz`), a directory
//! of such files (a local copy of a dataset repo), or a hub id: read from the local cache, or
//! downloaded into it (see [`crate::data::hub`]). Rows are JSON objects whatever the file
//! format, so templates see one shape.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::data::files::{list_data_files, select_files, FileSelection};
use crate::data::hub;
use crate::data::parquet::read_parquet;
use crate::data::split::Split;
use crate::hub::{Hub, HubOptions};
use crate::{CordaError, Result};

/// Where rows come from, and which of its files to read.
#[derive(Debug, Clone)]
pub struct RowSource {
    source: String,
    config: Option<String>,
    data_files: Vec<String>,
    hub: Option<Hub>,
}

impl RowSource {
    /// A local path or a hub dataset id (`nq_open`, `meta-math/MetaMathQA`).
    pub fn new(source: impl Into<String>) -> Self {
        RowSource {
            source: source.into(),
            config: None,
            data_files: Vec::new(),
            hub: None,
        }
    }

    /// Selects a config (a first-level directory of the dataset, e.g. `wikitext-2-raw-v1`).
    pub fn config(mut self, config: Option<&str>) -> Self {
        self.config = config.map(str::to_string);
        self
    }

    /// Reads exactly these files (paths relative to the dataset root, or directory prefixes)
    /// instead of choosing by config and split, like `data_files=` in `load_dataset`.
    pub fn data_files(mut self, files: Vec<String>) -> Self {
        self.data_files = files;
        self
    }

    /// Reaches the hub with these settings (token, endpoint, cache) instead of the
    /// environment's.
    pub fn hub(mut self, hub: Hub) -> Self {
        self.hub = Some(hub);
        self
    }

    /// Reads hub datasets from this cache directory only, never downloading (for prepared
    /// caches and tests).
    pub fn cache_root(mut self, root: impl Into<PathBuf>) -> Self {
        let mut opts = HubOptions::from_env_fn(|_| None);
        opts.offline = true;
        self.hub = Some(Hub::new(opts).with_cache_dir(root));
        self
    }

    /// The files that make up `split_name`, in reading order (downloading a hub dataset's
    /// files when the cache lacks them).
    pub fn files(&self, split_name: &str) -> Result<Vec<PathBuf>> {
        let path = Path::new(&self.source);
        let sel = FileSelection {
            config: self.config.as_deref(),
            split: split_name,
            data_files: &self.data_files,
        };
        if path.is_file() {
            if split_name != "train" {
                return Err(CordaError::Data(format!(
                    "{} is a single file, which `datasets` loads as the `train` split, not \
                     `{split_name}`; use `train[...]` or a directory with {split_name} files",
                    path.display()
                )));
            }
            return Ok(vec![path.to_path_buf()]);
        }
        if path.is_dir() {
            let all = list_data_files(path)?;
            let what = format!("directory {}", path.display());
            return Ok(select_files(&all, &sel, &what)?
                .into_iter()
                .map(|f| path.join(f))
                .collect());
        }
        if !hub::looks_like_hub_id(&self.source) {
            return Err(CordaError::Data(format!(
                "dataset `{}` is neither an existing file or directory nor a hub dataset id \
                 (`name` or `owner/name`); check the path",
                self.source
            )));
        }
        match &self.hub {
            Some(h) => hub::dataset_files(h, &self.source, &sel),
            None => hub::dataset_files(&Hub::from_env(), &self.source, &sel),
        }
    }

    /// Reads the split's files, concatenated in name order, then applies the split's slice.
    pub fn load(&self, split: &Split) -> Result<Vec<Value>> {
        let mut rows = Vec::new();
        for file in self.files(split.name())? {
            rows.extend(read_rows(&file)?);
        }
        if rows.is_empty() {
            return Err(CordaError::Data(format!(
                "dataset `{}` split `{}` has no rows; check the files or pick another split",
                self.source,
                split.name()
            )));
        }
        split.select(rows).map_err(|e| match e {
            CordaError::Data(msg) => CordaError::Data(format!("dataset `{}`: {msg}", self.source)),
            other => other,
        })
    }
}

/// Loads the rows of `split` (e.g. `train[:1000]`) from a local file, a directory or a hub
/// dataset, optionally restricted to one config.
pub fn load_rows(source: &str, split: &Split, config: Option<&str>) -> Result<Vec<Value>> {
    RowSource::new(source).config(config).load(split)
}

/// Reads one data file by its extension; `.gz` files (c4's `.json.gz` shards) are
/// decompressed on the way in and read by the extension before `.gz`.
pub fn read_rows(path: &Path) -> Result<Vec<Value>> {
    let lower = path
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let (inner, gzipped) = match lower.strip_suffix(".gz") {
        Some(stem) => (stem, true),
        None => (lower.as_str(), false),
    };
    let ext = inner.rsplit_once('.').map(|(_, e)| e).unwrap_or_default();
    match ext {
        "parquet" if !gzipped => read_parquet(path),
        "jsonl" | "ndjson" => read_jsonl(path, &read_text(path, gzipped)?),
        "json" => read_json(path, &read_text(path, gzipped)?),
        "txt" => Ok(read_text(path, gzipped)?
            .lines()
            .map(|line| {
                let mut obj = Map::new();
                obj.insert("text".to_string(), Value::String(line.to_string()));
                Value::Object(obj)
            })
            .collect()),
        _ if gzipped || matches!(ext, "bz2" | "xz" | "zst" | "zip") => {
            Err(CordaError::Data(format!(
                "{}: this compressed data file is not supported (only .jsonl/.json/.txt may be \
                 gzip-compressed); decompress it and pass the decompressed file",
                path.display()
            )))
        }
        _ => Err(CordaError::Data(format!(
            "{}: unknown data file type; use .jsonl, .json, .parquet or .txt (optionally .gz)",
            path.display()
        ))),
    }
}

fn read_text(path: &Path, gzipped: bool) -> Result<String> {
    let bytes = if gzipped {
        let file = std::fs::File::open(path).map_err(|e| CordaError::io(path, e))?;
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(file), &mut out)
            .map_err(|e| {
                CordaError::Data(format!(
                    "{}: not a readable gzip file ({e}); the download may be damaged, delete it \
                     and fetch it again",
                    path.display()
                ))
            })?;
        out
    } else {
        std::fs::read(path).map_err(|e| CordaError::io(path, e))?
    };
    String::from_utf8(bytes).map_err(|e| {
        CordaError::Data(format!(
            "{}: not UTF-8 text (invalid byte at offset {}); convert the file to UTF-8",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// JSON Lines: one object per non-blank line.
fn read_jsonl(path: &Path, text: &str) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            CordaError::Data(format!(
                "{}:{}: not valid JSON ({e}); each line of a .jsonl file must be one JSON object",
                path.display(),
                i + 1
            ))
        })?;
        rows.push(object_row(path, value, &format!("line {}", i + 1))?);
    }
    Ok(rows)
}

/// A `.json` file: an array of objects, an object with one list-of-objects field (e.g.
/// `{"data": [...]}`), or — as `datasets` also accepts — JSON Lines under a `.json` name.
fn read_json(path: &Path, text: &str) -> Result<Vec<Value>> {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(whole) => {
            // Many hub `.json` files are really JSON Lines.
            return read_jsonl(path, text).map_err(|_| CordaError::Json {
                path: path.to_path_buf(),
                source: whole,
            });
        }
    };
    let items = match value {
        Value::Array(items) => items,
        Value::Object(mut obj) => {
            let lists: Vec<String> = obj
                .iter()
                .filter(|(_, v)| v.as_array().is_some_and(|a| a.iter().all(Value::is_object)))
                .map(|(k, _)| k.clone())
                .collect();
            match lists.as_slice() {
                [field] => match obj.remove(field) {
                    Some(Value::Array(items)) => items,
                    _ => Vec::new(),
                },
                [] => vec![Value::Object(obj)],
                many => {
                    return Err(CordaError::Data(format!(
                        "{}: the JSON object has several list fields ({}); keep only the one \
                         with the rows, or convert the file to JSON Lines",
                        path.display(),
                        many.join(", ")
                    )))
                }
            }
        }
        other => {
            return Err(CordaError::Data(format!(
                "{}: expected a JSON array of objects, found {}; convert the file to JSON Lines",
                path.display(),
                short(&other)
            )))
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| object_row(path, v, &format!("item {i}")))
        .collect()
}

fn object_row(path: &Path, value: Value, at: &str) -> Result<Value> {
    if value.is_object() {
        Ok(value)
    } else {
        Err(CordaError::Data(format!(
            "{}: {at} is {}, but every row must be a JSON object of columns",
            path.display(),
            short(&value)
        )))
    }
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("`{}…`", &text[..cut]),
        None => format!("`{text}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_json_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let expected = vec![json!({"a": 1}), json!({"a": 2})];
        let array = write(d, "array.json", r#"[{"a": 1}, {"a": 2}]"#);
        assert_eq!(read_rows(&array).unwrap(), expected);
        let wrapped = write(
            d,
            "wrapped.json",
            r#"{"version": 3, "data": [{"a": 1}, {"a": 2}]}"#,
        );
        assert_eq!(read_rows(&wrapped).unwrap(), expected);
        let lines = write(d, "lines.json", "{\"a\": 1}\n\n{\"a\": 2}\n");
        assert_eq!(read_rows(&lines).unwrap(), expected);
        let jsonl = write(d, "x.jsonl", "{\"a\": 1}\r\n{\"a\": 2}");
        assert_eq!(read_rows(&jsonl).unwrap(), expected);
        let txt = write(d, "x.txt", "one\ntwo\n");
        assert_eq!(
            read_rows(&txt).unwrap(),
            vec![json!({"text": "one"}), json!({"text": "two"})]
        );
    }

    #[test]
    fn bad_files_give_located_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let bad = write(d, "bad.jsonl", "{\"a\": 1}\n{\"a\": \n");
        let err = read_rows(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:2"), "{err}");
        let scalar = write(d, "scalar.jsonl", "{\"a\": 1}\n3\n");
        let err = read_rows(&scalar).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("JSON object"),
            "{err}"
        );
        let two = write(d, "two.json", r#"{"x": [{"a": 1}], "y": [{"a": 2}]}"#);
        assert!(read_rows(&two).unwrap_err().to_string().contains("x, y"));
        let bz = write(d, "c4-train.json.bz2", "");
        assert!(read_rows(&bz)
            .unwrap_err()
            .to_string()
            .contains("decompress"));
        let fake_gz = write(d, "c4-train.json.gz", "plain");
        assert!(read_rows(&fake_gz)
            .unwrap_err()
            .to_string()
            .contains("gzip"));
        let broken = write(d, "broken.json", "[{\"a\": 1},");
        assert!(matches!(read_rows(&broken), Err(CordaError::Json { .. })));
    }

    #[test]
    fn gzipped_json_lines_are_read() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c4-train.00000-of-01024.json.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all(b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n")
            .unwrap();
        gz.finish().unwrap();
        assert_eq!(
            read_rows(&path).unwrap(),
            vec![json!({"text": "a"}), json!({"text": "b"})]
        );
    }

    #[test]
    fn directories_concatenate_split_files_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "data/train-00001-of-00002.jsonl", "{\"i\": 2}\n");
        write(
            d,
            "data/train-00000-of-00002.jsonl",
            "{\"i\": 0}\n{\"i\": 1}\n",
        );
        write(d, "data/test-00000-of-00001.jsonl", "{\"i\": 9}\n");
        write(d, "README.md", "# card");
        let source = d.to_str().unwrap();
        let rows = load_rows(source, &Split::whole("train"), None).unwrap();
        assert_eq!(
            rows,
            vec![json!({"i": 0}), json!({"i": 1}), json!({"i": 2})]
        );
        let rows = load_rows(source, &Split::parse("train[1:]").unwrap(), None).unwrap();
        assert_eq!(rows, vec![json!({"i": 1}), json!({"i": 2})]);
        let rows = load_rows(source, &Split::whole("test"), None).unwrap();
        assert_eq!(rows, vec![json!({"i": 9})]);
    }

    #[test]
    fn single_files_are_the_train_split() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "rows.jsonl", "{\"i\": 0}\n{\"i\": 1}\n");
        let source = file.to_str().unwrap();
        assert_eq!(
            load_rows(source, &Split::parse("train[:1]").unwrap(), None)
                .unwrap()
                .len(),
            1
        );
        let err = load_rows(source, &Split::whole("test"), None).unwrap_err();
        assert!(err.to_string().contains("`train` split"), "{err}");
        let err = load_rows(source, &Split::parse("train[5:]").unwrap(), None).unwrap_err();
        assert!(err.to_string().contains("only 2 rows"), "{err}");
    }

    #[test]
    fn missing_paths_are_not_mistaken_for_hub_ids() {
        let err = load_rows("no/such/file.jsonl", &Split::whole("train"), None).unwrap_err();
        assert!(err.to_string().contains("check the path"), "{err}");
    }

    #[test]
    fn hub_ids_resolve_in_an_explicit_cache() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("datasets--owner--qa");
        write(&repo, "refs/main", "0123abcd");
        let snap = repo.join("snapshots/0123abcd");
        write(&snap, "cfg/train-00000-of-00001.jsonl", "{\"q\": \"a\"}\n");
        write(
            &snap,
            "cfg/validation-00000-of-00001.jsonl",
            "{\"q\": \"b\"}\n",
        );
        write(
            &snap,
            "other/train-00000-of-00001.jsonl",
            "{\"q\": \"c\"}\n",
        );
        write(&snap, "README.md", "card");
        let source = RowSource::new("owner/qa").cache_root(cache.path());
        let rows = source
            .clone()
            .config(Some("cfg"))
            .load(&Split::whole("train"))
            .unwrap();
        assert_eq!(rows, vec![json!({"q": "a"})]);
        let rows = source
            .clone()
            .config(Some("cfg"))
            .load(&Split::whole("validation"))
            .unwrap();
        assert_eq!(rows, vec![json!({"q": "b"})]);
        let err = source.clone().load(&Split::whole("train")).unwrap_err();
        assert!(
            err.to_string().contains("several configs (cfg, other)"),
            "{err}"
        );
        let rows = source
            .data_files(vec!["other/".to_string()])
            .load(&Split::whole("train"))
            .unwrap();
        assert_eq!(rows, vec![json!({"q": "c"})]);

        let err = RowSource::new("owner/absent")
            .cache_root(cache.path())
            .load(&Split::whole("train"))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("huggingface-cli download --repo-type dataset owner/absent"),
            "{err}"
        );
    }
}
