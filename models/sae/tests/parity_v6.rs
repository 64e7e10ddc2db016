//! Parity with SAELens 6.54.12 (`tests/fixtures/saes`, `tests/fixtures/saes_inference`).
//!
//! For each architecture: load the SAELens-saved SAE, run one training forward pass on
//! `batches[0]` with no dead latents and with the fixture's dead mask, and compare the
//! latents, pre-activations, reconstruction (rows 0..15), every loss term, the total
//! loss, and the gradient of the total loss for every parameter; then 5 real trainer
//! steps (Adam, clipping) and the inference save/load round trip.
//!
//! Tolerances (f32 throughout; SAELens sums in other orders):
//! * forward tensors and gradients: 1e-5 of the reference's largest magnitude;
//! * losses: 1e-5 relative;
//! * after 5 Adam steps: 1e-6 absolute (Adam moves each weight by about lr = 3e-4 per
//!   step whatever the gradient's size, so rounding-level gradient differences show at
//!   1e-7; the fixture README suggests ~1e-6). One known exception: in the TopK run,
//!   step 2, row 64, latents 73 and 75 have bit-identical pre-activations at the k-th
//!   place and torch's `topk` (libstdc++ `nth_element`) keeps 75 where we keep 73; those
//!   two latents' weights differ afterwards and nothing else does.

mod common;

use common::*;
use sae::optim::{clip_grad_norm, Adam};
use sae::{io, Sae, StepInput, StepPath};
use serde_json::Value;

const FWD: f64 = 1e-5;
const LOSS: f64 = 1e-5;
const GRAD: f64 = 1e-5;
const STEP5_ABS: f64 = 1e-6;

struct Case {
    arch: &'static str,
    info: Value,
    reference: Reference,
}

fn case(arch: &'static str) -> Case {
    let root = fixtures();
    let info = json(&root.join("saes/saes_info.json"))["archs"][arch].clone();
    let reference = Reference::load(
        &root.join(format!("saes/{arch}/reference.safetensors")),
        &info["aliases"],
        &root,
    );
    Case {
        arch,
        info,
        reference,
    }
}

fn load(arch: &str) -> Sae {
    io::load(&fixtures().join(format!("saes/{arch}")), &DEV)
        .unwrap_or_else(|e| panic!("{arch}: {e}"))
}

