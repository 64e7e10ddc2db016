//! The analytic backward against finite differences, for the configurations that no
//! SAELens fixture covers (and a few that one does, as a cross-check of the method).
//!
//! Method: a random SAE at a generic point, a random input, and for each parameter
//! tensor a random direction `v` in it; the analytic directional derivative
//! `<grad_p, v>` must match the central difference `(L(p + e v) - L(p - e v)) / 2e` at
//! 1e-2 relative. Only
//! smooth configurations qualify: the step's straight-through estimator (JumpReLU) and
//! the detached residuals of AuxK and ghost grads are not derivatives of the loss, so
//! those are checked elsewhere (fixtures, or consistency tests below). The activation
//! pattern at `p +- e v` must equal the pattern at `p`, so no ReLU or top-k boundary is
//! crossed.

use kernels::{ops, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use sae::{Architecture, Params, Sae, SaeConfig, StepInput, StepPath};
use schemas::{ActivationFn, MseLossNormalization, NormalizeActivations};

const DEV: Device = Device::Cpu;

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(rng);
            scale * z
        })
        .collect();
    Tensor::from_vec(&DEV, shape, v).unwrap()
}

/// Adds `scale * N(0, 1)` to every parameter (moves off the symmetric initial point:
/// zero biases, `W_enc = W_dec^T`).
fn perturb(sae: &mut Sae, rng: &mut ChaCha8Rng, scale: f32) {
    for (_, t) in sae.params.iter_mut() {
        let noise = randn(rng, t.shape(), scale);
        ops::axpy(t, 1.0, &noise);
    }
}

fn loss(sae: &mut Sae, x: &Tensor, coef: f64, mask: Option<&Tensor>) -> (f64, Vec<bool>) {
    let out = sae
        .training_forward(&StepInput {
            sae_in: x,
            coefficient: coef,
            dead_neuron_mask: mask,
            noise_seed: 0,
        })
        .unwrap();
    let pattern = sae
        .last_feature_acts()
        .to_vec()
        .iter()
        .map(|&v| v != 0.0)
        .collect();
    (out.loss, pattern)
}

fn shifted(p: &Params, v: &Params, e: f32) -> Params {
    let mut q = p.clone();
    for (name, t) in q.iter_mut() {
        ops::axpy(t, e, v.get(name));
    }
    q
}

/// For each parameter, tries random points until one has no activation within reach of
/// a boundary along the chosen direction.
fn check(name: &str, cfg: SaeConfig, coef: f64, mask: Option<&Tensor>) {
    check_path(name, cfg, coef, mask, None)
}

/// [`check`] with the step's dense/sparse path forced where the architecture has both.
fn check_path(
    name: &str,
    cfg: SaeConfig,
    coef: f64,
    mask: Option<&Tensor>,
    path: Option<StepPath>,
) {
    let names: Vec<String> = Sae::new(cfg.clone(), &DEV, 0)
        .unwrap()
        .params
        .names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    for pname in &names {
        let mut tried = vec![];
        let ok = (0..60).any(
            |seed| match check_at(name, &cfg, coef, mask, seed, pname, path) {
                Ok(()) => true,
                Err(e) => {
                    tried.push(e);
                    false
                }
            },
        );
        assert!(
            ok,
            "{name}, {pname}: every point was too close to a boundary: {tried:?}"
        );
    }
}

