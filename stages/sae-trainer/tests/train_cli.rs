//! `sae-trainer train` as a user runs it: parity with SAELens training runs, exact
//! resume after SIGKILL, SIGTERM checkpoints, and the errors the issue lists.

mod common;

use common::with_value;
use sae::io::{self, OutTensor};
use schemas::Dtype;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sae-trainer"))
}

fn train(cfg: &Path, acts: &str, out: &Path, extra: &[&str]) -> Output {
    bin()
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--activations",
            acts,
            "--output",
            out.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn err(o: Output) -> String {
    assert!(
        !o.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    io::read_safetensors(&dir.join("sae_weights.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.values))
        .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn inputs(key: &str) -> String {
    format!(
        "{}:{key}",
        fixtures().join("saes/inputs.safetensors").display()
    )
}

/// SAELens 6.54.12's 5-step runs (`saes/saes_info.json`, `saes_inference/`): from the
/// saved SAE, in file order, constant LR 3e-4, Adam (0.9, 0.999), clipping at 1. Every
/// step's losses at 1e-5 relative; the saved inference SAE's weights at 2e-5 absolute
/// (folding divides by decoder norms ~0.1), except TopK latents 73 and 75 where the
/// reference run has an exact f32 tie at the k-th place (see models/sae/tests/parity_v6.rs).
#[test]
fn reproduces_saelens6_training_runs() {
    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("saes/saes_info.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for arch in [
        "standard",
        "gated",
        "jumprelu",
        "jumprelu_tanh",
        "topk",
        "batchtopk",
        "matryoshka_batchtopk",
    ] {
        let a = &info["archs"][arch];
        let c = &a["config"];
        let mut yaml = format!(
            "architecture: {}\nfrom_pretrained_path: {}\ntraining_tokens: 640\ntrain_batch_size_tokens: 128\nlr: 3.0e-4\nshuffle: false\nlog_frequency: 1\n",
            c["architecture"].as_str().unwrap(),
            fixtures().join(format!("saes/{arch}")).display()
        );
        for (k, v) in a["coefficients"].as_object().unwrap() {
            yaml += &format!("{k}_coefficient: {v}\n");
        }
        if c.get("k").is_some() {
            yaml += &format!("k: {}\n", c["k"]);
        }
        let cfg = tmp.path().join(format!("{arch}.yaml"));
        std::fs::write(&cfg, yaml).unwrap();
        let out = tmp.path().join(arch);
        let summary = ok(train(&cfg, &inputs("batches"), &out, &[]));
        assert_eq!(summary["steps"], 5);
        let lines: Vec<Value> = metrics(&out)
            .into_iter()
            .filter(|l| l.get("losses/overall_loss").is_some())
            .collect();
        let steps = a["trainer_5_steps"]["per_step"].as_array().unwrap();
        assert_eq!(lines.len(), 5, "{arch}");
        for (i, (ours, theirs)) in lines.iter().zip(steps).enumerate() {
            for (k, v) in theirs.as_object().unwrap() {
                // SAELens 6 logs the raw L1 term (SAELens 5 divided it by the coefficient)
                let key = match k.as_str() {
                    "loss" => "losses/overall_loss".to_string(),
                    "l1_loss" => "losses/raw_l1_loss".to_string(),
                    _ => format!("losses/{k}"),
                };
                let got = ours[&key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{arch} step {i}: no {key}"));
                assert!(
                    rel(got, v.as_f64().unwrap()) < 1e-5,
                    "{arch} step {i} {key}: {got} vs {v}"
                );
            }
        }
        let theirs = weights(&fixtures().join(format!("saes_inference/{arch}")));
        let ours = weights(&out);
        assert_eq!(
            ours.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            theirs.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            "{arch}"
        );
        for ((n, o), (_, t)) in ours.iter().zip(&theirs) {
            for (i, (a, b)) in o.iter().zip(t).enumerate() {
                let latent = match n.as_str() {
                    "W_enc" => i % 128,
                    "W_dec" => i / 128,
                    _ => i,
                };
                let tie = arch == "topk" && n != "b_dec" && [73, 75].contains(&latent);
                assert!((a - b).abs() <= 2e-5 || tie, "{arch} {n}[{i}]: {a} vs {b}");
            }
        }
        let cfg_json: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("cfg.json")).unwrap()).unwrap();
        let want: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("saes_inference/{arch}/cfg.json")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(cfg_json["architecture"], want["architecture"], "{arch}");
        assert!(out.join("sparsity.safetensors").exists() && out.join("config.yaml").exists());
    }
}

/// SAELens 5's 5-step runs (`seed_v5/seed_info.json`): beta1 0, L1/L0 warm-up over 3
/// steps, unit-norm decoder where set. Every key of SAELens 5's own training log dict,
/// every step, at 1e-5 relative (1e-4 for the grad-norm-free metrics' legacy std), and
/// the weights after 5 steps at 1e-6 absolute. (The cases whose step 0 depends on the
/// fixture's preset dead latents, ghost grads and TopK, are covered by
/// models/sae/tests/parity_v5.rs; a fresh run has no dead latents.)
#[test]
fn reproduces_saelens5_training_logs() {
    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("seed_v5/seed_info.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for case in [
        "standard_unit_decoder",
        "standard_lp2_decnorm_heuristic",
        "standard_dense_batch_mse",
        "standard_constant_norm_rescale",
        "standard_layer_norm",
        "gated",
        "jumprelu",
    ] {
        let c = &info["cases"][case];
        let rc = &c["runner_config"];
        let arch = rc["architecture"].as_str().unwrap();
        let coef = rc["l1_coefficient"].as_f64().unwrap();
        let mut yaml = format!(
            "architecture: {arch}\nfrom_pretrained_path: {}\ntraining_tokens: 640\ntrain_batch_size_tokens: 128\nlr: 3.0e-4\nadam_beta1: 0.0\nshuffle: false\nlog_frequency: 1\n",
            fixtures().join(format!("seed_v5/{case}")).display()
        );
        yaml += &if arch == "jumprelu" {
            format!("l0_coefficient: {coef}\nl0_warm_up_steps: 3\n")
        } else {
            format!("l1_coefficient: {coef}\nl1_warm_up_steps: 3\n")
        };
        if rc["normalize_sae_decoder"].as_bool().unwrap() {
            yaml += "normalize_sae_decoder: true\nscale_sparsity_penalty_by_decoder_norm: false\n";
        }
        let cfg = tmp.path().join(format!("{case}.yaml"));
        std::fs::write(&cfg, yaml).unwrap();
        let out = tmp.path().join(case);
        let input = inputs(if c["input"] == "batches_raw" {
            "batches_raw"
        } else {
            "batches"
        });
        ok(train(&cfg, &input, &out, &[]));
        let lines: Vec<Value> = metrics(&out)
            .into_iter()
            .filter(|l| l.get("losses/overall_loss").is_some())
            .collect();
        for (i, rec) in c["trainer_5_steps"]["per_step"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            for (k, want) in rec["train_log_dict"].as_object().unwrap() {
                let got = lines[i][k]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{case} step {i}: no {k}"));
                let want = want.as_f64().unwrap();
                // explained variances near 0 are compared to 1 rather than to themselves
                let scale = if k.contains("explained_variance") {
                    want.abs().max(1.0)
                } else {
                    want.abs()
                };
                let tol = if k.ends_with("_std") { 1e-4 } else { 1e-5 };
                assert!(
                    (got - want).abs() <= tol * scale || (got - want).abs() < 1e-9,
                    "{case} step {i} {k}: {got} vs {want}"
                );
            }
        }
        let r =
            io::read_safetensors(&fixtures().join(format!("seed_v5/{case}/reference.safetensors")))
                .unwrap();
        for (n, v) in weights(&out) {
            let (key, ours): (String, Vec<f32>) = if n == "threshold" {
                (
                    "step5.param.log_threshold".into(),
                    v.iter().map(|x| x.ln()).collect(),
                )
            } else {
                (format!("step5.param.{n}"), v)
            };
            let Some((_, want)) = r.iter().find(|(k, _)| *k == key) else {
                continue;
            };
            for (i, (a, b)) in ours.iter().zip(&want.values).enumerate() {
                assert!((a - b).abs() <= 1e-6, "{case} {key}[{i}]: {a} vs {b}");
            }
        }
    }
}

fn write_acts(path: &Path, n: usize, d: usize, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // sparse combinations of a few directions, plus noise: something an SAE can learn
    let dirs: Vec<f32> = (0..8 * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut v = vec![0f32; n * d];
    for r in 0..n {
        for k in 0..8 {
            if rng.random_bool(0.2) {
                let a = rng.random_range(0.5f32..2.0);
                for j in 0..d {
                    v[r * d + j] += a * dirs[k * d + j];
                }
            }
        }
        for j in 0..d {
            v[r * d + j] += 0.05 * rng.random_range(-1.0f32..1.0);
        }
    }
    io::write_safetensors(
        path,
        &[OutTensor {
            name: "acts",
            shape: vec![n, d],
            values: v,
            dtype: Dtype::F32,
        }],
        true,
    )
    .unwrap();
}

const RESUME_CFG: &str = "architecture: topk\nk: 4\nd_sae: 256\ntraining_tokens: 409600\ntrain_batch_size_tokens: 256\nnormalize_activations: expected_average_only_in\nn_batches_for_norm_estimate: 4\nb_dec_init_method: geometric_median\nn_batches_in_buffer: 8\nlog_frequency: 50\nn_checkpoints: 4\ndead_feature_window: 100\nfeature_sampling_window: 300\n";

/// Kill a run with SIGKILL between checkpoints, resume from the last one: the final
/// SAE is bit-identical to an uninterrupted run's (shuffled data, norm scaling, AuxK).
#[test]
fn exact_resume_after_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let acts = tmp.path().join("acts.safetensors");
    write_acts(&acts, 420_000, 32, 3);
    let acts = acts.to_str().unwrap();
    let cfg = tmp.path().join("run.yaml");
    std::fs::write(&cfg, RESUME_CFG).unwrap();
    let full = tmp.path().join("full");
    ok(train(&cfg, acts, &full, &[]));

    let cut = tmp.path().join("cut");
    let mut child = bin()
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--activations",
            acts,
            "--output",
            cut.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ckpts = cut.join("checkpoints");
    let first = loop {
        let done: Vec<PathBuf> = std::fs::read_dir(&ckpts)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            // A checkpoint being written sits under a `.tmp-PID` name until renamed.
            .filter(|p| !p.to_string_lossy().contains(".tmp-"))
            .filter(|p| p.join("trainer_state.json").exists())
            .collect();
        if let Some(p) = done.first() {
            break p.clone();
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before its first checkpoint"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !cut.join("sae_weights.safetensors").exists(),
        "killed before the end"
    );
    let summary = ok(train(
        &cfg,
        acts,
        &cut,
        &["--resume", first.to_str().unwrap()],
    ));
    assert_eq!(summary["tokens"], 409600);
    assert_eq!(
        std::fs::read(full.join("sae_weights.safetensors")).unwrap(),
        std::fs::read(cut.join("sae_weights.safetensors")).unwrap(),
        "resumed weights differ from the uninterrupted run's"
    );
    assert_eq!(
        std::fs::read(full.join("sparsity.safetensors")).unwrap(),
        std::fs::read(cut.join("sparsity.safetensors")).unwrap()
    );
    let (a, b) = (metrics(&full), metrics(&cut));
    let steps = |m: &[Value]| {
        m.iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        steps(&a),
        steps(&b),
        "metrics lines (resumed from {})",
        first.display()
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "the resumed run's metrics differ");
    }
    // the checkpoint is itself an SAE directory SAELens can load
    assert!(io::load(&first, &kernels::Device::Cpu).is_ok());
}

/// SIGTERM writes a checkpoint and stops with an error that says where it is.
#[test]
fn sigterm_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let acts = tmp.path().join("acts.safetensors");
    write_acts(&acts, 420_000, 32, 4);
    let cfg = tmp.path().join("run.yaml");
    std::fs::write(
        &cfg,
        RESUME_CFG.replace("n_checkpoints: 4", "n_checkpoints: 0"),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let child = bin()
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--activations",
            acts.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait for training to start (the metrics file appears), then SIGTERM
    while !out.join("metrics.jsonl").exists() {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("interrupted at step") && e.contains("checkpoint saved"),
        "{e}"
    );
    let saved: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .collect();
    assert_eq!(saved.len(), 1);
    assert!(saved[0].path().join("trainer_state.safetensors").exists());
}

#[test]
fn learns_and_writes_a_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let acts = tmp.path().join("acts.safetensors");
    write_acts(&acts, 60_000, 32, 5);
    let cfg = tmp.path().join("run.yaml");
    std::fs::write(&cfg, "architecture: standard\nd_sae: 128\nl1_coefficient: 0.5\ntraining_tokens: 51200\ntrain_batch_size_tokens: 256\nlr: 1.0e-3\nlr_scheduler_name: cosineannealing\nlr_warm_up_steps: 10\nnormalize_activations: expected_average_only_in\nn_batches_for_norm_estimate: 8\nb_dec_init_method: mean\nlog_frequency: 20\nfeature_sampling_window: 50\n").unwrap();
    let out = tmp.path().join("run");
    ok(train(&cfg, acts.to_str().unwrap(), &out, &[]));
    let lines = metrics(&out);
    let steps: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("losses/mse_loss").is_some())
        .collect();
    let (first, last) = (steps.first().unwrap(), steps.last().unwrap());
    let ev = |l: &Value| l["metrics/explained_variance"].as_f64().unwrap();
    assert!(
        ev(last) > 0.8 && ev(last) > ev(first),
        "explained variance {} -> {}",
        ev(first),
        ev(last)
    );
    assert!(lines
        .iter()
        .any(|l| l.get("metrics/mean_log10_feature_sparsity").is_some()));
    for key in [
        "details/current_learning_rate",
        "details/current_l1_coefficient",
        "details/n_training_tokens",
        "sparsity/dead_features",
        "metrics/l0",
        "losses/l1_loss",
    ] {
        assert!(last.get(key).is_some(), "no {key}");
    }
    // the inference SAE takes raw activations (the scaling factor is folded in)
    let sae = io::load(&out, &kernels::Device::Cpu).unwrap();
    assert_eq!(
        sae.cfg().normalize_activations,
        schemas::NormalizeActivations::None
    );
    let enc = bin()
        .args([
            "encode",
            "--sae",
            out.to_str().unwrap(),
            "--input",
            acts.to_str().unwrap(),
            "--output",
            tmp.path().join("e.safetensors").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let summary = ok(enc);
    assert!(
        summary["explained_variance"].as_f64().unwrap() > 0.8,
        "{summary}"
    );
}

#[test]
fn bad_inputs_give_clear_errors_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let acts = tmp.path().join("acts.safetensors");
    write_acts(&acts, 2048, 32, 6);
    let a = acts.to_str().unwrap();
    let cfg = |name: &str, yaml: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, yaml).unwrap();
        p
    };
    let good =
        "architecture: standard\nd_sae: 64\ntraining_tokens: 1024\ntrain_batch_size_tokens: 256\n";
    let out = |n: &str| tmp.path().join(n);

    // issue 18: a key given twice is named at both lines (serde said neither)
    let e = err(train(
        &cfg("dup.yaml", &format!("{good}lr: 0.1\nd_sae: 32\n")),
        a,
        &out("dup"),
        &[],
    ));
    assert!(
        e.contains("dup.yaml: field `d_sae`: given twice, at line 2 and again at line 6"),
        "{e}"
    );
    assert!(!out("dup").exists());

    let e = err(train(
        &cfg("u.yaml", &format!("{good}l1_coeficient: 2\n")),
        a,
        &out("u"),
        &[],
    ));
    assert!(e.contains("u.yaml") && e.contains("l1_coeficient"), "{e}");
    let e = err(train(
        &cfg("v.yaml", &format!("{good}lr_scheduler_name: linear\n")),
        a,
        &out("v"),
        &[],
    ));
    assert!(
        e.contains("lr_scheduler_name") && e.contains("linear"),
        "{e}"
    );
    let e = err(train(
        &cfg("d.yaml", &format!("{good}d_in: 64\n")),
        a,
        &out("d"),
        &[],
    ));
    assert!(
        e.contains("d_in") && e.contains("64") && e.contains("32"),
        "{e}"
    );
    assert!(!out("d").join("metrics.jsonl").exists());
    // bf16 products (SAELens's autocast) are a CUDA feature: refused on the CPU, and
    // `device: cuda` names the build feature when the binary lacks it.
    let e = err(train(
        &cfg(
            "ac.yaml",
            &format!(
                "{good}autocast: true
"
            ),
        ),
        a,
        &out("ac"),
        &[],
    ));
    assert!(e.contains("autocast") && e.contains("CUDA"), "{e}");
    assert!(!out("ac").exists());
    #[cfg(not(feature = "cuda"))]
    {
        let e = err(train(
            &cfg(
                "cu.yaml",
                &format!(
                    "{good}device: cuda:1
"
                ),
            ),
            a,
            &out("cu"),
            &[],
        ));
        assert!(e.contains("cuda:1") && e.contains("`cuda` feature"), "{e}");
    }

    let good_cfg = cfg("g.yaml", good);
    let empty = tmp.path().join("empty.safetensors");
    io::write_safetensors(
        &empty,
        &[OutTensor {
            name: "acts",
            shape: vec![0, 32],
            values: vec![],
            dtype: Dtype::F32,
        }],
        true,
    )
    .unwrap();
    let e = err(train(&good_cfg, empty.to_str().unwrap(), &out("e"), &[]));
    assert!(e.contains("no rows"), "{e}");
    let bytes = std::fs::read(&acts).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(train(&good_cfg, cut.to_str().unwrap(), &out("c"), &[]));
    assert!(
        e.contains("cut.safetensors") && e.contains("not a readable safetensors file"),
        "{e}"
    );
    let garbage = tmp.path().join("garbage.parquet");
    std::fs::write(&garbage, b"definitely not parquet").unwrap();
    let e = err(train(&good_cfg, garbage.to_str().unwrap(), &out("p"), &[]));
    assert!(e.contains("not a readable Parquet file"), "{e}");
    let short = tmp.path().join("short.safetensors");
    write_acts(&short, 600, 32, 7);
    let e = err(train(&good_cfg, short.to_str().unwrap(), &out("s"), &[]));
    // counted before anything is written (it used to run out after 2 batches)
    assert!(
        e.contains(&format!(
            "{} holds 600 activation rows, 2 batches of train_batch_size_tokens 256",
            short.display()
        )) && e.contains("needs 4 batches (1024 rows)"),
        "{e}"
    );
    assert!(
        !out("s").exists(),
        "the refused run wrote {}",
        out("s").display()
    );
    // fewer rows than one batch: the count and the file, not a bare "ran out"
    let tiny = tmp.path().join("tiny.safetensors");
    write_acts(&tiny, 100, 32, 7);
    let e = err(train(&good_cfg, tiny.to_str().unwrap(), &out("t"), &[]));
    assert!(
        e.contains(&format!(
            "{} holds 100 activation rows, 0 batches of train_batch_size_tokens 256",
            tiny.display()
        )),
        "{e}"
    );
    assert!(!out("t").exists());

    // NaN in the third batch: stop naming the step, keep the last checkpoint
    let (_, mut t) = io::read_tensor(&acts, None).unwrap();
    t.values[2 * 256 * 32 + 5 * 32 + 7] = f32::NAN;
    let nan = tmp.path().join("nan.safetensors");
    io::write_safetensors(
        &nan,
        &[OutTensor {
            name: "acts",
            shape: t.shape.clone(),
            values: t.values,
            dtype: Dtype::F32,
        }],
        true,
    )
    .unwrap();
    let nan_cfg = cfg(
        "n.yaml",
        &format!("{good}n_checkpoints: 3\nshuffle: false\n"),
    );
    let e = err(train(&nan_cfg, nan.to_str().unwrap(), &out("n"), &[]));
    assert!(
        e.contains("step 2")
            && e.contains("row 5 column 7")
            && e.contains("the last checkpoint is")
            && e.contains("/512"),
        "{e}"
    );
    // issue 18: and where it is in the file (row 517 = 2 batches of 256 + 5)
    assert!(
        e.contains(&format!("(row 517 of {})", nan.display())),
        "{e}"
    );
    assert!(out("n").join("checkpoints/512/trainer_state.json").exists());
    assert!(!out("n").join("sae_weights.safetensors").exists());

    // a non-empty output directory needs --overwrite
    let busy = out("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    let e = err(train(&good_cfg, a, &busy, &[]));
    assert!(e.contains("not empty") && e.contains("--overwrite"), "{e}");
    ok(train(&good_cfg, a, &busy, &["--overwrite"]));
    assert_eq!(
        std::fs::read_to_string(busy.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(busy.join("sae_weights.safetensors").exists());
}

#[test]
fn bench_prints_one_json_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("b.yaml");
    std::fs::write(&cfg, "architecture: topk\nk: 8\nd_in: 64\nd_sae: 512\ntrain_batch_size_tokens: 128\nuse_sparse_activations: true\n").unwrap();
    let o = bin()
        .args([
            "bench",
            "--config",
            cfg.to_str().unwrap(),
            "--steps",
            "3",
            "--warmup",
            "1",
        ])
        .output()
        .unwrap();
    let v = ok(o);
    for k in [
        "architecture",
        "d_in",
        "d_sae",
        "batch",
        "device",
        "matmul",
        "tflops",
        "tokens_per_second",
        "step_seconds_median",
        "peak_rss_mib",
    ] {
        assert!(v.get(k).is_some(), "{k} missing from {v}");
    }
    assert_eq!(
        (v["d_in"].as_u64(), v["d_sae"].as_u64(), v["batch"].as_u64()),
        (Some(64), Some(512), Some(128))
    );
    assert!(
        v["tokens_per_second"].as_f64().unwrap() > 0.0 && v["peak_rss_mib"].as_f64().unwrap() > 1.0
    );
    // TFLOP/s counts the sparse step's FLOPs (2 d m + 8 k d per token) per second.
    let flops = (2 * 64 * 512 + 8 * 8 * 64) as f64;
    let want = flops * v["tokens_per_second"].as_f64().unwrap() / 1e12;
    assert!((v["tflops"].as_f64().unwrap() - want).abs() <= 1e-9 * want.max(1.0));
    assert_eq!(v["device"], "cpu");
    // Reduced-precision products need CUDA.
    let o = bin()
        .args([
            "bench",
            "--config",
            cfg.to_str().unwrap(),
            "--matmul",
            "tf32",
        ])
        .output()
        .unwrap();
    let e = err(o);
    assert!(e.contains("tf32") && e.contains("CUDA"), "{e}");
}

/// After `training_tokens`, SAELens 5's finetuning methods train only their parameters:
/// `scale` the per-latent decoder scale (decoder rows stay parallel), `decoder` the
/// scale, `W_dec` and `b_dec`, `unrotated_decoder` the scale and `b_dec`. The
/// checkpoint taken as finetuning starts is compared with the final SAE.
#[test]
fn finetuning_trains_only_its_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let acts = tmp.path().join("acts.safetensors");
    write_acts(&acts, 12_000, 32, 9);
    for method in ["scale", "decoder", "unrotated_decoder"] {
        let cfg = tmp.path().join(format!("{method}.yaml"));
        std::fs::write(
            &cfg,
            format!("architecture: standard\nd_sae: 64\nl1_coefficient: 0.1\napply_b_dec_to_input: false\ntraining_tokens: 5120\nfinetuning_tokens: 5120\nfinetuning_method: {method}\ntrain_batch_size_tokens: 256\nlr: 1.0e-3\nn_checkpoints: 1\nshuffle: false\n"),
        )
        .unwrap();
        let out = tmp.path().join(method);
        ok(train(&cfg, acts.to_str().unwrap(), &out, &[]));
        let at_start: std::collections::HashMap<String, Vec<f32>> =
            weights(&out.join("checkpoints/5376")).into_iter().collect();
        let end: std::collections::HashMap<String, Vec<f32>> = weights(&out).into_iter().collect();
        assert_eq!(at_start["W_enc"], end["W_enc"], "{method}: W_enc moved");
        assert_eq!(at_start["b_enc"], end["b_enc"], "{method}: b_enc moved");
        let b_moved = at_start["b_dec"] != end["b_dec"];
        assert_eq!(b_moved, method != "scale", "{method}: b_dec");
        // decoder rows: rescaled (parallel) unless the decoder itself trains
        let (w0, w1) = (&at_start["W_dec"], &end["W_dec"]);
        assert_ne!(w0, w1, "{method}: nothing trained");
        let parallel = w0.chunks(32).zip(w1.chunks(32)).all(|(a, b)| {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let (na, nb) = (
                a.iter().map(|x| x * x).sum::<f32>().sqrt(),
                b.iter().map(|x| x * x).sum::<f32>().sqrt(),
            );
            (dot / (na * nb) - 1.0).abs() < 1e-5
        });
        assert_eq!(
            parallel,
            method != "decoder",
            "{method}: decoder rows parallel"
        );
    }
}

/// The single-SAE training example (tests/fixtures/tiny-acts) runs and learns.
#[test]
fn tiny_acts_example_trains() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tiny-topk");
    let acts = root.join("tests/fixtures/tiny-acts/tiny-gpt2.blocks.1.hook_resid_pre.safetensors");
    let summary = ok(train(
        &root.join("tests/fixtures/tiny-acts/tiny-topk.yaml"),
        acts.to_str().unwrap(),
        &out,
        &[],
    ));
    assert_eq!(summary["tokens"], 19456);
    assert_eq!(summary["run_name"], "512-L1-1.0-LR-0.001-Tokens-1.946e+04");
    let last = metrics(&out)
        .into_iter()
        .rfind(|l| l.get("metrics/explained_variance").is_some())
        .unwrap();
    assert!(
        last["metrics/explained_variance"].as_f64().unwrap() > 0.5,
        "{last}"
    );
    let sae = io::load(&out, &kernels::Device::Cpu).unwrap();
    assert_eq!(
        (sae.cfg().d_in, sae.cfg().d_sae, sae.cfg().k),
        (128, 512, 16.0)
    );
}

/// Parquet shards whose activations are the column named by `hook_name`.
#[test]
fn trains_from_parquet_shards_by_hook_name() {
    use arrow_array::{FixedSizeListArray, Float32Array, Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path().join("acts.safetensors");
    write_acts(&st, 3000, 32, 11);
    let (_, t) = io::read_tensor(&st, None).unwrap();
    let shards = tmp.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("seq", DataType::Int64, false),
        Field::new(
            "blocks.3.hook_resid_post",
            DataType::FixedSizeList(item.clone(), 32),
            false,
        ),
    ]));
    for (i, chunk) in t.values.chunks(1000 * 32).enumerate() {
        let n = chunk.len() / 32;
        let list = FixedSizeListArray::try_new(
            item.clone(),
            32,
            Arc::new(Float32Array::from(chunk.to_vec())),
            None,
        )
        .unwrap();
        let seq = Int64Array::from((0..n as i64).collect::<Vec<_>>());
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(seq), Arc::new(list)]).unwrap();
        let f = std::fs::File::create(shards.join(format!("shard-{i:03}.parquet"))).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, schema.clone(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    let yaml = "hook_name: blocks.3.hook_resid_post\narchitecture: standard\nd_sae: 64\ntraining_tokens: 2816\ntrain_batch_size_tokens: 256\nshuffle: false\n";
    let cfg = tmp.path().join("p.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let summary = ok(train(
        &cfg,
        shards.to_str().unwrap(),
        &tmp.path().join("run"),
        &[],
    ));
    assert_eq!(summary["d_in"], 32);
    // same rows, same order, as the safetensors file: the same SAE (its tensor is
    // called `acts`, so it is named: a bare file whose tensor is not hook_name's is
    // refused)
    let e = err(train(
        &cfg,
        st.to_str().unwrap(),
        &tmp.path().join("run2"),
        &[],
    ));
    assert!(
        e.contains("its tensor is 'acts', but hook_name is 'blocks.3.hook_resid_post'")
            && e.contains(&format!("{}:acts", st.display())),
        "{e}"
    );
    assert!(!tmp.path().join("run2").exists());
    ok(train(
        &cfg,
        &format!("{}:acts", st.display()),
        &tmp.path().join("run2"),
        &[],
    ));
    assert_eq!(
        weights(&tmp.path().join("run")),
        weights(&tmp.path().join("run2"))
    );
    std::fs::write(&cfg, yaml.replace("blocks.3", "blocks.4")).unwrap();
    let e = err(train(
        &cfg,
        shards.to_str().unwrap(),
        &tmp.path().join("run3"),
        &[],
    ));
    assert!(
        e.contains("'blocks.4.hook_resid_post' not found")
            && e.contains("blocks.3.hook_resid_post"),
        "{e}"
    );
}

