//! `activation-producer dump` and `eval` as a user runs them, on the tiny GPT-2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_activation-producer"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> serde_json::Value {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "expected failure for {args:?}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let (_, t) = sae::io::read_tensor(path, Some(name)).unwrap();
    (t.shape, t.values)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn dump_writes_transformer_lens_activations_per_position() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("acts.safetensors");
    let (model, tokens) = (fx.join("tiny-gpt2"), fx.join("acts/tokens.npy"));
    let summary = ok(&[
        "dump",
        "--model",
        s(&model),
        "--tokens",
        s(&tokens),
        "--hooks",
        "blocks.1.hook_resid_pre,blocks.0.attn.hook_z,blocks.0.hook_mlp_out",
        "--output",
        s(&out),
        "--batch-size",
        "3",
    ]);
    assert_eq!(summary["stop_at_layer"], 2);
    let reference = fx.join("acts/acts.safetensors");
    for name in [
        "blocks.1.hook_resid_pre",
        "blocks.0.attn.hook_z",
        "blocks.0.hook_mlp_out",
    ] {
        let (shape, got) = read(&out, name);
        assert_eq!(
            shape,
            vec![8 * 128, 128],
            "{name}: heads flattened into d_in"
        );
        let (_, want) = read(&reference, name);
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-4, "{name}: max |diff| {diff}");
    }

    // One head, positions 1..128 step 2, in bfloat16.
    let out2 = dir.path().join("head.safetensors");
    let summary = ok(&[
        "dump",
        "--model",
        s(&model),
        "--tokens",
        s(&tokens),
        "--hooks",
        "blocks.0.attn.hook_z",
        "--hook-head-index",
        "3",
        "--seqpos-slice",
        "1::2",
        "--dtype",
        "bfloat16",
        "--output",
        s(&out2),
    ]);
    assert_eq!(summary["positions_per_seq"], 64);
    let (shape, got) = read(&out2, "blocks.0.attn.hook_z");
    assert_eq!(shape, vec![8 * 64, 32]);
    let (_, z) = read(&reference, "blocks.0.attn.hook_z");
    for seq in 0..8 {
        for (i, p) in (1..128).step_by(2).enumerate() {
            for c in 0..32 {
                let want = z[(seq * 128 + p) * 128 + 96 + c];
                let g = got[(seq * 64 + i) * 32 + c];
                assert!(
                    (g - want).abs() <= want.abs() / 128.0 + 1e-4,
                    "bf16 rounding only"
                );
            }
        }
    }

    // Attention patterns are written whole, in TransformerLens's layout.
    let out3 = dir.path().join("pattern.safetensors");
    ok(&[
        "dump",
        "--model",
        s(&model),
        "--tokens",
        s(&tokens),
        "--hooks",
        "blocks.1.attn.hook_pattern",
        "--output",
        s(&out3),
    ]);
    let (shape, p) = read(&out3, "blocks.1.attn.hook_pattern");
    assert_eq!(shape, vec![8, 4, 128, 128]);
    for row in p.chunks(128).take(300) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    // The output is not replaced without --overwrite, and nothing else is left behind.
    let e = fails(&[
        "dump",
        "--model",
        s(&model),
        "--tokens",
        s(&tokens),
        "--hooks",
        "hook_embed",
        "--output",
        s(&out),
    ]);
    assert!(e.contains("already exists; pass --overwrite"), "{e}");
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
}