fn check_at(
    name: &str,
    cfg: &SaeConfig,
    coef: f64,
    mask: Option<&Tensor>,
    seed: u64,
    pname: &str,
    path: Option<StepPath>,
) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sae = Sae::new(cfg.clone(), &DEV, seed).unwrap();
    sae.force_path(path);
    perturb(&mut sae, &mut rng, 0.05);
    let x = randn(&mut rng, &[4, cfg.d_in], 1.0);
    let base = sae.params.clone();
    let (_, pattern) = loss(&mut sae, &x, coef, mask);
    if let Some(p) = path {
        assert_eq!(sae.last_path(), p, "{name}");
    }
    let mut g = sae.zero_grads();
    sae.backward(&mut g);
    let mut v = sae.params.zeros_like();
    // unit-norm direction, so that a step moves each pre-activation by about e
    let n = g.get(pname).numel() as f32;
    *v.get_mut(pname) = randn(&mut rng, g.get(pname).shape(), 1.0 / n.sqrt());
    let analytic: f64 = g
        .get(pname)
        .to_vec()
        .iter()
        .zip(v.get(pname).to_vec())
        .map(|(a, b)| (*a * b) as f64)
        .sum();
    // Two step sizes must agree with each other before the analytic value is compared
    // with them.
    let mut fds = vec![];
    for e in [1e-3f32, 3e-4] {
        sae.params = shifted(&base, &v, e);
        let (lp, pp) = loss(&mut sae, &x, coef, mask);
        sae.params = shifted(&base, &v, -e);
        let (lm, pm) = loss(&mut sae, &x, coef, mask);
        sae.params = base.clone();
        if pp != pattern || pm != pattern {
            return Err(format!("seed {seed}: pattern changed"));
        }
        fds.push((lp - lm) / (2.0 * e as f64));
    }
    if cfg.architecture == Architecture::Gated && !gated_aux_clear(&sae, &x, &v, 1e-3) {
        return Err(format!("seed {seed}: auxiliary gate near a kink"));
    }
    let scale = analytic.abs().max(1e-3);
    if (fds[0] - fds[1]).abs() / scale >= 5e-3 {
        return Err(format!("seed {seed}: step sizes disagree {fds:?}"));
    }
    let err = (fds[0] - analytic).abs() / scale;
    assert!(
        err < 1e-2,
        "{name}, {pname}: analytic {analytic}, finite differences {fds:?} (rel err {err:.2e})"
    );
    Ok(())
}

/// Gated's auxiliary path applies a ReLU to `(x - b_dec) @ W_enc + b_gate`, on the raw
/// input, which the latent pattern does not show. True when no entry of it reaches 0
/// within a step of `e` along `v` (computed here with host loops).
fn gated_aux_clear(sae: &Sae, x: &Tensor, v: &Params, e: f64) -> bool {
    let (d, m) = (sae.cfg().d_in, sae.cfg().d_sae);
    let a: f32 = if sae.cfg().apply_b_dec_to_input {
        1.0
    } else {
        0.0
    };
    let p = &sae.params;
    let (w, bg, bd) = (
        p.get("W_enc").to_vec(),
        p.get("b_gate").to_vec(),
        p.get("b_dec").to_vec(),
    );
    let (vw, vg, vd) = (
        v.get("W_enc").to_vec(),
        v.get("b_gate").to_vec(),
        v.get("b_dec").to_vec(),
    );
    let xv = x.to_vec();
    for r in 0..x.rows() {
        for j in 0..m {
            let (mut g, mut dg) = (bg[j] as f64, vg[j] as f64);
            for i in 0..d {
                let xi = (xv[r * d + i] - a * bd[i]) as f64;
                g += xi * w[i * m + j] as f64;
                dg += xi * vw[i * m + j] as f64 - (a * vd[i] * w[i * m + j]) as f64;
            }
            // the first-order change over a step of e, with room for the second order
            if g.abs() <= 2.0 * e * dg.abs() + 1e-6 {
                return false;
            }
        }
    }
    true
}

fn cfg(arch: Architecture) -> SaeConfig {
    let mut c = SaeConfig::new(arch, 12, 24);
    c.k = 4.0;
    c
}

