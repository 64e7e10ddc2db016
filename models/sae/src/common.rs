//! The parts of the forward and backward pass that every architecture shares: run-time
//! input normalisation, the decoder bias, the reconstruction loss and the linear
//! encoder/decoder gradients.

use crate::Params;
use kernels::{ops, Device, Tensor};
use schemas::tensors::{B_DEC, W_DEC};
use schemas::{NormalizeActivations, SaeConfig};

/// Per-row affine maps that SAELens's run-time normalisations apply: `x*in_scale +
/// in_shift` on the way in, `y*out_scale + out_shift` on the way out. They depend only
/// on the input batch, so they are constants for the backward pass.
#[derive(Clone, Debug)]
pub(crate) struct RowNorm {
    pub in_scale: Tensor,
    pub in_shift: Tensor,
    pub out_scale: Tensor,
    pub out_shift: Tensor,
}

impl RowNorm {
    /// `None` when the config applies no run-time normalisation.
    pub fn from_input(cfg: &SaeConfig, x: &Tensor) -> Option<RowNorm> {
        let dev = x.device();
        let rows = x.rows();
        match cfg.normalize_activations {
            NormalizeActivations::ConstantNormRescale => {
                // x * sqrt(d_in)/||x||, undone by dividing by the same coefficient.
                let mut norms = Tensor::zeros(&dev, &[rows]);
                ops::row_norms(x, &mut norms);
                let d = (cfg.d_in as f32).sqrt();
                let v = norms.to_vec();
                let scale: Vec<f32> = v.iter().map(|n| d / n).collect();
                let inv: Vec<f32> = scale.iter().map(|c| 1.0 / c).collect();
                Some(RowNorm {
                    in_scale: vec_t(&dev, scale),
                    in_shift: Tensor::zeros(&dev, &[rows]),
                    out_scale: vec_t(&dev, inv),
                    out_shift: Tensor::zeros(&dev, &[rows]),
                })
            }
            NormalizeActivations::LayerNorm => {
                // (x - mu) / (std + 1e-5) in, y * std + mu out (std unbiased).
                let mut mu = Tensor::zeros(&dev, &[rows]);
                let mut sd = Tensor::zeros(&dev, &[rows]);
                ops::row_mean_std(x, &mut mu, &mut sd);
                let (mu, sd) = (mu.to_vec(), sd.to_vec());
                let scale: Vec<f32> = sd.iter().map(|s| 1.0 / (s + 1e-5)).collect();
                let shift: Vec<f32> = mu.iter().zip(&scale).map(|(m, s)| -m * s).collect();
                Some(RowNorm {
                    in_scale: vec_t(&dev, scale),
                    in_shift: vec_t(&dev, shift),
                    out_scale: vec_t(&dev, sd),
                    out_shift: vec_t(&dev, mu),
                })
            }
            NormalizeActivations::None | NormalizeActivations::ExpectedAverageOnlyIn => None,
        }
    }
}

fn vec_t(dev: &Device, v: Vec<f32>) -> Tensor {
    let n = v.len();
    Tensor::from_vec(dev, &[n], v).expect("length matches")
}

/// `x*in_scale + in_shift - apply_b_dec * b_dec`: SAELens's `process_sae_in`.
pub(crate) fn process_input(
    cfg: &SaeConfig,
    p: &Params,
    x: &Tensor,
    norm: Option<&RowNorm>,
) -> Tensor {
    let mut sae_in = x.clone();
    if let Some(n) = norm {
        ops::row_affine(&mut sae_in, &n.in_scale, &n.in_shift);
    }
    if cfg.apply_b_dec_to_input {
        ops::add_row_vec(&mut sae_in, p.get(B_DEC), -1.0);
    }
    sae_in
}

/// Applies the run-time output normalisation in place.
pub(crate) fn finish_output(out: &mut Tensor, norm: Option<&RowNorm>) {
    if let Some(n) = norm {
        ops::row_affine(out, &n.out_scale, &n.out_shift);
    }
}

/// State of one training step that every architecture uses.
pub(crate) struct Shared {
    pub device: Device,
    /// The raw input batch `[B, d_in]` (the MSE target).
    pub x: Tensor,
    pub norm: Option<RowNorm>,
    /// The processed input `[B, d_in]`.
    pub sae_in: Tensor,
    /// Decoder output before the output normalisation `[B, d_in]`.
    pub recon: Tensor,
    /// The reconstruction `[B, d_in]`.
    pub sae_out: Tensor,
    /// Gradient of the total loss with respect to `recon` `[B, d_in]`.
    pub d_recon: Tensor,
    /// `dense_batch` row weights of the MSE `[B]`.
    pub mse_w: Option<Tensor>,
    /// Decoder row norms `[d_sae]` and the gradient flowing into them.
    pub n: Tensor,
    pub dn: Tensor,
    /// Overrides the dense/sparse choice of the architectures that have both.
    pub force_path: Option<crate::StepPath>,
}

