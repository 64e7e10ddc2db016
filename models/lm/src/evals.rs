//! SAELens's `run_evals` for one SAE: downstream loss with the SAE spliced in,
//! reconstruction quality, shrinkage, sparsity and feature density, with special
//! tokens excluded the way SAELens excludes them.
//!
//! Same formulas and the same masking as `sae_lens.evals` (6.x), all computed in
//! f64 on the host from the kernels' f32 outputs. Not supported: SAELens's
//! training-time activation scaler (a saved SAE has its scaling folded in).

use crate::hooks::{Capture, HookPoint, NoHooks};
use crate::model::{HookedTransformer, TokenBatch, Workspace};
use crate::splice::{Intervention, Interventions};
use crate::{LmError, Result};
use kernels::{ops, Tensor};
use sae::Sae;
use serde_json::{json, Value};

/// SAELens's `EvalConfig` with every metric on (`get_eval_everything_config`).
#[derive(Clone, Debug)]
pub struct EvalConfig {
    pub batch_size_prompts: usize,
    pub n_eval_reconstruction_batches: usize,
    pub n_eval_sparsity_variance_batches: usize,
    /// Token ids whose positions are left out of every metric (and not spliced).
    pub ignore_tokens: Vec<u32>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            batch_size_prompts: 8,
            n_eval_reconstruction_batches: 10,
            n_eval_sparsity_variance_batches: 1,
            ignore_tokens: Vec::new(),
        }
    }
}

/// What `run_evals` returns: SAELens's two dicts.
#[derive(Clone, Debug)]
pub struct EvalOutput {
    /// Grouped like SAELens: `model_behavior_preservation`, `model_performance_preservation`,
    /// `reconstruction_quality`, `shrinkage`, `sparsity`, `token_stats`.
    pub metrics: Value,
    /// Per latent: fraction of (unmasked) tokens it fires on.
    pub feature_density: Vec<f64>,
    /// Per latent: firings per prompt it fires in at all.
    pub consistent_activation_heuristic: Vec<f64>,
}

