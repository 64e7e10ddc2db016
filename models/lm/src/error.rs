use std::path::PathBuf;

/// Errors from loading or running the hooked transformer.
#[derive(Debug, thiserror::Error)]
pub enum LmError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{dir}: weight '{name}' is missing (looked for: {tried})")]
    MissingWeight {
        dir: String,
        name: String,
        tried: String,
    },
    #[error("weight '{name}' has shape {got:?}, expected {want:?} from config.json")]
    WeightShape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("unknown hook '{name}' for this {model_type} model; valid hooks are: {valid}")]
    UnknownHook {
        name: String,
        model_type: String,
        valid: String,
    },
    #[error("hook '{name}': layer {layer} is out of range (the model has {n_layers} layers, 0..{n_layers})")]
    LayerOutOfRange {
        name: String,
        layer: usize,
        n_layers: usize,
    },
    #[error("stop_at_layer {stop} is out of range (the model has {n_layers} layers; use 1..={n_layers})")]
    StopAtLayer { stop: usize, n_layers: usize },
    #[error("hook_head_index {index} is out of range for '{hook}', which has {n_heads} heads")]
    HeadOutOfRange {
        hook: String,
        index: usize,
        n_heads: usize,
    },
    #[error("hook_head_index is set, but '{hook}' has no head dimension (only attn.hook_q/k/v/z and their rotated forms do)")]
    NoHeads { hook: String },
    #[error("token id {token} at sequence {seq}, position {pos} is out of range: the vocabulary has {vocab} ids (0..{vocab})")]
    TokenOutOfRange {
        token: i64,
        seq: usize,
        pos: usize,
        vocab: usize,
    },
    #[error("context of {len} positions is longer than the model's {n_ctx} (n_positions / max_position_embeddings)")]
    ContextTooLong { len: usize, n_ctx: usize },
    #[error("hook '{hook}': the forward pass produced {count} non-finite value(s) (NaN or infinity) from finite token ids, the first at row {row}, column {col} of its [sequences x positions, width] activation")]
    NonFiniteActivation {
        hook: String,
        count: usize,
        row: usize,
        col: usize,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Sae(#[from] sae::SaeError),
}

pub type Result<T, E = LmError> = std::result::Result<T, E>;

impl LmError {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        LmError::Io {
            path: path.into(),
            err,
        }
    }
}