fn coefficient(info: &Value) -> f64 {
    info["coefficients"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
}

fn check_forward(c: &Case, dead: bool, path: Option<StepPath>) {
    let inputs = inputs();
    let mut sae = load(c.arch);
    sae.force_path(path);
    let case = if dead { "dead" } else { "nodead" };
    let mask = dead.then_some(&inputs.dead_mask);
    let tol = Tol {
        fwd: FWD,
        loss: LOSS,
        grad: GRAD,
    };
    let (out, _) = check_step(
        c.arch,
        &mut sae,
        &c.reference,
        case,
        &inputs.batches[0],
        mask,
        coefficient(&c.info),
        &tol,
    );
    // SAELens 6 reports every term of the architecture, zero or not
    let n_ref = c
        .reference
        .tensors
        .keys()
        .filter(|k| k.starts_with(&format!("{case}.losses.")))
        .count();
    assert_eq!(
        n_ref,
        out.losses.len(),
        "{}: loss terms {:?}",
        c.arch,
        out.losses
    );
    let key = format!("{case}.buffer_after.topk_threshold");
    if c.reference.has(&key) {
        assert_rel(
            &format!("{} {key}", c.arch),
            sae.buffers.topk_threshold,
            c.reference.scalar(&key),
            1e-6,
        );
    }
}

/// Five `SAETrainer.step` calls: constant LR 3e-4, Adam (0.9, 0.999), clipping at 1.
fn check_five_steps(c: &Case, path: Option<StepPath>) -> Sae {
    let inputs = inputs();
    let mut sae = load(c.arch);
    sae.force_path(path);
    let mut adam = Adam::new(&sae.params, 3e-4, 0.9, 0.999);
    let steps = c.info["trainer_5_steps"]["per_step"]
        .as_array()
        .unwrap()
        .clone();
    for (i, batch) in inputs.batches.iter().enumerate() {
        let out = sae
            .training_forward(&StepInput {
                sae_in: batch,
                coefficient: coefficient(&c.info),
                dead_neuron_mask: None,
                noise_seed: 0,
            })
            .unwrap();
        if let Some(p) = path {
            assert_eq!(sae.last_path(), p, "{} step {i}", c.arch);
        }
        assert_rel(
            &format!("{} step {i} loss", c.arch),
            out.loss,
            steps[i]["loss"].as_f64().unwrap(),
            LOSS,
        );
        for (k, v) in steps[i].as_object().unwrap() {
            if k != "loss" {
                assert_rel(
                    &format!("{} step {i} {k}", c.arch),
                    out.get(k).unwrap(),
                    v.as_f64().unwrap(),
                    LOSS,
                );
            }
        }
        let mut g = sae.zero_grads();
        sae.backward(&mut g);
        clip_grad_norm(&mut g, 1.0);
        adam.update(&mut sae.params, &g);
    }
    let tie_latents: &[usize] = if c.arch == "topk" { &[73, 75] } else { &[] };
    for (p, t) in sae.params.iter() {
        let want = c.reference.get(&format!("step5.param.{p}"));
        let got = t.to_vec();
        // latent index of each element: columns of W_enc, rows of W_dec, b_enc entries
        let latent = |i: usize| match p {
            "W_enc" => Some(i % t.cols()),
            "W_dec" => Some(i / t.cols()),
            "b_enc" | "threshold" | "b_gate" | "b_mag" | "r_mag" => Some(i),
            _ => None,
        };
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let err = (g as f64 - w).abs();
            if err > STEP5_ABS {
                assert!(
                    latent(i).is_some_and(|l| tie_latents.contains(&l)),
                    "{} step5.param.{p}[{i}]: got {g}, want {w} (abs err {err:.2e} > {STEP5_ABS:.0e})",
                    c.arch
                );
            }
        }
    }
    if c.reference.has("step5.buffer.topk_threshold") {
        assert_rel(
            &format!("{} step5 topk_threshold", c.arch),
            sae.buffers.topk_threshold,
            c.reference.scalar("step5.buffer.topk_threshold"),
            1e-5,
        );
    }
    sae
}

