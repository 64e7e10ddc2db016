//! Parity with SAELens 5.11.0, the seed's version (`tests/fixtures/seed_v5`): the
//! options SAELens 6 dropped (unit-norm decoder and its gradient projection, ghost
//! grads, Lp-2 with decoder-norm scaling, `dense_batch` MSE, `constant_norm_rescale`,
//! `layer_norm`, `log_threshold` JumpReLU, TopK without rescaling) and the pre-6.0
//! on-disk format.
//!
//! Same tolerances as `parity_v6.rs`: 1e-5 of the largest magnitude for tensors, 1e-5
//! relative for losses, 1e-6 absolute after five Adam steps. One kind of exception after
//! five steps: an element whose clipped gradient was at some step within 10x of Adam's
//! eps (1e-8). There the update `lr * g / (|g| + eps)` depends on the last digits of a
//! near-cancelling gradient (SAELens 5 has beta1 = 0, so nothing smooths it); such an
//! element may differ by up to Adam's largest possible drift, `2 * lr * steps`. The
//! ghost-grad case has one in `W_enc` and one in `W_dec` (step 0, gradient ~1e-8).

mod common;

use common::*;
use kernels::{ops, Tensor};
use sae::optim::{clip_grad_norm, Adam};
use sae::{io, Sae, StepInput};
use serde_json::Value;

const FWD: f64 = 1e-5;
const LOSS: f64 = 1e-5;
const GRAD: f64 = 1e-5;
const STEP5_ABS: f64 = 1e-6;

struct Case {
    name: &'static str,
    info: Value,
    reference: Reference,
}

fn case(name: &'static str) -> Case {
    let root = fixtures().join("seed_v5");
    let info = json(&root.join("seed_info.json"))["cases"][name].clone();
    let reference = Reference::load(
        &root.join(format!("{name}/reference.safetensors")),
        &info["aliases"],
        &root,
    );
    Case {
        name,
        info,
        reference,
    }
}

fn input(c: &Case, i: usize) -> Tensor {
    let inputs = inputs();
    match c.info["input"].as_str().unwrap() {
        "batches" => inputs.batches[i].clone(),
        "batches_raw" => inputs.batches_raw[i].clone(),
        other => panic!("input {other}"),
    }
}

fn load(c: &Case) -> Sae {
    io::load(&fixtures().join(format!("seed_v5/{}", c.name)), &DEV)
        .unwrap_or_else(|e| panic!("{}: {e}", c.name))
}

fn check_forward(c: &Case, dead: bool) {
    let mut sae = load(c);
    let case = if dead { "dead" } else { "nodead" };
    let mask = inputs().dead_mask;
    let coefficient = c.info["coefficient"]["current_l1_coefficient"]
        .as_f64()
        .unwrap();
    let tol = Tol {
        fwd: FWD,
        loss: LOSS,
        grad: GRAD,
    };
    let (_, mut g) = check_step(
        c.name,
        &mut sae,
        &c.reference,
        case,
        &input(c, 0),
        dead.then_some(&mask),
        coefficient,
        &tol,
    );
    let key = format!("{case}.grad_parallel_removed.W_dec");
    if c.reference.has(&key) {
        sae.remove_gradient_parallel_to_decoder_directions(&mut g);
        assert_close(
            &format!("{} {key}", c.name),
            &g.get("W_dec").to_vec(),
            &c.reference.get(&key),
            GRAD,
        );
    }
}

