//! End-to-end tests of the `corda-convert` binary against the PEFT fixtures.

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Tensor};
use corda_core::adapter::Adapter;

use corda_testdata::peft_tiny_llama as fixtures;

fn fx(rel: &str) -> String {
    fixtures().join(rel).display().to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corda-convert"))
        .args(args)
        .output()
        .expect("run corda-convert")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn max_abs_diff(x: &Tensor, y: &Tensor) -> f32 {
    assert_eq!(x.dims(), y.dims());
    corda_core::util::tensor::max_abs_diff(x, y).unwrap()
}

/// Entries of `dir` (to check that no temporary directory was left behind).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn converts_both_fixtures_like_peft() {
    let tmp = tempfile::tempdir().unwrap();
    for mode in ["kpm", "ipm"] {
        let out = tmp.path().join(mode);
        let o = run(&[
            "--initial_adapter",
            &fx(&format!("{mode}/corda_init")),
            "--trained_adapter",
            &fx(&format!("{mode}/trained")),
            "--output_dir",
            out.to_str().unwrap(),
        ]);
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("r 8 -> 16"), "{stdout}");
        let ours = Adapter::load(&out).unwrap();
        let peft = Adapter::load(&fixtures().join(mode).join("lora")).unwrap();
        assert_eq!(ours.modules.len(), peft.modules.len());
        for (m, p) in &peft.modules {
            assert!(max_abs_diff(&ours.modules[m].a, &p.a) <= 1e-6, "{m}");
            assert!(max_abs_diff(&ours.modules[m].b, &p.b) <= 1e-6, "{m}");
        }
        assert_eq!((ours.config.r, ours.config.lora_alpha), (16, 32.0));
        // Only the two output files, no leftovers.
        assert_eq!(
            entries(&out),
            ["adapter_config.json", "adapter_model.safetensors"]
        );
    }
    assert_eq!(entries(tmp.path()), ["ipm", "kpm"]);
}

#[test]
fn kebab_case_aliases_and_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "--initial-adapter".to_string(),
            fx("kpm/corda_init"),
            "--trained-adapter".to_string(),
            fx("kpm/trained"),
            "--output-dir".to_string(),
            out.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let first = Command::new(env!("CARGO_BIN_EXE_corda-convert"))
        .args(args(&[]))
        .output()
        .unwrap();
    assert!(first.status.success(), "{:?}", text(&first));
    let before = std::fs::read(out.join("adapter_model.safetensors")).unwrap();

    // An existing non-empty output is refused and left untouched.
    let again = Command::new(env!("CARGO_BIN_EXE_corda-convert"))
        .args(args(&["--rank", "4"]))
        .output()
        .unwrap();
    let (_, stderr) = text(&again);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr.starts_with("Error:") && stderr.contains("--overwrite"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        before
    );
    assert_eq!(entries(tmp.path()), ["lora"]);

    let forced = Command::new(env!("CARGO_BIN_EXE_corda-convert"))
        .args(args(&["--rank", "4", "--overwrite"]))
        .output()
        .unwrap();
    assert!(forced.status.success(), "{:?}", text(&forced));
    assert_eq!(Adapter::load(&out).unwrap().config.r, 4);
    assert_eq!(entries(tmp.path()), ["lora"]);
}

#[test]
fn rank_compression_reports_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let worst = |k: &str| -> f64 {
        let out = tmp.path().join(format!("r{k}"));
        let o = run(&[
            "--initial_adapter",
            &fx("ipm/corda_init"),
            "--trained_adapter",
            &fx("ipm/trained"),
            "--output_dir",
            out.to_str().unwrap(),
            "--rank",
            k,
        ]);
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("model.layers.1.mlp.down_proj"), "{stdout}");
        let ad = Adapter::load(&out).unwrap();
        assert_eq!(
            (ad.config.r, ad.config.lora_alpha),
            (k.parse().unwrap(), k.parse().unwrap())
        );
        let line = stdout
            .lines()
            .find(|l| l.contains("largest relative Frobenius error"))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let e16 = worst("16");
    assert!(e16 < 1e-5, "rank 16 should be lossless, got {e16}");
    let e4 = worst("4");
    assert!(e4 > 1e-3, "rank 4 should lose something, got {e4}");
}