#[test]
fn dump_errors_name_the_problem() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.safetensors");
    let (model, tokens) = (fx.join("tiny-gpt2"), fx.join("acts/tokens.npy"));
    let base = |extra: &[&str]| -> String {
        let mut a = vec![
            "dump",
            "--model",
            s(&model),
            "--tokens",
            s(&tokens),
            "--output",
            s(&out),
        ];
        a.extend_from_slice(extra);
        fails(&a)
    };
    let e = base(&["--hooks", "blocks.0.hook_resid"]);
    assert!(
        e.contains("unknown hook 'blocks.0.hook_resid'") && e.contains("blocks.0.hook_resid_pre"),
        "{e}"
    );
    let e = base(&["--hooks", "blocks.7.hook_resid_pre"]);
    assert!(e.contains("layer 7 is out of range"), "{e}");
    let e = base(&[
        "--hooks",
        "blocks.1.hook_resid_post",
        "--stop-at-layer",
        "1",
    ]);
    assert!(
        e.contains("--stop-at-layer 1 stops before hook 'blocks.1.hook_resid_post'")
            && e.contains("2 or more"),
        "{e}"
    );
    let e = base(&["--hooks", "blocks.0.hook_resid_pre", "--stop-at-layer", "3"]);
    assert!(e.contains("stop_at_layer 3 is out of range"), "{e}");
    let e = base(&["--hooks", "blocks.0.attn.hook_z", "--hook-head-index", "9"]);
    assert!(
        e.contains("hook_head_index 9 is out of range") && e.contains("4 heads"),
        "{e}"
    );
    let e = base(&["--hooks", "blocks.0.hook_resid_pre", "--seqpos-slice", "3"]);
    assert!(e.contains("expected START:STOP"), "{e}");
    assert!(!out.exists());

    // Tokens beyond the vocabulary or the context (the npy writer is below).
    let t = dir.path().join("bad.npy");
    let dump_tokens = |ids: &[i64], rows, cols| {
        std::fs::write(&t, npy_i64(ids, rows, cols)).unwrap();
        fails(&[
            "dump",
            "--model",
            s(&model),
            "--tokens",
            s(&t),
            "--hooks",
            "hook_embed",
            "--output",
            s(&out),
        ])
    };
    let e = dump_tokens(&[1, 2, 4096, 3], 2, 2);
    assert!(
        e.contains("token id 4096 at sequence 1, position 0 is out of range"),
        "{e}"
    );
    let e = dump_tokens(&[0; 300], 1, 300);
    assert!(
        e.contains("300 positions is longer than the model's 256"),
        "{e}"
    );
}

