//! The standard SAE: `f = ReLU(sae_in @ W_enc + b_enc)`, penalised by the Lp norm of
//! `f` weighted by decoder row norms (SAELens 6; SAELens 5 optionally unweighted), with
//! SAELens 5's ghost grads, `tanh-relu` and pre-activation noise.
//!
//! Two paths with the same math, chosen per step from the latents' density
//! ([`super::choose_path`]): the dense one multiplies `[B, d_sae]` matrices as SAELens
//! does, a row block at a time (the latents and their gradient are remade per block
//! from the pre-activations, the one full `[B, d_sae]` buffer); the sparse one keeps
//! the active latents as CSR and runs the decoder, its gradients and the
//! encoder-weight gradient over them only. Ghost grads are dense and whole-batch.

use super::{
    choose_path, linear_into, pre_activations, Acts, Arch, Buffers, Losses, StepInput, StepPath,
};
use crate::common::{
    decode_rows, decoder_backward_rows, dense_batch_weights, per_item_mse, row_blocks, take_rows,
    Blocks, Shared,
};
use crate::{Params, Result};
use kernels::{ops, Csr, Device, Tensor};
use schemas::tensors::{B_DEC, B_ENC, W_DEC, W_ENC};
use schemas::{ActivationFn, SaeConfig};

pub(crate) struct Standard {
    cfg: SaeConfig,
    /// Pre-activations `[B, d_sae]` (noised when `noise_scale > 0`).
    h: Tensor,
    /// The dense path's row blocks, and the cut its latents are read with (0).
    blk: Blocks,
    zero: Tensor,
    /// The sparsity loss's scale `coefficient / B`, for the dense backward.
    c: f32,
    /// Gradient with respect to `h` from ghost grads (only when they ran).
    d_h_ghost: Option<Tensor>,
    /// Ghost-grad decoder input `exp(h)` on dead latents and its gradient.
    ghost: Option<(Tensor, Tensor)>,
    path: StepPath,
    /// Sparse path: the latents as CSR, the pre-activations at its entries (for
    /// `tanh-relu`'s backward), and the sparsity loss's gradient there, `[nnz]`.
    fc: Csr,
    hv: Tensor,
    d_fc: Tensor,
}

