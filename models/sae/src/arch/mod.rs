//! One file per SAE architecture, each implementing [`Arch`]; [`build`] is the
//! registry. Adding an architecture is adding a file and one line there.

mod batchtopk;
mod gated;
mod jumprelu;
mod matryoshka;
mod standard;
mod topk;

use crate::common::Shared;
use crate::{Params, Result};
use kernels::{ops, Device, Tensor};
use schemas::{Architecture, SaeConfig};
use std::borrow::Cow;

/// What a training step feeds the SAE (SAELens's `TrainStepInput`).
pub struct StepInput<'a> {
    /// The batch `[n_tokens, d_in]`, already scaled by any estimated norm factor.
    pub sae_in: &'a Tensor,
    /// The current (warmed-up) sparsity coefficient: `l1` for standard and gated,
    /// `l0` for JumpReLU; unused by the TopK family.
    pub coefficient: f64,
    /// `[d_sae]`, 1.0 where a latent counts as dead. `None` means no latent is dead.
    pub dead_neuron_mask: Option<&'a Tensor>,
    /// Seed of the pre-activation noise (only used when `noise_scale > 0`).
    pub noise_seed: u64,
}

/// The latents of the last training forward pass.
pub enum Acts<'a> {
    Dense(&'a Tensor),
    Sparse(&'a kernels::Csr),
    /// Latents kept as their pre-activations, because a dense step makes them a row
    /// block at a time: latent `(r, j)` is `pre[r, j]` where `pre[r, j] > cut[j]`
    /// (`cut >= 0`) and 0 elsewhere, then through `tanh` when `tanh` is set.
    Above {
        pre: &'a Tensor,
        cut: &'a Tensor,
        tanh: bool,
    },
    /// Latents a dense step made a row block at a time and did not keep, remade on
    /// demand a block at a time.
    Rows(&'a dyn LatentRows),
}

/// Latents that can be remade a row block at a time (see [`Acts::Rows`]).
pub trait LatentRows {
    fn device(&self) -> Device;
    /// `(rows, d_sae)`.
    fn shape(&self) -> (usize, usize);
    /// The latents of rows `start..start + out.rows()` into `out` `[rows, d_sae]`.
    fn latents(&self, start: usize, out: &mut Tensor);
}

/// Runs `each(start, block)` over the latents of `rows`, a row block at a time.
fn each_block(rows: &dyn LatentRows, mut each: impl FnMut(usize, &Tensor)) {
    let (b, m) = rows.shape();
    let mut block = Tensor::zeros(&rows.device(), &[0, 0]);
    for (start, n) in crate::common::row_blocks(b) {
        block.resize(&[n, m]);
        rows.latents(start, &mut block);
        each(start, &block);
    }
}

impl Acts<'_> {
    /// `out[j]` = how many rows fire latent `j` (`out` is `[d_sae]`).
    pub fn col_counts(&self, out: &mut Tensor) {
        match self {
            Acts::Dense(f) => ops::col_nonzero_counts(f, out),
            Acts::Sparse(c) => ops::csr_col_nonzero_counts(c, out),
            Acts::Above { pre, cut, .. } => ops::step_count_cols(pre, cut, out),
            Acts::Rows(rows) => {
                let mut part = Tensor::zeros(&out.device(), &[out.numel()]);
                ops::fill(out, 0.0);
                each_block(*rows, |_, f| {
                    ops::col_nonzero_counts(f, &mut part);
                    ops::axpy(out, 1.0, &part);
                });
            }
        }
    }

    /// `out[r]` = the L0 of row `r` (`out` is `[B]`).
    pub fn row_counts(&self, out: &mut Tensor) {
        match self {
            Acts::Dense(f) => ops::row_nonzero_counts(f, out),
            Acts::Sparse(c) => ops::csr_row_nonzero_counts(c, out),
            Acts::Above { pre, cut, .. } => ops::step_count_rows(pre, cut, out),
            Acts::Rows(rows) => {
                // `out` as a column, so that each block's counts go to their rows.
                let dev = out.device();
                let mut col =
                    std::mem::replace(out, Tensor::zeros(&dev, &[0])).reshape(&[rows.shape().0, 1]);
                each_block(*rows, |start, f| {
                    let mut part = Tensor::zeros(&dev, &[f.rows()]);
                    ops::row_nonzero_counts(f, &mut part);
                    ops::copy_into_rows(&mut col, start, &part.reshape(&[f.rows(), 1]));
                });
                *out = col.reshape(&[rows.shape().0]);
            }
        }
    }

    /// `(rows, d_sae)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Acts::Dense(f) => (f.rows(), f.cols()),
            Acts::Sparse(c) => (c.rows(), c.cols()),
            Acts::Above { pre, .. } => (pre.rows(), pre.cols()),
            Acts::Rows(rows) => rows.shape(),
        }
    }

    /// The latents as a dense `[B, d_sae]` tensor (allocates).
    pub fn to_dense(&self) -> Tensor {
        match self {
            Acts::Dense(f) => (*f).clone(),
            Acts::Sparse(c) => {
                let mut d = Tensor::zeros(&c.device(), &[c.rows(), c.cols()]);
                ops::csr_to_dense(c, &mut d);
                d
            }
            Acts::Above { pre, cut, tanh } => {
                let mut f = Tensor::zeros(&pre.device(), pre.shape());
                ops::jumprelu(pre, cut, &mut f);
                if *tanh {
                    ops::tanh(&mut f);
                }
                f
            }
            Acts::Rows(rows) => {
                let (b, m) = rows.shape();
                let mut f = Tensor::zeros(&rows.device(), &[b, m]);
                each_block(*rows, |start, block| {
                    ops::copy_into_rows(&mut f, start, block)
                });
                f
            }
        }
    }
}

