//! The gated SAE: a gate `sae_in @ W_enc + b_gate > 0` selects latents whose magnitude
//! is `ReLU(sae_in @ (W_enc * exp(r_mag)) + b_mag)`. Training adds an L1 penalty on the
//! ReLU'd gate pre-activations (weighted by decoder norms) and an auxiliary
//! reconstruction from the gate path alone.
//!
//! Sparse path ([`super::choose_path`], on the density of open gates): the main
//! latents, the penalised `ReLU(pi_gate)` and the auxiliary decode all live on the open
//! gates, so they are kept as one CSR pattern and every product after the gate GEMM
//! runs over it. The magnitude pre-activations need no second GEMM there:
//! `sae_in @ (W_enc * e^r) + b_mag = (pi_gate - b_gate) * e^r + b_mag`. When the
//! auxiliary path reads another input (run-time normalisation, reshaping) its gate
//! differs from the main one and the step is dense.

use super::{
    choose_path, linear_counting_into, linear_into, Acts, Arch, Buffers, Losses, StepInput,
    StepPath,
};
use crate::common::Shared;
use crate::{Params, Result};
use kernels::{ops, Csr, Device, Tensor};
use schemas::tensors::{B_DEC, B_GATE, B_MAG, R_MAG, W_DEC, W_ENC};
use schemas::{NormalizeActivations, ReshapeActivations, SaeConfig};

pub(crate) struct Gated {
    cfg: SaeConfig,
    /// `W_enc * exp(r_mag)` `[d_in, d_sae]`.
    w_mag: Tensor,
    /// Gate pre-activations `[B, d_sae]` on the processed input; on the sparse path,
    /// once the open gates are taken, the magnitude pre-activations (the step's one
    /// `[B, d_sae]` buffer).
    pi_gate: Tensor,
    /// Magnitude pre-activations (SAELens's `hidden_pre`) `[B, d_sae]`.
    h_mag: Tensor,
    f: Tensor,
    /// Auxiliary path: the input it sees (`x - b_dec` without run-time normalisation),
    /// its gate pre-activations (when they differ from `pi_gate`), their ReLU, and
    /// the gradient with respect to that ReLU.
    aux_in: Option<Tensor>,
    aux_gate: Option<Tensor>,
    pi_act: Tensor,
    d_pi_act: Tensor,
    d_via: Tensor,
    path: StepPath,
    /// Sparse path: the open gates with `pi_gate` as values (= its ReLU there), the
    /// latents on the same entries, the magnitude pre-activations there `[nnz]`, and
    /// the gradient with respect to `ReLU(pi_gate)` at them (L1, then aux).
    gc: Csr,
    fc: Csr,
    hv: Tensor,
    d_pg: Tensor,
}

impl Gated {
    pub fn new(cfg: &SaeConfig, device: &Device) -> Gated {
        let z = Tensor::zeros(device, &[0, 0]);
        Gated {
            cfg: cfg.clone(),
            w_mag: z.clone(),
            pi_gate: z.clone(),
            h_mag: z.clone(),
            f: z.clone(),
            aux_in: None,
            aux_gate: None,
            pi_act: z.clone(),
            d_pi_act: z.clone(),
            d_via: z,
            path: StepPath::Dense,
            gc: Csr::empty(device),
            fc: Csr::empty(device),
            hv: Tensor::zeros(device, &[0]),
            d_pg: Tensor::zeros(device, &[0]),
        }
    }

    /// The sparse forward from the gate GEMM on: open gates, magnitudes, decode.
    /// `split` has counted the open gates (`pi_gate > 0`) if the path choice needed it.
    fn sparse_forward(&mut self, p: &Params, s: &mut Shared, split: &ops::Split) {
        let dev = s.device.clone();
        let empty = || Tensor::zeros(&dev, &[0, 0]);
        (self.w_mag, self.h_mag, self.f) = (empty(), empty(), empty());
        (self.pi_act, self.d_pi_act) = (empty(), empty());
        split.to_csr(&self.pi_gate, &mut self.gc, None);
        // pi_gate becomes the magnitudes: pi_gate * e^r + (b_mag - b_gate * e^r)
        let mut e = p.get(R_MAG).clone();
        ops::exp(p.get(R_MAG), &mut e);
        let mut b_gate_e = p.get(B_GATE).clone();
        ops::mul(&mut b_gate_e, &e);
        let mut shift = p.get(B_MAG).clone();
        ops::axpy(&mut shift, -1.0, &b_gate_e);
        ops::scale_shift_cols(&mut self.pi_gate, &e, &shift);
        let nnz = self.gc.nnz();
        self.hv = Tensor::zeros(&dev, &[nnz]);
        ops::csr_gather(&self.gc, &self.pi_gate, &mut self.hv);
        self.fc = self.gc.clone();
        ops::relu(&self.hv, self.fc.values_mut());
        ops::csr_matmul(&mut s.recon, &self.fc, p.get(W_DEC), 1.0, 0.0);
    }

