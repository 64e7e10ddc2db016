//! Hook activations and logits against TransformerLens 3.9 (models loaded as SAELens
//! loads them: `from_pretrained_no_processing`). Tolerance: 1e-4 absolute everywhere
//! (the bound), the largest difference printed for each model.
//!
//! * `tests/fixtures/acts/`: the shared reference set's activations of tiny-gpt2 on
//!   8 × 128 tokens (five hooks, logits of the first sequence, per-token CE).
//! * `tests/fixtures/lm/*`: random GPT-NeoX (parallel, bf16; sequential), Llama
//!   (grouped-query), Qwen2 (q/k/v bias, tied, sharded), Qwen3 (q/k norms, bf16),
//!   Gemma 2 (soft-capping, sliding window) and Gemma 3 (text in bf16, multimodal)
//!   checkpoints, and every hook of tiny-gpt2, made by `tests/lm/make_lm_fixtures.py`
//!   with TransformerLens itself.

mod common;

use common::*;
use lm::{Capture, HookPoint, NoHooks, Workspace};

const TOL: f32 = 1e-4;

#[test]
fn tiny_gpt2_matches_shared_transformer_lens_activations() {
    let fx = fixtures();
    let model = load(&fx.join("tiny-gpt2"));
    let tokens = pipeline::read_tokens(&fx.join("acts/tokens.npy")).unwrap();
    assert_eq!((tokens.n_seq, tokens.seq_len), (8, 128));
    let batch = lm::TokenBatch::new(&tokens.ids, 8, 128, model.cfg()).unwrap();
    let acts = reference(&fx.join("acts/acts.safetensors"));
    let names: Vec<&String> = acts.keys().collect();
    assert_eq!(names.len(), 5);
    let hooks = model.hooks(&names).unwrap();
    let mut cap = Capture::new(hooks.clone());
    let mut ws = Workspace::new();
    model.run(&mut ws, &batch, None, &mut cap).unwrap();
    for (name, hook) in names.iter().zip(&hooks) {
        let got = cap.get(hook).unwrap();
        let (shape, want) = &acts[*name];
        assert_eq!(got.rows(), shape[0] * shape[1], "{name}");
        let diff = max_abs_diff(&got.to_vec(), want, name);
        eprintln!("{name}: max |diff| {diff:.2e}");
        assert!(diff <= TOL, "{name}: max |diff| {diff}");
    }

    let logits_ref = reference(&fx.join("acts/logits.safetensors"));
    let (_, first) = &logits_ref["logits"];
    let logits = ws.logits.as_ref().unwrap().to_vec();
    let diff = max_abs_diff(&logits[..128 * 4096], first, "logits");
    eprintln!("logits: max |diff| {diff:.2e}");
    assert!(diff <= TOL);

    let (shape, ce_ref) = &logits_ref["per_token_ce_loss"];
    assert_eq!(shape, &[8, 127]);
    let ce = model.loss_per_token(&ws, &batch).unwrap();
    let diff = max_abs_diff(&ce, ce_ref, "per-token CE");
    let mean = ce.iter().map(|&v| v as f64).sum::<f64>() / ce.len() as f64;
    eprintln!("per-token CE: max |diff| {diff:.2e}, mean {mean:.6}");
    assert!(diff <= TOL);
    assert!((mean - 8.326632).abs() <= 1e-4, "mean CE {mean}");
}

/// Runs `dir` on the reference's tokens capturing every hook it holds; compares all.
fn check_model(dir: &std::path::Path, reference_file: &std::path::Path) -> usize {
    let model = load(dir);
    let r = reference(reference_file);
    let (shape, ids) = &r["tokens"];
    let batch = batch(&model, ids, shape);
    let names: Vec<&String> = r
        .keys()
        .filter(|k| !matches!(k.as_str(), "tokens" | "logits" | "hf_logits"))
        .collect();
    let hooks = model.hooks(&names).unwrap();
    let mut cap = Capture::new(hooks.clone());
    let mut ws = Workspace::new();
    model.run(&mut ws, &batch, None, &mut cap).unwrap();
    let mut worst = (0f32, String::new());
    for (name, hook) in names.iter().zip(&hooks) {
        let got = cap
            .get(hook)
            .unwrap_or_else(|| panic!("{name} not reached"));
        let diff = max_abs_diff(&got.to_vec(), &r[*name].1, name);
        assert!(diff <= TOL, "{}: {name}: max |diff| {diff}", dir.display());
        if diff > worst.0 {
            worst = (diff, name.to_string());
        }
    }
    let logits = ws.logits.as_ref().unwrap().to_vec();
    for key in ["logits", "hf_logits"] {
        let diff = max_abs_diff(&logits, &r[key].1, key);
        assert!(diff <= TOL, "{}: {key}: max |diff| {diff}", dir.display());
    }
    eprintln!(
        "{}: {} hooks + logits within {TOL}; worst hook {} ({:.2e})",
        dir.display(),
        names.len(),
        worst.1,
        worst.0
    );
    names.len()
}

