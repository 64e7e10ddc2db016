//! `sae-trainer encode` as a user runs it: every fixture SAE, every input dtype, hook_z
//! reshaping, and each error the issue lists.

mod common;

use common::with_value;
use sae::io::{self, OutTensor};
use schemas::Dtype;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn encode(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sae-trainer"))
        .arg("encode")
        .args(args)
        .output()
        .unwrap()
}

fn run_ok(sae: &Path, input: &str, out: &Path) -> serde_json::Value {
    let o = encode(&[
        "--sae",
        sae.to_str().unwrap(),
        "--input",
        input,
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "{}: {}",
        sae.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn run_err(args: &[&str]) -> String {
    let o = encode(args);
    assert!(!o.status.success(), "expected failure for {args:?}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let (_, t) = io::read_tensor(path, Some(name)).unwrap();
    (t.shape, t.values)
}

fn reference(dir: &str, key: &str) -> Vec<f32> {
    // the keys used here are stored (not aliased) in these files
    let (_, t) = io::read_tensor(
        &fixtures().join(dir).join("reference.safetensors"),
        Some(key),
    )
    .unwrap();
    t.values
}

fn inputs(key: &str) -> String {
    format!(
        "{}:{key}",
        fixtures().join("saes/inputs.safetensors").display()
    )
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{what}[{i}]: {g} vs {w}");
    }
}

/// Every SAE in the fixtures encodes; where SAELens recorded its inference outputs for
/// `batches[0]`, ours match (the input is `[5, 128, 128]`, so the first 16 output rows
/// are rows 0..15 of `batches[0]`). Tolerance 1e-5 of the largest magnitude.
#[test]
fn every_fixture_sae() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    for arch in [
        "standard",
        "gated",
        "jumprelu",
        "jumprelu_tanh",
        "topk",
        "batchtopk",
        "matryoshka_batchtopk",
    ] {
        for kind in ["saes", "saes_inference"] {
            let dir = fixtures().join(format!("{kind}/{arch}"));
            let summary = run_ok(&dir, &inputs("batches"), &out);
            assert_eq!(summary["n_tokens"], 640);
            let (fs, f) = tensor(&out, "feature_acts");
            let (os, o) = tensor(&out, "sae_out");
            assert_eq!((fs, os), (vec![5, 128, 128], vec![5, 128, 128]));
            if kind == "saes_inference" {
                close(
                    &format!("{arch} feature_acts"),
                    &f[..16 * 128],
                    &reference(&format!("saes/{arch}"), "inference.feature_acts"),
                    1e-5,
                );
                close(
                    &format!("{arch} sae_out"),
                    &o[..16 * 128],
                    &reference(&format!("saes/{arch}"), "inference.sae_out"),
                    1e-5,
                );
            } else if !arch.contains("batchtopk") {
                close(
                    &format!("{arch} training dir"),
                    &o[..16 * 128],
                    &reference(&format!("saes/{arch}"), "nodead.sae_out"),
                    1e-5,
                );
            }
            std::fs::remove_file(&out).unwrap();
        }
    }
    for case in [
        "standard_unit_decoder",
        "standard_ghost_grads",
        "standard_lp2_decnorm_heuristic",
        "standard_dense_batch_mse",
        "standard_constant_norm_rescale",
        "standard_layer_norm",
        "gated",
        "jumprelu",
        "topk",
        "standard_unit_decoder/step5_runner_checkpoint",
    ] {
        let raw = case.contains("norm_rescale") || case.contains("layer_norm");
        let input = inputs(if raw { "batches_raw" } else { "batches" });
        run_ok(&fixtures().join(format!("seed_v5/{case}")), &input, &out);
        if !case.contains('/') {
            let (_, o) = tensor(&out, "sae_out");
            close(
                &format!("v5 {case}"),
                &o[..16 * 128],
                &reference(&format!("seed_v5/{case}"), "nodead.sae_out"),
                1e-5,
            );
        }
        std::fs::remove_file(&out).unwrap();
    }
}

fn write_input(path: &Path, name: &str, shape: Vec<usize>, values: Vec<f32>, dtype: Dtype) {
    io::write_safetensors(
        path,
        &[OutTensor {
            name,
            shape,
            values,
            dtype,
        }],
        true,
    )
    .unwrap();
}

#[test]
fn half_precision_inputs_and_single_tensor_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, x) = tensor(&fixtures().join("saes/inputs.safetensors"), "batches");
    let sae = fixtures().join("saes_inference/standard");
    let want_out = tmp.path().join("f32.safetensors");
    run_ok(&sae, &inputs("batches"), &want_out);
    let (_, want) = tensor(&want_out, "sae_out");
    // tolerances: the input's own rounding (f16 ~5e-4, bf16 ~4e-3 relative)
    for (dtype, tol) in [(Dtype::F16, 2e-3), (Dtype::BF16, 2e-2), (Dtype::F64, 1e-6)] {
        let file = tmp.path().join(format!("{dtype:?}.safetensors"));
        write_input(&file, "acts", vec![640, 128], x.clone(), dtype);
        let out = tmp.path().join(format!("{dtype:?}-out.safetensors"));
        // a file with a single tensor needs no tensor name
        run_ok(&sae, file.to_str().unwrap(), &out);
        let (s, o) = tensor(&out, "sae_out");
        assert_eq!(s, vec![640, 128]);
        close(&format!("{dtype:?} input"), &o, &want, tol);
    }
}