#[test]
fn standard_variants() {
    check(
        "standard L1 weighted",
        cfg(Architecture::Standard),
        0.7,
        None,
    );
    let mut c = cfg(Architecture::Standard);
    c.lp_norm = 2.0;
    check("standard L2 weighted", c.clone(), 0.7, None);
    c.lp_norm = 1.5;
    c.scale_sparsity_penalty_by_decoder_norm = false;
    check("standard L1.5 unweighted", c, 0.7, None);
    let mut c = cfg(Architecture::Standard);
    c.activation_fn = ActivationFn::TanhRelu;
    check("standard tanh-relu", c, 0.7, None);
    let mut c = cfg(Architecture::Standard);
    c.mse_loss_normalization = Some(MseLossNormalization::DenseBatch);
    check("standard dense_batch", c, 0.7, None);
    for norm in [
        NormalizeActivations::LayerNorm,
        NormalizeActivations::ConstantNormRescale,
    ] {
        let mut c = cfg(Architecture::Standard);
        c.normalize_activations = norm;
        check(&format!("standard {norm}"), c.clone(), 0.7, None);
        c.apply_b_dec_to_input = false;
        check(
            &format!("standard {norm} without b_dec on input"),
            c,
            0.7,
            None,
        );
    }
}

#[test]
fn standard_sparse_path_variants() {
    let sparse = Some(StepPath::Sparse);
    let mut c = cfg(Architecture::Standard);
    check_path("standard sparse L1 weighted", c.clone(), 0.7, None, sparse);
    c.lp_norm = 2.0;
    check_path("standard sparse L2 weighted", c.clone(), 0.7, None, sparse);
    c.lp_norm = 1.5;
    c.scale_sparsity_penalty_by_decoder_norm = false;
    check_path("standard sparse L1.5 unweighted", c, 0.7, None, sparse);
    let mut c = cfg(Architecture::Standard);
    c.activation_fn = ActivationFn::TanhRelu;
    check_path("standard sparse tanh-relu", c, 0.7, None, sparse);
    let mut c = cfg(Architecture::Standard);
    c.normalize_activations = NormalizeActivations::LayerNorm;
    check_path("standard sparse layer_norm", c, 0.7, None, sparse);
}

#[test]
fn gated_variants() {
    check("gated", cfg(Architecture::Gated), 0.5, None);
    // with a run-time normalisation the auxiliary path reads the raw input
    let mut c = cfg(Architecture::Gated);
    c.normalize_activations = NormalizeActivations::LayerNorm;
    check("gated layer_norm", c.clone(), 0.5, None);
    c.apply_b_dec_to_input = false;
    check("gated layer_norm without b_dec on input", c, 0.5, None);
}

#[test]
fn gated_sparse_path_variants() {
    let sparse = Some(StepPath::Sparse);
    let mut c = cfg(Architecture::Gated);
    check_path("gated sparse", c.clone(), 0.5, None, sparse);
    c.apply_b_dec_to_input = false;
    check_path("gated sparse without b_dec on input", c, 0.5, None, sparse);
    // the auxiliary path's own input makes a second gate: dense whatever is forced
    let mut c = cfg(Architecture::Gated);
    c.normalize_activations = NormalizeActivations::LayerNorm;
    let mut sae = Sae::new(c, &DEV, 0).unwrap();
    sae.force_path(sparse);
    let x = randn(&mut ChaCha8Rng::seed_from_u64(3), &[4, 12], 1.0);
    run(&mut sae, &x, 0.5, None);
    assert_eq!(sae.last_path(), StepPath::Dense);
}