/// Our inference save of the 5-step SAE against SAELens's, and SAELens's file loaded
/// and run here against SAELens's own outputs.
fn check_inference(c: &Case, trained: &Sae) {
    let inputs = inputs();
    let dir = tempfile::tempdir().unwrap();
    io::save_inference(trained, dir.path(), false).unwrap();
    let theirs = fixtures().join(format!("saes_inference/{}", c.arch));
    let ours_w = read_all(&dir.path().join("sae_weights.safetensors"));
    let theirs_w = read_all(&theirs.join("sae_weights.safetensors"));
    let mut names: Vec<_> = ours_w.keys().collect();
    names.sort();
    let mut want: Vec<_> = theirs_w.keys().collect();
    want.sort();
    assert_eq!(names, want, "{}: inference tensor names", c.arch);
    for n in names {
        let got: Vec<f32> = ours_w[n].1.iter().map(|&v| v as f32).collect();
        assert_eq!(ours_w[n].0, theirs_w[n].0, "{}: shape of {n}", c.arch);
        for (i, (&g, &w)) in got.iter().zip(&theirs_w[n].1).enumerate() {
            let err = (g as f64 - w).abs();
            let latent = match n.as_str() {
                "W_enc" => i % 128,
                "W_dec" => i / 128,
                _ => i,
            };
            let tie = c.arch == "topk" && n != "b_dec" && [73, 75].contains(&latent);
            // folding divides by decoder norms (about 0.1 here): 20x the step-5 tolerance
            assert!(
                err <= 20.0 * STEP5_ABS || tie,
                "{} inference {n}[{i}]: got {g}, want {w}",
                c.arch
            );
        }
    }
    let ours_cfg = json(&dir.path().join("cfg.json"));
    assert_eq!(
        ours_cfg,
        json(&theirs.join("cfg.json")),
        "{}: inference cfg.json",
        c.arch
    );

    let loaded = io::load(&theirs, &DEV).unwrap();
    let (acts, out) = loaded.forward(&inputs.batches[0]).unwrap();
    assert_close(
        &format!("{} inference.feature_acts", c.arch),
        &head_rows(&acts, 16),
        &c.reference.get("inference.feature_acts"),
        FWD,
    );
    assert_close(
        &format!("{} inference.sae_out", c.arch),
        &head_rows(&out, 16),
        &c.reference.get("inference.sae_out"),
        FWD,
    );
    assert_close(
        &format!("{} inference.forward", c.arch),
        &head_rows(&out, 16),
        &c.reference.get("inference.forward"),
        FWD,
    );
    let enc = loaded.encode(&inputs.batches[0]).unwrap();
    let dec = loaded.decode(&enc).unwrap();
    assert_close(
        &format!("{} decode(encode)", c.arch),
        &head_rows(&dec, 16),
        &c.reference.get("inference.sae_out"),
        FWD,
    );
    // Ours, reloaded, computes what the trained SAE computed before folding...
    let ours = io::load(dir.path(), &DEV).unwrap();
    let (acts2, out2) = ours.forward(&inputs.batches[0]).unwrap();
    if c.arch.contains("batchtopk") {
        // (BatchTopK becomes a JumpReLU with the running threshold: another function.)
        assert_eq!(ours.cfg().architecture, schemas::Architecture::JumpRelu);
    } else {
        let (_, before) = trained.forward(&inputs.batches[0]).unwrap();
        let want: Vec<f64> = before.to_vec().iter().map(|&v| v as f64).collect();
        assert_close(
            &format!("{} fold preserves forward", c.arch),
            &out2.to_vec(),
            &want,
            FWD,
        );
    }
    // ...and, but for the TopK tie (see the module docs), what SAELens's file computes.
    if c.arch != "topk" {
        assert_close(
            &format!("{} our inference save", c.arch),
            &head_rows(&out2, 16),
            &c.reference.get("inference.sae_out"),
            1e-4,
        );
        assert_close(
            &format!("{} our inference acts", c.arch),
            &head_rows(&acts2, 16),
            &c.reference.get("inference.feature_acts"),
            1e-4,
        );
    }
}

fn full(arch: &'static str) {
    let c = case(arch);
    check_forward(&c, false, None);
    check_forward(&c, true, None);
    let trained = check_five_steps(&c, None);
    check_inference(&c, &trained);
}

/// The sparse path of an architecture that chooses by density, forced (the fixtures'
/// random latents are dense): the same reference numbers, the same tolerances.
fn sparse_forced(arch: &'static str) {
    let c = case(arch);
    check_forward(&c, false, Some(StepPath::Sparse));
    check_forward(&c, true, Some(StepPath::Sparse));
    let trained = check_five_steps(&c, Some(StepPath::Sparse));
    check_inference(&c, &trained);
}

#[test]
fn standard_sparse_path() {
    sparse_forced("standard");
}

/// The `step` penalty; in `jumprelu_tanh` the tanh penalty with the estimator passed to
/// the input (its dead case also has the pre-activation loss, which is dense).
#[test]
fn jumprelu_sparse_path() {
    sparse_forced("jumprelu");
}

#[test]
fn gated_sparse_path() {
    sparse_forced("gated");
}

#[test]
fn jumprelu_tanh_sparse_path() {
    sparse_forced("jumprelu_tanh");
}