impl Shared {
    pub fn new(device: &Device) -> Shared {
        let z = |s: &[usize]| Tensor::zeros(device, s);
        Shared {
            device: device.clone(),
            x: z(&[0, 0]),
            norm: None,
            sae_in: z(&[0, 0]),
            recon: z(&[0, 0]),
            sae_out: z(&[0, 0]),
            d_recon: z(&[0, 0]),
            mse_w: None,
            n: z(&[0]),
            dn: z(&[0]),
            force_path: None,
        }
    }

    pub fn batch(&self) -> usize {
        self.x.rows()
    }

    /// Stores the batch, computes the processed input and the decoder row norms.
    pub fn prepare(&mut self, cfg: &SaeConfig, p: &Params, x: &Tensor) {
        self.x = x.clone();
        self.norm = RowNorm::from_input(cfg, x);
        self.sae_in = process_input(cfg, p, x, self.norm.as_ref());
        self.recon.resize(x.shape());
        self.n.resize(&[cfg.d_sae]);
        ops::row_norms(p.get(W_DEC), &mut self.n);
        self.dn.resize(&[cfg.d_sae]);
        ops::fill(&mut self.dn, 0.0);
        self.mse_w = cfg.mse_loss_normalization.map(|_| dense_batch_weights(x));
    }

    /// Turns `recon` into `sae_out`, returns the MSE loss (summed over `d_in`, mean over
    /// the batch) and stores its gradient with respect to `recon` in `d_recon`.
    pub fn finish(&mut self) -> f64 {
        self.sae_out = self.recon.clone();
        finish_output(&mut self.sae_out, self.norm.as_ref());
        let b = self.batch() as f32;
        self.d_recon.resize(self.x.shape());
        let sum = ops::mse(
            &self.sae_out,
            &self.x,
            self.mse_w.as_ref(),
            Some((&mut self.d_recon, 1.0 / b)),
        );
        through_output_norm(self.norm.as_ref(), &mut self.d_recon);
        sum / b as f64
    }

    /// Takes a gradient with respect to an output-normalised tensor back through the
    /// output normalisation.
    pub fn out_grad_to_pre(&self, g: &mut Tensor) {
        through_output_norm(self.norm.as_ref(), g);
    }

    /// Backward of a linear map `h = input @ W + b`: `dw += input^T @ d_h`; returns
    /// `sum_r d_h`, the bias gradient of this step.
    pub fn linear_backward(&self, input: &Tensor, d_h: &Tensor, dw: &mut Tensor) -> Tensor {
        ops::matmul(dw, input, true, d_h, false, 1.0, 1.0);
        let mut db = Tensor::zeros(&self.device, &[d_h.cols()]);
        ops::col_sums(d_h, &mut db, 1.0, 0.0);
        db
    }

    /// `d b_dec -= W @ db`: the `b_dec` gradient through `sae_in = x_norm - b_dec`,
    /// given `db`, the column sums of an encoder pre-activation gradient. (`b_dec` is
    /// subtracted after the input normalisation, so no row scaling applies.)
    pub fn b_dec_through_encoder(&self, w: &Tensor, db_step: &Tensor, d_b_dec: &mut Tensor) {
        ops::matvec(d_b_dec, w, false, db_step, -1.0, 1.0);
    }

    /// Adds the gradient that reached the decoder row norms to `d W_dec`:
    /// `d W_dec[j] += dn[j] / n[j] * W_dec[j]`.
    pub fn norms_backward(&self, p: &Params, g: &mut Params) {
        let n = self.n.to_vec();
        let dn = self.dn.to_vec();
        if dn.iter().all(|&v| v == 0.0) {
            return;
        }
        let c: Vec<f32> = dn
            .iter()
            .zip(&n)
            .map(|(d, n)| if *n > 0.0 { d / n } else { 0.0 })
            .collect();
        let c = vec_t(&self.device, c);
        ops::add_scaled_rows(g.get_mut(W_DEC), p.get(W_DEC), &c);
    }
}

/// How many row blocks a dense step runs in: its `[B, d_sae]` temporaries are row
/// blocks of `ceil(B / DENSE_BLOCKS)` rows, so the step holds one full `[B, d_sae]`
/// buffer (the pre-activations) and a few blocks, not several full buffers.
pub(crate) const DENSE_BLOCKS: usize = 8;

/// The row blocks `(start, rows)` of a dense step over `b` rows.
pub(crate) fn row_blocks(b: usize) -> impl Iterator<Item = (usize, usize)> {
    let rows = b.div_ceil(DENSE_BLOCKS).max(1);
    (0..b)
        .step_by(rows)
        .map(move |start| (start, rows.min(b - start)))
}

/// `dst = src[start..start + rows, :]`, resizing `dst`.
pub(crate) fn take_rows(src: &Tensor, start: usize, rows: usize, dst: &mut Tensor) {
    dst.resize(&[rows, src.cols()]);
    ops::copy_rows(src, start, dst);
}

/// The temporaries of a dense step's row blocks, kept between steps: three
/// `[rows, d_sae]` blocks and two `[rows, d_in]` ones.
pub(crate) struct Blocks {
    pub a: Tensor,
    pub b: Tensor,
    pub c: Tensor,
    pub x: Tensor,
    pub r: Tensor,
}

