//! Sparse autoencoders, numerically equal to SAELens's.
//!
//! * [`Sae`]: an SAE of any architecture (`standard`, `gated`, `jumprelu`, `topk`,
//!   `batchtopk`, `matryoshka_batchtopk`), its inference `encode`/`decode`, and the
//!   training forward pass with every SAELens loss term and an analytic backward pass.
//! * [`io`]: SAELens SAE directories, read and written (training and inference forms).
//! * [`pretrained`]: SAELens's pretrained SAEs by `RELEASE:SAE_ID`, from the local HF cache.
//! * [`optim`]: torch's Adam and gradient clipping over [`Params`].
//! * [`geometric_median`]: SAELens's `b_dec` initialisation.
//!
//! All math goes through `kernels`; this crate never touches a backend.

mod arch;
mod common;
mod error;
pub mod geometric_median;
mod init;
pub mod io;
pub mod optim;
mod params;
pub mod pretrained;
mod sae;

pub use arch::{Acts, Buffers, Losses, StepInput, StepPath, SPARSE_BELOW};
pub use error::{Result, SaeError};
pub use params::Params;
pub use sae::{param_shapes, Sae, StepOutput};
pub use schemas::{Architecture, BDecInitMethod, SaeConfig};

/// `sqrt(d_in) / mean ||x||`: the factor that SAELens's `expected_average_only_in`
/// normalisation multiplies activations by (its `ActivationScaler` estimate).
pub fn norm_scaling_factor(d_in: usize, mean_norm: f64) -> f64 {
    (d_in as f64).sqrt() / mean_norm
}