/// On the CPU the TopK family chooses its path by the selection's density, whatever
/// `use_sparse_activations` says; `true` keeps it sparse at any density, and a forced
/// path wins over both.
#[test]
fn topk_family_chooses_its_path_by_density() {
    let x = randn(&mut ChaCha8Rng::seed_from_u64(3), &[8, 12], 1.0);
    for arch in [
        Architecture::TopK,
        Architecture::BatchTopK,
        Architecture::MatryoshkaBatchTopK,
    ] {
        // (k, d_sae, use_sparse_activations, forced) -> path
        for (k, m, flag, forced, want) in [
            (2.0, 64, false, None, StepPath::Sparse),
            (8.0, 64, false, None, StepPath::Dense),
            (8.0, 64, true, None, StepPath::Sparse),
            (2.0, 64, true, Some(StepPath::Dense), StepPath::Dense),
            (8.0, 64, false, Some(StepPath::Sparse), StepPath::Sparse),
        ] {
            let mut c = SaeConfig::new(arch, 12, m);
            c.k = k;
            c.use_sparse_activations = flag;
            c.matryoshka_widths = vec![16, m];
            let mut sae = Sae::new(c, &DEV, 0).unwrap();
            sae.force_path(forced);
            run(&mut sae, &x, 0.0, None);
            assert_eq!(sae.last_path(), want, "{arch} k={k} flag={flag} {forced:?}");
        }
    }
}

/// Both paths of the TopK family, each forced (on the CPU the step would choose by
/// density); `use_sparse_activations` set to match, as a user would.
#[test]
fn topk_family_dense_and_sparse() {
    let path = |sparse| match sparse {
        true => Some(StepPath::Sparse),
        false => Some(StepPath::Dense),
    };
    for arch in [Architecture::TopK, Architecture::BatchTopK] {
        for sparse in [false, true] {
            for rescale in [true, false] {
                let mut c = cfg(arch);
                c.use_sparse_activations = sparse;
                c.rescale_acts_by_decoder_norm = rescale;
                let name = format!("{arch} sparse={sparse} rescale={rescale}");
                check_path(&name, c, 0.0, None, path(sparse));
            }
        }
    }
    for sparse in [false, true] {
        let mut c = cfg(Architecture::MatryoshkaBatchTopK);
        c.use_sparse_activations = sparse;
        c.matryoshka_widths = vec![4, 10, 24];
        let name = format!("matryoshka sparse={sparse}");
        check_path(&name, c.clone(), 0.0, None, path(sparse));
        c.matryoshka_widths = vec![6, 15]; // final level appended
        c.normalize_activations = NormalizeActivations::ConstantNormRescale;
        c.rescale_acts_by_decoder_norm = sparse;
        check_path(
            &format!("matryoshka with appended level, constant_norm_rescale, sparse={sparse}"),
            c,
            0.0,
            None,
            path(sparse),
        );
    }
}

fn run(sae: &mut Sae, x: &Tensor, coef: f64, mask: Option<&Tensor>) -> (sae::StepOutput, Params) {
    let out = sae
        .training_forward(&StepInput {
            sae_in: x,
            coefficient: coef,
            dead_neuron_mask: mask,
            noise_seed: 0,
        })
        .unwrap();
    let mut g = sae.zero_grads();
    sae.backward(&mut g);
    (out, g)
}

