//! The TopK SAE and the machinery the BatchTopK family shares with it.
//!
//! `h = sae_in @ W_enc + b_enc`, rescaled by decoder row norms when
//! `rescale_acts_by_decoder_norm` (then the decoder sees `f / ||W_dec||`); the latents
//! are the ReLU of the k largest entries per row (or, for BatchTopK, of the `k * B`
//! largest of the whole batch). Dead latents get the AuxK loss: the top `d_in / 2`
//! dead pre-activations reconstruct the residual.
//!
//! Two execution paths with the same math: the dense one multiplies full
//! `[B, d_sae]` matrices (what SAELens does), the sparse one touches only the selected
//! latents in the decoder and in every weight gradient. On the CPU each step chooses
//! by the selection's density as the other architectures do ([`super::choose_path`]),
//! `use_sparse_activations` or not: k of 24576 latents is far below the point where
//! the sparse products win. `use_sparse_activations: true` always takes the sparse
//! path, and on a GPU it alone decides.

use super::{
    choose_path, linear_into, maybe_noise, n_dead, Acts, Arch, Buffers, Losses, StepInput, StepPath,
};
use crate::common::{reciprocal, Shared};
use crate::{Params, Result, SaeError};
use kernels::{ops, Csr, Device, Tensor};
use schemas::tensors::{B_DEC, B_ENC, W_DEC, W_ENC};
use schemas::{NormalizeActivations, SaeConfig};

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Select {
    /// k per row (TopK).
    PerRow,
    /// `int(k * B)` over the whole batch (BatchTopK).
    Batch,
}

/// One AuxK term: its selection (raw pre-activations), the decoder input, and the
/// gradient of the loss with respect to its reconstruction (before output
/// normalisation).
struct AuxTerm {
    sel: Csr,
    scaled: Csr,
    d_pre: Tensor,
}

pub(crate) struct TopK {
    pub(crate) cfg: SaeConfig,
    select: Select,
    /// This step's path (see the module's notes).
    pub(crate) sparse: bool,
    /// `hidden_pre` `[B, d_sae]`: the encoder output, times the decoder norms when
    /// rescaling.
    h: Tensor,
    /// The selected latents; values are the feature activations (ReLU'd).
    pub(crate) sel: Csr,
    /// The decoder input: `sel` times `1/||W_dec||` when rescaling.
    pub(crate) fs: Csr,
    inv_n: Tensor,
    aux: Vec<AuxTerm>,
    /// Extra gradient with respect to the decoder input at its stored entries
    /// (`[nnz]`), added by Matryoshka's inner losses.
    pub(crate) d_fs_extra: Option<Tensor>,
}

impl TopK {
    pub fn new(cfg: &SaeConfig, device: &Device, select: Select) -> TopK {
        let z = Tensor::zeros(device, &[0, 0]);
        TopK {
            cfg: cfg.clone(),
            select,
            sparse: cfg.use_sparse_activations,
            h: z,
            sel: Csr::empty(device),
            fs: Csr::empty(device),
            inv_n: Tensor::zeros(device, &[0]),
            aux: Vec::new(),
            d_fs_extra: None,
        }
    }

    fn select_into(&self, h: &Tensor, out: &mut Csr) {
        match self.select {
            Select::PerRow => {
                ops::topk_rows(h, self.cfg.k as usize, None, out);
                relu_values(out);
            }
            Select::Batch => {
                // batch_topk keeps positive entries only: the top of ReLU(h).
                let total = (self.cfg.k * h.rows() as f64) as usize;
                ops::batch_topk(h, total, out);
            }
        }
    }

