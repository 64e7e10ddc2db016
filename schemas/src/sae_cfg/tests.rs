use super::*;
use std::path::PathBuf;

fn fixture(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn parse(rel: &str) -> SaeConfig {
    SaeConfig::from_json_str(&fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn reads_every_saelens6_training_config() {
    let c = parse("saes/standard/cfg.json");
    assert_eq!(
        (c.architecture, c.d_in, c.d_sae),
        (Architecture::Standard, 128, 128)
    );
    assert_eq!(
        (c.l1_coefficient, c.lp_norm, c.decoder_init_norm),
        (2.0, 1.0, Some(0.1))
    );
    assert!(c.scale_sparsity_penalty_by_decoder_norm);
    let j = parse("saes/jumprelu_tanh/cfg.json");
    assert_eq!(j.jumprelu_sparsity_loss_mode, SparsityLossMode::Tanh);
    assert_eq!(
        (
            j.l0_coefficient,
            j.pre_act_loss_coefficient,
            j.jumprelu_ste_to_input
        ),
        (0.5, Some(0.01), true)
    );
    assert!(!j.jumprelu_log_threshold);
    let t = parse("saes/topk/cfg.json");
    assert_eq!((t.k, t.rescale_acts_by_decoder_norm), (16.0, true));
    let m = parse("saes/matryoshka_batchtopk/cfg.json");
    assert_eq!(m.architecture, Architecture::MatryoshkaBatchTopK);
    assert_eq!(m.matryoshka_widths, vec![16, 48, 128]);
    assert_eq!(m.topk_threshold_lr, 0.01);
    assert_eq!(
        parse("saes/gated/cfg.json").architecture,
        Architecture::Gated
    );
    assert_eq!(
        parse("saes/batchtopk/cfg.json").architecture,
        Architecture::BatchTopK
    );
}

#[test]
fn training_json_reproduces_saelens_files() {
    // Same keys, same values, same order as SAELens's own save_model output.
    for arch in [
        "standard",
        "gated",
        "jumprelu",
        "jumprelu_tanh",
        "topk",
        "batchtopk",
        "matryoshka_batchtopk",
    ] {
        let text = fixture(&format!("saes/{arch}/cfg.json"));
        let want: Value = serde_json::from_str(&text).unwrap();
        let got = SaeConfig::from_json(&want).unwrap().to_training_json();
        assert_eq!(got, want, "{arch}");
        let got_keys: Vec<_> = got.as_object().unwrap().keys().collect();
        let want_keys: Vec<_> = want.as_object().unwrap().keys().collect();
        assert_eq!(got_keys, want_keys, "{arch}: key order");
    }
}

#[test]
fn inference_json_reproduces_saelens_files() {
    for arch in [
        "standard",
        "gated",
        "jumprelu",
        "jumprelu_tanh",
        "topk",
        "batchtopk",
        "matryoshka_batchtopk",
    ] {
        let train: Value =
            serde_json::from_str(&fixture(&format!("saes/{arch}/cfg.json"))).unwrap();
        let want: Value =
            serde_json::from_str(&fixture(&format!("saes_inference/{arch}/cfg.json"))).unwrap();
        let got = SaeConfig::from_json(&train).unwrap().to_inference_json();
        assert_eq!(got, want, "{arch}");
        // and reading the inference file gives the inference config
        let inf = SaeConfig::from_json(&want).unwrap();
        assert_eq!(
            inf.architecture,
            SaeConfig::from_json(&train)
                .unwrap()
                .inference_architecture()
        );
    }
    let t = parse("saes_inference/topk/cfg.json");
    assert_eq!((t.k, t.rescale_acts_by_decoder_norm), (16.0, true));
}

#[test]
fn reads_saelens5_configs() {
    let s = parse("seed_v5/standard_unit_decoder/cfg.json");
    assert_eq!(s.architecture, Architecture::Standard);
    assert!(s.normalize_sae_decoder && !s.scale_sparsity_penalty_by_decoder_norm);
    assert_eq!(s.decoder_init_norm, None);
    assert_eq!(s.metadata["hook_name"], "blocks.0.hook_resid_pre");
    assert_eq!(s.metadata["sae_lens_training_version"], "5.11.0");
    assert!(!s.metadata.contains_key("hook_layer"));
    let t = parse("seed_v5/topk/cfg.json");
    assert_eq!(
        (t.architecture, t.k, t.rescale_acts_by_decoder_norm),
        (Architecture::TopK, 16.0, false)
    );
    let j = parse("seed_v5/jumprelu/cfg.json");
    assert!(j.jumprelu_log_threshold);
    assert_eq!((j.l0_coefficient, j.jumprelu_bandwidth), (0.5, 0.001));
    let g = parse("seed_v5/standard_ghost_grads/cfg.json");
    assert!(g.use_ghost_grads);
    let d = parse("seed_v5/standard_dense_batch_mse/cfg.json");
    assert_eq!(
        d.mse_loss_normalization,
        Some(MseLossNormalization::DenseBatch)
    );
    let l = parse("seed_v5/standard_lp2_decnorm_heuristic/cfg.json");
    assert_eq!(l.lp_norm, 2.0);
    assert!(
        l.scale_sparsity_penalty_by_decoder_norm
            && l.decoder_heuristic_init
            && l.init_encoder_as_decoder_transpose
    );
    assert_eq!(
        parse("seed_v5/standard_layer_norm/cfg.json").normalize_activations,
        NormalizeActivations::LayerNorm
    );
    assert_eq!(
        parse("seed_v5/standard_constant_norm_rescale/cfg.json").normalize_activations,
        NormalizeActivations::ConstantNormRescale
    );
    // the whole LanguageModelSAERunnerConfig of an old runner checkpoint
    let r = parse("seed_v5/standard_unit_decoder/step5_runner_checkpoint/cfg.json");
    assert_eq!(
        (r.architecture, r.d_in, r.d_sae),
        (Architecture::Standard, 128, 128)
    );
    assert_eq!(r.l1_warm_up_steps, 3);
    assert_eq!(r.metadata["model_class_name"], "HookedTransformer");
}

#[test]
fn seed_options_survive_a_round_trip() {
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
    ] {
        let c = parse(&format!("seed_v5/{case}/cfg.json"));
        let json = c.to_training_json();
        let back = SaeConfig::from_json(&json).unwrap();
        assert_eq!(back.to_training_json(), json, "{case}");
        // the options that change the math come back as they were
        assert_eq!(
            (
                back.normalize_sae_decoder,
                back.use_ghost_grads,
                back.mse_loss_normalization,
                back.normalize_activations
            ),
            (
                c.normalize_sae_decoder,
                c.use_ghost_grads,
                c.mse_loss_normalization,
                c.normalize_activations
            ),
            "{case}"
        );
        assert_eq!(
            (
                back.lp_norm,
                back.jumprelu_log_threshold,
                back.rescale_acts_by_decoder_norm
            ),
            (
                c.lp_norm,
                c.jumprelu_log_threshold,
                c.rescale_acts_by_decoder_norm
            ),
            "{case}"
        );
        if c.architecture == Architecture::Standard {
            assert_eq!(
                back.scale_sparsity_penalty_by_decoder_norm,
                c.scale_sparsity_penalty_by_decoder_norm,
                "{case}"
            );
        }
        assert_eq!(
            json["metadata"]["sae_lens_version"],
            crate::SAELENS_FORMAT_VERSION
        );
    }
}

#[test]
fn pre6_conversions() {
    let v = serde_json::json!({
        "d_in": 8, "d_sae": 16, "hook_point": "blocks.0.attn.hook_z",
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
        "normalize_activations": true, "dtype": "torch.bfloat16"
    });
    let c = SaeConfig::from_json(&v).unwrap();
    assert_eq!((c.architecture, c.k), (Architecture::TopK, 4.0));
    assert_eq!(c.reshape_activations, ReshapeActivations::HookZ);
    assert_eq!(
        c.normalize_activations,
        NormalizeActivations::ExpectedAverageOnlyIn
    );
    assert_eq!(c.dtype, Dtype::BF16);
    assert_eq!(c.metadata["hook_name"], "blocks.0.attn.hook_z");
}

#[test]
fn errors_name_the_field() {
    let err = |v: Value| SaeConfig::from_json(&v).unwrap_err();
    let e = err(
        serde_json::json!({"d_sae": 4, "architecture": "standard", "metadata": {"sae_lens_version": "6.1.0"}}),
    );
    assert_eq!(e.field, "d_in");
    let e = err(
        serde_json::json!({"d_in": "x", "d_sae": 4, "architecture": "standard", "metadata": {"sae_lens_version": "6.1.0"}}),
    );
    assert_eq!(e.field, "d_in");
    assert!(e.to_string().contains("\"x\""), "{e}");
    let e = err(
        serde_json::json!({"d_in": 4, "d_sae": 4, "architecture": "magic", "metadata": {"sae_lens_version": "6.1.0"}}),
    );
    assert_eq!(e.field, "architecture");
    assert!(e
        .message
        .contains("standard, gated, jumprelu, topk, batchtopk, matryoshka_batchtopk"));
    let e = err(
        serde_json::json!({"d_in": 4, "d_sae": 4, "architecture": "topk", "k": 9, "metadata": {"sae_lens_version": "6.1.0"}}),
    );
    assert_eq!(e.field, "k");
    let e = err(
        serde_json::json!({"d_in": 4, "d_sae": 4, "architecture": "standard", "normalize_activations": "zscore", "metadata": {"sae_lens_version": "6.1.0"}}),
    );
    assert_eq!(e.field, "normalize_activations");
    let e = err(
        serde_json::json!({"d_in": 4, "d_sae": 8, "architecture": "matryoshka_batchtopk", "k": 2, "matryoshka_widths": [4, 2], "metadata": {"sae_lens_version": "6.1.0"}}),
    );
    assert_eq!(e.field, "matryoshka_widths");
    let e = err(
        serde_json::json!({"d_in": 4, "d_sae": 8, "architecture": "jumprelu", "jumprelu_sparsity_loss_mode": "quadratic", "metadata": {"sae_lens_version": "6.1.0"}}),
    );
    assert_eq!(e.field, "target_l0");
    assert_eq!(
        SaeConfig::from_json_str("{not json").unwrap_err().field,
        "<json>"
    );
    let e = err(
        serde_json::json!({"d_in": 4, "d_sae": 8, "architecture": "gated", "use_ghost_grads": true}),
    );
    assert_eq!(e.field, "use_ghost_grads");
}
