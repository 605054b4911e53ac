//! Flag spelling and value parsers shared by the binaries. The parsers are clap
//! `value_parser`s: clap names the flag in their errors, so the messages only name the value.

use std::ffi::OsString;
use std::str::FromStr;

use anyhow::{bail, Result};

/// Rewrite kebab-case long flags (`--save-path`, `--save-path=X`) to the underscore names the
/// command declares (`--save_path`), once, instead of an alias per flag. Only names that exist
/// in underscore form are rewritten, and nothing after a bare `--`.
pub fn normalize_flag_names(cmd: &clap::Command, args: Vec<OsString>) -> Vec<OsString> {
    let longs: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    out.extend(it.next());
    for a in it.by_ref() {
        let Some(s) = a.to_str() else {
            out.push(a);
            continue;
        };
        if s == "--" {
            out.push(a);
            break;
        }
        let Some(body) = s.strip_prefix("--") else {
            out.push(a);
            continue;
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let snake = name.replace('-', "_");
        if name.contains('-') && !longs.contains(&name) && longs.contains(&snake.as_str()) {
            out.push(match value {
                Some(v) => format!("--{snake}={v}").into(),
                None => format!("--{snake}").into(),
            });
        } else {
            out.push(a);
        }
    }
    out.extend(it);
    out
}

/// Make every plain on/off flag (a `bool` field, which clap derives as `SetTrue`) a Hugging
/// Face style boolean: `--flag` and `--flag true` (any case, also 1/yes) mean true,
/// `--flag false` mean false; leaving it out means its declared default (false unless the
/// field says `default_value = "true"`). Done once here instead of per flag.
pub fn hf_booleans(cmd: clap::Command) -> clap::Command {
    let flags: Vec<(clap::Id, String)> = cmd
        .get_arguments()
        .filter(|a| matches!(a.get_action(), clap::ArgAction::SetTrue))
        .map(|a| {
            let default = a.get_default_values().first().and_then(|v| v.to_str());
            (a.get_id().clone(), default.unwrap_or("false").to_string())
        })
        .collect();
    flags.into_iter().fold(cmd, |cmd, (id, default)| {
        let value_name = id.as_str().to_ascii_uppercase();
        cmd.mut_arg(id, |a| {
            a.action(clap::ArgAction::Set)
                .num_args(0..=1)
                .value_name(value_name)
                .default_value(default)
                .default_missing_value("true")
                .value_parser(parse_bool)
        })
    })
}

/// Booleans as transformers' `HfArgumentParser` reads them: `true/false/1/0/yes/no` in any case.
pub fn parse_bool(s: &str) -> std::result::Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "y" | "on" => Ok(true),
        "false" | "0" | "no" | "n" | "off" => Ok(false),
        other => Err(format!("`{other}` is not a boolean; use true or false")),
    }
}

/// A size like transformers' `max_shard_size`: `2GB`, `500MB`, `1GiB`, `64KB` or a byte count.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
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
        _ => Err(format!(
            "`{s}` is not a size; use e.g. 2GB, 500MB or a byte count"
        )),
    }
}

/// One `KEY=VALUE` item of a pattern flag (`down_proj=64`); the key must not be empty.
pub fn key_value<T: FromStr>(s: &str) -> std::result::Result<(String, T), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE (e.g. down_proj=64)"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!(
            "`{s}` has an empty module name; use KEY=VALUE (e.g. down_proj=64)"
        ));
    }
    let v = v
        .trim()
        .parse::<T>()
        .map_err(|_| format!("`{}` in `{s}` is not a number", v.trim()))?;
    Ok((k.to_string(), v))
}

/// A count that must be at least 1 (a rank, a batch size).
pub fn positive_count(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1, got 0".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number ≥ 1")),
    }
}

/// A finite number above zero (a LoRA alpha): NaN, infinities, 0 and negatives are refused.
pub fn positive_number(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("must be a finite number above 0, got {v}")),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

/// A finite number of at least zero (a tolerance): NaN, infinities and negatives are refused.
pub fn non_negative_number(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("must be a finite number of at least 0, got {v}")),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

/// Let every flag that takes a value take a negative number (`--r -1`, `--verify_tolerance
/// -1`), so that it reaches the flag's own check and is refused with the flag's range instead
/// of clap's "unexpected argument '-1'". Done once here instead of per flag.
pub fn negative_values(cmd: clap::Command) -> clap::Command {
    let ids: Vec<clap::Id> = cmd
        .get_arguments()
        .filter(|a| a.get_long().is_some() && a.get_action().takes_values())
        .map(|a| a.get_id().clone())
        .collect();
    ids.into_iter().fold(cmd, |cmd, id| {
        cmd.mut_arg(id, |a| a.allow_negative_numbers(true))
    })
}