/// A `hook_z` SAE takes `[n, n_heads, d_head]` and returns `sae_out` in that shape.
#[test]
fn hook_z_reshaping() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sae");
    std::fs::create_dir(&dir).unwrap();
    let src = fixtures().join("saes_inference/standard");
    std::fs::copy(
        src.join("sae_weights.safetensors"),
        dir.join("sae_weights.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("cfg.json")).unwrap()).unwrap();
    cfg["reshape_activations"] = "hook_z".into();
    cfg["metadata"]["hook_name"] = "blocks.0.attn.hook_z".into();
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
    let (_, x) = tensor(&fixtures().join("saes/inputs.safetensors"), "batches");
    let heads = tmp.path().join("z.safetensors");
    write_input(
        &heads,
        "blocks.0.attn.hook_z",
        vec![640, 4, 32],
        x,
        Dtype::F32,
    );
    let out = tmp.path().join("out.safetensors");
    run_ok(
        &dir,
        &format!("{}:blocks.0.attn.hook_z", heads.display()),
        &out,
    );
    let (fs, _) = tensor(&out, "feature_acts");
    let (os, o) = tensor(&out, "sae_out");
    assert_eq!((fs, os), (vec![640, 128], vec![640, 4, 32]));
    let flat = tmp.path().join("flat.safetensors");
    run_ok(&src, &inputs("batches"), &flat);
    assert_eq!(o, tensor(&flat, "sae_out").1);
}

#[test]
fn clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let outs = out.to_str().unwrap();
    let good = fixtures().join("saes_inference/topk");
    let good = good.to_str().unwrap();
    let input = inputs("batches");

    let e = run_err(&["--sae", "/no/such/sae", "--input", &input, "--output", outs]);
    assert!(
        e.contains("/no/such/sae") && e.contains("no such SAE directory"),
        "{e}"
    );

    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(
        fixtures().join("saes_inference/topk/sae_weights.safetensors"),
        bad.join("sae_weights.safetensors"),
    )
    .unwrap();
    let e = run_err(&[
        "--sae",
        bad.to_str().unwrap(),
        "--input",
        &input,
        "--output",
        outs,
    ]);
    assert!(e.contains("cfg.json") && e.contains("No such file"), "{e}");

    std::fs::write(bad.join("cfg.json"), "{\"d_in\": 128, \"d_sae\": ").unwrap();
    let e = run_err(&[
        "--sae",
        bad.to_str().unwrap(),
        "--input",
        &input,
        "--output",
        outs,
    ]);
    assert!(
        e.contains("cfg.json") && e.contains("not valid JSON"),
        "{e}"
    );

    let text = std::fs::read_to_string(fixtures().join("saes_inference/topk/cfg.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["architecture"] = "matching_pursuit".into();
    std::fs::write(bad.join("cfg.json"), cfg.to_string()).unwrap();
    let e = run_err(&[
        "--sae",
        bad.to_str().unwrap(),
        "--input",
        &input,
        "--output",
        outs,
    ]);
    assert!(
        e.contains("architecture")
            && e.contains("matching_pursuit")
            && e.contains("standard, gated"),
        "{e}"
    );

    // weights that do not fit the config's d_in
    cfg["architecture"] = "topk".into();
    cfg["d_in"] = 64.into();
    std::fs::write(bad.join("cfg.json"), cfg.to_string()).unwrap();
    let e = run_err(&[
        "--sae",
        bad.to_str().unwrap(),
        "--input",
        &input,
        "--output",
        outs,
    ]);
    assert!(
        e.contains("W_enc") && e.contains("[128, 128]") && e.contains("d_in = 64"),
        "{e}"
    );

    // input whose last dimension is not d_in
    let narrow = tmp.path().join("narrow.safetensors");
    write_input(&narrow, "acts", vec![10, 64], vec![0.5; 640], Dtype::F32);
    let e = run_err(&[
        "--sae",
        good,
        "--input",
        narrow.to_str().unwrap(),
        "--output",
        outs,
    ]);
    assert!(
        e.contains("'acts'") && e.contains("[10, 64]") && e.contains("d_in = 128"),
        "{e}"
    );

    let e = run_err(&[
        "--sae",
        good,
        "--input",
        &inputs("activations"),
        "--output",
        outs,
    ]);
    assert!(
        e.contains("'activations' is missing") && e.contains("batches, batches_raw"),
        "{e}"
    );

    let whole = fixtures().join("saes/inputs.safetensors");
    let e = run_err(&[
        "--sae",
        good,
        "--input",
        whole.to_str().unwrap(),
        "--output",
        outs,
    ]);
    assert!(e.contains("FILE:TENSOR"), "{e}");

    let mut v = vec![0.1f32; 3 * 128];
    v[128 + 5] = f32::NAN;
    let nan = tmp.path().join("nan.safetensors");
    write_input(&nan, "acts", vec![3, 128], v, Dtype::F32);
    let e = run_err(&[
        "--sae",
        good,
        "--input",
        nan.to_str().unwrap(),
        "--output",
        outs,
    ]);
    assert!(
        e.contains("non-finite") && e.contains("row 1, column 5"),
        "{e}"
    );
    assert!(!out.exists(), "no output after a failure");

    // an existing output is kept unless --overwrite
    std::fs::write(&out, b"keep me").unwrap();
    let e = run_err(&["--sae", good, "--input", &input, "--output", outs]);
    assert!(
        e.contains("already exists") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let o = encode(&[
        "--sae",
        good,
        "--input",
        &input,
        "--output",
        outs,
        "--overwrite",
    ]);
    assert!(o.status.success());
    assert_eq!(tensor(&out, "sae_out").0, vec![5, 128, 128]);

    let e = run_err(&[
        "--sae",
        good,
        "--input",
        &input,
        "--output",
        outs,
        "--overwrite",
        "--device",
        "cuda",
    ]);
    // A CPU build names the feature; a CUDA build without a GPU says what is missing.
    #[cfg(not(feature = "cuda"))]
    assert!(e.contains("without the `cuda` feature"), "{e}");
    #[cfg(feature = "cuda")]
    assert!(e.contains("cuda") && e.contains("cannot be loaded"), "{e}");
    // no temporary files left behind
    let leftovers = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .count();
    assert_eq!(leftovers, 0);
}

/// `--sae RELEASE:SAE_ID`: SAELens's registry (here a file named by
/// SAESTREAM_PRETRAINED_SAES) and an HF cache (HF_HUB_CACHE), both built here, give the
/// same encoding as the SAE's directory.
#[test]
fn a_pretrained_release_and_id_encode_as_the_directory_does() {
    let t = tempfile::tempdir().unwrap();
    let registry = t.path().join("pretrained_saes.yaml");
    std::fs::write(
        &registry,
        "tiny:\n  repo_id: org/tiny-saes\n  model: tiny-gpt2\n  saes:\n  - id: layer_0/std\n    path: standard\n",
    )
    .unwrap();
    let commit = "e".repeat(40);
    let repo = t.path().join("hub/models--org--tiny-saes");
    let d = repo.join("snapshots").join(&commit).join("standard");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), &commit).unwrap();
    let src = fixtures().join("saes_inference/standard");
    for f in ["cfg.json", "sae_weights.safetensors"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let run = |sae: &str, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_sae-trainer"))
            .args([
                "encode",
                "--sae",
                sae,
                "--input",
                &inputs("batches"),
                "--output",
            ])
            .arg(out)
            .env("SAESTREAM_PRETRAINED_SAES", &registry)
            .env("HF_HUB_CACHE", t.path().join("hub"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let (a, b) = (
        t.path().join("a.safetensors"),
        t.path().join("b.safetensors"),
    );
    let o = run(src.to_str().unwrap(), &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run("tiny:layer_0/std", &b);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let o = run("tiny:layer_9/std", &t.path().join("c.safetensors"));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("release 'tiny' has no SAE id 'layer_9/std'"),
        "{e}"
    );
}

/// A copy of `dir` whose weights file has `value` at flat position `at` of `tensor`.
fn poisoned_copy(dir: &Path, into: &Path, file: &str, tensor: &str, at: usize, value: f32) {
    std::fs::create_dir_all(into).unwrap();
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, into.join(f.file_name().unwrap())).unwrap();
    }
    with_value(&dir.join(file), &into.join(file), tensor, at, value);
}

/// Issue 18: an SAE whose W_enc holds a NaN (one latent silently read 0) or whose b_dec
/// holds one (an all-NaN output, exit 0) is refused at load, naming the file, the
/// tensor, the count and the first bad index; nothing is written.
#[test]
fn non_finite_weights_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let src = fixtures().join("saes_inference/standard");
    for (tensor, at, value, index) in [
        ("W_enc", 3 * 128 + 7, f32::NAN, "[3, 7]"),
        ("b_dec", 5, f32::INFINITY, "[5]"),
    ] {
        let bad = tmp.path().join(tensor);
        poisoned_copy(&src, &bad, "sae_weights.safetensors", tensor, at, value);
        let e = run_err(&[
            "--sae",
            bad.to_str().unwrap(),
            "--input",
            &inputs("batches"),
            "--output",
            out.to_str().unwrap(),
        ]);
        let file = bad.join("sae_weights.safetensors");
        assert!(
            e.contains(&format!("{}: tensor '{tensor}'", file.display()))
                && e.contains("1 non-finite value(s)")
                && e.contains(&format!("at index {index}")),
            "{e}"
        );
        assert!(!out.exists(), "{tensor}: an output was written");
    }
}
