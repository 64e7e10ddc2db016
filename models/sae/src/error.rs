use std::path::PathBuf;

/// Errors from building, loading, saving or running an SAE.
#[derive(Debug, thiserror::Error)]
pub enum SaeError {
    // The cause is part of the message (and deliberately not a `source`, so that
    // error chains do not print it twice).
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: {err}", path.display())]
    Config {
        path: PathBuf,
        err: schemas::CfgError,
    },
    #[error("invalid SAE config: {0}")]
    BadConfig(#[from] schemas::CfgError),
    #[error("{}: not a readable safetensors file: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },
    #[error("{}: tensor '{name}' is missing (the file has: {present})", path.display())]
    MissingTensor {
        path: PathBuf,
        name: String,
        present: String,
    },
    #[error("{}: unexpected tensor '{name}' for a {arch} SAE (expected: {expected})", path.display())]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        arch: String,
        expected: String,
    },
    #[error(
        "tensor '{name}' has shape {got:?}, expected {want:?} (d_in = {d_in}, d_sae = {d_sae})"
    )]
    Shape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
        d_in: usize,
        d_sae: usize,
    },
    #[error(
        "tensor '{name}' has dtype {dtype}, which is not supported (use F32, F16, BF16 or F64)"
    )]
    Dtype { name: String, dtype: String },
    #[error("{what}: {count} non-finite value(s) (NaN or infinity), the first at row {row}, column {col}")]
    NonFinite {
        what: String,
        count: usize,
        row: usize,
        col: usize,
    },
    #[error(
        "{}: tensor '{name}' holds {count} non-finite value(s) (NaN or infinity), the first ({value}) at index {index:?}; these weights are corrupt or from a diverged run",
        path.display()
    )]
    NonFiniteWeights {
        path: PathBuf,
        name: String,
        count: usize,
        index: Vec<usize>,
        value: f32,
    },
    #[error("{} already exists; pass --overwrite to replace it", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
}

pub type Result<T, E = SaeError> = std::result::Result<T, E>;

impl SaeError {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> SaeError {
        SaeError::Io {
            path: path.into(),
            err,
        }
    }
}
