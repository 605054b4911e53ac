//! Command-line plumbing the corda binaries share, so that the library (`corda-core`) knows no
//! flags: `--config` files, kebab/snake flag spelling, Hugging Face style booleans and other
//! value parsers, logging set-up, and one `main` wrapper with one error format and one
//! exit-code policy.
//!
//! Exit status: 0 on success and for `--help` / `--version`; 1 for any error, whether the flags
//! are wrong or the run fails. Errors print as `Error: <message>` on stderr (with the causes
//! after `: `), flag errors followed by clap's usage line.

pub mod config;
pub mod flags;
pub mod hub;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use corda_core::util::process::{install_interrupt_handler, OutputLock};
use corda_core::util::AtomicDir;
use corda_core::CordaError;

pub use config::{expand_config_args, read_config_file};
pub use corda_core::util::process::OnInterrupt;
pub use flags::{
    hf_booleans, key_alpha, key_rank, key_value, negative_values, non_negative_number,
    normalize_flag_names, parse_bool, parse_device, parse_size, positive_count, positive_number,
};
pub use hub::HubArgs;

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

/// Claim an output directory: lock it against other runs, refuse an existing non-empty one
/// unless `overwrite` (`--overwrite`); nothing is written until the [`Output`] is committed.
pub fn output_dir(path: &Path, overwrite: bool) -> anyhow::Result<Output> {
    let lock = OutputLock::acquire(path)?;
    let dir = AtomicDir::create(path, overwrite).map_err(overwrite_hint)?;
    Ok(Output { dir, _lock: lock })
}

/// `path` absolute with symlinks and `..` resolved; a path that does not exist yet is resolved
/// through its nearest existing ancestor. `None` when that cannot be done.
fn resolved(path: &Path) -> Option<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    let mut tail = vec![];
    let mut at = abs.as_path();
    loop {
        if let Ok(mut found) = at.canonicalize() {
            found.extend(tail.iter().rev());
            return Some(found);
        }
        tail.push(at.file_name()?.to_os_string());
        at = at.parent()?;
    }
}

/// Refuse an output `out` (given by flag `out_flag`) that is, contains or lies inside one of
/// `inputs` ((path, flag) pairs): writing it would replace or damage that input, or mix outputs
/// into it. Checked before any work.
pub fn ensure_apart(out: &Path, out_flag: &str, inputs: &[(&Path, &str)]) -> anyhow::Result<()> {
    let Some(o) = resolved(out) else {
        return Ok(());
    };
    for (input, flag) in inputs {
        let Some(i) = resolved(input) else {
            continue;
        };
        let how = if o == i {
            "is"
        } else if i.starts_with(&o) {
            "contains"
        } else if o.starts_with(&i) {
            "lies inside"
        } else {
            continue;
        };
        anyhow::bail!(
            "{out_flag} {} {how} the input {flag} {}: writing there would replace or damage it; choose a path outside it",
            out.display(),
            input.display()
        );
    }
    Ok(())
}

/// An output directory being written under its lock (see [`output_dir`]).
pub struct Output {
    dir: AtomicDir,
    _lock: OutputLock,
}

impl Output {
    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The final location.
    pub fn target(&self) -> &Path {
        self.dir.target()
    }

    /// Move the finished directory into place, then release the lock.
    pub fn commit(self) -> Result<PathBuf, CordaError> {
        self.dir.commit()
    }
}

/// Handle SIGINT / SIGTERM as `mode` says (temporary files are removed before exiting). Call
/// first in `main`, before any thread starts.
pub fn handle_interrupts(mode: OnInterrupt) {
    if let Err(e) = install_interrupt_handler(mode) {
        eprintln!("warning: {e}; an interrupt may leave temporary files behind");
    }
}

/// The library's [`CordaError::OutputExists`] in the binaries' words: the flag that allows it.
pub fn overwrite_hint(e: CordaError) -> anyhow::Error {
    match e {
        CordaError::OutputExists { path } => anyhow::anyhow!(
            "{} already exists and is not empty; choose another path or pass --overwrite",
            path.display()
        ),
        e => e.into(),
    }
}