#[test]
fn merge_and_verify_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let (lora, merged) = (tmp.path().join("lora"), tmp.path().join("merged"));
    let o = run(&[
        "--initial_adapter",
        &fx("kpm/corda_init"),
        "--trained_adapter",
        &fx("kpm/trained"),
        "--output_dir",
        lora.to_str().unwrap(),
        "--merge",
        "--base_model",
        &fx("base-model"),
        "--merged_path",
        merged.to_str().unwrap(),
        "--verify",
        "--residual_model",
        &fx("kpm/residual-model"),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("merged 14 of"), "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("verify:")).unwrap();
    let diff: f64 = line
        .split("max |logit difference| ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(diff < 1e-4, "{line}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(f).is_file(), "{f}");
    }
    assert!(lora.join("adapter_model.safetensors").is_file());

    // Verifying against the wrong residual model fails, and then nothing is written.
    let (lora2, merged2) = (tmp.path().join("lora2"), tmp.path().join("merged2"));
    let o = run(&[
        "--initial_adapter",
        &fx("kpm/corda_init"),
        "--trained_adapter",
        &fx("kpm/trained"),
        "--output_dir",
        lora2.to_str().unwrap(),
        "--merge",
        "--base_model",
        &fx("base-model"),
        "--merged_path",
        merged2.to_str().unwrap(),
        "--verify",
        "--residual_model",
        &fx("ipm/residual-model"),
    ]);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("verification failed"), "{stderr}");
    assert_eq!(entries(tmp.path()), ["lora", "merged"]);
}

/// Write a copy of a fixture adapter after `edit`.
fn edited_copy(root: &Path, name: &str, src: &str, edit: impl FnOnce(&mut Adapter)) -> String {
    let mut ad = Adapter::load(&fixtures().join(src)).unwrap();
    edit(&mut ad);
    let dir = root.join(name);
    ad.save(&dir).unwrap();
    dir.display().to_string()
}

fn convert_fails(initial: &str, trained: &str, out: &Path) -> String {
    let o = run(&[
        "--initial_adapter",
        initial,
        "--trained_adapter",
        trained,
        "--output_dir",
        out.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        !out.exists(),
        "{} must not be created on failure",
        out.display()
    );
    stderr
}

#[test]
fn mismatched_adapters_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let fewer = edited_copy(tmp.path(), "fewer", "kpm/corda_init", |a| {
        a.modules.remove("model.layers.0.mlp.gate_proj");
    });
    let err = convert_fails(&fewer, &fx("kpm/trained"), &out);
    assert!(
        err.contains("model.layers.0.mlp.gate_proj") && err.contains("do not belong together"),
        "{err}"
    );

    let other_r = edited_copy(tmp.path(), "other_r", "kpm/corda_init", |a| a.config.r = 4);
    let err = convert_fails(&other_r, &fx("kpm/trained"), &out);
    // Refused when read: its tensors have rank 8 (PEFT cannot load it either).
    assert!(err.contains("implies r = 4"), "{err}");

    let narrow = edited_copy(tmp.path(), "narrow", "kpm/trained", |a| {
        let p = a
            .modules
            .get_mut("model.layers.1.self_attn.o_proj")
            .unwrap();
        p.a =
            p.a.narrow(0, 0, 8)
                .unwrap()
                .pad_with_zeros(1, 0, 3)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
    });
    let err = convert_fails(&fx("kpm/corda_init"), &narrow, &out);
    assert!(err.contains("model.layers.1.self_attn.o_proj"), "{err}");

    let targets = edited_copy(tmp.path(), "targets", "kpm/trained", |a| {
        a.config.target_modules.retain(|t| t != "o_proj")
    });
    let err = convert_fails(&fx("kpm/corda_init"), &targets, &out);
    assert!(
        err.contains("target_modules differ") && err.contains("o_proj"),
        "{err}"
    );
}