/// Matryoshka's per-level aux loss equals the plain AuxK loss when every dead latent is
/// in the outermost level (same residual, same k_aux, same scale), gradients included;
/// with dead latents in the innermost level it equals a direct computation of
/// SAELens's formula against that level's residual.
#[test]
fn matryoshka_aux_loss() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut c = cfg(Architecture::MatryoshkaBatchTopK);
    c.matryoshka_widths = vec![6, 12, 24];
    c.d_in = 10;
    let base = Sae::new(c.clone(), &DEV, 1).unwrap();
    let x = randn(&mut rng, &[16, 10], 1.0);
    let outer: Vec<f32> = (0..24)
        .map(|j| (j >= 12 && j % 2 == 0) as u8 as f32)
        .collect();
    let outer = Tensor::from_vec(&DEV, &[24], outer).unwrap();
    let mut plain = base.clone();
    let (a, ga) = run(&mut plain, &x, 0.0, Some(&outer));
    let mut cfg2 = c.clone();
    cfg2.use_matryoshka_aux_loss = true;
    let mut per_level = base.clone();
    per_level.set_cfg(cfg2.clone()).unwrap();
    let (b, gb) = run(&mut per_level, &x, 0.0, Some(&outer));
    let aux = |o: &sae::StepOutput| o.get("auxiliary_reconstruction_loss").unwrap();
    assert!(aux(&a) > 0.0);
    assert!(
        (aux(&a) - aux(&b)).abs() <= 1e-6 * aux(&a),
        "{} vs {}",
        aux(&a),
        aux(&b)
    );
    for (n, t) in ga.iter() {
        let (u, w) = (t.to_vec(), gb.get(n).to_vec());
        let scale = u.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            u.iter().zip(&w).all(|(p, q)| (p - q).abs() <= 1e-5 * scale),
            "{n}"
        );
    }

    // Dead latents 0, 2, 4 of the innermost level (width 6).
    let inner: Vec<f32> = (0..24)
        .map(|j| (j < 6 && j % 2 == 0) as u8 as f32)
        .collect();
    let inner_t = Tensor::from_vec(&DEV, &[24], inner.clone()).unwrap();
    let mut s = base.clone();
    s.set_cfg(cfg2).unwrap();
    let (out, _) = run(&mut s, &x, 0.0, Some(&inner_t));
    // direct computation from public pieces
    let h = s.last_hidden_pre().to_vec();
    let f = s.last_feature_acts().to_vec();
    let w = s.params.get("W_dec").to_vec();
    let bdec = s.params.get("b_dec").to_vec();
    let norms: Vec<f32> = w
        .chunks(10)
        .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt())
        .collect();
    let xv = x.to_vec();
    let dead: Vec<usize> = (0..24).filter(|&j| inner[j] > 0.0).collect();
    let (k_aux, scale) = (dead.len().min(5), (dead.len() as f64 / 5.0).min(1.0));
    let mut total = 0f64;
    for r in 0..16 {
        let mut partial = bdec.clone();
        for j in 0..6 {
            for i in 0..10 {
                partial[i] += f[r * 24 + j] / norms[j] * w[j * 10 + i];
            }
        }
        let mut cand: Vec<usize> = dead.clone();
        cand.sort_by(|&a, &b| h[r * 24 + b].total_cmp(&h[r * 24 + a]));
        let mut recons = [0f32; 10];
        for &j in &cand[..k_aux] {
            for i in 0..10 {
                recons[i] += h[r * 24 + j] / norms[j] * w[j * 10 + i];
            }
        }
        total += (0..10)
            .map(|i| ((recons[i] - (xv[r * 10 + i] - partial[i])) as f64).powi(2))
            .sum::<f64>();
    }
    let want = scale * total / 16.0;
    let got = out.get("auxiliary_reconstruction_loss").unwrap();
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "inner-level aux: {got} vs {want}"
    );
}