/// Rows whose token is not ignored.
fn keep_mask(batch: &TokenBatch, ignore: &[u32]) -> Vec<bool> {
    batch.ids.iter().map(|t| !ignore.contains(t)).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Runs every eval. `tokens` must hold at least
/// `batch_size_prompts * max(n_eval_reconstruction_batches, n_eval_sparsity_variance_batches)`
/// sequences; both loops start from the first sequence, as SAELens resets its store
/// between them.
pub fn run_evals(
    model: &HookedTransformer,
    sae: &Sae,
    hook: HookPoint,
    head: Option<usize>,
    tokens: &TokenBatch,
    cfg: &EvalConfig,
) -> Result<EvalOutput> {
    let bs = cfg.batch_size_prompts;
    let n_rec = cfg.n_eval_reconstruction_batches;
    let n_sv = cfg.n_eval_sparsity_variance_batches;
    if bs == 0 || n_rec == 0 || n_sv == 0 {
        return Err(LmError::Invalid(
            "batch_size_prompts, n_eval_reconstruction_batches and n_eval_sparsity_variance_batches must be at least 1".into(),
        ));
    }
    let need = bs * n_rec.max(n_sv);
    if tokens.n_seq < need {
        return Err(LmError::Invalid(format!(
            "the evals need {need} sequences (batch_size_prompts {bs} × max(n_eval_reconstruction_batches {n_rec}, n_eval_sparsity_variance_batches {n_sv})), but the tokens hold {}",
            tokens.n_seq
        )));
    }
    // Checks the hook, head and d_in once, with clear errors.
    Interventions::new().add(
        model.cfg(),
        hook,
        head,
        Intervention::Sae {
            sae,
            use_error_term: false,
        },
    )?;

    let mut ws = Workspace::new();
    let rec = reconstruction(model, sae, hook, head, tokens, cfg, &mut ws)?;
    let sv = sparsity_variance(model, sae, hook, head, tokens, cfg, &mut ws)?;
    let ctx = tokens.seq_len;
    let metrics = json!({
        "model_behavior_preservation": {
            "kl_div_score": rec.kl_div_score,
            "kl_div_with_ablation": rec.kl_div_with_ablation,
            "kl_div_with_sae": rec.kl_div_with_sae,
        },
        "model_performance_preservation": {
            "ce_loss_score": rec.ce_loss_score,
            "ce_loss_with_ablation": rec.ce_loss_with_ablation,
            "ce_loss_with_sae": rec.ce_loss_with_sae,
            "ce_loss_without_sae": rec.ce_loss_without_sae,
        },
        "reconstruction_quality": {
            "explained_variance": sv.explained_variance,
            "explained_variance_legacy": sv.explained_variance_legacy,
            "mse": sv.mse,
            "cossim": sv.cossim,
        },
        "shrinkage": {
            "l2_norm_in": sv.l2_norm_in,
            "l2_norm_out": sv.l2_norm_out,
            "l2_ratio": sv.l2_ratio,
            "relative_reconstruction_bias": sv.relative_reconstruction_bias,
        },
        "sparsity": { "l0": sv.l0, "l1": sv.l1 },
        "token_stats": {
            "total_tokens_eval_reconstruction": ctx * n_rec * bs,
            "total_tokens_eval_sparsity_variance": ctx * n_sv * bs,
        },
    });
    Ok(EvalOutput {
        metrics,
        feature_density: sv.feature_density,
        consistent_activation_heuristic: sv.consistent_activation_heuristic,
    })
}

struct Reconstruction {
    kl_div_score: f64,
    kl_div_with_ablation: f64,
    kl_div_with_sae: f64,
    ce_loss_score: f64,
    ce_loss_with_ablation: f64,
    ce_loss_with_sae: f64,
    ce_loss_without_sae: f64,
}

/// SAELens's `get_downstream_reconstruction_metrics`.
fn reconstruction(
    model: &HookedTransformer,
    sae: &Sae,
    hook: HookPoint,
    head: Option<usize>,
    tokens: &TokenBatch,
    cfg: &EvalConfig,
    ws: &mut Workspace,
) -> Result<Reconstruction> {
    let (mut kl_sae, mut kl_abl) = (Vec::new(), Vec::new());
    let (mut ce_clean, mut ce_sae, mut ce_abl) = (Vec::new(), Vec::new(), Vec::new());
    let dev = model.device().clone();
    for i in 0..cfg.n_eval_reconstruction_batches {
        let batch = tokens.slice(i * cfg.batch_size_prompts, cfg.batch_size_prompts);
        let keep = keep_mask(&batch, &cfg.ignore_tokens);
        let t = batch.seq_len;

        model.run(ws, &batch, None, &mut NoHooks)?;
        let clean_logits = ws.logits.take().unwrap();
        let clean_ce = model.loss_per_token_of(&clean_logits, &batch);

        let mut splice = Interventions::new();
        let what = Intervention::Sae {
            sae,
            use_error_term: false,
        };
        splice.add(model.cfg(), hook, head, what)?;
        // The SAE replaces only the positions that are kept; zero ablation replaces all.
        splice.sae_rows = Some(keep.clone());
        model.run(ws, &batch, None, &mut splice)?;
        let sae_logits = ws.logits.take().unwrap();
        let sae_ce = model.loss_per_token_of(&sae_logits, &batch);

        let mut ablate = Interventions::new();
        ablate.add(model.cfg(), hook, head, Intervention::ZeroAblate)?;
        model.run(ws, &batch, None, &mut ablate)?;
        let abl_logits = ws.logits.take().unwrap();
        let abl_ce = model.loss_per_token_of(&abl_logits, &batch);

        let mut kl = Tensor::zeros(&dev, &[batch.rows()]);
        for (logits, out) in [(&sae_logits, &mut kl_sae), (&abl_logits, &mut kl_abl)] {
            ops::kl_div(&clean_logits, logits, &mut kl);
            out.extend(
                kl.to_vec()
                    .iter()
                    .zip(&keep)
                    .filter(|(_, &k)| k)
                    .map(|(&v, _)| v as f64),
            );
        }
        // The CE of position p (predicting p+1) is kept when token p is kept.
        let ce_keep: Vec<bool> = (0..batch.rows())
            .filter(|r| r % t + 1 < t)
            .map(|r| keep[r])
            .collect();
        for (ce, out) in [
            (&clean_ce, &mut ce_clean),
            (&sae_ce, &mut ce_sae),
            (&abl_ce, &mut ce_abl),
        ] {
            out.extend(
                ce.iter()
                    .zip(&ce_keep)
                    .filter(|(_, &k)| k)
                    .map(|(&v, _)| v as f64),
            );
        }
        // Keep the clean logits buffer for the next pass.
        ws.logits = Some(clean_logits);
    }
    let (kl_sae, kl_abl) = (mean(&kl_sae), mean(&kl_abl));
    let (ce_clean, ce_sae, ce_abl) = (mean(&ce_clean), mean(&ce_sae), mean(&ce_abl));
    Ok(Reconstruction {
        kl_div_score: (kl_abl - kl_sae) / kl_abl,
        kl_div_with_ablation: kl_abl,
        kl_div_with_sae: kl_sae,
        ce_loss_score: (ce_abl - ce_sae) / (ce_abl - ce_clean),
        ce_loss_with_ablation: ce_abl,
        ce_loss_with_sae: ce_sae,
        ce_loss_without_sae: ce_clean,
    })
}

struct SparsityVariance {
    l2_norm_in: f64,
    l2_norm_out: f64,
    l2_ratio: f64,
    relative_reconstruction_bias: f64,
    l0: f64,
    l1: f64,
    explained_variance: f64,
    explained_variance_legacy: f64,
    mse: f64,
    cossim: f64,
    feature_density: Vec<f64>,
    consistent_activation_heuristic: Vec<f64>,
}

/// Element range of row `r` of a `[_, w]` matrix.
fn row(w: usize, r: usize) -> std::ops::Range<usize> {
    r * w..(r + 1) * w
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// SAELens's `get_sparsity_and_variance_metrics`.
fn sparsity_variance(
    model: &HookedTransformer,
    sae: &Sae,
    hook: HookPoint,
    head: Option<usize>,
    tokens: &TokenBatch,
    cfg: &EvalConfig,
    ws: &mut Workspace,
) -> Result<SparsityVariance> {
    let d_sae = sae.cfg().d_sae;
    let d = sae.cfg().d_in;
    let (mut l2_in, mut l2_out, mut l2_ratio, mut rrb) = (vec![], vec![], vec![], vec![]);
    let (mut l0, mut l1, mut ev_legacy, mut mse, mut cossim) =
        (vec![], vec![], vec![], vec![], vec![]);
    // Streaming explained variance: 1 - E||x - x̂||² / (E||x||² - ||E x||²).
    let mut sum_x = vec![0f64; d];
    let (mut sum_sq, mut sum_resid_sq, mut n_samples) = (0f64, 0f64, 0usize);
    let mut feature_acts = vec![0f64; d_sae];
    let mut feature_prompts = vec![0f64; d_sae];
    let mut total_tokens = 0usize;
    let stop = crate::hooks::stop_at_layer_for(&[hook], model.cfg().n_layers);

    for i in 0..cfg.n_eval_sparsity_variance_batches {
        let batch = tokens.slice(i * cfg.batch_size_prompts, cfg.batch_size_prompts);
        let keep = keep_mask(&batch, &cfg.ignore_tokens);
        let mut cap = Capture::new(vec![hook]);
        model.run(ws, &batch, stop, &mut cap)?;
        let act = cap
            .take()
            .pop()
            .flatten()
            .ok_or_else(|| LmError::Invalid(format!("the pass did not reach '{hook}'")))?;
        let dh = model.cfg().d_head;
        let x = crate::splice::head_columns(&act, head.map(|h| (h * dh, dh)));
        let (f, out) = sae.forward(&x)?;
        let (x, f, out) = (x.to_vec(), f.to_vec(), out.to_vec());
        let rows: Vec<usize> = (0..batch.rows()).filter(|&r| keep[r]).collect();
        let mut batch_mean = vec![0f64; d];
        for &r in &rows {
            batch_mean
                .iter_mut()
                .zip(&x[row(d, r)])
                .for_each(|(m, &v)| *m += v as f64);
        }
        batch_mean.iter_mut().for_each(|m| *m /= rows.len() as f64);
        let (mut xhat_sq, mut x_dot_xhat) = (vec![], vec![]);
        for &r in &rows {
            let (xr, or, fr) = (&x[row(d, r)], &out[row(d, r)], &f[row(d_sae, r)]);
            let (nin, nout) = (dot(xr, xr).sqrt(), dot(or, or).sqrt());
            l2_in.push(nin);
            l2_out.push(nout);
            l2_ratio.push(nout / if nin.abs() < 1e-4 { 1.0 } else { nin });
            xhat_sq.push(nout * nout);
            x_dot_xhat.push(dot(xr, or));
            l0.push(fr.iter().filter(|&&v| v != 0.0).count() as f64);
            l1.push(fr.iter().map(|&v| v.abs() as f64).sum());
            let resid: f64 = xr
                .iter()
                .zip(or)
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                .sum();
            let var: f64 = xr
                .iter()
                .zip(&batch_mean)
                .map(|(&a, &m)| (a as f64 - m).powi(2))
                .sum();
            ev_legacy.push(1.0 - resid / var);
            mse.push(resid);
            cossim.push(dot(xr, or) / (nin * nout));
            sum_x.iter_mut().zip(xr).for_each(|(s, &v)| *s += v as f64);
            sum_sq += dot(xr, xr);
            sum_resid_sq += resid;
        }
        n_samples += rows.len();
        rrb.push(mean(&xhat_sq) / mean(&x_dot_xhat));

        // Density counts only kept positions; a prompt counts once per latent.
        let t = batch.seq_len;
        for s in 0..batch.n_seq {
            let mut fired = vec![0f64; d_sae];
            for p in 0..t {
                let r = s * t + p;
                if !keep[r] {
                    continue;
                }
                for (c, &v) in fired.iter_mut().zip(&f[row(d_sae, r)]) {
                    if v != 0.0 {
                        *c += 1.0;
                    }
                }
            }
            for j in 0..d_sae {
                feature_acts[j] += fired[j];
                if fired[j] > 0.0 {
                    feature_prompts[j] += 1.0;
                }
            }
        }
        total_tokens += rows.len();
    }

    let explained_variance = if n_samples == 0 {
        0.0
    } else {
        let n = n_samples as f64;
        let total_var = sum_sq / n - sum_x.iter().map(|s| (s / n).powi(2)).sum::<f64>();
        let m = sum_resid_sq / n;
        if total_var < 1e-10 {
            if m < 1e-10 {
                1.0
            } else {
                0.0
            }
        } else {
            1.0 - m / total_var
        }
    };
    Ok(SparsityVariance {
        l2_norm_in: mean(&l2_in),
        l2_norm_out: mean(&l2_out),
        l2_ratio: mean(&l2_ratio),
        relative_reconstruction_bias: mean(&rrb),
        l0: mean(&l0),
        l1: mean(&l1),
        explained_variance,
        explained_variance_legacy: mean(&ev_legacy),
        mse: mean(&mse),
        cossim: mean(&cossim),
        feature_density: feature_acts
            .iter()
            .map(|a| a / total_tokens as f64)
            .collect(),
        consistent_activation_heuristic: feature_acts
            .iter()
            .zip(&feature_prompts)
            .map(|(a, p)| a / p)
            .collect(),
    })
}
