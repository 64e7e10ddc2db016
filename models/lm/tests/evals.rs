//! `lm::evals::run_evals` against SAELens 6.54.12's own `run_evals` on the tiny GPT-2
//! (`tests/fixtures/lm/evals`, made by `tests/lm/make_eval_fixture.py`): a standard SAE
//! on the residual stream, a TopK SAE on all heads of `hook_z`, and a standard SAE on
//! one head (`hook_head_index` 2), with BOS (4095) excluded as SAELens excludes it.
//!
//! Tolerances: every base metric within 1e-4 relative (1e-6 absolute floor); the
//! model is random, so CE losses with and without the SAE differ only in the 4th
//! decimal and the two ratio scores (`ce_loss_score`, `kl_div_score`) amplify f32
//! noise in their denominators: they are checked at 1e-2 relative, and exactly
//! against the formula on our own components.

mod common;

use common::*;
use kernels::Device;
use lm::evals::{run_evals, EvalConfig};
use lm::HookPoint;
use serde_json::Value;

fn close(got: f64, want: f64, rel: f64, what: &str) {
    let tol = (rel * want.abs()).max(1e-6);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, SAELens {want} (|diff| {:.3e} > {tol:.1e})",
        (got - want).abs()
    );
}

fn check(name: &str) {
    let fx = fixtures();
    let model = load(&fx.join("tiny-gpt2"));
    let dir = fx.join("lm/evals").join(name);
    let sae = sae::io::load(&dir, &Device::Cpu)
        .unwrap()
        .inference_form()
        .unwrap();
    let meta = &sae.cfg().metadata;
    let hook = HookPoint::parse(meta["hook_name"].as_str().unwrap(), model.cfg()).unwrap();
    let head = meta
        .get("hook_head_index")
        .and_then(|v| v.as_u64())
        .map(|h| h as usize);
    let tokens = pipeline::read_tokens(&fx.join("acts/tokens.npy")).unwrap();
    let batch = lm::TokenBatch::new(&tokens.ids, 8, 128, model.cfg()).unwrap();
    // SAELens took the special tokens from the tokenizer; config.json names the same.
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("lm/evals/info.json")).unwrap())
            .unwrap();
    let special: Vec<u32> = info["special_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(model.cfg().special_token_ids, special);
    let cfg = EvalConfig {
        batch_size_prompts: 4,
        n_eval_reconstruction_batches: 2,
        n_eval_sparsity_variance_batches: 2,
        ignore_tokens: special,
    };
    let out = run_evals(&model, &sae, hook, head, &batch, &cfg).unwrap();
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("evals.json")).unwrap()).unwrap();
    let mut n = 0;
    for (group, metrics) in want["metrics"].as_object().unwrap() {
        for (key, w) in metrics.as_object().unwrap() {
            let g = out.metrics[group][key]
                .as_f64()
                .unwrap_or_else(|| panic!("{group}.{key} missing"));
            let rel = if key.ends_with("_score") { 1e-2 } else { 1e-4 };
            let w = w.as_f64().unwrap();
            close(g, w, rel, &format!("{name}: {group}.{key}"));
            eprintln!("{name}: {group}.{key}: {g:.8} vs SAELens {w:.8}");
            n += 1;
        }
    }
    assert_eq!(n, 19, "every SAELens metric compared");
    let m = &out.metrics;
    let f = |g: &str, k: &str| m[g][k].as_f64().unwrap();
    let ce = "model_performance_preservation";
    let score = (f(ce, "ce_loss_with_ablation") - f(ce, "ce_loss_with_sae"))
        / (f(ce, "ce_loss_with_ablation") - f(ce, "ce_loss_without_sae"));
    assert_eq!(f(ce, "ce_loss_score"), score);
    for (key, got) in [
        ("feature_density", &out.feature_density),
        (
            "consistent_activation_heuristic",
            &out.consistent_activation_heuristic,
        ),
    ] {
        let w = want[key].as_array().unwrap();
        assert_eq!(got.len(), w.len(), "{key}");
        for (j, (g, w)) in got.iter().zip(w).enumerate() {
            match w.as_f64() {
                Some(w) => close(*g, w, 1e-6, &format!("{name}: {key}[{j}]")),
                // 0/0 for a latent that never fired: NaN in torch, null in JSON.
                None => assert!(g.is_nan(), "{name}: {key}[{j}] = {g}, SAELens NaN"),
            }
        }
    }
}

#[test]
fn standard_sae_on_the_residual_stream_matches_saelens_evals() {
    check("standard-resid");
}

#[test]
fn topk_sae_on_all_heads_of_hook_z_matches_saelens_evals() {
    check("topk-z");
}

#[test]
fn sae_on_one_head_matches_saelens_evals() {
    check("standard-z-head2");
}