impl Standard {
    /// The backward pass over the active latents only: the decoder's gradients, the
    /// latents' gradient at the active entries, the encoder's from those.
    fn sparse_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        let dev = s.device.clone();
        let w_dec = p.get(W_DEC);
        ops::col_sums(&s.d_recon, g.get_mut(B_DEC), 1.0, 1.0);
        ops::csr_t_matmul(g.get_mut(W_DEC), &self.fc, &s.d_recon, false, 1.0, 1.0);
        let mut d = Tensor::zeros(&dev, &[self.fc.nnz()]);
        ops::csr_sampled_dot(&self.fc, &s.d_recon, w_dec, &mut d);
        ops::axpy(&mut d, 1.0, &self.d_fc);
        // Every stored entry has h > 0: ReLU passes the gradient, tanh-relu scales it.
        // `d_h` has the latents' pattern: it lends their values' place for the two
        // products below (the step's metrics read the latents after).
        let d_h = match self.cfg.activation_fn {
            ActivationFn::Relu => d,
            ActivationFn::TanhRelu => {
                let mut d_h = Tensor::zeros(&dev, &[d.numel()]);
                ops::tanh_relu_backward(&self.hv, &d, &mut d_h);
                d_h
            }
        };
        let f = std::mem::replace(self.fc.values_mut(), d_h);
        ops::csr_t_matmul(g.get_mut(W_ENC), &self.fc, &s.sae_in, true, 1.0, 1.0);
        let mut db = Tensor::zeros(&dev, &[self.cfg.d_sae]);
        ops::csr_col_dot(&self.fc, None, &mut db, 1.0, 0.0);
        *self.fc.values_mut() = f;
        ops::axpy(g.get_mut(B_ENC), 1.0, &db);
        if self.cfg.apply_b_dec_to_input {
            s.b_dec_through_encoder(p.get(W_ENC), &db, g.get_mut(B_DEC));
        }
        s.norms_backward(p, g);
    }

    pub fn new(cfg: &SaeConfig, device: &Device) -> Standard {
        let z = Tensor::zeros(device, &[0, 0]);
        Standard {
            cfg: cfg.clone(),
            h: z,
            blk: Blocks::new(device),
            zero: Tensor::zeros(device, &[cfg.d_sae]),
            c: 0.0,
            d_h_ghost: None,
            ghost: None,
            path: StepPath::Dense,
            fc: Csr::empty(device),
            hv: Tensor::zeros(device, &[0]),
            d_fc: Tensor::zeros(device, &[0]),
        }
    }

    /// SAELens 5's ghost-grad loss: dead latents, activated by `exp`, reconstruct the
    /// residual, scaled to half its norm, weighted so its MSE matches the main MSE.
    fn ghost_grads(&mut self, p: &Params, s: &Shared, dead: &Tensor) -> f64 {
        let dev = s.device.clone();
        let (b, d) = (s.batch(), self.cfg.d_in);
        let w_dec = p.get(W_DEC);
        // exp(h) on dead latents only
        let mut e = Tensor::zeros(&dev, self.h.shape());
        ops::exp(&self.h, &mut e);
        ops::mul_row_vec(&mut e, dead);
        let mut ghost = Tensor::zeros(&dev, &[b, d]);
        ops::matmul(&mut ghost, &e, false, w_dec, false, 1.0, 0.0);
        let mut residual = s.x.clone();
        ops::axpy(&mut residual, -1.0, &s.sae_out);
        let (mut res_norm, mut ghost_norm) = (Tensor::zeros(&dev, &[b]), Tensor::zeros(&dev, &[b]));
        ops::row_norms(&residual, &mut res_norm);
        ops::row_norms(&ghost, &mut ghost_norm);
        let scale: Vec<f32> = res_norm
            .to_vec()
            .iter()
            .zip(ghost_norm.to_vec())
            .map(|(r, g)| r / (1e-6 + g * 2.0))
            .collect();
        let scale = crate::common::vector(&dev, scale);
        let zero = Tensor::zeros(&dev, &[b]);
        ops::row_affine(&mut ghost, &scale, &zero);
        // mse_rescaling_factor = per_item_mse / (per_item_ghost + 1e-6), detached
        let main = per_item_mse(&self.cfg, &s.sae_out, &s.x);
        let ghost_mse = per_item_mse(&self.cfg, &ghost, &residual);
        let mut weight = Tensor::zeros(&dev, &[b, d]);
        ops::div_eps(&main, &ghost_mse, 1e-6, &mut weight);
        // dense_batch divides the ghost MSE by the residual's centred row norms too
        if self.cfg.mse_loss_normalization.is_some() {
            ops::row_affine(&mut weight, &dense_batch_weights(&residual), &zero);
        }
        let mut d_ghost = Tensor::zeros(&dev, &[b, d]);
        let n = (b * d) as f32;
        let loss = ops::weighted_sq_err(&ghost, &residual, &weight, Some((&mut d_ghost, 1.0 / n)))
            / n as f64;
        // back through the (detached) norm scaling
        ops::row_affine(&mut d_ghost, &scale, &zero);
        let mut d_e = Tensor::zeros(&dev, self.h.shape());
        ops::matmul(&mut d_e, &d_ghost, false, w_dec, true, 1.0, 0.0);
        ops::mul(&mut d_e, &e);
        self.d_h_ghost = Some(d_e);
        self.ghost = Some((e, d_ghost));
        loss
    }
}