    /// The backward pass over the open gates only.
    fn sparse_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        let dev = s.device.clone();
        let (m, nnz) = (self.cfg.d_sae, self.gc.nnz());
        let w_dec = p.get(W_DEC);
        // Main path: decoder, then the magnitudes (the gate is a constant mask).
        ops::col_sums(&s.d_recon, g.get_mut(B_DEC), 1.0, 1.0);
        ops::csr_t_matmul(g.get_mut(W_DEC), &self.fc, &s.d_recon, false, 1.0, 1.0);
        let mut d_f = Tensor::zeros(&dev, &[nnz]);
        ops::csr_sampled_dot(&self.fc, &s.d_recon, w_dec, &mut d_f);
        let mut d_h = self.gc.clone();
        ops::relu_backward(&self.hv, &d_f, d_h.values_mut());
        let mut db_mag = Tensor::zeros(&dev, &[m]);
        ops::csr_col_dot(&d_h, None, &mut db_mag, 1.0, 0.0);
        ops::axpy(g.get_mut(B_MAG), 1.0, &db_mag);
        // d r_j = sum_r d_h * (sae_in @ W_enc * e^r)_j = sum_r d_h * h_mag - b_mag_j db_mag_j
        let mut dr = Tensor::zeros(&dev, &[m]);
        ops::csr_col_dot(&d_h, Some(&self.hv), &mut dr, 1.0, 0.0);
        let mut t = p.get(B_MAG).clone();
        ops::mul(&mut t, &db_mag);
        ops::axpy(&mut dr, -1.0, &t);
        ops::axpy(g.get_mut(R_MAG), 1.0, &dr);

        // Auxiliary path: via = ReLU(pi_gate) @ W_dec + b_dec.
        ops::col_sums(&self.d_via, g.get_mut(B_DEC), 1.0, 1.0);
        ops::csr_t_matmul(g.get_mut(W_DEC), &self.gc, &self.d_via, false, 1.0, 1.0);
        let mut d_aux = Tensor::zeros(&dev, &[nnz]);
        ops::csr_sampled_dot(&self.gc, &self.d_via, w_dec, &mut d_aux);
        ops::axpy(&mut self.d_pg, 1.0, &d_aux);

        // Encoder: W_enc gets sae_in^T (d_h * e^r + d_gate) (every entry has an open
        // gate, so ReLU passes d_pg), b_dec both paths' bias gradients through W_enc.
        let mut e = p.get(R_MAG).clone();
        ops::exp(p.get(R_MAG), &mut e);
        ops::csr_scale_cols(&mut d_h, &e);
        let mut d_gate = self.gc.clone();
        *d_gate.values_mut() = std::mem::replace(&mut self.d_pg, Tensor::zeros(&dev, &[0]));
        let mut db = Tensor::zeros(&dev, &[m]);
        ops::csr_col_dot(&d_gate, None, &mut db, 1.0, 0.0);
        ops::axpy(g.get_mut(B_GATE), 1.0, &db);
        ops::axpy(d_h.values_mut(), 1.0, d_gate.values());
        ops::csr_t_matmul(g.get_mut(W_ENC), &d_h, &s.sae_in, true, 1.0, 1.0);
        if self.cfg.apply_b_dec_to_input {
            ops::mul(&mut db_mag, &e);
            ops::axpy(&mut db, 1.0, &db_mag);
            s.b_dec_through_encoder(p.get(W_ENC), &db, g.get_mut(B_DEC));
        }
        s.norms_backward(p, g);
    }

    fn magnitude_weights(p: &Params) -> Tensor {
        let mut w = p.get(W_ENC).clone();
        let mut e = p.get(R_MAG).clone();
        ops::exp(p.get(R_MAG), &mut e);
        ops::mul_row_vec(&mut w, &e);
        w
    }

    /// The loss terms, given the auxiliary decode `ReLU(pi_gate) @ W_dec` (no bias yet):
    /// aux reconstruction `||via + b_dec - x||^2`, mean over rows; keeps its gradient.
    fn losses(&mut self, p: &Params, s: &Shared, mut via: Tensor, mse: f64, l1: f64) -> Losses {
        let b = s.batch();
        ops::add_row_vec(&mut via, p.get(B_DEC), 1.0);
        self.d_via.resize(via.shape());
        let aux = ops::mse(&via, &s.x, None, Some((&mut self.d_via, 1.0 / b as f32))) / b as f64;
        vec![
            ("mse_loss".into(), mse),
            ("l1_loss".into(), l1),
            ("auxiliary_reconstruction_loss".into(), aux),
        ]
    }

    /// The auxiliary losses read `step_input.sae_in - b_dec` directly, skipping the
    /// run-time normalisation and reshaping that `process_sae_in` applies.
    fn aux_input_differs(&self) -> bool {
        !matches!(
            self.cfg.normalize_activations,
            NormalizeActivations::None | NormalizeActivations::ExpectedAverageOnlyIn
        ) || self.cfg.reshape_activations != ReshapeActivations::None
    }
}

