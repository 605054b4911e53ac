//! A small mutation fuzzer on top of proptest, shared by the crates' `fuzz.rs` tests.
//!
//! Every target first replays its checked-in seed corpus (`tests/fuzz-corpus/<target>/`), then
//! runs a bounded number of mutated seeds: byte flips and overwrites, inserted and deleted
//! runs, truncation, splices of troublesome tokens, and, for JSON seeds, one node replaced by
//! an arbitrary JSON value (so every field meets every type). Any panic fails the test and
//! proptest shrinks it to a small list of mutations. Errors are the expected outcome.
//!
//! The runs are deterministic. `CORDA_FUZZ_CASES` (default 512 per target) and
//! `CORDA_FUZZ_SEED` (a number) explore further, e.g.
//! `CORDA_FUZZ_CASES=20000 CORDA_FUZZ_SEED=7 cargo test --release --test fuzz`. A crash found
//! that way belongs in the corpus once fixed, so every later run replays it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::Value;

/// The seeds of `target`: (file name, bytes), sorted by name.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fuzz-corpus")
        .join(target)
}

/// One edit of a seed.
#[derive(Debug, Clone)]
pub enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    Splice {
        at: usize,
        token: &'static str,
    },
    /// Replace JSON node number `node` (pre-order) by `value`.
    Json {
        node: usize,
        value: Value,
    },
}

/// Tokens that tend to break parsers: extreme numbers, empty and odd structure, escapes.
const TOKENS: &[&str] = &[
    "0",
    "-1",
    "1e309",
    "-1e309",
    "NaN",
    "1e-320",
    "18446744073709551616",
    "9007199254740993",
    "null",
    "true",
    "\"\"",
    "[]",
    "{}",
    "[[[[",
    "}}}}",
    "\"\\u0000\"",
    "\"\\ud800\"",
    ":",
    ",",
    "\n",
    "\t",
    "\u{feff}",
    "é",
    "..",
    "{",
    "}",
    "=",
    "[",
    "]",
    "*",
    ".*",
    "(",
    ")",
    "\\",
    "%",
    "train[:",
    "-",
    "+",
    "|",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<usize>(), prop::sample::select(TOKENS))
            .prop_map(|(at, token)| Mutation::Splice { at, token }),
        2 => (any::<usize>(), json_value()).prop_map(|(node, value)| Mutation::Json { node, value }),
    ]
}

/// Arbitrary JSON, weighted towards the values that break typed readers.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![0i64, -1, 1, 2, 1 << 40, i64::MIN]).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(vec![0.5f64, -0.0, 1e300, -1e-300, 3.5]).prop_map(Value::from),
        "[a-z_.*|()\\[\\]0-9=:,{}-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// `seed` after `mutations`.
pub fn apply(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in mutations {
        let pos = |at: usize, len: usize| if len == 0 { 0 } else { at % len };
        match m {
            Mutation::Flip { at, bit } if !b.is_empty() => {
                let i = pos(*at, b.len());
                b[i] ^= 1 << bit;
            }
            Mutation::Set { at, byte } if !b.is_empty() => {
                let i = pos(*at, b.len());
                b[i] = *byte;
            }
            Mutation::Insert { at, bytes } => {
                let i = pos(*at, b.len() + 1);
                b.splice(i..i, bytes.iter().copied());
            }
            Mutation::Delete { at, len } if !b.is_empty() => {
                let i = pos(*at, b.len());
                let end = (i + len).min(b.len());
                b.drain(i..end);
            }
            Mutation::Truncate { at } => {
                let i = pos(*at, b.len() + 1);
                b.truncate(i);
            }
            Mutation::Splice { at, token } => {
                let i = pos(*at, b.len() + 1);
                b.splice(i..i, token.bytes());
            }
            Mutation::Json { node, value } => {
                if let Ok(mut v) = serde_json::from_slice::<Value>(&b) {
                    let n = count_nodes(&v);
                    replace_node(&mut v, node % n, value);
                    b = serde_json::to_vec_pretty(&v).unwrap();
                }
            }
            _ => {}
        }
    }
    b
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count_nodes).sum(),
        Value::Object(o) => o.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// Replace node `k` (pre-order, 0 = `v` itself); returns how many nodes were passed.
fn replace_node(v: &mut Value, k: usize, with: &Value) -> usize {
    if k == 0 {
        *v = with.clone();
        return usize::MAX;
    }
    let mut seen = 1;
    let children: Vec<&mut Value> = match v {
        Value::Array(a) => a.iter_mut().collect(),
        Value::Object(o) => o.values_mut().collect(),
        _ => return 1,
    };
    for c in children {
        let n = count_nodes(c);
        if k < seen + n {
            replace_node(c, k - seen, with);
            return usize::MAX;
        }
        seen += n;
    }
    seen
}

fn cases() -> u32 {
    std::env::var("CORDA_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512)
}

fn rng() -> TestRng {
    let seed: u64 = std::env::var("CORDA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// Replay the corpus of `target`, then `scale` × the configured number of mutated seeds, each
/// through `check(seed name, bytes)`, which must not panic.
pub fn fuzz(target: &str, scale: f64, check: impl Fn(&str, &[u8])) {
    let seeds = seeds(target);
    for (name, bytes) in &seeds {
        check(name, bytes);
    }
    let config = Config {
        cases: ((cases() as f64 * scale).ceil() as u32).max(1),
        failure_persistence: None,
        max_shrink_iters: 512,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, rng());
    let strategy = (0..seeds.len(), prop::collection::vec(mutation(), 1..5));
    let result = runner.run(&strategy, |(i, muts)| {
        let (name, seed) = &seeds[i];
        check(name, &apply(seed, &muts));
        Ok(())
    });
    if let Err(e) = result {
        panic!("fuzz target `{target}` panicked: {e}");
    }
}

/// A scratch directory per process, emptied for each case.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    pub fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    /// An empty directory.
    pub fn dir(&self) -> PathBuf {
        let d = self.0.path().join("case");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        d
    }
}