    /// Encoder, selection and decoder of the training pass; returns the MSE.
    pub(crate) fn forward_core(&mut self, p: &Params, s: &mut Shared, input: &StepInput) -> f64 {
        let mut sel = std::mem::replace(&mut self.sel, Csr::empty(&s.device));
        self.inv_n = reciprocal(&s.n);
        // Nothing between the bias and the selection: the selection's pass adds it.
        let fused = self.cfg.noise_scale == 0.0 && !self.cfg.rescale_acts_by_decoder_norm;
        if fused {
            let w = p.get(W_ENC);
            self.h.resize(&[s.sae_in.rows(), w.cols()]);
            ops::matmul(&mut self.h, &s.sae_in, false, w, false, 1.0, 0.0);
            let (k, bias) = (self.cfg.k, p.get(B_ENC));
            match self.select {
                Select::PerRow => {
                    ops::add_bias_topk_rows(&mut self.h, bias, k as usize, &mut sel);
                    relu_values(&mut sel);
                }
                Select::Batch => {
                    let total = (k * self.h.rows() as f64) as usize;
                    ops::add_bias_batch_topk(&mut self.h, bias, total, &mut sel);
                }
            }
        } else {
            linear_into(&mut self.h, &s.sae_in, p.get(W_ENC), p.get(B_ENC));
            maybe_noise(&self.cfg, &mut self.h, input.noise_seed);
            if self.cfg.rescale_acts_by_decoder_norm {
                ops::mul_row_vec(&mut self.h, &s.n);
            }
            self.select_into(&self.h, &mut sel);
        }
        self.sparse = match (&s.device, self.cfg.use_sparse_activations) {
            (Device::Cpu, true) if s.force_path.is_none() => true,
            (Device::Cpu, _) => {
                let (rows, cols) = (s.batch(), self.cfg.d_sae);
                choose_path(s, || sel.nnz(), rows, cols) == StepPath::Sparse
            }
            (_, flag) => flag,
        };
        self.sel = sel;
        self.fs = self.sel.clone();
        if self.cfg.rescale_acts_by_decoder_norm {
            ops::csr_scale_cols(&mut self.fs, &self.inv_n);
        }
        decode_into(&mut s.recon, &self.fs, p.get(W_DEC), 0.0, self.sparse);
        ops::add_row_vec(&mut s.recon, p.get(B_DEC), 1.0);
        self.aux.clear();
        self.d_fs_extra = None;
        s.finish()
    }

    /// SAELens's `calculate_topk_aux_loss` restricted to the latents where
    /// `mask > 0` (all dead latents for TopK; one Matryoshka level's for its per-level
    /// variant), against `residual = x - reconstruction`. Returns the unweighted
    /// `scale * mean ||recons - residual||^2`; its gradient, times `coef`, is kept.
    pub(crate) fn aux_term(
        &mut self,
        p: &Params,
        s: &Shared,
        mask: &Tensor,
        residual: &Tensor,
        coef: f64,
    ) -> f64 {
        let dead = n_dead(Some(mask));
        if dead == 0 {
            return 0.0;
        }
        let b = s.batch();
        let half = self.cfg.d_in / 2;
        let scale = (dead as f64 / half as f64).min(1.0);
        let k_aux = half.min(dead);
        let mut sel = Csr::empty(&s.device);
        ops::topk_rows(&self.h, k_aux, Some(mask), &mut sel);
        let mut scaled = sel.clone();
        if self.cfg.rescale_acts_by_decoder_norm {
            ops::csr_scale_cols(&mut scaled, &self.inv_n);
        }
        let mut recons = Tensor::zeros(&s.device, &[b, self.cfg.d_in]);
        decode_into(&mut recons, &scaled, p.get(W_DEC), 0.0, self.sparse);
        if self.cfg.topk_aux_uses_decoder_bias {
            // SAELens 5 decoded the aux latents with the full decoder.
            ops::add_row_vec(&mut recons, p.get(B_DEC), 1.0);
            crate::common::finish_output(&mut recons, s.norm.as_ref());
        }
        let mut d_pre = Tensor::zeros(&s.device, recons.shape());
        let g = (coef * scale / b as f64) as f32;
        let sq = ops::mse(&recons, residual, None, Some((&mut d_pre, g)));
        if self.cfg.topk_aux_uses_decoder_bias {
            s.out_grad_to_pre(&mut d_pre);
        }
        self.aux.push(AuxTerm { sel, scaled, d_pre });
        scale * sq / b as f64
    }

    /// The TopK auxiliary loss over all dead latents (SAELens's
    /// `auxiliary_reconstruction_loss`).
    pub(crate) fn dead_aux_loss(
        &mut self,
        p: &Params,
        s: &Shared,
        input: &StepInput,
    ) -> Result<f64> {
        let Some(mask) = input.dead_neuron_mask.filter(|m| n_dead(Some(m)) > 0) else {
            return Ok(0.0);
        };
        if !self.cfg.topk_aux_uses_decoder_bias
            && matches!(
                self.cfg.normalize_activations,
                NormalizeActivations::ConstantNormRescale | NormalizeActivations::LayerNorm
            )
        {
            return Err(SaeError::Unsupported(format!(
                "the TopK auxiliary loss does not support normalize_activations '{}' (its \
                 reconstruction would be in normalized space while the residual is not)",
                self.cfg.normalize_activations
            )));
        }
        let mut residual = s.x.clone();
        ops::axpy(&mut residual, -1.0, &s.sae_out);
        let coef = self.cfg.aux_loss_coefficient;
        Ok(coef * self.aux_term(p, s, mask, &residual, coef))
    }

