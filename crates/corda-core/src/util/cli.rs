//! Command-line helpers shared by the three binaries: Hugging Face style booleans
//! (`--bf16`, `--bf16 True`, `--bf16 false`) and `--config FILE` (YAML or TOML whose keys are
//! flag names; flags given on the command line win because they come later).

use std::ffi::OsString;
use std::path::Path;

use serde_json::Value;

use crate::{CordaError, Result};

/// Parse `true/false/1/0/yes/no` in any case, as transformers' `HfArgumentParser` does.
pub fn parse_bool(s: &str) -> std::result::Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "y" | "on" => Ok(true),
        "false" | "0" | "no" | "n" | "off" => Ok(false),
        other => Err(format!("`{other}` is not a boolean; use true or false")),
    }
}

/// Read a YAML (`.yaml`/`.yml`) or TOML (`.toml`) config into flag/value pairs.
pub fn read_config_file(path: &Path) -> Result<Vec<(String, Value)>> {
    let text = std::fs::read_to_string(path).map_err(|e| CordaError::io(path, e))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let value: Value = match ext.as_str() {
        "toml" => {
            let t: toml::Value = toml::from_str(&text).map_err(|e| {
                CordaError::Invalid(format!("{}: not valid TOML: {e}", path.display()))
            })?;
            serde_json::to_value(t)
                .map_err(|e| CordaError::Invalid(format!("{}: {e}", path.display())))?
        }
        "yaml" | "yml" => serde_yaml::from_str(&text)
            .map_err(|e| CordaError::Invalid(format!("{}: not valid YAML: {e}", path.display())))?,
        _ => {
            return Err(CordaError::Invalid(format!(
                "{}: --config takes a .yaml, .yml or .toml file",
                path.display()
            )))
        }
    };
    let Value::Object(map) = value else {
        return Err(CordaError::Invalid(format!(
            "{}: expected a mapping of flag names to values",
            path.display()
        )));
    };
    Ok(map.into_iter().collect())
}

/// Replace `--config FILE` in `args` by the file's flags, placed right after the program name
/// so that any flag also given on the command line overrides the file.
pub fn expand_config_args(args: Vec<OsString>) -> Result<Vec<OsString>> {
    let mut out: Vec<OsString> = vec![];
    let mut from_file: Vec<OsString> = vec![];
    let mut it = args.into_iter();
    if let Some(prog) = it.next() {
        out.push(prog);
    }
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        let file = if s == "--config" {
            match it.next() {
                Some(f) => Some(f),
                None => return Err(CordaError::Invalid("--config needs a file".into())),
            }
        } else {
            s.strip_prefix("--config=").map(OsString::from)
        };
        match file {
            Some(f) => {
                for (key, value) in read_config_file(Path::new(&f))? {
                    let flag = format!("--{key}");
                    match value {
                        Value::Null => {}
                        Value::Bool(b) => from_file.push(format!("{flag}={b}").into()),
                        Value::Array(items) => {
                            from_file.push(flag.into());
                            for v in items {
                                from_file.push(scalar(&v).into());
                            }
                        }
                        v => {
                            from_file.push(flag.into());
                            from_file.push(scalar(&v).into());
                        }
                    }
                }
            }
            None => out.push(a),
        }
    }
    let rest = out.split_off(1.min(out.len()));
    out.extend(from_file);
    out.extend(rest);
    Ok(out)
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `--device cpu|cuda|cuda:N`. CUDA needs a build with the `cuda` cargo feature.
pub fn parse_device(s: &str) -> Result<candle_core::Device> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(candle_core::Device::Cpu);
    }
    let ordinal = match s.as_str() {
        "cuda" | "gpu" => Some(0),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    match ordinal {
        Some(n) if cfg!(feature = "cuda") => candle_core::Device::new_cuda(n)
            .map_err(|e| CordaError::Invalid(format!("cannot open CUDA device {n}: {e}"))),
        Some(_) => Err(CordaError::Invalid(
            "this build has no CUDA support; rebuild with `cargo build --release --features cuda` or use --device cpu".into(),
        )),
        None => Err(CordaError::Invalid(format!("unknown device `{s}`; use cpu, cuda or cuda:N"))),
    }
}

/// `--max_shard_size`: `2GB`, `500MB`, `1GiB`, `64KB` or a plain byte count, as transformers.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let units: [(&str, u64); 7] = [
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ];
    let (num, mult) = units
        .iter()
        .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n, *m)))
        .unwrap_or((t.as_str(), 1));
    match num.trim().parse::<f64>() {
        Ok(v) if v > 0.0 => Ok((v * mult as f64) as u64),
        _ => Err(CordaError::Invalid(format!(
            "--max_shard_size `{s}`: use e.g. 2GB, 500MB or a byte count"
        ))),
    }
}

/// Log to stderr at `default_level` unless `RUST_LOG` says otherwise; colours only on a terminal.
pub fn init_logging(default_level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_flags_come_first_so_the_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "r: 16\nbf16: true\ndataset_field: [query, response]\n").unwrap();
        let args: Vec<OsString> = ["prog", "--config", f.to_str().unwrap(), "--r", "8"]
            .iter()
            .map(OsString::from)
            .collect();
        let got: Vec<String> = expand_config_args(args)
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            got,
            [
                "prog",
                "--r",
                "16",
                "--bf16=true",
                "--dataset_field",
                "query",
                "response",
                "--r",
                "8"
            ]
        );
        let t = dir.path().join("c.toml");
        std::fs::write(&t, "lora_alpha = 32\n").unwrap();
        let got = expand_config_args(vec!["p".into(), format!("--config={}", t.display()).into()])
            .unwrap();
        assert_eq!(got, ["p", "--lora_alpha", "32"].map(OsString::from));
        assert!(expand_config_args(vec!["p".into(), "--config".into(), "x.ini".into()]).is_err());
    }

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("500mb").unwrap(), 500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots")
            .unwrap_err()
            .to_string()
            .contains("--max_shard_size"));
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn booleans_parse_like_transformers() {
        assert_eq!(parse_bool("True"), Ok(true));
        assert_eq!(parse_bool("false"), Ok(false));
        assert!(parse_bool("maybe").is_err());
    }
}