/// SAELens 5's `SAETrainer._train_step` five times: unit-norm decoder first (when set),
/// dead counters preset so the fixture's mask is dead at step 0, L1 warm-up, Adam with
/// the config's betas, clipping at 1, counters updated from the latents.
fn check_five_steps(c: &Case) {
    let rc = &c.info["runner_config"];
    let f = |k: &str| {
        rc[k]
            .as_f64()
            .unwrap_or_else(|| panic!("runner_config.{k}"))
    };
    let (lr, b1, b2) = (f("lr"), f("adam_beta1"), f("adam_beta2"));
    let (l1, warm, window) = (
        f("l1_coefficient"),
        f("l1_warm_up_steps"),
        f("dead_feature_window"),
    );
    let mut sae = load(c);
    let mut adam = Adam::new(&sae.params, lr, b1, b2);
    let m = sae.cfg().d_sae;
    let mask = inputs().dead_mask.to_vec();
    let mut since_fired: Vec<f32> = mask
        .iter()
        .map(|&d| if d > 0.0 { window as f32 + 1.0 } else { 0.0 })
        .collect();
    let mut act_freq = vec![0f32; m];
    let mut tokens = 0usize;
    // smallest |clipped gradient| each element saw (see the module docs)
    let mut min_grad: Vec<Vec<f32>> = sae
        .params
        .iter()
        .map(|(_, t)| vec![f32::INFINITY; t.numel()])
        .collect();
    for step in 0..5 {
        if sae.cfg().normalize_sae_decoder {
            sae.set_decoder_norm_to_unit_norm();
        }
        let coef = if warm > 0.0 {
            l1 * (step as f64 / warm).min(1.0)
        } else {
            l1
        };
        let dead: Vec<f32> = since_fired
            .iter()
            .map(|&n| (n as f64 > window) as u8 as f32)
            .collect();
        let dead = Tensor::from_vec(&DEV, &[m], dead).unwrap();
        let x = input(c, step);
        let out = sae
            .training_forward(&StepInput {
                sae_in: &x,
                coefficient: coef,
                dead_neuron_mask: Some(&dead),
                noise_seed: 0,
            })
            .unwrap();
        let rec = &c.info["trainer_5_steps"]["per_step"][step];
        assert_rel(
            &format!("{} step {step} loss", c.name),
            out.loss,
            rec["loss"].as_f64().unwrap(),
            LOSS,
        );
        // counters from this step's latents
        let acts = sae.last_feature_acts();
        let mut fired = Tensor::zeros(&DEV, &[m]);
        ops::col_nonzero_counts(&acts, &mut fired);
        for (j, &n) in fired.to_vec().iter().enumerate() {
            since_fired[j] = if n > 0.0 { 0.0 } else { since_fired[j] + 1.0 };
            act_freq[j] += n;
        }
        tokens += x.rows();
        let mut g = sae.zero_grads();
        sae.backward(&mut g);
        let norm = clip_grad_norm(&mut g, 1.0);
        assert_rel(
            &format!("{} step {step} grad norm", c.name),
            norm as f64,
            rec["grad_norm_before_clip"].as_f64().unwrap(),
            1e-4,
        );
        for ((_, t), mins) in g.iter().zip(min_grad.iter_mut()) {
            mins.iter_mut()
                .zip(t.to_vec())
                .for_each(|(m, v)| *m = m.min(v.abs()));
        }
        adam.update(&mut sae.params, &g);
    }
    let r = &c.reference;
    let mut ill_conditioned = 0;
    for ((p, t), mins) in sae.params.iter().zip(&min_grad) {
        let want = r.get(&format!("step5.param.{p}"));
        for (i, (&g, &w)) in t.to_vec().iter().zip(&want).enumerate() {
            let err = (g as f64 - w).abs();
            if err > STEP5_ABS {
                let near_eps = (mins[i] as f64) < 10.0 * adam.eps;
                assert!(
                    near_eps && err <= 2.0 * lr * 5.0,
                    "{} step5.param.{p}[{i}]: got {g}, want {w} (smallest clipped grad {:e})",
                    c.name,
                    mins[i]
                );
                ill_conditioned += 1;
            }
        }
    }
    assert!(
        ill_conditioned <= 2,
        "{}: {ill_conditioned} elements off after 5 steps",
        c.name
    );
    let n = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    assert_eq!(
        n(&since_fired),
        r.get("step5.trainer.n_forward_passes_since_fired"),
        "{}",
        c.name
    );
    assert_eq!(
        n(&act_freq),
        r.get("step5.trainer.act_freq_scores"),
        "{}",
        c.name
    );
    let log_sparsity: Vec<f32> = act_freq
        .iter()
        .map(|a| ((a / tokens as f32) + 1e-10).log10())
        .collect();
    assert_close(
        &format!("{} log_feature_sparsity", c.name),
        &log_sparsity,
        &r.get("step5.trainer.log_feature_sparsity"),
        1e-6,
    );
}

