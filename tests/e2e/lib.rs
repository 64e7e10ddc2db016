//! End-to-end tests live in `e2e/*.rs` (see Cargo.toml); this library holds what they
//! share besides the process helpers (`pipeline/tests/support`).

use std::path::{Path, PathBuf};

/// The repository's test fixtures.
pub fn fx() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A path as an argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The example kit (`examples/`: model, corpus, sweep).
pub fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The trained weights of sweep point `point` in a run directory.
pub fn sae_weights(run_dir: &Path, point: &str) -> Vec<u8> {
    let f = run_dir
        .join("saes")
        .join(point)
        .join("sae_weights.safetensors");
    std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()))
}

/// The example sweep, shortened for the multi-host tests: 2 TopK SAEs (k 8 and 16) of 24
/// steps on one hook, no evals; `pipeline` is the body of its `pipeline:` section.
pub fn short_sweep_yaml(pipeline: &str) -> String {
    format!(
        "model_name: {}\ndataset_path: {}\nhook_name: blocks.1.hook_resid_post\ncontext_size: 32\n\
store_batch_size_prompts: 8\narchitecture: topk\nk: 8\nd_sae: 256\n\
normalize_activations: expected_average_only_in\nn_batches_for_norm_estimate: 2\n\
training_tokens: 6144\ntrain_batch_size_tokens: 256\nn_batches_in_buffer: 4\nlr: 0.003\n\
log_frequency: 4\nfeature_sampling_window: 10\ndead_feature_window: 10\nseed: 7\n\
n_eval_batches: 0\nsweep:\n  k: [8, 16]\npipeline:\n{pipeline}",
        examples().join("model").display(),
        examples().join("corpus.jsonl").display()
    )
}