    pub(crate) fn backward_core(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        let dev = s.device.clone();
        let w_dec = p.get(W_DEC);
        let rescale = self.cfg.rescale_acts_by_decoder_norm;
        let m = self.cfg.d_sae;
        let mut d_inv_n = Tensor::zeros(&dev, &[m]);

        // Main decoder.
        ops::col_sums(&s.d_recon, g.get_mut(B_DEC), 1.0, 1.0);
        weight_grad(g.get_mut(W_DEC), &self.fs, &s.d_recon, false, self.sparse);
        let mut d_sel = self.sel.clone();
        *d_sel.values_mut() = grad_at(&self.sel, &s.d_recon, w_dec, self.sparse);
        if let Some(extra) = &self.d_fs_extra {
            ops::axpy(d_sel.values_mut(), 1.0, extra);
        }
        if rescale {
            ops::csr_col_dot(&d_sel, Some(self.sel.values()), &mut d_inv_n, 1.0, 1.0);
            ops::csr_scale_cols(&mut d_sel, &self.inv_n);
        }
        // ReLU on the selected values (selected zeros pass nothing).
        let mut relu_grad = d_sel.values().clone();
        ops::relu_backward(self.sel.values(), d_sel.values(), &mut relu_grad);
        *d_sel.values_mut() = relu_grad;

        // AuxK terms: no ReLU, the raw pre-activations reconstruct.
        let mut d_pats = vec![d_sel];
        for a in &self.aux {
            if self.cfg.topk_aux_uses_decoder_bias {
                ops::col_sums(&a.d_pre, g.get_mut(B_DEC), 1.0, 1.0);
            }
            weight_grad(g.get_mut(W_DEC), &a.scaled, &a.d_pre, false, self.sparse);
            let mut d = a.sel.clone();
            *d.values_mut() = grad_at(&a.sel, &a.d_pre, w_dec, self.sparse);
            if rescale {
                ops::csr_col_dot(&d, Some(a.sel.values()), &mut d_inv_n, 1.0, 1.0);
                ops::csr_scale_cols(&mut d, &self.inv_n);
            }
            d_pats.push(d);
        }

        // Through the rescaling h = h_raw * n (h_raw = h / n at the stored entries),
        // and inv_n = 1/n.
        if rescale {
            for d in d_pats.iter_mut() {
                let mut h_raw = d.clone();
                ops::csr_gather(d, &self.h, h_raw.values_mut());
                ops::csr_scale_cols(&mut h_raw, &self.inv_n);
                ops::csr_col_dot(d, Some(h_raw.values()), &mut s.dn, 1.0, 1.0);
                ops::csr_scale_cols(d, &s.n);
            }
            // d n = -d inv_n / n^2
            let mut c = self.inv_n.clone();
            ops::mul(&mut c, &self.inv_n);
            ops::mul(&mut d_inv_n, &c);
            ops::axpy(&mut s.dn, -1.0, &d_inv_n);
        }

        // Encoder.
        let mut db = Tensor::zeros(&dev, &[m]);
        if self.sparse {
            for d in &d_pats {
                ops::csr_t_matmul(g.get_mut(W_ENC), d, &s.sae_in, true, 1.0, 1.0);
                ops::csr_col_dot(d, None, &mut db, 1.0, 1.0);
            }
        } else {
            let mut dh = Tensor::zeros(&dev, &[s.batch(), m]);
            for d in &d_pats {
                ops::csr_scatter_add(d, &mut dh);
            }
            db = s.linear_backward(&s.sae_in, &dh, g.get_mut(W_ENC));
        }
        ops::axpy(g.get_mut(B_ENC), 1.0, &db);
        if self.cfg.apply_b_dec_to_input {
            s.b_dec_through_encoder(p.get(W_ENC), &db, g.get_mut(B_DEC));
        }
        s.norms_backward(p, g);
    }

    pub(crate) fn encode_inference(&self, p: &Params, sae_in: &Tensor) -> Tensor {
        let dev = sae_in.device();
        let mut h = Tensor::zeros(&dev, &[0, 0]);
        linear_into(&mut h, sae_in, p.get(W_ENC), p.get(B_ENC));
        if self.cfg.rescale_acts_by_decoder_norm {
            let mut n = Tensor::zeros(&dev, &[self.cfg.d_sae]);
            ops::row_norms(p.get(W_DEC), &mut n);
            ops::mul_row_vec(&mut h, &n);
        }
        let mut sel = Csr::empty(&dev);
        self.select_into(&h, &mut sel);
        let mut f = Tensor::zeros(&dev, h.shape());
        ops::csr_to_dense(&sel, &mut f);
        f
    }

    pub(crate) fn decode_inference(&self, p: &Params, acts: &Tensor) -> Tensor {
        let mut a = acts.clone();
        if self.cfg.rescale_acts_by_decoder_norm {
            let mut n = Tensor::zeros(&acts.device(), &[self.cfg.d_sae]);
            ops::row_norms(p.get(W_DEC), &mut n);
            ops::mul_row_vec(&mut a, &reciprocal(&n));
        }
        super::dense_decode(p, &a)
    }