/// Issue 18: a checkpoint whose parameters hold a NaN (a diverged run) is refused by
/// `--resume`, naming the file, the tensor and the first bad index, before anything is
/// written.
#[test]
fn resume_refuses_a_checkpoint_with_non_finite_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let acts = tmp.path().join("acts.safetensors");
    write_acts(&acts, 4096, 32, 5);
    let acts = acts.to_str().unwrap();
    let cfg = tmp.path().join("run.yaml");
    std::fs::write(
        &cfg,
        "architecture: standard\nd_sae: 64\ntraining_tokens: 4096\ntrain_batch_size_tokens: 256\nn_checkpoints: 1\n",
    )
    .unwrap();
    let first = tmp.path().join("first");
    ok(train(&cfg, acts, &first, &[]));
    let ckpt = std::fs::read_dir(first.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("trainer_state.json").exists())
        .expect("a checkpoint");
    let file = ckpt.join(schemas::files::TRAINER_STATE_TENSORS);
    // W_dec is [d_sae, d_in] = [64, 32]
    with_value(&file, &file, "param.W_dec", 2 * 32 + 2, f32::NAN);
    let again = tmp.path().join("again");
    let e = err(train(
        &cfg,
        acts,
        &again,
        &["--resume", ckpt.to_str().unwrap()],
    ));
    assert!(
        e.contains(&format!("{}: tensor 'param.W_dec'", file.display()))
            && e.contains("1 non-finite value(s)")
            && e.contains("at index [2, 2]"),
        "{e}"
    );
    assert!(
        !again.exists(),
        "the refused resume wrote {}",
        again.display()
    );
}

