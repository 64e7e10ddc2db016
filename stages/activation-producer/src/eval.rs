//! `activation-producer eval`: SAELens's evals of one SAE spliced into the model.

use crate::{check_output, load_model_and_tokens};
use anyhow::{bail, Context, Result};
use lm::evals::{run_evals, EvalConfig};
use lm::HookPoint;
use serde_json::{json, Value};
use std::path::PathBuf;

pub struct EvalArgs {
    pub model: PathBuf,
    pub sae: PathBuf,
    pub tokens: PathBuf,
    /// Overrides the SAE's `hook_name`.
    pub hook: Option<String>,
    /// Overrides the SAE's `hook_head_index`.
    pub hook_head_index: Option<usize>,
    pub batch_size_prompts: usize,
    pub n_eval_reconstruction_batches: usize,
    pub n_eval_sparsity_variance_batches: usize,
    /// `None`: the model's special tokens (as SAELens); `Some(ids)`: exactly these.
    pub ignore_tokens: Option<Vec<u32>>,
    /// Full output (with per-latent metrics) written here.
    pub output: Option<PathBuf>,
    pub overwrite: bool,
    pub device: String,
}

/// Runs the evals; returns what is printed (the metrics and a summary of the
/// per-latent ones, which go whole to `output`).
pub fn run(a: &EvalArgs) -> Result<Value> {
    if let Some(o) = &a.output {
        check_output(o, a.overwrite)?;
    }
    let (model, tokens) = load_model_and_tokens(&a.model, &a.tokens, &a.device)?;
    let sae = sae::pretrained::load(&a.sae, model.device())
        .with_context(|| format!("cannot load the SAE in {}", a.sae.display()))?
        .inference_form()?;
    let meta = &sae.cfg().metadata;
    let hook_name = match (&a.hook, meta.get("hook_name").and_then(|h| h.as_str())) {
        (Some(h), _) => h.clone(),
        (None, Some(h)) if !h.is_empty() => h.to_string(),
        _ => bail!(
            "{}: cfg.json has no metadata.hook_name; pass --hook",
            a.sae.display()
        ),
    };
    let hook = HookPoint::parse(&hook_name, model.cfg())?;
    let head = a.hook_head_index.or_else(|| {
        meta.get("hook_head_index")
            .and_then(|h| h.as_u64())
            .map(|h| h as usize)
    });
    let ignore = match &a.ignore_tokens {
        Some(ids) => ids.clone(),
        None => lm::special_token_ids(&a.model, model.cfg()),
    };
    let cfg = EvalConfig {
        batch_size_prompts: a.batch_size_prompts,
        n_eval_reconstruction_batches: a.n_eval_reconstruction_batches,
        n_eval_sparsity_variance_batches: a.n_eval_sparsity_variance_batches,
        ignore_tokens: ignore.clone(),
    };
    let out = run_evals(&model, &sae, hook, head, &tokens, &cfg)?;
    let dead = out.feature_density.iter().filter(|&&d| d == 0.0).count();
    let mean_density = out.feature_density.iter().sum::<f64>() / out.feature_density.len() as f64;
    let mut printed = json!({
        "sae": a.sae.display().to_string(),
        "hook_name": hook_name,
        "hook_head_index": head,
        "excluded_token_ids": ignore,
        "metrics": out.metrics,
        "feature_metrics_summary": {
            "d_sae": out.feature_density.len(),
            "never_fired": dead,
            "mean_feature_density": mean_density,
        },
    });
    if let Some(path) = &a.output {
        let mut full = printed.clone();
        // JSON has no NaN: a latent that never fired has a null heuristic, as SAELens's
        // json.dumps would need.
        let finite = |v: &[f64]| -> Vec<Value> {
            v.iter()
                .map(|&x| if x.is_finite() { json!(x) } else { Value::Null })
                .collect()
        };
        full["feature_metrics"] = json!({
            "feature_density": finite(&out.feature_density),
            "consistent_activation_heuristic": finite(&out.consistent_activation_heuristic),
        });
        let text = serde_json::to_string_pretty(&full)?;
        sae::io::atomic_write(path, text.as_bytes())?;
        printed["output"] = json!(path.display().to_string());
    }
    Ok(printed)
}
