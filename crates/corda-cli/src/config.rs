//! `--config FILE`: a YAML or TOML mapping of flag names to values, expanded into command-line
//! flags placed right after the program name, so a flag also given on the command line wins.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Read a YAML (`.yaml`/`.yml`) or TOML (`.toml`) config into key/value pairs, in file order.
pub fn read_config_file(path: &Path) -> Result<Vec<(String, Value)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let value: Value = match ext.as_str() {
        "toml" => {
            let t: toml::Value = toml::from_str(&text)
                .with_context(|| format!("{}: not valid TOML", path.display()))?;
            serde_json::to_value(t).with_context(|| format!("{}", path.display()))?
        }
        "yaml" | "yml" => serde_yaml::from_str(&text)
            .with_context(|| format!("{}: not valid YAML", path.display()))?,
        _ => bail!(
            "{}: --config takes a .yaml, .yml or .toml file",
            path.display()
        ),
    };
    let Value::Object(map) = value else {
        bail!(
            "{}: expected a mapping of flag names to values",
            path.display()
        );
    };
    Ok(map.into_iter().collect())
}

/// Replace `--config FILE` (or `--config=FILE`) in `args` by the file's flags. Booleans become
/// `--flag=true`, lists become one flag followed by its values, `null` leaves the flag out.
/// When `known` lists the command's long flags, a key that is none of them (in either spelling)
/// is refused naming the file and the key, instead of surfacing later as an unknown `--flag`.
pub fn expand_config_args(args: Vec<OsString>, known: Option<&[&str]>) -> Result<Vec<OsString>> {
    let mut out: Vec<OsString> = vec![];
    let mut from_file: Vec<OsString> = vec![];
    let mut it = args.into_iter();
    if let Some(prog) = it.next() {
        out.push(prog);
    }
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        let file = if s == "--config" {
            Some(it.next().context("--config needs a file")?)
        } else {
            s.strip_prefix("--config=").map(OsString::from)
        };
        let Some(f) = file else {
            out.push(a);
            continue;
        };
        for (key, value) in read_config_file(Path::new(&f))? {
            if let Some(known) = known {
                let snake = key.replace('-', "_");
                if !known.contains(&key.as_str()) && !known.contains(&snake.as_str()) {
                    bail!(
                        "{}: unknown key `{key}` (not a flag of this program; see --help for the flag names)",
                        Path::new(&f).display()
                    );
                }
            }
            let flag = format!("--{key}");
            match value {
                Value::Null => {}
                Value::Bool(b) => from_file.push(format!("{flag}={b}").into()),
                Value::Array(items) => {
                    from_file.push(flag.into());
                    from_file.extend(items.iter().map(|v| OsString::from(scalar(v))));
                }
                v => {
                    from_file.push(flag.into());
                    from_file.push(scalar(&v).into());
                }
            }
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
        let got: Vec<String> = expand_config_args(args, None)
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
        let got = expand_config_args(
            vec!["p".into(), format!("--config={}", t.display()).into()],
            Some(&["lora_alpha"]),
        )
        .unwrap();
        assert_eq!(got, ["p", "--lora_alpha", "32"].map(OsString::from));
        let err = expand_config_args(
            vec!["p".into(), format!("--config={}", t.display()).into()],
            Some(&["r"]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("c.toml") && err.contains("`lora_alpha`"),
            "{err}"
        );
        assert!(
            expand_config_args(vec!["p".into(), "--config".into(), "x.ini".into()], None).is_err()
        );
        assert!(expand_config_args(vec!["p".into(), "--config".into()], None).is_err());
    }
}