#[test]
fn every_gpt2_hook_matches_transformer_lens() {
    let fx = fixtures();
    let n = check_model(
        &fx.join("tiny-gpt2"),
        &fx.join("lm/gpt2-all-hooks/reference.safetensors"),
    );
    // 3 global hooks + 15 per block (no rotary, no gating) × 2 blocks
    assert_eq!(n, 33);
}

#[test]
fn gpt_neox_parallel_bf16_matches_transformer_lens() {
    let d = fixtures().join("lm/neox-parallel-bf16");
    let n = check_model(&d, &d.join("reference.safetensors"));
    assert_eq!(
        n,
        2 + 16 * 2,
        "no hook_resid_mid or hook_pos_embed in a parallel rotary block"
    );
}

#[test]
fn gpt_neox_sequential_matches_transformer_lens() {
    let d = fixtures().join("lm/neox-sequential");
    check_model(&d, &d.join("reference.safetensors"));
}

#[test]
fn llama_grouped_query_matches_transformer_lens() {
    let d = fixtures().join("lm/swiglu-gqa");
    let n = check_model(&d, &d.join("reference.safetensors"));
    assert_eq!(n, 2 + 18 * 2);
}

#[test]
fn qwen2_tied_sharded_matches_transformer_lens() {
    let d = fixtures().join("lm/qwen2-tied-sharded");
    check_model(&d, &d.join("reference.safetensors"));
}

/// [`check_model`], and the model's hook names are exactly the ones TransformerLens made.
fn check_all_hooks(name: &str) -> usize {
    let d = fixtures().join("lm").join(name);
    let n = check_model(&d, &d.join("reference.safetensors"));
    let r = reference(&d.join("reference.safetensors"));
    let mut theirs: Vec<&String> = r
        .keys()
        .filter(|k| !matches!(k.as_str(), "tokens" | "logits" | "hf_logits"))
        .collect();
    theirs.sort();
    let mut ours = lm::hooks::valid_names(load(&d).cfg());
    ours.sort();
    assert_eq!(
        ours.iter().collect::<Vec<_>>(),
        theirs,
        "{name}: hook names"
    );
    n
}

#[test]
fn gemma2_soft_capping_and_sliding_window_match_transformer_lens() {
    // Attention and final soft-capping (caps 2 and 1.5, which change the logits by up to
    // 8.7 here), a 4-token window on layers 0 and 2 of a 12-token context, GQA, head_dim
    // 32 with d_model 64, query_pre_attn_scalar 24, pre- and post-norms.
    assert_eq!(check_all_hooks("gemma2-softcap-window"), 2 + 20 * 3);
}

#[test]
fn gemma3_text_bf16_matches_transformer_lens() {
    // Gemma 3: q/k norms, local (10k) and global (1M, linear ×8) RoPE bases, 5-token
    // window, weights stored in bfloat16.
    assert_eq!(check_all_hooks("gemma3-text-bf16"), 2 + 22 * 3);
}

#[test]
fn gemma3_multimodal_checkpoint_runs_its_text_model() {
    // Gemma3ForConditionalGeneration: the text model under `language_model.model.`,
    // its config under `text_config`; the vision tower is left unread.
    assert_eq!(check_all_hooks("gemma3-multimodal"), 2 + 22 * 3);
}

#[test]
fn qwen3_qk_norm_bf16_matches_transformer_lens() {
    assert_eq!(check_all_hooks("qwen3-qknorm-bf16"), 2 + 20 * 2);
}

#[test]
fn stop_at_layer_runs_only_the_needed_blocks() {
    let d = fixtures().join("lm/swiglu-gqa");
    let model = load(&d);
    let r = reference(&d.join("reference.safetensors"));
    let (shape, ids) = &r["tokens"];
    let batch = batch(&model, ids, shape);
    let names = [
        "blocks.0.hook_resid_post",
        "blocks.0.attn.hook_z",
        "blocks.1.hook_resid_pre",
    ];
    let hooks = model.hooks(&names).unwrap();
    assert_eq!(lm::hooks::stop_at_layer_for(&hooks, 2), Some(2));
    let early = &hooks[..2];
    assert_eq!(lm::hooks::stop_at_layer_for(early, 2), Some(1));
    let mut cap = Capture::new(hooks.clone());
    let mut ws = Workspace::new();
    model.run(&mut ws, &batch, Some(1), &mut cap).unwrap();
    // Block 1 never ran: its hook was not reached, and no logits were made.
    assert!(cap.get(&hooks[2]).is_none());
    assert!(ws.logits.is_none());
    for (name, hook) in names[..2].iter().zip(early) {
        let diff = max_abs_diff(&cap.get(hook).unwrap().to_vec(), &r[*name].1, name);
        assert!(diff <= TOL, "{name}: {diff}");
    }
    // What the pass leaves is the residual stream entering block 1.
    let diff = max_abs_diff(
        &ws.resid().unwrap().to_vec(),
        &r["blocks.1.hook_resid_pre"].1,
        "resid",
    );
    assert!(diff <= TOL);
    assert!(model.check_stop_at_layer(3).is_err());
    let err = model
        .run(&mut ws, &batch, Some(3), &mut NoHooks)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("stop_at_layer 3") && err.contains("2 layers"),
        "{err}"
    );
}