/// SAELens 5's inference `SAE` gives the training forward's outputs.
fn check_inference(c: &Case) {
    let sae = load(c);
    let (acts, out) = sae.forward(&input(c, 0)).unwrap();
    assert_close(
        &format!("{} inference.feature_acts", c.name),
        &head_rows(&acts, 16),
        &c.reference.get("inference.feature_acts"),
        FWD,
    );
    assert_close(
        &format!("{} inference.sae_out", c.name),
        &head_rows(&out, 16),
        &c.reference.get("inference.sae_out"),
        FWD,
    );
    assert_close(
        &format!("{} inference.forward", c.name),
        &head_rows(&out, 16),
        &c.reference.get("inference.forward"),
        FWD,
    );
}

fn full(name: &'static str) {
    let c = case(name);
    check_forward(&c, false);
    check_forward(&c, true);
    check_inference(&c);
    check_five_steps(&c);
}

#[test]
fn standard_unit_decoder() {
    full("standard_unit_decoder");
}

#[test]
fn standard_ghost_grads() {
    full("standard_ghost_grads");
}

#[test]
fn standard_lp2_decnorm_heuristic() {
    full("standard_lp2_decnorm_heuristic");
}

#[test]
fn standard_dense_batch_mse() {
    full("standard_dense_batch_mse");
}

#[test]
fn standard_constant_norm_rescale() {
    full("standard_constant_norm_rescale");
}

#[test]
fn standard_layer_norm() {
    full("standard_layer_norm");
}

#[test]
fn gated() {
    full("gated");
}

#[test]
fn jumprelu_log_threshold() {
    full("jumprelu");
}

#[test]
fn topk_without_rescaling() {
    full("topk");
}

/// The whole-runner-config `cfg.json` of an old checkpoint, its weights and sparsity.
#[test]
fn runner_checkpoint() {
    let c = case("standard_unit_decoder");
    let dir = fixtures().join("seed_v5/standard_unit_decoder/step5_runner_checkpoint");
    let sae = io::load(&dir, &DEV).unwrap();
    let (acts, out) = sae.forward(&inputs().batches[0]).unwrap();
    let r = &c.reference;
    assert_close(
        "runner_checkpoint feature_acts",
        &head_rows(&acts, 16),
        &r.get("runner_checkpoint.inference.feature_acts"),
        FWD,
    );
    assert_close(
        "runner_checkpoint sae_out",
        &head_rows(&out, 16),
        &r.get("runner_checkpoint.inference.sae_out"),
        FWD,
    );
    let sparsity = io::load_sparsity(&dir)
        .unwrap()
        .expect("sparsity.safetensors");
    assert_eq!(sparsity.len(), 128);
    assert!(sparsity.iter().all(|v| v.is_finite() && *v <= 0.0));
    // Saved again in SAELens 6's format, it loads and computes the same.
    let tmp = tempfile::tempdir().unwrap();
    io::save_training(&sae, tmp.path(), false).unwrap();
    let back = io::load(tmp.path(), &DEV).unwrap();
    let (_, out2) = back.forward(&inputs().batches[0]).unwrap();
    assert_eq!(out.to_vec(), out2.to_vec());
    assert_eq!(
        json(&tmp.path().join("cfg.json"))["metadata"]["sae_lens_version"],
        schemas::SAELENS_FORMAT_VERSION
    );
}

/// The JumpReLU `log_threshold` round trip: SAELens 5 stores `threshold`, trains the log.
#[test]
fn jumprelu_threshold_forms() {
    let c = case("jumprelu");
    let sae = load(&c);
    assert!(sae.params.contains("log_threshold") && !sae.params.contains("threshold"));
    let stored =
        io::read_safetensors(&fixtures().join("seed_v5/jumprelu/sae_weights.safetensors")).unwrap();
    let t = &stored
        .iter()
        .find(|(n, _)| n == "threshold")
        .unwrap()
        .1
        .values;
    let lt = sae.params.get("log_threshold").to_vec();
    for (a, b) in t.iter().zip(&lt) {
        assert!((a.ln() - b).abs() < 1e-6);
    }
    let inf = sae.inference_form().unwrap();
    assert!(inf.params.contains("threshold"));
    let (a1, _) = sae.forward(&inputs().batches[0]).unwrap();
    let (a2, _) = inf.forward(&inputs().batches[0]).unwrap();
    let want: Vec<f64> = a1.to_vec().iter().map(|&v| v as f64).collect();
    assert_close("log vs direct threshold", &a2.to_vec(), &want, 1e-6);
}