impl Blocks {
    pub fn new(device: &Device) -> Blocks {
        let z = || Tensor::zeros(device, &[0, 0]);
        Blocks {
            a: z(),
            b: z(),
            c: z(),
            x: z(),
            r: z(),
        }
    }

    /// Frees the blocks (a sparse step does not use them).
    pub fn free(&mut self) {
        *self = Blocks::new(&self.a.device());
    }
}

/// `out[start..start + rows] = acts_block @ W_dec` (`r` is scratch).
pub(crate) fn decode_rows(
    out: &mut Tensor,
    w_dec: &Tensor,
    acts: &Tensor,
    start: usize,
    r: &mut Tensor,
) {
    r.resize(&[acts.rows(), w_dec.cols()]);
    ops::matmul(r, acts, false, w_dec, false, 1.0, 0.0);
    ops::copy_into_rows(out, start, r);
}

/// A row block's share of a decoder's backward, given the decode's output gradient
/// `d_out` (less the `b_dec` gradient, a whole-batch column sum):
/// `d W_dec += acts^T @ d_out[rows]` and `d_acts = d_out[rows] @ W_dec^T` (resized).
/// Leaves `d_out`'s block in `r`.
pub(crate) fn decoder_backward_rows(
    d_out: &Tensor,
    w_dec: &Tensor,
    acts: &Tensor,
    start: usize,
    g_w_dec: &mut Tensor,
    d_acts: &mut Tensor,
    r: &mut Tensor,
) {
    take_rows(d_out, start, acts.rows(), r);
    ops::matmul(g_w_dec, acts, true, r, false, 1.0, 1.0);
    d_acts.resize(acts.shape());
    ops::matmul(d_acts, r, false, w_dec, true, 1.0, 0.0);
}

impl Shared {
    /// A row block's share of the encoder-weight gradient: `dw += input[rows]^T @ d_h`
    /// and `db += sum_r d_h` (`x` is scratch). [`Shared::encoder_bias_backward`] ends it.
    pub fn encoder_backward_rows(
        &self,
        input: &Tensor,
        d_h: &Tensor,
        start: usize,
        dw: &mut Tensor,
        db: &mut Tensor,
        x: &mut Tensor,
    ) {
        take_rows(input, start, d_h.rows(), x);
        ops::matmul(dw, x, true, d_h, false, 1.0, 1.0);
        ops::col_sums(d_h, db, 1.0, 1.0);
    }

    /// Adds an encoder's bias gradient `db` (summed over the batch) to `g[name]`, and to
    /// `b_dec` when it is subtracted from the input.
    pub fn encoder_bias_backward(
        &self,
        cfg: &SaeConfig,
        w: &Tensor,
        db: &Tensor,
        g: &mut Params,
        name: &str,
    ) {
        ops::axpy(g.get_mut(name), 1.0, db);
        if cfg.apply_b_dec_to_input {
            self.b_dec_through_encoder(w, db, g.get_mut(B_DEC));
        }
    }
}

/// `g[r, :] *= out_scale[r]`: the backward of the output normalisation (its shift is a
/// constant of the input).
fn through_output_norm(norm: Option<&RowNorm>, g: &mut Tensor) {
    if let Some(n) = norm {
        let zero = Tensor::zeros(&g.device(), &[g.rows()]);
        ops::row_affine(g, &n.out_scale, &zero);
    }
}

/// `1 / (||x_r - mean(x)|| + 1e-6)`: SAELens 5's `dense_batch` MSE weights.
pub(crate) fn dense_batch_weights(x: &Tensor) -> Tensor {
    let mut w = Tensor::zeros(&x.device(), &[x.rows()]);
    ops::centered_row_norms(x, &mut w);
    let v: Vec<f32> = w.to_vec().iter().map(|n| 1.0 / (n + 1e-6)).collect();
    vec_t(&x.device(), v)
}

/// Element-wise per-item MSE as SAELens's `mse_loss_fn` returns it (used by ghost
/// grads): `(pred - target)^2`, divided by the `dense_batch` norm of `target` when set.
pub(crate) fn per_item_mse(cfg: &SaeConfig, pred: &Tensor, target: &Tensor) -> Tensor {
    let w = cfg
        .mse_loss_normalization
        .map(|_| dense_batch_weights(target));
    let mut out = Tensor::zeros(&pred.device(), pred.shape());
    ops::sq_err(pred, target, w.as_ref(), &mut out);
    out
}

/// Reciprocal of every element (`1/v`, 0 where `v` is 0).
pub(crate) fn reciprocal(v: &Tensor) -> Tensor {
    let r: Vec<f32> = v
        .to_vec()
        .iter()
        .map(|&x| if x != 0.0 { 1.0 / x } else { 0.0 })
        .collect();
    vec_t(&v.device(), r)
}

pub(crate) fn vector(dev: &Device, v: Vec<f32>) -> Tensor {
    vec_t(dev, v)
}