#[test]
fn fused_and_materialised_attention_agree() {
    let d = fixtures().join("lm/neox-sequential");
    let model = load(&d);
    let r = reference(&d.join("reference.safetensors"));
    let (shape, ids) = &r["tokens"];
    let batch = batch(&model, ids, shape);
    let z = HookPoint::parse("blocks.1.attn.hook_z", model.cfg()).unwrap();
    let pat = HookPoint::parse("blocks.1.attn.hook_pattern", model.cfg()).unwrap();
    let mut ws = Workspace::new();
    let mut fused = Capture::new(vec![z]);
    model.run(&mut ws, &batch, None, &mut fused).unwrap();
    let mut split = Capture::new(vec![z, pat]);
    model.run(&mut ws, &batch, None, &mut split).unwrap();
    let diff = max_abs_diff(
        &fused.get(&z).unwrap().to_vec(),
        &split.get(&z).unwrap().to_vec(),
        "z",
    );
    assert!(diff <= 1e-6, "fused vs materialised attention: {diff}");
}

#[test]
fn workspace_is_reused_across_passes() {
    let fx = fixtures();
    let model = load(&fx.join("tiny-gpt2"));
    let tokens = pipeline::read_tokens(&fx.join("acts/tokens.npy")).unwrap();
    let batch = lm::TokenBatch::new(&tokens.ids, 8, 128, model.cfg()).unwrap();
    let mut ws = Workspace::new();
    model.run(&mut ws, &batch, None, &mut NoHooks).unwrap();
    let first = ws.logits.as_ref().unwrap().to_vec();
    // The memory of a pass: per token, 8 d_model-wide buffers (residual, norm output,
    // positions, q, k, v, z, attention out, MLP out: q..z are n_heads*d_head = d_model
    // wide here, and the position buffer doubles as scratch), the MLP hidden layer,
    // the logits, and one position id.
    let c = model.cfg();
    let per_token = 4 * (9 * c.d_model + c.d_mlp + c.d_vocab + 1);
    assert_eq!(ws.bytes(), 8 * 128 * per_token);
    // A second, smaller pass reuses the same buffers and gives the same numbers.
    let half = batch.slice(0, 4);
    model.run(&mut ws, &half, None, &mut NoHooks).unwrap();
    assert_eq!(ws.bytes(), 4 * 128 * per_token);
    assert_eq!(
        ws.logits.as_ref().unwrap().to_vec(),
        first[..first.len() / 2]
    );
}

#[test]
fn f16_weights_load_as_the_same_values_in_f32() {
    // The tiny GPT-2 rounded to f16, stored once as F16 and once as F32: the two
    // checkpoints must give bit-identical logits.
    let src = fixtures().join("tiny-gpt2");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (f16_dir, f32_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // (name, shape, f16 bytes, f32 bytes of the same values)
    type Both = (String, Vec<usize>, Vec<u8>, Vec<u8>);
    let mut store: Vec<Both> = Vec::new();
    for (name, v) in st.tensors() {
        let (mut h, mut f) = (Vec::new(), Vec::new());
        for b in v.data().chunks_exact(4) {
            let x = half::f16::from_f32(f32::from_le_bytes(b.try_into().unwrap()));
            h.extend(x.to_le_bytes());
            f.extend(x.to_f32().to_le_bytes());
        }
        store.push((name, v.shape().to_vec(), h, f));
    }
    for (dir, half_precision) in [(&f16_dir, true), (&f32_dir, false)] {
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
        let views: Vec<_> = store
            .iter()
            .map(|(n, s, h, f)| {
                let (dt, data) = if half_precision {
                    (safetensors::Dtype::F16, h)
                } else {
                    (safetensors::Dtype::F32, f)
                };
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dt, s.clone(), data).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    }
    let tokens = pipeline::read_tokens(&fixtures().join("acts/tokens.npy")).unwrap();
    let run = |dir: &std::path::Path| {
        let model = load(dir);
        let batch = lm::TokenBatch::new(&tokens.ids[..256], 2, 128, model.cfg()).unwrap();
        let mut ws = Workspace::new();
        model.run(&mut ws, &batch, None, &mut NoHooks).unwrap();
        ws.logits.unwrap().to_vec()
    };
    let (a, b) = (run(f16_dir.path()), run(f32_dir.path()));
    assert_eq!(a, b);
    // And rounding the weights to f16 moves the logits only a little.
    let full = run(&src);
    let diff = max_abs_diff(&a, &full[..a.len()], "f16 vs f32 logits");
    assert!(diff > 0.0 && diff < 1e-2, "{diff}");
}