#[test]
fn standard() {
    full("standard");
}

#[test]
fn gated() {
    full("gated");
}

#[test]
fn jumprelu() {
    full("jumprelu");
}

#[test]
fn jumprelu_tanh() {
    full("jumprelu_tanh");
}

#[test]
fn topk() {
    full("topk");
}

#[test]
fn batchtopk() {
    full("batchtopk");
}

#[test]
fn matryoshka_batchtopk() {
    full("matryoshka_batchtopk");
}

/// The sparse path gives the dense path's numbers.
#[test]
fn sparse_path_matches_reference() {
    for arch in ["topk", "batchtopk", "matryoshka_batchtopk"] {
        let c = case(arch);
        let mut sae = load(arch);
        let mut cfg = sae.cfg().clone();
        cfg.use_sparse_activations = true;
        sae.set_cfg(cfg).unwrap();
        let inputs = inputs();
        let out = sae
            .training_forward(&StepInput {
                sae_in: &inputs.batches[0],
                coefficient: 0.0,
                dead_neuron_mask: Some(&inputs.dead_mask),
                noise_seed: 0,
            })
            .unwrap();
        assert_rel(
            &format!("{arch} sparse loss"),
            out.loss,
            c.reference.scalar("dead.loss"),
            LOSS,
        );
        let mut g = sae.zero_grads();
        sae.backward(&mut g);
        for (p, t) in g.iter() {
            assert_close(
                &format!("{arch} sparse grad.{p}"),
                &t.to_vec(),
                &c.reference.get(&format!("dead.grad.{p}")),
                GRAD,
            );
        }
    }
}

/// Training saves reproduce SAELens's own training files.
#[test]
fn training_save_round_trip() {
    for arch in ARCHS {
        let src = fixtures().join(format!("saes/{arch}"));
        let sae = io::load(&src, &DEV).unwrap();
        let dir = tempfile::tempdir().unwrap();
        io::save_training(&sae, dir.path(), false).unwrap();
        assert_eq!(
            json(&dir.path().join("cfg.json")),
            json(&src.join("cfg.json")),
            "{arch}"
        );
        let a = read_all(&dir.path().join("sae_weights.safetensors"));
        let b = read_all(&src.join("sae_weights.safetensors"));
        assert_eq!(a, b, "{arch}: weights differ after a load/save round trip");
        // refuses to overwrite, then overwrites when told
        assert!(matches!(
            io::save_training(&sae, dir.path(), false),
            Err(sae::SaeError::AlreadyExists { .. })
        ));
        io::save_training(&sae, dir.path(), true).unwrap();
    }
}

/// f16 and bf16 files load (SAELens writes the config's dtype).
#[test]
fn half_precision_files() {
    let inputs = inputs();
    for dtype in [schemas::Dtype::F16, schemas::Dtype::BF16] {
        let mut sae = load("standard");
        let mut cfg = sae.cfg().clone();
        cfg.dtype = dtype;
        sae.set_cfg(cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        io::save_training(&sae, dir.path(), false).unwrap();
        let w = io::read_safetensors(&dir.path().join("sae_weights.safetensors")).unwrap();
        assert_eq!(w.len(), 4);
        assert!(w.iter().all(|(_, t)| t.dtype == dtype));
        let back = io::load(dir.path(), &DEV).unwrap();
        assert_eq!(back.cfg().dtype, dtype);
        let (_, a) = sae.forward(&inputs.batches[0]).unwrap();
        let (_, b) = back.forward(&inputs.batches[0]).unwrap();
        let want: Vec<f64> = a.to_vec().iter().map(|&v| v as f64).collect();
        // half precision keeps ~3 significant digits
        let tol = if dtype == schemas::Dtype::F16 {
            5e-3
        } else {
            3e-2
        };
        assert_close(&format!("{dtype:?} forward"), &b.to_vec(), &want, tol);
    }
}