/// Issue 18: `--overwrite` of a finished run builds the new run beside it (OUT.new).
/// When the new run stops (a NaN batch at step 13 of 16, after three checkpoints) the
/// earlier run is intact byte for byte and the message says where the new run's
/// checkpoints are; when a new run finishes it replaces the earlier one, leaving no
/// staging directory behind.
#[test]
fn overwrite_replaces_a_run_only_when_the_new_one_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.safetensors");
    write_acts(&good, 4096, 32, 7);
    let bad = tmp.path().join("bad.safetensors");
    with_value(&good, &bad, "acts", 3500 * 32 + 4, f32::NAN);
    let cfg = tmp.path().join("run.yaml");
    let yaml = "architecture: standard\nd_sae: 64\ntraining_tokens: 4096\ntrain_batch_size_tokens: 256\nn_checkpoints: 3\nshuffle: false\n";
    std::fs::write(&cfg, yaml).unwrap();
    let out = tmp.path().join("run");
    ok(train(&cfg, good.to_str().unwrap(), &out, &[]));
    let before: Vec<(String, Vec<u8>)> = [
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "metrics.jsonl",
    ]
    .iter()
    .map(|f| (f.to_string(), std::fs::read(out.join(f)).unwrap()))
    .collect();

    let staged = tmp.path().join("run.new");
    let e = err(train(&cfg, bad.to_str().unwrap(), &out, &["--overwrite"]));
    assert!(
        e.contains("step 13")
            && e.contains(&format!(
                "the earlier run in {} is untouched",
                out.display()
            ))
            && e.contains(&format!("checkpoints are in {}", staged.display())),
        "{e}"
    );
    for (f, bytes) in &before {
        assert_eq!(&std::fs::read(out.join(f)).unwrap(), bytes, "{f} changed");
    }
    let ckpts: Vec<PathBuf> = std::fs::read_dir(staged.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("trainer_state.json").exists())
        .collect();
    assert_eq!(ckpts.len(), 3, "the stopped run's checkpoints: {ckpts:?}");

    // A second seed, so the finished run differs from the earlier one.
    std::fs::write(&cfg, format!("{yaml}seed: 9\n")).unwrap();
    ok(train(&cfg, good.to_str().unwrap(), &out, &["--overwrite"]));
    assert_ne!(
        std::fs::read(out.join("sae_weights.safetensors")).unwrap(),
        before[1].1,
        "the new run replaced the earlier one"
    );
    assert!(!staged.exists(), "{} is left behind", staged.display());
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".replaced"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(std::fs::read_to_string(out.join("config.yaml"))
        .unwrap()
        .contains("seed: 9"));
}