    pub(crate) fn fold(&self, p: &mut Params, n: &Tensor) -> Result<()> {
        if !self.cfg.rescale_acts_by_decoder_norm {
            return Err(SaeError::Unsupported(
                "folding W_dec norms into a TopK SAE without rescale_acts_by_decoder_norm would change which latents are selected".into(),
            ));
        }
        super::fold_norms_into(p, n, &[B_ENC]);
        Ok(())
    }

    pub(crate) fn shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        let (d, m) = (self.cfg.d_in, self.cfg.d_sae);
        vec![
            (W_ENC, vec![d, m]),
            (B_ENC, vec![m]),
            (W_DEC, vec![m, d]),
            (B_DEC, vec![d]),
        ]
    }

    pub(crate) fn hidden(&self) -> &Tensor {
        &self.h
    }

    /// The last step's path.
    pub(crate) fn path(&self) -> super::StepPath {
        match self.sparse {
            true => super::StepPath::Sparse,
            false => super::StepPath::Dense,
        }
    }
}

/// `out = beta*out + a @ w`, sparse or through a dense copy of `a`.
/// ReLU of a selection's values: top-k picks raw pre-activations.
fn relu_values(sel: &mut Csr) {
    let mut v = sel.values().clone();
    ops::relu(sel.values(), &mut v);
    *sel.values_mut() = v;
}

pub(crate) fn decode_into(out: &mut Tensor, a: &Csr, w: &Tensor, beta: f32, sparse: bool) {
    if sparse {
        ops::csr_matmul(out, a, w, 1.0, beta);
    } else {
        let mut dense = Tensor::zeros(&w.device(), &[a.rows(), a.cols()]);
        ops::csr_to_dense(a, &mut dense);
        ops::matmul(out, &dense, false, w, false, 1.0, beta);
    }
}

/// `dw += a^T @ x` (`[m, d]`), or `dw += x^T @ a` (`[d, m]`) when `transposed`.
pub(crate) fn weight_grad(dw: &mut Tensor, a: &Csr, x: &Tensor, transposed: bool, sparse: bool) {
    if sparse {
        ops::csr_t_matmul(dw, a, x, transposed, 1.0, 1.0);
    } else {
        let mut dense = Tensor::zeros(&x.device(), &[a.rows(), a.cols()]);
        ops::csr_to_dense(a, &mut dense);
        if transposed {
            ops::matmul(dw, x, true, &dense, false, 1.0, 1.0);
        } else {
            ops::matmul(dw, &dense, true, x, false, 1.0, 1.0);
        }
    }
}

/// `(d @ w^T)` at the stored positions of `pattern` (`[nnz]`).
pub(crate) fn grad_at(pattern: &Csr, d: &Tensor, w: &Tensor, sparse: bool) -> Tensor {
    let mut out = Tensor::zeros(&d.device(), &[pattern.nnz()]);
    if sparse {
        ops::csr_sampled_dot(pattern, d, w, &mut out);
    } else {
        let mut full = Tensor::zeros(&d.device(), &[d.rows(), w.rows()]);
        ops::matmul(&mut full, d, false, w, true, 1.0, 0.0);
        ops::csr_gather(pattern, &full, &mut out);
    }
    out
}

impl Arch for TopK {
    fn param_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        self.shapes()
    }

    fn encode(&self, p: &Params, sae_in: &Tensor) -> Tensor {
        self.encode_inference(p, sae_in)
    }

    fn decode(&self, p: &Params, acts: &Tensor) -> Tensor {
        self.decode_inference(p, acts)
    }

    fn train_forward(
        &mut self,
        p: &mut Params,
        s: &mut Shared,
        input: &StepInput,
        _b: &mut Buffers,
    ) -> Result<Losses> {
        let mse = self.forward_core(p, s, input);
        let aux = self.dead_aux_loss(p, s, input)?;
        Ok(vec![
            ("mse_loss".into(), mse),
            ("auxiliary_reconstruction_loss".into(), aux),
        ])
    }

    fn train_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        self.backward_core(p, s, g);
    }

    fn acts(&self) -> Acts<'_> {
        Acts::Sparse(&self.sel)
    }

    fn path(&self) -> super::StepPath {
        self.path()
    }

    fn hidden_pre(&self) -> std::borrow::Cow<'_, Tensor> {
        std::borrow::Cow::Borrowed(self.hidden())
    }

    fn fold_w_dec_norm(&self, p: &mut Params, n: &Tensor) -> Result<()> {
        self.fold(p, n)
    }
}