/// Loss terms in the order SAELens reports them, `mse_loss` first.
pub type Losses = Vec<(String, f64)>;

/// How a training step's decoder and backward products ran: over the full `[B, d_sae]`
/// latent matrix (SAELens's way), or over its active entries only (CSR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPath {
    Dense,
    Sparse,
}

impl StepPath {
    pub fn as_str(self) -> &'static str {
        match self {
            StepPath::Dense => "dense",
            StepPath::Sparse => "sparse",
        }
    }
}

/// Latent density (active entries / (B × d_sae)) below which the sparse products beat
/// the dense GEMMs on the CPU (measured with `sae-trainer bench`, see the README).
pub const SPARSE_BELOW: f64 = 0.1;

/// The path for a step whose latents have `nnz()` active entries out of `rows × cols`:
/// sparse on the CPU below [`SPARSE_BELOW`] (a function of the data alone, so resume
/// stays exact), dense otherwise and on CUDA (whose products are all dense so far).
/// [`Shared::force_path`] overrides the density (tests and benches compare the two).
pub(crate) fn choose_path(
    s: &Shared,
    nnz: impl FnOnce() -> usize,
    rows: usize,
    cols: usize,
) -> StepPath {
    if s.device != Device::Cpu {
        return StepPath::Dense;
    }
    if let Some(p) = s.force_path {
        return p;
    }
    let density = nnz() as f64 / (rows * cols).max(1) as f64;
    match density < SPARSE_BELOW {
        true => StepPath::Sparse,
        false => StepPath::Dense,
    }
}

pub(crate) trait Arch: Send + Sync {
    /// Parameter names (SAELens state-dict keys) and shapes.
    fn param_shapes(&self) -> Vec<(&'static str, Vec<usize>)>;

    /// Inference encode of an already processed input `[n, d_in]` into dense latents
    /// `[n, d_sae]` (allocates).
    fn encode(&self, p: &Params, sae_in: &Tensor) -> Tensor;

    /// Inference decode of dense latents, before the output normalisation.
    fn decode(&self, p: &Params, acts: &Tensor) -> Tensor {
        dense_decode(p, acts)
    }

    /// Training forward pass: everything the backward pass needs is kept in `self`
    /// and `s`. `s.prepare` has run. May adjust parameters first (JumpReLU clamps its
    /// threshold) and update buffers (BatchTopK's threshold).
    fn train_forward(
        &mut self,
        p: &mut Params,
        s: &mut Shared,
        input: &StepInput,
        buffers: &mut Buffers,
    ) -> Result<Losses>;

    /// Adds the gradient of the last forward pass's total loss to `g`.
    fn train_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params);

    /// The latents and pre-activations of the last training forward pass.
    fn acts(&self) -> Acts<'_>;
    /// The path the last training step took.
    fn path(&self) -> StepPath {
        StepPath::Dense
    }
    /// Borrowed where the step keeps them whole.
    fn hidden_pre(&self) -> Cow<'_, Tensor>;

    /// Folds decoder row norms into the encoder (`fold_W_dec_norm`).
    fn fold_w_dec_norm(&self, p: &mut Params, n: &Tensor) -> Result<()>;
}

