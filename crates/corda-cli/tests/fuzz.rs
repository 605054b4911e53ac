//! Property tests over what a user types or writes for the binaries: `--config` YAML and TOML
//! files (through the expansion into flags) and the values of `--rank_pattern`,
//! `--alpha_pattern`, `--max_shard_size`, booleans and numbers. No input may panic.
//! Seeds: `tests/fuzz-corpus/{config_file,flags}/`; the harness is `tests/support/fuzz.rs`.

#[path = "../../../tests/support/fuzz.rs"]
mod fuzz;

use std::ffi::OsString;

use corda_cli::{
    expand_config_args, key_alpha, key_rank, parse_bool, parse_size, positive_count,
    positive_number, read_config_file,
};
use fuzz::{fuzz, Scratch};

const KNOWN: &[&str] = &[
    "model_id",
    "r",
    "lora_alpha",
    "first_eigen",
    "target_modules",
    "rank_pattern",
    "calib_loader_size",
    "save_path",
    "dataset_field",
    "model_name_or_path",
    "bf16",
    "learning_rate",
    "max_steps",
    "save_total_limit",
];

#[test]
fn config_files() {
    let s = Scratch::new();
    fuzz("config_file", 1.0, |name, bytes| {
        let d = s.dir();
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        let _ = read_config_file(&p);
        let args: Vec<OsString> = vec!["prog".into(), "--config".into(), p.clone().into()];
        let _ = expand_config_args(args.clone(), Some(KNOWN));
        let _ = expand_config_args(args, None);
    });
}

#[test]
fn flag_values() {
    fuzz("flags", 2.0, |name, bytes| {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end_matches('\n');
        // clap splits --rank_pattern / --alpha_pattern at commas (value_delimiter).
        for part in text.split(',') {
            let _ = key_rank(part);
            let _ = key_alpha(part);
        }
        let _ = (parse_size(text), parse_bool(text));
        let _ = (positive_count(text), positive_number(text));
        assert!(!name.is_empty());
    });
}