/// An error and its causes joined by `: `, like anyhow's `{:#}`, except that a cause whose text
/// the message before it already ends with (an error that prints its source, such as
/// `CordaError::Io`) is not repeated.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = user_paths(&cause.to_string());
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// `text` with every temporary name `.NAME.tmp-PID` (where an output is written before it is
/// renamed into place) shown as the `NAME` the user asked for.
fn user_paths(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(".tmp-") {
        let (before, after) = rest.split_at(i);
        let digits = after[5..].bytes().take_while(u8::is_ascii_digit).count();
        // The name starts after the last separator before it and must begin with a dot.
        let start = before
            .rfind(|c: char| c == '/' || c.is_whitespace() || c == '`' || c == '\'')
            .map_or(0, |j| j + 1);
        if digits > 0 && before[start..].starts_with('.') && before.len() > start + 1 {
            out.push_str(&before[..start]);
            out.push_str(&before[start + 1..]);
            rest = &after[5 + digits..];
        } else {
            out.push_str(before);
            out.push_str(".tmp-");
            rest = &after[5..];
        }
    }
    out.push_str(rest);
    out
}

/// Why parsing the command line did not give arguments.
#[derive(Debug)]
pub enum ParseOutcome {
    /// `--help` or `--version`: print this on stdout and exit 0.
    Info(String),
    /// A bad flag, value or config file.
    Error(String),
}

/// `--config` expansion, flag spelling, then clap.
pub fn parse_args<A: clap::Parser>(argv: Vec<OsString>) -> Result<A, ParseOutcome> {
    let cmd = negative_values(hf_booleans(A::command()));
    let longs: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
    let argv =
        expand_config_args(argv, Some(&longs)).map_err(|e| ParseOutcome::Error(error_text(&e)))?;
    let argv = normalize_flag_names(&cmd, argv);
    let parsed = cmd
        .try_get_matches_from(argv)
        .and_then(|m| A::from_arg_matches(&m));
    parsed.map_err(|e| {
        if e.use_stderr() {
            let text = e.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            ParseOutcome::Error(text.trim_end().to_string())
        } else {
            ParseOutcome::Info(e.render().to_string())
        }
    })
}