/// The quadratic JumpReLU penalty differs from the step penalty only in the per-row
/// factor `4/T (l0 - T)` on the estimator: with one row, its threshold gradient is the
/// step mode's times that factor.
#[test]
fn jumprelu_quadratic_is_scaled_step() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut c = cfg(Architecture::JumpRelu);
    c.jumprelu_bandwidth = 2.0; // wide window so many latents get the estimator
    let mut step = Sae::new(c.clone(), &DEV, 2).unwrap();
    perturb(&mut step, &mut rng, 0.3);
    let x = randn(&mut rng, &[1, 12], 1.0);
    let mut quad = step.clone();
    let mut qc = c.clone();
    qc.jumprelu_sparsity_loss_mode = schemas::SparsityLossMode::Quadratic;
    qc.target_l0 = Some(3.0);
    quad.set_cfg(qc).unwrap();
    let (a, ga) = run(&mut step, &x, 1.0, None);
    let (b, gb) = run(&mut quad, &x, 1.0, None);
    let l0 = a.get("l0_loss").unwrap();
    let factor = 4.0 / 3.0 * (l0 - 3.0);
    assert!((b.get("l0_loss").unwrap() - 2.0 / 3.0 * (l0 - 3.0).powi(2)).abs() < 1e-9);
    // the threshold gradient has a decoder part (the same in both) plus the estimator
    let (mut sa, mut sb) = (step.clone(), quad.clone());
    let (_, ga0) = run(&mut sa, &x, 0.0, None);
    let (_, gb0) = run(&mut sb, &x, 0.0, None);
    let est = |g: &Params, g0: &Params| -> Vec<f32> {
        g.get("threshold")
            .to_vec()
            .iter()
            .zip(g0.get("threshold").to_vec())
            .map(|(a, b)| a - b)
            .collect()
    };
    let (ea, eb) = (est(&ga, &ga0), est(&gb, &gb0));
    assert!(
        ea.iter().any(|v| *v != 0.0),
        "no latent inside the estimator window"
    );
    for (p, q) in ea.iter().zip(&eb) {
        assert!(
            (*p as f64 * factor - *q as f64).abs() <= 1e-4 * p.abs().max(1e-3) as f64,
            "{p} * {factor} vs {q}"
        );
    }
}

/// JumpReLU's estimator is not a derivative, so its sparse path is checked against its
/// dense path (itself checked against SAELens's fixtures for `step` and `tanh`): every
/// penalty mode, the log threshold, the estimator passed to the input, a batch of many
/// rows (the quadratic penalty's factor differs per row), a bandwidth wide enough that
/// many inactive entries sit inside the rectangle. Losses at 1e-6 relative; gradients
/// at 1e-5 of their largest magnitude (f32, other summation orders).
#[test]
fn jumprelu_sparse_path_equals_dense() {
    use schemas::SparsityLossMode::{Quadratic, Step, Tanh};
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let x = randn(&mut rng, &[40, 12], 1.0);
    let mut inside = 0;
    for mode in [Step, Tanh, Quadratic] {
        for (log_t, ste_in) in [(false, false), (false, true), (true, false)] {
            let mut c = cfg(Architecture::JumpRelu);
            c.jumprelu_bandwidth = 0.5;
            c.jumprelu_sparsity_loss_mode = mode;
            c.target_l0 = (mode == Quadratic).then_some(5.0);
            c.jumprelu_log_threshold = log_t;
            c.jumprelu_ste_to_input = ste_in;
            c.jumprelu_init_threshold = 0.3;
            let name = format!("{mode:?} log_threshold={log_t} ste_to_input={ste_in}");
            let mut dense = Sae::new(c, &DEV, 3).unwrap();
            perturb(&mut dense, &mut rng, 0.3);
            let mut sparse = dense.clone();
            dense.force_path(Some(StepPath::Dense));
            sparse.force_path(Some(StepPath::Sparse));
            let (a, ga) = run(&mut dense, &x, 0.8, None);
            let (b, gb) = run(&mut sparse, &x, 0.8, None);
            assert_eq!(sparse.last_path(), StepPath::Sparse, "{name}");
            assert_eq!(dense.last_path(), StepPath::Dense, "{name}");
            let (fa, fb) = (dense.last_feature_acts(), sparse.last_feature_acts());
            assert_eq!(fa.to_vec(), fb.to_vec(), "{name}: latents");
            let acts = fa.to_vec();
            let pre = dense.last_hidden_pre().to_vec();
            inside += acts
                .iter()
                .zip(&pre)
                .filter(|(f, h)| **f == 0.0 && **h > 0.0)
                .count();
            for (k, v) in a.losses.iter() {
                let w = b.get(k).unwrap();
                assert!(
                    (v - w).abs() <= 1e-6 * v.abs().max(1e-3),
                    "{name} {k}: {v} vs {w}"
                );
            }
            for (p, t) in ga.iter() {
                let (u, w) = (t.to_vec(), gb.get(p).to_vec());
                let scale = u.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                assert!(scale > 1e-6, "{name}: grad.{p} is zero");
                for (i, (y, z)) in u.iter().zip(&w).enumerate() {
                    assert!(
                        (y - z).abs() <= 1e-5 * scale,
                        "{name} grad.{p}[{i}]: {y} vs {z}"
                    );
                }
            }
        }
    }
    assert!(
        inside > 0,
        "no inactive entry inside the estimator's rectangle"
    );
}