/// Issue 18: a checkpoint with a NaN in a layer-norm weight (NaN q/k/v, an all-zero
/// attention pattern, a residual stream that looks finite but is wrong, exit 0) is
/// refused, naming the file, the tensor and the index; a pass that makes infinities
/// from finite weights is refused naming the hook. Nothing is written either way.
#[test]
fn dump_refuses_non_finite_weights() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in std::fs::read_dir(fx.join("tiny-gpt2")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    let file = model.join("model.safetensors");
    let all = sae::io::read_safetensors(&file).unwrap();
    let outs: Vec<sae::io::OutTensor> = all
        .iter()
        .map(|(name, t)| {
            let mut values = t.values.clone();
            if name == "transformer.h.1.ln_1.weight" {
                values[17] = f32::NAN;
            }
            sae::io::OutTensor {
                name,
                shape: t.shape.clone(),
                values,
                dtype: t.dtype,
            }
        })
        .collect();
    sae::io::write_safetensors(&file, &outs, true).unwrap();
    let out = dir.path().join("a.safetensors");
    let dump = |hook: &str| {
        fails(&[
            "dump",
            "--model",
            s(&model),
            "--tokens",
            s(&fx.join("acts/tokens.npy")),
            "--hooks",
            hook,
            "--output",
            s(&out),
        ])
    };
    let e = dump("blocks.1.hook_resid_post");
    assert!(
        e.contains(&format!(
            "{}: tensor 'transformer.h.1.ln_1.weight'",
            file.display()
        )) && e.contains("1 non-finite value(s)")
            && e.contains("at index [17]"),
        "{e}"
    );
    assert!(!out.exists());

    // Finite weights whose products overflow: the pass itself makes infinities, and
    // the captured hook is refused by name.
    let outs: Vec<sae::io::OutTensor> = all
        .iter()
        .map(|(name, t)| sae::io::OutTensor {
            name,
            shape: t.shape.clone(),
            values: match name.as_str() {
                "transformer.h.0.mlp.c_fc.weight" => vec![f32::MAX / 2.0; t.values.len()],
                _ => t.values.clone(),
            },
            dtype: t.dtype,
        })
        .collect();
    sae::io::write_safetensors(&file, &outs, true).unwrap();
    let e = dump("blocks.0.hook_resid_post");
    assert!(
        e.contains("hook 'blocks.0.hook_resid_post': the forward pass produced")
            && e.contains("non-finite value(s)")
            && e.contains("from finite token ids"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn eval_prints_saelens_metrics_and_writes_per_latent_ones() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("evals.json");
    let sae_dir = fx.join("lm/evals/standard-z-head2");
    let printed = ok(&[
        "eval",
        "--model",
        s(&fx.join("tiny-gpt2")),
        "--sae",
        s(&sae_dir),
        "--tokens",
        s(&fx.join("acts/tokens.npy")),
        "--batch-size-prompts",
        "4",
        "--n-eval-reconstruction-batches",
        "2",
        "--n-eval-sparsity-variance-batches",
        "2",
        "--output",
        s(&full),
    ]);
    // Hook and head come from the SAE's cfg.json; BOS from the tokenizer files.
    assert_eq!(printed["hook_name"], "blocks.1.attn.hook_z");
    assert_eq!(printed["hook_head_index"], 2);
    assert_eq!(printed["excluded_token_ids"], serde_json::json!([4095]));
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sae_dir.join("evals.json")).unwrap())
            .unwrap();
    let (g, w) = (
        &printed["metrics"]["sparsity"]["l0"],
        &want["metrics"]["sparsity"]["l0"],
    );
    assert!(
        (g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4,
        "{g} vs {w}"
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&full).unwrap()).unwrap();
    assert_eq!(
        written["feature_metrics"]["feature_density"]
            .as_array()
            .unwrap()
            .len(),
        48
    );
    assert_eq!(written["metrics"], printed["metrics"]);

    // Too few sequences for the requested batches.
    let e = fails(&[
        "eval",
        "--model",
        s(&fx.join("tiny-gpt2")),
        "--sae",
        s(&sae_dir),
        "--tokens",
        s(&fx.join("acts/tokens.npy")),
    ]);
    assert!(
        e.contains("the evals need 80 sequences") && e.contains("hold 8"),
        "{e}"
    );
    // An SAE without a hook name needs --hook.
    let e = fails(&[
        "eval",
        "--model",
        s(&fx.join("tiny-gpt2")),
        "--sae",
        s(&fx.join("saes_inference/standard")),
        "--tokens",
        s(&fx.join("acts/tokens.npy")),
    ]);
    assert!(e.contains("no metadata.hook_name; pass --hook"), "{e}");
}

#[test]
fn bench_runs_on_a_small_shape_and_reports_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let r = ok(&[
        "bench",
        "--n-layers",
        "3",
        "--d-model",
        "64",
        "--n-heads",
        "4",
        "--d-mlp",
        "128",
        "--d-vocab",
        "300",
        "--n-ctx",
        "32",
        "--batch",
        "2",
        "--context-size",
        "16",
        "--stop-at-layer",
        "2",
        "--iters",
        "2",
        "--model-out",
        s(&ckpt),
    ]);
    assert!(r["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(r["hook"], "blocks.1.hook_resid_post");
    // 3 blocks of 4 d² + 2 d·d_mlp weights (+ biases, norms), embeddings; tied unembedding.
    let (d, m, v, c) = (64, 128, 300, 32);
    let block = 4 * d * d + 4 * d + 2 * d * m + m + d + 4 * d;
    assert_eq!(
        r["n_params"].as_u64().unwrap() as usize,
        v * d + c * d + 3 * block + 2 * d
    );
    // The checkpoint it wrote is a loadable GPT-2 directory.
    let tokens = dir.path().join("t.npy");
    std::fs::write(&tokens, npy_i64(&[1, 2, 3, 299], 2, 2)).unwrap();
    ok(&[
        "dump",
        "--model",
        s(&ckpt),
        "--tokens",
        s(&tokens),
        "--hooks",
        "ln_final.hook_normalized",
        "--output",
        s(&dir.path().join("o.safetensors")),
    ]);
}

fn npy_i64(v: &[i64], rows: usize, cols: usize) -> Vec<u8> {
    let mut header =
        format!("{{'descr': '<i8', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    out
}