/// The `main` of every binary: logging at `log_level` (overridden by `RUST_LOG`), parse the
/// command line into `A`, run, and turn the result into the exit status described above.
pub fn main<A: clap::Parser>(
    log_level: &str,
    run: impl FnOnce(A) -> anyhow::Result<()>,
) -> ExitCode {
    init_logging(log_level);
    let args = match parse_args::<A>(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(ParseOutcome::Info(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(ParseOutcome::Error(msg)) => {
            eprintln!("Error: {msg}");
            return ExitCode::FAILURE;
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    #[command(name = "t", args_override_self = true)]
    struct T {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        #[arg(long = "save_path")]
        save_path: Option<String>,
        #[arg(long)]
        bf16: bool,
        #[arg(long, default_value = "true")]
        on: bool,
    }

    fn parse(args: &[&str]) -> Result<T, ParseOutcome> {
        parse_args(args.iter().map(OsString::from).collect())
    }

    /// Issue 14: an output is refused when it is, contains or lies inside an input, however
    /// spelled (`..`, not yet existing); a sibling with a common name prefix is not.
    #[test]
    fn outputs_apart_from_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("M");
        std::fs::create_dir(&m).unwrap();
        let input = [(m.as_path(), "--model_id")];
        for (out, how) in [
            (m.clone(), "is the input"),
            (dir.path().join("M/../M"), "is the input"),
            (dir.path().to_path_buf(), "contains the input"),
            (m.join("new/deeper"), "lies inside the input"),
        ] {
            let e = ensure_apart(&out, "--save_path", &input)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(how) && e.contains("--model_id"),
                "{}: {e}",
                out.display()
            );
        }
        for out in [dir.path().join("M2"), dir.path().join("out/M")] {
            ensure_apart(&out, "--save_path", &input).unwrap();
        }
    }

    /// Issue 14 case 9: a negative number is a value of any flag, checked by its parser.
    #[test]
    fn negative_numbers_are_values() {
        #[derive(Parser, Debug)]
        #[command(name = "n")]
        struct N {
            #[arg(long, value_parser = non_negative_number)]
            tol: Option<f64>,
            #[arg(long)]
            steps: Option<i64>,
        }
        let p = |args: &[&str]| parse_args::<N>(args.iter().map(OsString::from).collect());
        assert_eq!(p(&["n", "--steps", "-3"]).unwrap().steps, Some(-3));
        for bad in ["-1", "nan", "inf"] {
            let Err(ParseOutcome::Error(e)) = p(&["n", "--tol", bad]) else {
                panic!("--tol {bad} accepted");
            };
            assert!(
                e.contains("--tol") && !e.contains("unexpected argument"),
                "{e}"
            );
        }
    }

    #[test]
    fn config_keys_and_flags_may_use_either_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "save-path: from-file\nbf16: true\n").unwrap();
        let t = parse(&["t", "--config", f.to_str().unwrap()]).unwrap();
        assert_eq!((t.save_path.as_deref(), t.bf16), (Some("from-file"), true));
        let t = parse(&[
            "t",
            "--config",
            f.to_str().unwrap(),
            "--save-path",
            "cli",
            "--bf16",
            "False",
        ])
        .unwrap();
        assert_eq!((t.save_path.as_deref(), t.bf16), (Some("cli"), false));
        assert!(parse(&["t", "--bf16"]).unwrap().bf16);
        assert!(parse(&["t"]).unwrap().on);
        assert!(!parse(&["t", "--on", "FALSE"]).unwrap().on);
        assert!(parse(&["t", "--on"]).unwrap().on);
    }

    #[test]
    fn errors_do_not_repeat_a_cause_their_message_already_shows() {
        let io = CordaError::Io {
            path: "/x/y".into(),
            source: std::io::Error::from_raw_os_error(20),
        };
        let text = error_text(&anyhow::Error::from(io).context("reading the model"));
        assert_eq!(text.matches("os error 20").count(), 1, "{text}");
        assert!(text.starts_with("reading the model: /x/y: "), "{text}");
    }

    #[test]
    fn errors_name_the_users_paths_not_temporary_ones() {
        assert_eq!(
            user_paths("/x/.out.tmp-123/model.safetensors: No space left on device"),
            "/x/out/model.safetensors: No space left on device"
        );
        assert_eq!(
            user_paths("writing .cache.safetensors.tmp-9: full; `a.tmp-` .x.tmp-y"),
            "writing cache.safetensors: full; `a.tmp-` .x.tmp-y"
        );
        let io = CordaError::io(
            "/x/.ft.tmp-77/adapter_config.json",
            std::io::Error::from_raw_os_error(28),
        );
        let text = error_text(&anyhow::Error::from(io));
        assert!(text.starts_with("/x/ft/adapter_config.json: "), "{text}");
    }

    #[test]
    fn an_unknown_config_key_names_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            "save_path: x
save_pth: y
",
        )
        .unwrap();
        match parse(&["t", "--config", f.to_str().unwrap()]) {
            Err(ParseOutcome::Error(m)) => {
                assert!(m.contains("c.yaml") && m.contains("`save_pth`"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn help_is_info_and_bad_flags_are_errors() {
        assert!(
            matches!(parse(&["t", "--help"]), Err(ParseOutcome::Info(h)) if h.contains("--save_path"))
        );
        match parse(&["t", "--bogus"]) {
            Err(ParseOutcome::Error(m)) => {
                assert!(m.contains("--bogus") && !m.starts_with("error:"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        match parse(&["t", "--bf16", "maybe"]) {
            Err(ParseOutcome::Error(m)) => assert!(m.contains("--bf16"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