/// Issue 18: a `from_pretrained_path` SAE whose architecture, d_sae and k differ from
/// the config keeps its own (SAELens's precedence), the differences are printed, and
/// config.yaml records what was used, agreeing with the saved cfg.json.
#[test]
fn from_pretrained_path_differences_are_said_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.yaml");
    std::fs::write(
        &cfg,
        format!(
            "architecture: standard\nd_sae: 64\nk: 8\nfrom_pretrained_path: {}\ntraining_tokens: 256\ntrain_batch_size_tokens: 128\n",
            fixtures().join("saes/topk").display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let o = train(&cfg, &inputs("batches"), &out, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    ok(o);
    assert!(
        stderr.contains("the SAE's own settings are used")
            && stderr.contains("architecture 'topk' (the config says 'standard')")
            && stderr.contains("d_sae 128 (the config asks 64)")
            && stderr.contains("k 16 (the config says 8)"),
        "{stderr}"
    );
    let used =
        schemas::TrainConfig::from_yaml(&std::fs::read_to_string(out.join("config.yaml")).unwrap())
            .unwrap();
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(used.architecture, "topk");
    assert_eq!(used.d_sae, Some(128));
    assert_eq!(used.k, Some(16.0));
    assert_eq!(saved["d_sae"], 128);
    assert_eq!(saved["k"].as_f64(), Some(16.0));
}

/// Issue 18: `--resume` with a config that differs from the checkpoint's refuses,
/// listing each difference, unless only what a resume may change differs (logging,
/// checkpoints, device), which it then uses.
#[test]
fn resume_lists_config_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let acts = tmp.path().join("acts.safetensors");
    write_acts(&acts, 4096, 32, 6);
    let acts = acts.to_str().unwrap();
    let base = "architecture: standard\nd_sae: 64\ntraining_tokens: 4096\ntrain_batch_size_tokens: 256\nn_checkpoints: 1\n";
    let cfg = tmp.path().join("run.yaml");
    std::fs::write(&cfg, base).unwrap();
    let first = tmp.path().join("first");
    ok(train(&cfg, acts, &first, &[]));
    let ckpt = std::fs::read_dir(first.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("trainer_state.json").exists())
        .expect("a checkpoint");
    let resume = |yaml: &str, out: &Path| {
        let c = tmp.path().join("changed.yaml");
        std::fs::write(&c, yaml).unwrap();
        train(&c, acts, out, &["--resume", ckpt.to_str().unwrap()])
    };
    let refused = tmp.path().join("refused");
    let changed = base.replace("d_sae: 64", "d_sae: 128") + "lr: 0.001\n";
    let e = err(resume(&changed, &refused));
    assert!(
        e.contains(&format!(
            "the config differs from the checkpoint {}",
            ckpt.display()
        )) && e.contains("d_sae (64 in the checkpoint, 128 in the config)")
            && e.contains("lr (0.0003 in the checkpoint, 0.001 in the config)")
            && e.contains("only device, log_frequency, n_checkpoints"),
        "{e}"
    );
    assert!(!refused.exists());
    let resumed = tmp.path().join("resumed");
    ok(resume(&format!("{base}log_frequency: 7\n"), &resumed));
    let used = schemas::TrainConfig::from_yaml(
        &std::fs::read_to_string(resumed.join("config.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(used.log_frequency, 7);
    assert_eq!(
        std::fs::read(first.join("sae_weights.safetensors")).unwrap(),
        std::fs::read(resumed.join("sae_weights.safetensors")).unwrap(),
        "logging does not change the run"
    );
}

/// Issue 18: activation tensors of rank > 2 are read by a stated rule, and refused
/// otherwise naming the shape: `[n_seq, seq_len, d_in]` (a dump's layout) and a hook_z's
/// `[n, n_heads, d_head]` (heads side by side: d_in = n_heads * d_head).
#[test]
fn activation_ranks_follow_the_stated_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let flat = tmp.path().join("flat.safetensors");
    write_acts(&flat, 4096, 32, 8);
    let (_, t) = io::read_tensor(&flat, None).unwrap();
    let as_shape = |name: &str, shape: Vec<usize>, file: &str| {
        let p = tmp.path().join(file);
        io::write_safetensors(
            &p,
            &[OutTensor {
                name,
                shape,
                values: t.values.clone(),
                dtype: Dtype::F32,
            }],
            true,
        )
        .unwrap();
        p
    };
    let cfg = tmp.path().join("run.yaml");
    let yaml =
        "architecture: standard\nd_sae: 64\ntraining_tokens: 4096\ntrain_batch_size_tokens: 256\n";
    std::fs::write(&cfg, yaml).unwrap();
    let four = as_shape("acts", vec![2, 2, 1024, 32], "four.safetensors");
    let e = err(train(
        &cfg,
        four.to_str().unwrap(),
        &tmp.path().join("r4"),
        &[],
    ));
    assert!(
        e.contains("tensor 'acts' has shape [2, 2, 1024, 32]")
            && e.contains("activations are [n, d_in] or [n_seq, seq_len, d_in]"),
        "{e}"
    );
    assert!(!tmp.path().join("r4").exists());
    let seqs = as_shape("acts", vec![4, 1024, 32], "seqs.safetensors");
    let s = ok(train(
        &cfg,
        seqs.to_str().unwrap(),
        &tmp.path().join("r3"),
        &[],
    ));
    assert_eq!(
        (s["d_in"].as_u64(), s["tokens"].as_u64()),
        (Some(32), Some(4096))
    );
    let z = as_shape("blocks.0.attn.hook_z", vec![4096, 4, 8], "z.safetensors");
    std::fs::write(&cfg, format!("{yaml}hook_name: blocks.0.attn.hook_z\n")).unwrap();
    let s = ok(train(
        &cfg,
        z.to_str().unwrap(),
        &tmp.path().join("rz"),
        &[],
    ));
    assert_eq!(s["d_in"].as_u64(), Some(32));
}