impl Arch for Standard {
    fn param_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        let (d, m) = (self.cfg.d_in, self.cfg.d_sae);
        vec![
            (W_ENC, vec![d, m]),
            (B_ENC, vec![m]),
            (W_DEC, vec![m, d]),
            (B_DEC, vec![d]),
        ]
    }

    fn encode(&self, p: &Params, sae_in: &Tensor) -> Tensor {
        let mut h = Tensor::zeros(&sae_in.device(), &[0, 0]);
        linear_into(&mut h, sae_in, p.get(W_ENC), p.get(B_ENC));
        let mut f = Tensor::zeros(&sae_in.device(), h.shape());
        activate(&self.cfg, &h, &mut f);
        f
    }

    fn train_forward(
        &mut self,
        p: &mut Params,
        s: &mut Shared,
        input: &StepInput,
        _b: &mut Buffers,
    ) -> Result<Losses> {
        let dev = s.device.clone();
        let b = s.batch();
        let split = ops::Split::relu(self.cfg.d_sae);
        let (w, bias) = (p.get(W_ENC), p.get(B_ENC));
        pre_activations(
            &self.cfg,
            &mut self.h,
            &s.sae_in,
            (w, bias),
            input.noise_seed,
            Some(&split),
        );
        self.path = match self.cfg.use_ghost_grads {
            true => StepPath::Dense,
            false => choose_path(s, || split.nnz(&self.h), b, self.cfg.d_sae),
        };
        let c = input.coefficient as f32 / b as f32;
        self.c = c;
        let weighted = self.cfg.scale_sparsity_penalty_by_decoder_norm;
        let n = weighted.then_some(&s.n);
        let p_norm = self.cfg.lp_norm as f32;
        let sparsity = match self.path {
            StepPath::Sparse => {
                // The dense blocks are not needed on this path: free them.
                self.blk.free();
                split.to_csr(&self.h, &mut self.fc, None);
                if self.cfg.activation_fn == ActivationFn::TanhRelu {
                    self.hv = self.fc.values().clone();
                    ops::tanh(self.fc.values_mut());
                }
                ops::csr_matmul(&mut s.recon, &self.fc, p.get(W_DEC), 1.0, 0.0);
                self.d_fc = Tensor::zeros(&dev, &[self.fc.nnz()]);
                let dn = if weighted { Some(&mut s.dn) } else { None };
                ops::csr_lp_sparsity(&self.fc, n, p_norm, c, Some(&mut self.d_fc), dn)
            }
            StepPath::Dense => {
                self.fc = Csr::empty(&dev);
                // Sparsity: coefficient * mean_r ||f_r * n||_p (n = 1 when unweighted);
                // its gradient is taken with the backward's blocks.
                let mut sum = 0.0;
                let k = &mut self.blk;
                for (start, rows) in row_blocks(b) {
                    latents_rows(&self.cfg, (&self.h, &self.zero), start, rows, &mut k.b);
                    let n = weighted.then_some(&s.n);
                    sum += ops::lp_sparsity(&k.b, n, p_norm, c, None, None);
                    decode_rows(&mut s.recon, p.get(W_DEC), &k.b, start, &mut k.r);
                }
                sum
            }
        };
        ops::add_row_vec(&mut s.recon, p.get(B_DEC), 1.0);
        let mse = s.finish();
        let l1 = input.coefficient * sparsity / b as f64;

        let mut losses = vec![];
        self.d_h_ghost = None;
        self.ghost = None;
        if self.cfg.use_ghost_grads {
            // SAELens 5 runs ghost grads whenever a mask is given, dead latents or not.
            let none = Tensor::zeros(&dev, &[self.cfg.d_sae]);
            let dead = input.dead_neuron_mask.unwrap_or(&none);
            let g = self.ghost_grads(p, s, dead);
            losses.push(("ghost_grad_loss".to_string(), g));
        }
        losses.push(("l1_loss".to_string(), l1));
        losses.insert(0, ("mse_loss".to_string(), mse));
        Ok(losses)
    }

    fn train_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        if self.path == StepPath::Sparse {
            return self.sparse_backward(p, s, g);
        }
        let weighted = self.cfg.scale_sparsity_penalty_by_decoder_norm;
        let p_norm = self.cfg.lp_norm as f32;
        ops::col_sums(&s.d_recon, g.get_mut(B_DEC), 1.0, 1.0);
        let mut db = Tensor::zeros(&s.device, &[self.cfg.d_sae]);
        let mut dn = std::mem::replace(&mut s.dn, Tensor::zeros(&s.device, &[0]));
        // Per block: `b` the latents (then `d_h` for tanh-relu), `c` their gradient
        // (then `d_h` for ReLU), `a` the pre-activations for tanh-relu.
        let k = &mut self.blk;
        let tanh = self.cfg.activation_fn == ActivationFn::TanhRelu;
        for (start, rows) in row_blocks(s.batch()) {
            latents_rows(&self.cfg, (&self.h, &self.zero), start, rows, &mut k.b);
            let (w, gw) = (p.get(W_DEC), g.get_mut(W_DEC));
            decoder_backward_rows(&s.d_recon, w, &k.b, start, gw, &mut k.c, &mut k.r);
            let (n, dn) = match weighted {
                true => (Some(&s.n), Some(&mut dn)),
                false => (None, None),
            };
            ops::lp_sparsity(&k.b, n, p_norm, self.c, Some(&mut k.c), dn);
            let d_h = match tanh {
                // The latents are positive exactly where the pre-activations are.
                false => {
                    ops::mask_positive(&mut k.c, &k.b);
                    &mut k.c
                }
                true => {
                    take_rows(&self.h, start, rows, &mut k.a);
                    ops::tanh_relu_backward(&k.a, &k.c, &mut k.b);
                    &mut k.b
                }
            };
            if let Some(dg) = &self.d_h_ghost {
                take_rows(dg, start, rows, &mut k.a);
                ops::axpy(d_h, 1.0, &k.a);
            }
            let gw = g.get_mut(W_ENC);
            s.encoder_backward_rows(&s.sae_in, d_h, start, gw, &mut db, &mut k.x);
        }
        s.dn = dn;
        s.encoder_bias_backward(&self.cfg, p.get(W_ENC), &db, g, B_ENC);
        if let Some((e, d_ghost)) = &self.ghost {
            ops::matmul(g.get_mut(W_DEC), e, true, d_ghost, false, 1.0, 1.0);
        }
        s.norms_backward(p, g);
    }

    fn acts(&self) -> Acts<'_> {
        match self.path {
            StepPath::Sparse => Acts::Sparse(&self.fc),
            StepPath::Dense => Acts::Above {
                pre: &self.h,
                cut: &self.zero,
                tanh: self.cfg.activation_fn == ActivationFn::TanhRelu,
            },
        }
    }

    fn path(&self) -> StepPath {
        self.path
    }

    fn hidden_pre(&self) -> std::borrow::Cow<'_, Tensor> {
        std::borrow::Cow::Borrowed(&self.h)
    }

    fn fold_w_dec_norm(&self, p: &mut Params, n: &Tensor) -> Result<()> {
        super::fold_norms_into(p, n, &[B_ENC]);
        Ok(())
    }
}

/// ReLU, or SAELens 5's `tanh-relu`.
fn activate(cfg: &SaeConfig, h: &Tensor, f: &mut Tensor) {
    ops::relu(h, f);
    if cfg.activation_fn == ActivationFn::TanhRelu {
        ops::tanh(f);
    }
}

/// The latents of rows `start..start + rows` of the pre-activations `h` into `f`
/// (`zero` is a zero cut `[d_sae]`).
fn latents_rows(
    cfg: &SaeConfig,
    (h, zero): (&Tensor, &Tensor),
    start: usize,
    rows: usize,
    f: &mut Tensor,
) {
    f.resize(&[rows, cfg.d_sae]);
    ops::jumprelu_rows(h, start, zero, f);
    if cfg.activation_fn == ActivationFn::TanhRelu {
        ops::tanh(f);
    }
}
