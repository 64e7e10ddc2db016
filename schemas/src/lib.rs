//! The data contracts of the project: file names, tensor names and config types.
//!
//! This crate is the only place where a SAELens field name, file name or tensor name
//! is spelled. Everything else refers to the constants and types defined here.

#[cfg(any(test, feature = "fake-hub"))]
pub mod fake_hub;
pub mod hub;
pub mod sae_cfg;
pub mod seqpos;
pub mod streams;
pub mod sweep;
pub mod tokens;
pub mod train_cfg;
pub mod yaml;

pub use sae_cfg::{
    ActivationFn, Architecture, BDecInitMethod, CfgError, Dtype, MseLossNormalization,
    NormalizeActivations, ReshapeActivations, SaeConfig, SparsityLossMode,
};
pub use tokens::{TokenSpec, TokenizationMetadata};
pub use train_cfg::{FinetuningMethod, LrScheduler, TrainConfig};

/// File names inside an SAE directory, as SAELens writes them.
pub mod files {
    /// The SAE config (JSON).
    pub const SAE_CFG: &str = "cfg.json";
    /// The SAE parameters (safetensors).
    pub const SAE_WEIGHTS: &str = "sae_weights.safetensors";
    /// log10 feature densities (safetensors, one tensor [`SPARSITY_TENSOR`]).
    pub const SPARSITY: &str = "sparsity.safetensors";
    /// The tensor name inside [`SPARSITY`].
    pub const SPARSITY_TENSOR: &str = "sparsity";
    /// A trainer checkpoint's counters and scalars (`counters.batches_consumed` is the
    /// stream position it resumes at).
    pub const TRAINER_STATE_JSON: &str = "trainer_state.json";
    /// A trainer checkpoint's tensors (SAE, Adam moments, dead-latent counters).
    pub const TRAINER_STATE_TENSORS: &str = "trainer_state.safetensors";
}

/// Column and tensor names of token files (pretokenized datasets, SAELens's `input_ids`).
pub mod columns {
    /// Token ids, one sequence per row.
    pub const INPUT_IDS: &str = "input_ids";
}

/// SAE parameter and buffer names (SAELens state-dict keys).
pub mod tensors {
    pub const W_ENC: &str = "W_enc";
    pub const W_DEC: &str = "W_dec";
    pub const B_ENC: &str = "b_enc";
    pub const B_DEC: &str = "b_dec";
    pub const THRESHOLD: &str = "threshold";
    /// SAELens 5's trained JumpReLU parameter (`threshold = exp(log_threshold)`).
    pub const LOG_THRESHOLD: &str = "log_threshold";
    pub const B_GATE: &str = "b_gate";
    pub const B_MAG: &str = "b_mag";
    pub const R_MAG: &str = "r_mag";
    /// BatchTopK's running threshold (an f64 scalar buffer).
    pub const TOPK_THRESHOLD: &str = "topk_threshold";
    /// SAELens 5's decoder scaling for finetuning (`scaling_factor` in older files).
    pub const FINETUNING_SCALING_FACTOR: &str = "finetuning_scaling_factor";
    pub const SCALING_FACTOR: &str = "scaling_factor";
    /// Tensor names of `sae-trainer encode` output.
    pub const FEATURE_ACTS: &str = "feature_acts";
    pub const SAE_OUT: &str = "sae_out";
}

/// File names inside a run directory of `pipeline run` (and `pipeline report`).
pub mod run_files {
    /// The resolved run file (what `--resume` reads).
    pub const RESOLVED: &str = "sweep.yaml";
    /// Points, stages and what was decided before the run started.
    pub const PLAN: &str = "plan.json";
    /// Per point results and per stage figures, written when the run ends.
    pub const SUMMARY: &str = "summary.json";
    /// The live display's last sample: per stage tokens, rate and queue fill, the
    /// bottleneck and how often each stage was named it (rewritten while the run goes).
    pub const PROGRESS: &str = "progress.json";
    /// The run report (`pipeline report`).
    pub const REPORT: &str = "report.html";
    /// Per point directories, under which each SAE is written.
    pub const SAES: &str = "saes";
    /// Per point training configs as the trainers read them.
    pub const CONFIGS: &str = "configs";
    /// In an SAE's directory: one JSON object per logged step (SAELens metric names).
    pub const METRICS: &str = "metrics.jsonl";
    /// In an SAE's directory: SAELens's evals (`activation-producer eval --output`).
    pub const EVALS: &str = "evals.json";
    /// In an SAE's directory: its feature browser and the data behind it.
    pub const FEATURES_HTML: &str = "features.html";
    pub const FEATURES_JSON: &str = "features.json";
}

/// The SAELens release whose on-disk format this project reads and writes.
pub const SAELENS_FORMAT_VERSION: &str = "6.54.12";
