//! The gated SAE: a gate `sae_in @ W_enc + b_gate > 0` selects latents whose magnitude
//! is `ReLU(sae_in @ (W_enc * exp(r_mag)) + b_mag)`. Training adds an L1 penalty on the
//! ReLU'd gate pre-activations (weighted by decoder norms) and an auxiliary
//! reconstruction from the gate path alone.

use super::{linear_into, Acts, Arch, Buffers, Losses, StepInput};
use crate::common::Shared;
use crate::{Params, Result};
use kernels::{ops, Device, Tensor};
use schemas::tensors::{B_DEC, B_GATE, B_MAG, R_MAG, W_DEC, W_ENC};
use schemas::{NormalizeActivations, ReshapeActivations, SaeConfig};

pub(crate) struct Gated {
    cfg: SaeConfig,
    /// `W_enc * exp(r_mag)` `[d_in, d_sae]`.
    w_mag: Tensor,
    /// Gate pre-activations `[B, d_sae]` on the processed input.
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
        }
    }

    fn magnitude_weights(p: &Params) -> Tensor {
        let mut w = p.get(W_ENC).clone();
        let mut e = p.get(R_MAG).clone();
        ops::exp(p.get(R_MAG), &mut e);
        ops::mul_row_vec(&mut w, &e);
        w
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
        self.w_mag = Self::magnitude_weights(p);
        linear_into(&mut self.pi_gate, &s.sae_in, p.get(W_ENC), p.get(B_GATE));
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
        let c = input.coefficient as f32 / b as f32;
        let l1 = ops::lp_sparsity(
            &self.pi_act,
            Some(&s.n),
            1.0,
            c,
            Some(&mut self.d_pi_act),
            Some(&mut s.dn),
        );
        let l1 = input.coefficient * l1 / b as f64;
        // aux reconstruction: ||relu(pi_gate) @ W_dec + b_dec - x||^2, mean over rows
        let mut via = Tensor::zeros(&dev, &[b, self.cfg.d_in]);
        ops::matmul(&mut via, &self.pi_act, false, p.get(W_DEC), false, 1.0, 0.0);
        ops::add_row_vec(&mut via, p.get(B_DEC), 1.0);
        self.d_via.resize(via.shape());
        let aux = ops::mse(&via, &s.x, None, Some((&mut self.d_via, 1.0 / b as f32))) / b as f64;
        Ok(vec![
            ("mse_loss".into(), mse),
            ("l1_loss".into(), l1),
            ("auxiliary_reconstruction_loss".into(), aux),
        ])
    }

    fn train_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        let dev = s.device.clone();
        // Main path: decoder, then the magnitude encoder (the gate is a constant mask).
        let mut d_f = Tensor::zeros(&dev, self.f.shape());
        s.decoder_backward_dense(p, &self.f, g, &mut d_f, false);
        let mut d_h = Tensor::zeros(&dev, self.h_mag.shape());
        ops::relu_backward(&self.h_mag, &d_f, &mut d_h);
        ops::mask_positive(&mut d_h, &self.pi_gate);
        // d(W_enc * e^r) = sae_in^T @ d_h; W_enc gets it times e^r, r_mag gets the
        // column sums of it times W_enc * e^r.
        let mut d_wmag = Tensor::zeros(&dev, self.w_mag.shape());
        let db_mag = s.linear_backward(&s.sae_in, &d_h, &mut d_wmag);
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
            g.get_mut(W_DEC),
            &self.pi_act,
            true,
            &self.d_via,
            false,
            1.0,
            1.0,
        );
        ops::matmul(
            &mut self.d_pi_act,
            &self.d_via,
            false,
            p.get(W_DEC),
            true,
            1.0,
            1.0,
        );
        let gate = self.aux_gate.as_ref().unwrap_or(&self.pi_gate);
        let mut d_gate = Tensor::zeros(&dev, gate.shape());
        ops::relu_backward(gate, &self.d_pi_act, &mut d_gate);
        let aux_in = self.aux_in.as_ref().unwrap_or(&s.sae_in);
        s.encoder_backward_dense(&self.cfg, p.get(W_ENC), aux_in, &d_gate, g, W_ENC, B_GATE);
        s.norms_backward(p, g);
    }

    fn acts(&self) -> Acts<'_> {
        Acts::Dense(&self.f)
    }

    fn hidden_pre(&self) -> &Tensor {
        &self.h_mag
    }

    fn fold_w_dec_norm(&self, p: &mut Params, n: &Tensor) -> Result<()> {
        // r_mag needs no scaling: W_enc's scaling carries over to the magnitude path.
        super::fold_norms_into(p, n, &[B_GATE, B_MAG]);
        Ok(())
    }
}