/// Non-parameter state an architecture carries between steps.
#[derive(Clone, Debug, Default)]
pub struct Buffers {
    /// BatchTopK's running threshold (SAELens keeps it in f64).
    pub topk_threshold: f64,
}

/// The registry: the architecture object for a config.
pub(crate) fn build(cfg: &SaeConfig, device: &Device) -> Box<dyn Arch> {
    match cfg.architecture {
        Architecture::Standard => Box::new(standard::Standard::new(cfg, device)),
        Architecture::Gated => Box::new(gated::Gated::new(cfg, device)),
        Architecture::JumpRelu => Box::new(jumprelu::JumpRelu::new(cfg, device)),
        Architecture::TopK => Box::new(topk::TopK::new(cfg, device, topk::Select::PerRow)),
        Architecture::BatchTopK => Box::new(batchtopk::BatchTopK::new(cfg, device)),
        Architecture::MatryoshkaBatchTopK => Box::new(matryoshka::Matryoshka::new(cfg, device)),
    }
}

/// `acts @ W_dec + b_dec` (allocates `[n, d_in]`).
pub(crate) fn dense_decode(p: &Params, acts: &Tensor) -> Tensor {
    use kernels::ops;
    use schemas::tensors::{B_DEC, W_DEC};
    let w = p.get(W_DEC);
    let mut out = Tensor::zeros(&acts.device(), &[acts.rows(), w.cols()]);
    ops::matmul(&mut out, acts, false, w, false, 1.0, 0.0);
    ops::add_row_vec(&mut out, p.get(B_DEC), 1.0);
    out
}

/// `sae_in @ W + b` into an existing buffer.
pub(crate) fn linear_into(h: &mut Tensor, sae_in: &Tensor, w: &Tensor, b: &Tensor) {
    use kernels::ops;
    h.resize(&[sae_in.rows(), w.cols()]);
    ops::matmul(h, sae_in, false, w, false, 1.0, 0.0);
    ops::add_row_vec(h, b, 1.0);
}

/// `sae_in @ W + b` and the config's pre-activation noise into `h`. Without noise, on
/// the CPU, the bias pass also counts `split`'s entries (noise would come after it).
pub(crate) fn pre_activations(
    cfg: &SaeConfig,
    h: &mut Tensor,
    sae_in: &Tensor,
    (w, b): (&Tensor, &Tensor),
    noise_seed: u64,
    split: Option<&kernels::ops::Split>,
) {
    let split = split.filter(|_| cfg.noise_scale == 0.0);
    linear_counting_into(h, sae_in, w, b, split);
    maybe_noise(cfg, h, noise_seed);
}

/// [`linear_into`], where on the CPU the bias pass also counts `split`'s entries, so
/// that choosing the path needs no pass of its own.
pub(crate) fn linear_counting_into(
    h: &mut Tensor,
    sae_in: &Tensor,
    w: &Tensor,
    b: &Tensor,
    split: Option<&kernels::ops::Split>,
) {
    match split {
        Some(split) if sae_in.device() == Device::Cpu => {
            h.resize(&[sae_in.rows(), w.cols()]);
            kernels::ops::matmul(h, sae_in, false, w, false, 1.0, 0.0);
            split.add_bias_and_count(h, b);
        }
        _ => linear_into(h, sae_in, w, b),
    }
}

/// Scales `b_enc`-like vectors and `W_enc` columns by the decoder norms and divides
/// `W_dec` rows by them: the shared part of `fold_W_dec_norm`.
pub(crate) fn fold_norms_into(p: &mut Params, n: &Tensor, encoder_biases: &[&str]) {
    use kernels::ops;
    use schemas::tensors::{W_DEC, W_ENC};
    let inv = crate::common::reciprocal(n);
    let zero = Tensor::zeros(&n.device(), &[n.numel()]);
    ops::row_affine(p.get_mut(W_DEC), &inv, &zero);
    ops::mul_row_vec(p.get_mut(W_ENC), n);
    for b in encoder_biases {
        ops::mul(p.get_mut(b), n);
    }
}

/// Adds `std * N(0,1)` noise to pre-activations when the config asks for it.
pub(crate) fn maybe_noise(cfg: &SaeConfig, h: &mut Tensor, seed: u64) {
    if cfg.noise_scale != 0.0 {
        kernels::ops::add_normal_noise(h, cfg.noise_scale as f32, seed);
    }
}

/// Dead-latent count of a mask.
pub(crate) fn n_dead(mask: Option<&Tensor>) -> usize {
    mask.map_or(0, |m| m.to_vec().iter().filter(|&&v| v > 0.0).count())
}
