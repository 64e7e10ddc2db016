//! The hooked transformer: the Rust counterpart of TransformerLens's
//! `HookedTransformer` (loaded the way SAELens loads it, with no weight processing)
//! and of SAELens's `HookedSAETransformer`.
//!
//! * [`HookedTransformer::load`] reads an HF checkpoint directory (GPT-2, GPT-NeoX,
//!   Llama / Mistral / Qwen2; f32, f16 or bf16; single or sharded safetensors).
//! * [`HookedTransformer::run`] runs a batch of token ids, calling a [`Hooks`] visitor
//!   at every TransformerLens hook point it reaches; [`Capture`] caches activations,
//!   [`Interventions`] splices SAEs in or zero-ablates.
//! * [`evals::run_evals`] computes SAELens's eval metrics for one SAE.

pub mod config;
mod error;
pub mod evals;
pub mod hooks;
mod model;
pub mod splice;
mod weights;

pub use config::{special_token_ids, LmConfig};
pub use error::{LmError, Result};
pub use hooks::{Capture, HookKind, HookPoint, Hooks, NoHooks};
pub use model::{HookedTransformer, TokenBatch, Workspace};
pub use splice::{Intervention, Interventions};