/// With the pre-activation loss and dead latents the step is dense whatever is forced:
/// that loss reads every sub-threshold entry of a dead latent.
#[test]
fn jumprelu_pre_act_loss_with_dead_latents_runs_dense() {
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    let mut c = cfg(Architecture::JumpRelu);
    c.pre_act_loss_coefficient = Some(0.1);
    let mut sae = Sae::new(c, &DEV, 4).unwrap();
    perturb(&mut sae, &mut rng, 0.3);
    sae.force_path(Some(StepPath::Sparse));
    let x = randn(&mut rng, &[8, 12], 1.0);
    let dead = Tensor::from_vec(
        &DEV,
        &[24],
        (0..24).map(|i| (i % 3 == 0) as u8 as f32).collect(),
    )
    .unwrap();
    run(&mut sae, &x, 0.5, Some(&dead));
    assert_eq!(sae.last_path(), StepPath::Dense);
    run(&mut sae, &x, 0.5, None);
    assert_eq!(sae.last_path(), StepPath::Sparse);
}

/// A dense step keeps its latents only as pre-activations (standard, JumpReLU) or
/// remakes them a row block at a time (gated): the counts the trainer reads from them
/// (latents fired, L0 per row) are those of the latents as a matrix, over a batch
/// whose last row block is short.
#[test]
fn dense_steps_count_the_latents_they_made() {
    let mut cases = vec![];
    for arch in [
        Architecture::Standard,
        Architecture::JumpRelu,
        Architecture::Gated,
    ] {
        cases.push((format!("{arch}"), cfg(arch)));
    }
    let mut c = cfg(Architecture::Standard);
    c.activation_fn = ActivationFn::TanhRelu;
    cases.push(("standard tanh-relu".into(), c));
    let mut c = cfg(Architecture::Gated);
    c.normalize_activations = NormalizeActivations::LayerNorm;
    cases.push(("gated layer_norm".into(), c));
    for (name, c) in cases {
        let (b, m) = (13, c.d_sae);
        let mut sae = Sae::new(c, &DEV, 0).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        perturb(&mut sae, &mut rng, 0.3);
        sae.force_path(Some(StepPath::Dense));
        let x = randn(&mut rng, &[b, 12], 1.0);
        run(&mut sae, &x, 0.5, None);
        assert_eq!(sae.last_path(), StepPath::Dense, "{name}");
        let f = sae.last_feature_acts().to_vec();
        let (mut want_cols, mut want_rows) = (vec![0f32; m], vec![0f32; b]);
        for (i, v) in f.iter().enumerate() {
            if *v != 0.0 {
                want_cols[i % m] += 1.0;
                want_rows[i / m] += 1.0;
            }
        }
        let fired = want_rows.iter().sum::<f32>();
        assert!(
            fired > 0.0 && fired < (b * m) as f32,
            "{name}: {fired} fired"
        );
        let (mut cols, mut rows) = (Tensor::zeros(&DEV, &[m]), Tensor::zeros(&DEV, &[b]));
        sae.last_acts().col_counts(&mut cols);
        sae.last_acts().row_counts(&mut rows);
        assert_eq!(cols.to_vec(), want_cols, "{name}: per latent");
        assert_eq!(rows.to_vec(), want_rows, "{name}: per row");
        assert_eq!(sae.last_acts().shape(), (b, m), "{name}");
    }
}