/// One `KEY=RANK` item of `--rank_pattern`: a non-empty key and a rank of at least 1.
pub fn key_rank(s: &str) -> std::result::Result<(String, usize), String> {
    let (k, v) = key_value::<String>(s)?;
    positive_count(&v)
        .map(|r| (k, r))
        .map_err(|e| format!("rank in `{s}`: {e}"))
}

/// One `KEY=ALPHA` item of `--alpha_pattern`: a non-empty key and a finite alpha above 0.
pub fn key_alpha(s: &str) -> std::result::Result<(String, f64), String> {
    let (k, v) = key_value::<String>(s)?;
    positive_number(&v)
        .map(|a| (k, a))
        .map_err(|e| format!("alpha in `{s}`: {e}"))
}

/// `cpu`, `cuda` (= `cuda:0`, also `gpu`) or `cuda:N`. CUDA needs a build with the `cuda`
/// cargo feature (candle reports whether it was compiled in).
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
    let Some(n) = ordinal else {
        bail!("unknown device `{s}`; use cpu, cuda or cuda:N")
    };
    // A missing driver or library would otherwise be a panic inside cudarc.
    corda_core::util::cuda_runtime::check_cuda_libraries()?;
    candle_core::Device::new_cuda(n).map_err(|e| {
        anyhow::anyhow!(
            "cannot open CUDA device {n}: {e}; check that `nvidia-smi` lists it (and CUDA_VISIBLE_DEVICES), that the driver supports CUDA 13.0 (driver 580 or newer), or use --device cpu"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cmd() -> Command {
        Command::new("p")
            .arg(Arg::new("save_path").long("save_path"))
            .arg(Arg::new("max-odd").long("max-odd"))
            .arg(
                Arg::new("size")
                    .long("max_shard_size")
                    .value_parser(parse_size),
            )
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn kebab_flags_become_the_declared_underscore_names() {
        let args = ["p", "--save-path", "x", "--save-path=y", "--max-odd", "1"]
            .map(OsString::from)
            .to_vec();
        assert_eq!(
            strings(normalize_flag_names(&cmd(), args)),
            ["p", "--save_path", "x", "--save_path=y", "--max-odd", "1"]
        );
        let args = ["p", "--unknown-flag", "--", "--save-path"]
            .map(OsString::from)
            .to_vec();
        assert_eq!(
            strings(normalize_flag_names(&cmd(), args)),
            ["p", "--unknown-flag", "--", "--save-path"]
        );
    }

    #[test]
    fn sizes_parse_like_transformers_and_errors_name_the_flag() {
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("500mb").unwrap(), 500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("0").is_err());
        let err = cmd()
            .try_get_matches_from(["p", "--max_shard_size", "lots"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--max_shard_size") && err.contains("lots"),
            "{err}"
        );
    }

    #[test]
    fn booleans_patterns_and_devices() {
        assert_eq!(parse_bool("True"), Ok(true));
        assert_eq!(parse_bool("false"), Ok(false));
        assert!(parse_bool("maybe").is_err());
        assert_eq!(
            key_value::<usize>("down_proj=64").unwrap(),
            ("down_proj".into(), 64)
        );
        assert!(key_value::<usize>("down_proj").is_err());
        assert!(key_value::<usize>("down_proj=x").is_err());
        assert!(key_value::<usize>("=3").unwrap_err().contains("empty"));
        assert!(key_rank("down_proj=0").is_err());
        assert_eq!(key_rank("q_proj=16").unwrap(), ("q_proj".into(), 16));
        for bad in ["nan", "inf", "-inf", "0", "-16", "x"] {
            assert!(positive_number(bad).is_err(), "{bad}");
            assert!(key_alpha(&format!("q_proj={bad}")).is_err(), "{bad}");
        }
        assert_eq!(positive_number("16").unwrap(), 16.0);
        assert!(positive_count("0").unwrap_err().contains("at least 1"));
        assert!(parse_device("cpu").is_ok());
        assert!(parse_device("tpu").is_err());
    }

    #[test]
    fn cuda_without_a_usable_runtime_is_a_clear_error() {
        // Holds on any machine without a GPU driver, with or without the cuda feature.
        if std::path::Path::new("/dev/nvidiactl").exists() {
            return;
        }
        let e = format!("{:#}", parse_device("cuda:1").unwrap_err());
        assert!(e.contains("--device cpu"), "{e}");
    }
}