impl Arch for Gated {
    fn param_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        let (d, m) = (self.cfg.d_in, self.cfg.d_sae);
        vec![
            (W_ENC, vec![d, m]),
            (B_GATE, vec![m]),
            (B_MAG, vec![m]),
            (R_MAG, vec![m]),
            (W_DEC, vec![m, d]),
            (B_DEC, vec![d]),
        ]
    }

    fn encode(&self, p: &Params, sae_in: &Tensor) -> Tensor {
        let dev = sae_in.device();
        let mut gate = Tensor::zeros(&dev, &[0, 0]);
        linear_into(&mut gate, sae_in, p.get(W_ENC), p.get(B_GATE));
        let mut h = Tensor::zeros(&dev, &[0, 0]);
        linear_into(&mut h, sae_in, &Self::magnitude_weights(p), p.get(B_MAG));
        let mut f = Tensor::zeros(&dev, h.shape());
        ops::relu(&h, &mut f);
        ops::mask_positive(&mut f, &gate);
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
        let w_enc = p.get(W_ENC);
        linear_counting_into(
            &mut self.pi_gate,
            &s.sae_in,
            w_enc,
            p.get(B_GATE),
            Some(&split),
        );
        self.path = match self.aux_input_differs() {
            true => StepPath::Dense,
            false => choose_path(s, || split.nnz(&self.pi_gate), b, self.cfg.d_sae),
        };
        let c = input.coefficient as f32 / b as f32;
        if self.path == StepPath::Sparse {
            self.sparse_forward(p, s, &split);
            ops::add_row_vec(&mut s.recon, p.get(B_DEC), 1.0);
            let mse = s.finish();
            self.d_pg = Tensor::zeros(&dev, &[self.gc.nnz()]);
            let l1 = ops::csr_lp_sparsity(
                &self.gc,
                Some(&s.n),
                1.0,
                c,
                Some(&mut self.d_pg),
                Some(&mut s.dn),
            );
            let mut via = Tensor::zeros(&dev, &[b, self.cfg.d_in]);
            ops::csr_matmul(&mut via, &self.gc, p.get(W_DEC), 1.0, 0.0);
            return Ok(self.losses(p, s, via, mse, input.coefficient * l1 / b as f64));
        }
        self.gc = Csr::empty(&dev);
        self.fc = Csr::empty(&dev);
        self.w_mag = Self::magnitude_weights(p);
        linear_into(&mut self.h_mag, &s.sae_in, &self.w_mag, p.get(B_MAG));
        self.f.resize(self.h_mag.shape());
        ops::relu(&self.h_mag, &mut self.f);
        ops::mask_positive(&mut self.f, &self.pi_gate);
        ops::matmul(&mut s.recon, &self.f, false, p.get(W_DEC), false, 1.0, 0.0);
        ops::add_row_vec(&mut s.recon, p.get(B_DEC), 1.0);
        let mse = s.finish();

        // Auxiliary path on x - b_dec.
        (self.aux_in, self.aux_gate) = (None, None);
        if self.aux_input_differs() {
            let mut xin = s.x.clone();
            if self.cfg.apply_b_dec_to_input {
                ops::add_row_vec(&mut xin, p.get(B_DEC), -1.0);
            }
            let mut g = Tensor::zeros(&dev, &[0, 0]);
            linear_into(&mut g, &xin, p.get(W_ENC), p.get(B_GATE));
            self.aux_in = Some(xin);
            self.aux_gate = Some(g);
        }
        let gate = self.aux_gate.as_ref().unwrap_or(&self.pi_gate);
        self.pi_act.resize(gate.shape());
        ops::relu(gate, &mut self.pi_act);
        // l1 = coefficient * mean_r sum_j relu(pi_gate) * ||W_dec[j]||
        self.d_pi_act.resize(gate.shape());
        ops::fill(&mut self.d_pi_act, 0.0);
        let l1 = ops::lp_sparsity(
            &self.pi_act,
            Some(&s.n),
            1.0,
            c,
            Some(&mut self.d_pi_act),
            Some(&mut s.dn),
        );
        let l1 = input.coefficient * l1 / b as f64;
        let mut via = Tensor::zeros(&dev, &[b, self.cfg.d_in]);
        ops::matmul(&mut via, &self.pi_act, false, p.get(W_DEC), false, 1.0, 0.0);
        Ok(self.losses(p, s, via, mse, l1))
    }

    fn train_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        if self.path == StepPath::Sparse {
            return self.sparse_backward(p, s, g);
        }
        let dev = s.device.clone();
        // Main path: decoder, then the magnitude encoder (the gate is a constant mask).
        ops::col_sums(&s.d_recon, g.get_mut(B_DEC), 1.0, 1.0);
        ops::matmul(g.get_mut(W_DEC), &self.f, true, &s.d_recon, false, 1.0, 1.0);
        // The auxiliary path's decoder gradient next (the same order of sums into
        // W_dec): then `relu(pi_gate)` is spent, and its buffer takes `d_f`, which the
        // ReLU and the gate mask in place into `d_h`. The forward refills it, so no
        // [B, d_sae] buffer is allocated here (`f` stays: the step's metrics read it).
        ops::matmul(
            g.get_mut(W_DEC),
            &self.pi_act,
            true,
            &self.d_via,
            false,
            1.0,
            1.0,
        );
        let mut d_h = std::mem::replace(&mut self.pi_act, Tensor::zeros(&dev, &[0, 0]));
        ops::matmul(&mut d_h, &s.d_recon, false, p.get(W_DEC), true, 1.0, 0.0);
        ops::mask_positive(&mut d_h, &self.h_mag);
        ops::mask_positive(&mut d_h, &self.pi_gate);
        // d(W_enc * e^r) = sae_in^T @ d_h; W_enc gets it times e^r, r_mag gets the
        // column sums of it times W_enc * e^r.
        let mut d_wmag = Tensor::zeros(&dev, self.w_mag.shape());
        let db_mag = s.linear_backward(&s.sae_in, &d_h, &mut d_wmag);
        self.pi_act = d_h;
        if self.cfg.apply_b_dec_to_input {
            s.b_dec_through_encoder(&self.w_mag, &db_mag, g.get_mut(B_DEC));
        }
        ops::axpy(g.get_mut(B_MAG), 1.0, &db_mag);
        let mut prod = d_wmag.clone();
        ops::mul(&mut prod, &self.w_mag);
        ops::col_sums(&prod, g.get_mut(R_MAG), 1.0, 1.0);
        let mut e = p.get(R_MAG).clone();
        ops::exp(p.get(R_MAG), &mut e);
        ops::mul_row_vec(&mut d_wmag, &e);
        ops::axpy(g.get_mut(W_ENC), 1.0, &d_wmag);

        // Auxiliary path: via = relu(pi_gate) @ W_dec + b_dec.
        ops::col_sums(&self.d_via, g.get_mut(B_DEC), 1.0, 1.0);
        ops::matmul(
            &mut self.d_pi_act,
            &self.d_via,
            false,
            p.get(W_DEC),
            true,
            1.0,
            1.0,
        );
        // ReLU's backward in place (the forward refills `d_pi_act`).
        let gate = self.aux_gate.as_ref().unwrap_or(&self.pi_gate);
        ops::mask_positive(&mut self.d_pi_act, gate);
        let aux_in = self.aux_in.as_ref().unwrap_or(&s.sae_in);
        let d_gate = &self.d_pi_act;
        s.encoder_backward_dense(&self.cfg, p.get(W_ENC), aux_in, d_gate, g, W_ENC, B_GATE);
        s.norms_backward(p, g);
    }

    fn acts(&self) -> Acts<'_> {
        match self.path {
            StepPath::Sparse => Acts::Sparse(&self.fc),
            StepPath::Dense => Acts::Dense(&self.f),
        }
    }

    fn path(&self) -> StepPath {
        self.path
    }

    fn hidden_pre(&self) -> &Tensor {
        match self.path {
            StepPath::Sparse => &self.pi_gate,
            StepPath::Dense => &self.h_mag,
        }
    }

    fn fold_w_dec_norm(&self, p: &mut Params, n: &Tensor) -> Result<()> {
        // r_mag needs no scaling: W_enc's scaling carries over to the magnitude path.
        super::fold_norms_into(p, n, &[B_GATE, B_MAG]);
        Ok(())
    }
}
