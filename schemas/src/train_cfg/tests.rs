use super::*;

fn err(yaml: &str) -> CfgError {
    TrainConfig::from_yaml(yaml).expect_err(yaml)
}

#[test]
fn defaults_and_a_full_config() {
    let c = TrainConfig::from_yaml("architecture: topk\nk: 32\nd_in: 64\n").unwrap();
    assert_eq!(
        (c.lr, c.adam_beta1, c.train_batch_size_tokens),
        (3e-4, 0.9, 4096)
    );
    let s = c.sae_config(64).unwrap();
    assert_eq!(
        (s.d_sae, s.k, s.architecture),
        (256, 32.0, Architecture::TopK)
    );
    assert_eq!(c.lr_end(), 3e-4 / 10.0); // as SAELens computes it: 2.9999999999999997e-05
    let yaml = r#"
hook_name: blocks.0.hook_resid_pre
model_name: tiny-gpt2
architecture: jumprelu
d_sae: 512
l0_coefficient: 0.5
jumprelu_sparsity_loss_mode: tanh
pre_act_loss_coefficient: 3.0e-6
lr: 1.0e-3
lr_scheduler_name: cosineannealing
lr_warm_up_steps: 10
lr_decay_steps: 20
lr_end: 1.0e-5
training_tokens: 409600
train_batch_size_tokens: 4096
n_checkpoints: 2
wandb_log_frequency: 5
"#;
    let c = TrainConfig::from_yaml(yaml).unwrap();
    assert_eq!(c.log_frequency, 5);
    assert_eq!(c.lr_scheduler().unwrap(), LrScheduler::CosineAnnealing);
    let s = c.sae_config(128).unwrap();
    assert_eq!(s.jumprelu_sparsity_loss_mode, SparsityLossMode::Tanh);
    assert_eq!(s.metadata["hook_name"], "blocks.0.hook_resid_pre");
    // the resolved config round-trips through YAML
    assert_eq!(TrainConfig::from_yaml(&c.to_yaml()).unwrap(), c);
    // SAELens 5 spelling of TopK
    let c = TrainConfig::from_yaml(
        "architecture: topk\nactivation_fn: topk\nactivation_fn_kwargs: {k: 8}\n",
    )
    .unwrap();
    assert_eq!(c.sae_config(16).unwrap().k, 8.0);
}

#[test]
fn seed_post_init_checks_name_the_field() {
    assert!(err("lrr: 0.1\n").field.starts_with('<') && err("lrr: 0.1\n").message.contains("lrr"));
    assert!(err("lr: fast\n").message.contains("lr"));
    assert_eq!(err("d_sae: 10\nexpansion_factor: 4\n").field, "d_sae");
    assert_eq!(err("architecture: topk\n").field, "k");
    assert_eq!(
        err("architecture: topk\nactivation_fn: relu\nk: 4\n").field,
        "activation_fn"
    );
    assert_eq!(err("normalize_sae_decoder: true\ndecoder_heuristic_init: true\nscale_sparsity_penalty_by_decoder_norm: false\n").field, "normalize_sae_decoder");
    let e = err("normalize_sae_decoder: true\n");
    assert!(
        e.field == "normalize_sae_decoder"
            && e.message.contains("scale_sparsity_penalty_by_decoder_norm"),
        "{e}"
    );
    let e = err("finetuning_method: decoder\nfinetuning_tokens: 4096\n");
    assert!(
        e.field == "finetuning_method" && e.message.contains("apply_b_dec_to_input"),
        "{e}"
    );
    assert_eq!(
        err("finetuning_method: rotate\nfinetuning_tokens: 4096\n").field,
        "finetuning_method"
    );
    let e = err("b_dec_init_method: median\n");
    assert!(
        e.field == "b_dec_init_method" && e.message.contains("geometric_median, mean, zeros"),
        "{e}"
    );
    let e = err("normalize_activations: zscore\n");
    assert!(
        e.field == "normalize_activations" && e.message.contains("zscore"),
        "{e}"
    );
    let e = err("context_size: -5\n");
    assert!(
        e.field == "context_size" && e.message.contains("negative"),
        "{e}"
    );
    assert_eq!(err("architecture: sparse\n").field, "architecture");
    assert_eq!(
        err("lr_scheduler_name: linear\n").field,
        "lr_scheduler_name"
    );
    assert_eq!(err("training_tokens: 100\n").field, "training_tokens");
    assert_eq!(
        err("lr_warm_up_steps: 80\nlr_decay_steps: 40\ntraining_tokens: 409600\n").field,
        "lr_warm_up_steps"
    );
    assert_eq!(
        err("lr_scheduler_name: cosineannealing\nlr_decay_steps: 10\nlr_end: 0.0\n").field,
        "lr_end"
    );
    assert_eq!(err("adam_beta1: 1.5\n").field, "adam_beta1");
    assert_eq!(err("d_in: 16\narchitecture: topk\nk: 100\n").field, "k");
    assert_eq!(err("dtype: float8\n").field, "dtype");
    assert_eq!(err("max_grad_norm: 0\n").field, "max_grad_norm");
    // a d_in that disagrees with the activations
    let c = TrainConfig::from_yaml("d_in: 16\n").unwrap();
    assert_eq!(c.sae_config(32).unwrap_err().field, "d_in");
}

#[test]
fn saelens_default_run_name() {
    // as in the seed fixture's runner config: "128-L1-2.0-LR-0.0003-Tokens-6.400e+02"
    let c = TrainConfig {
        l1_coefficient: 2.0,
        lr: 3e-4,
        training_tokens: 640,
        ..Default::default()
    };
    assert_eq!(c.run_name_for(128), "128-L1-2.0-LR-0.0003-Tokens-6.400e+02");
    let c = TrainConfig {
        l1_coefficient: 1e-5,
        lr: 4e-5,
        training_tokens: 2_000_000,
        ..Default::default()
    };
    assert_eq!(
        c.run_name_for(24576),
        "24576-L1-1e-05-LR-4e-05-Tokens-2.000e+06"
    );
    let c = TrainConfig {
        run_name: Some("mine".into()),
        ..Default::default()
    };
    assert_eq!(c.run_name_for(8), "mine");
}