#[test]
fn rslora_with_patterns_is_refused_like_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let rs = |a: &mut Adapter| {
        a.config.use_rslora = true;
        a.config.rank_pattern.insert("q_proj".to_string(), 8);
    };
    let init = edited_copy(tmp.path(), "init", "kpm/corda_init", rs);
    let trained = edited_copy(tmp.path(), "trained", "kpm/trained", rs);
    let err = convert_fails(&init, &trained, &tmp.path().join("out"));
    assert!(
        err.contains("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."),
        "{err}"
    );
    // The compression writes a uniform adapter, so it still works.
    let out = tmp.path().join("compressed");
    let o = run(&[
        "--initial_adapter",
        &init,
        "--trained_adapter",
        &trained,
        "--output_dir",
        out.to_str().unwrap(),
        "--rank",
        "16",
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(!Adapter::load(&out).unwrap().config.use_rslora);
}

#[test]
fn missing_inputs_and_bad_flags_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = convert_fails(
        tmp.path().join("missing").to_str().unwrap(),
        &fx("kpm/trained"),
        &out,
    );
    assert!(
        err.contains("loading the initial adapter") && err.contains("missing"),
        "{err}"
    );

    let o = run(&["--initial_adapter", &fx("kpm/corda_init")]);
    assert_eq!(o.status.code(), Some(1));
    let o = run(&[
        "--initial_adapter",
        &fx("kpm/corda_init"),
        "--trained_adapter",
        &fx("kpm/trained"),
        "--merge",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let o = run(&[
        "--initial_adapter",
        &fx("kpm/corda_init"),
        "--trained_adapter",
        &fx("kpm/trained"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("nothing to do"));
    let o = run(&[
        "--initial_adapter",
        &fx("kpm/corda_init"),
        "--trained_adapter",
        &fx("kpm/trained"),
        "--output_dir",
        &fx("kpm/trained"),
    ]);
    assert_eq!(o.status.code(), Some(1));

    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let (stdout, _) = text(&help);
    for heading in ["Adapters:", "Output:", "Compression:", "Merge:", "Verify:"] {
        assert!(stdout.contains(heading), "{heading} missing from --help");
    }
}

#[test]
fn config_file_with_command_line_override() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("convert.toml");
    std::fs::write(
        &cfg,
        format!(
            "initial_adapter = \"{}\"\ntrained_adapter = \"{}\"\noutput_dir = \"{}\"\noverwrite = false\n",
            fx("kpm/corda_init"),
            fx("kpm/trained"),
            tmp.path().join("from-file").display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("from-cli");
    let o = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(!tmp.path().join("from-file").exists());
}

/// Issue 14 case 8: an IPM initial adapter with a KPM-trained one is refused, and so is a
/// trained adapter whose recorded starting point (corda_provenance.json) is another initial
/// adapter; with the right starting point the conversion works.
#[test]
fn adapters_of_another_method_or_starting_point_are_refused() {
    use corda_core::adapter::Provenance;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = convert_fails(&fx("ipm/corda_init"), &fx("kpm/trained"), &out);
    assert!(
        err.contains("corda_method ipm") && err.contains("with kpm"),
        "{err}"
    );

    let kpm_init = Adapter::load(&fixtures().join("kpm/corda_init")).unwrap();
    let ipm_init = Adapter::load(&fixtures().join("ipm/corda_init")).unwrap();
    let trained = edited_copy(tmp.path(), "trained", "kpm/trained", |_| {});
    let init = edited_copy(tmp.path(), "init", "kpm/corda_init", |_| {});
    Provenance::of_initial(&kpm_init)
        .unwrap()
        .write(Path::new(&init))
        .unwrap();
    // Trained from another starting point (same shapes, so nothing else tells).
    let mut other = Provenance::of_initial(&ipm_init).unwrap();
    other.corda_method = Some("kpm".into());
    other.write(Path::new(&trained)).unwrap();
    let err = convert_fails(&init, &trained, &out);
    assert!(
        err.contains("another initial adapter") && err.contains(&init),
        "{err}"
    );
    // An initial adapter edited after preprocessing.
    let edited = edited_copy(tmp.path(), "edited", "kpm/corda_init", |a| {
        let p = a.modules.values_mut().next().unwrap();
        p.a = (&p.a * 2.0).unwrap();
    });
    Provenance::of_initial(&kpm_init)
        .unwrap()
        .write(Path::new(&edited))
        .unwrap();
    let err = convert_fails(&edited, &trained, &out);
    assert!(err.contains("changed after preprocessing"), "{err}");

    Provenance::of_initial(&kpm_init)
        .unwrap()
        .write(Path::new(&trained))
        .unwrap();
    let o = run(&[
        "--initial_adapter",
        &init,
        "--trained_adapter",
        &trained,
        "--output_dir",
        out.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
}

/// Issue 14 cases 7 and 13: a trained adapter with non-finite values is refused naming the file
/// and the tensor; `--verify` fails on an adapter whose logits are degenerate.
#[test]
fn broken_trained_adapters_fail_conversion_and_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let nan = edited_copy(tmp.path(), "nan", "kpm/trained", |a| {
        let p = a.modules.get_mut("model.layers.1.mlp.down_proj").unwrap();
        p.b = (&p.b * f64::NAN).unwrap();
    });
    let err = convert_fails(&fx("kpm/corda_init"), &nan, &out);
    assert!(
        err.contains("nan/adapter_model.safetensors")
            && err.contains("model.layers.1.mlp.down_proj.lora_B.weight")
            && err.contains("non-finite"),
        "{err}"
    );

    // Factors blown up by a diverged run: finite, but the model's output is garbage.
    let huge = edited_copy(tmp.path(), "huge", "kpm/trained", |a| {
        for p in a.modules.values_mut() {
            p.a = (&p.a * 3e6).unwrap();
            p.b = (&p.b * 3e6).unwrap();
        }
    });
    let o = run(&[
        "--initial_adapter",
        &fx("kpm/corda_init"),
        "--trained_adapter",
        &huge,
        "--output_dir",
        out.to_str().unwrap(),
        "--verify",
        "--base_model",
        &fx("base-model"),
        "--residual_model",
        &fx("kpm/residual-model"),
    ]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("degenerate logits"), "{stdout}\n{stderr}");
    assert!(!out.exists());
}

/// Issue 14 case 6: an output another run is writing is refused, naming that process; the
/// same directory for --output_dir and --merged_path is refused up front.
#[test]
fn a_locked_output_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let lock = corda_core::util::process::OutputLock::acquire(&out).unwrap();
    let err = convert_fails(&fx("kpm/corda_init"), &fx("kpm/trained"), &out);
    assert!(
        err.contains("another corda run") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    drop(lock);
    let o = run(&[
        "--initial_adapter",
        &fx("kpm/corda_init"),
        "--trained_adapter",
        &fx("kpm/trained"),
        "--output_dir",
        out.to_str().unwrap(),
        "--merge",
        "--base_model",
        &fx("base-model"),
        "--merged_path",
        out.to_str().unwrap(),
    ]);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("different directories"), "{stderr}");
    assert_eq!(entries(tmp.path()), Vec::<String>::new());
}

/// Issue 14 case 9: `--verify_tolerance nan` made every comparison pass; NaN, infinite and
/// negative tolerances are refused up front naming the flag (a negative one was "unexpected
/// argument '-1'"), and a wrong residual model fails verification with a finite one.
/// Outputs over an input (an adapter, the base model) are refused.
#[test]
fn verify_tolerance_must_be_a_finite_non_negative_number() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let verify = |tol: &str, out: &Path| {
        run(&[
            "--initial_adapter",
            &fx("kpm/corda_init"),
            "--trained_adapter",
            &fx("kpm/trained"),
            "--output_dir",
            out.to_str().unwrap(),
            "--verify",
            "--base_model",
            &fx("base-model"),
            "--residual_model",
            &fx("ipm/residual-model"),
            "--verify_tolerance",
            tol,
        ])
    };
    for tol in ["nan", "inf", "-1"] {
        let o = verify(tol, &out);
        let (stdout, stderr) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{tol}: {stdout}\n{stderr}");
        assert!(
            stderr.contains("--verify_tolerance") && stderr.contains("finite"),
            "{tol}: {stderr}"
        );
        assert!(!out.exists());
    }
    // The wrong (IPM) residual model fails with a real tolerance.
    let o = verify("1e-3", &out);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o).1);
    assert!(!out.exists());

    let base = fixtures().join("base-model");
    for (path, expect) in [
        (base.join("lora"), "lies inside the input --base_model"),
        (
            fixtures().join("kpm"),
            "contains the input --initial_adapter",
        ),
    ] {
        let o = run(&[
            "--initial_adapter",
            &fx("kpm/corda_init"),
            "--trained_adapter",
            &fx("kpm/trained"),
            "--merge",
            "--base_model",
            &fx("base-model"),
            "--merged_path",
            path.to_str().unwrap(),
        ]);
        let (_, stderr) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("--merged_path") && stderr.contains(expect),
            "{stderr}"
        );
    }
    assert!(!base.join("lora").exists());
}
