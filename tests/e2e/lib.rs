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

/// 2 TopK SAEs in 2 trainer processes fed by 2 producers; 600 steps of 256 tokens with
/// 3 planned checkpoints; small Flight windows so that no stage runs far ahead (every
/// process is still running when the first checkpoint is written: of each producer's
/// 39 MB of activations, a quarter has been read by then, and a reader holds at most
/// its 256 KiB queue and as much again in flight beyond what its upstream serves; when
/// HTTP/2's own 16 MiB window was added to that, a producer well ahead of slower
/// trainers could send all it had left before a fault). `pipeline_extra` goes at the
/// end of the `pipeline:` section.
pub fn checkpointed_sweep_yaml(pipeline_extra: &str) -> String {
    format!(
        "model_name: {}\ndataset_path: {}\nhook_name: blocks.1.hook_resid_post\n\
context_size: 32\nstore_batch_size_prompts: 8\narchitecture: topk\nk: 8\nd_sae: 512\n\
normalize_activations: expected_average_only_in\nn_batches_for_norm_estimate: 2\n\
training_tokens: 153600\ntrain_batch_size_tokens: 256\nn_batches_in_buffer: 4\nlr: 0.003\n\
log_frequency: 4\nn_checkpoints: 3\nseed: 7\nn_eval_batches: 1\neval_batch_size_prompts: 4\n\
sweep:\n  k: [8, 16]\npipeline:\n  producers: 2\n  trainers: 2\n  window_bytes: 256KiB\n{pipeline_extra}",
        examples().join("model").display(),
        examples().join("corpus.jsonl").display()
    )
}

/// The points of [`checkpointed_sweep_yaml`].
pub const POINTS: [&str; 2] = ["topk-k8", "topk-k16"];
/// Its first planned checkpoint: 2 norm batches + step 151 (tokens pass 153600 / 4).
const FIRST_CKPT_TOKENS: &str = "38656";

/// True once the shuffler holds its first snapshot and every SAE its first checkpoint.
pub fn first_checkpoint_written(run_dir: &Path) -> bool {
    run_dir.join("snapshots/153/state.json").is_file()
        && POINTS.iter().all(|p| {
            run_dir
                .join("saes")
                .join(p)
                .join("checkpoints")
                .join(FIRST_CKPT_TOKENS)
                .join("trainer_state.json")
                .is_file()
        })
}

/// The trained files of a run, named, byte for byte.
pub type Files = Vec<(String, Vec<u8>)>;

/// Every trained file of [`POINTS`] in a run directory.
pub fn outputs(run: &Path) -> Files {
    let mut v = Vec::new();
    for p in POINTS {
        for f in [
            "cfg.json",
            "sae_weights.safetensors",
            "sparsity.safetensors",
            "metrics.jsonl",
        ] {
            let path = run.join("saes").join(p).join(f);
            let b = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            v.push((format!("{p}/{f}"), b));
        }
    }
    v
}
