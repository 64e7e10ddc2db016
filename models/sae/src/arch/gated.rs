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
//!
//! The dense path uses the same identity for the magnitudes, and runs a row block at a
//! time: every `[B, d_sae]` matrix but `pi_gate` (the latents, the auxiliary gate and
//! its ReLU, their gradients) is made per block and not kept.

use super::{
    choose_path, linear_counting_into, linear_into, Acts, Arch, Buffers, LatentRows, Losses,
    StepInput, StepPath,
};
use crate::common::{decode_rows, decoder_backward_rows, row_blocks, take_rows, Blocks, Shared};
use crate::{Params, Result};
use kernels::{ops, Csr, Device, Tensor};
use schemas::tensors::{B_DEC, B_GATE, B_MAG, R_MAG, W_DEC, W_ENC};
use schemas::{NormalizeActivations, ReshapeActivations, SaeConfig};

pub(crate) struct Gated {
    cfg: SaeConfig,
    /// Gate pre-activations `[B, d_sae]` on the processed input; on the sparse path,
    /// once the open gates are taken, the magnitude pre-activations (the step's one
    /// `[B, d_sae]` buffer).
    pi_gate: Tensor,
    /// `exp(r_mag)` and `b_mag - b_gate * exp(r_mag)`: the magnitudes are
    /// `pi_gate * e + shift` `[d_sae]`.
    e: Tensor,
    shift: Tensor,
    /// Zeros `[d_sae]`: the cut of the penalised `ReLU(pi_gate)`.
    zero: Tensor,
    /// Dense path: its row blocks, the L1 scale `coefficient / B`, and the auxiliary
    /// path's input when it is not `sae_in` (`x - b_dec` without run-time
    /// normalisation) `[B, d_in]`.
    blk: Blocks,
    c: f32,
    aux_in: Option<Tensor>,
    /// The gradient with respect to the auxiliary decode `[B, d_in]`.
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
            pi_gate: z.clone(),
            e: Tensor::zeros(device, &[0]),
            shift: Tensor::zeros(device, &[0]),
            zero: Tensor::zeros(device, &[cfg.d_sae]),
            blk: Blocks::new(device),
            c: 0.0,
            aux_in: None,
            d_via: z,
            path: StepPath::Dense,
            gc: Csr::empty(device),
            fc: Csr::empty(device),
            hv: Tensor::zeros(device, &[0]),
            d_pg: Tensor::zeros(device, &[0]),
        }
    }

    /// `e = exp(r_mag)` and `shift = b_mag - b_gate * e`, so that the magnitudes are
    /// `pi_gate * e + shift`.
    fn magnitude_map(&mut self, p: &Params) {
        self.e = p.get(R_MAG).clone();
        ops::exp(p.get(R_MAG), &mut self.e);
        let mut b_gate_e = p.get(B_GATE).clone();
        ops::mul(&mut b_gate_e, &self.e);
        self.shift = p.get(B_MAG).clone();
        ops::axpy(&mut self.shift, -1.0, &b_gate_e);
    }

    /// The latents of rows `start..start + rows` into `f`.
    fn latents_rows(&self, start: usize, rows: usize, f: &mut Tensor) {
        f.resize(&[rows, self.cfg.d_sae]);
        ops::gated_latents_rows(&self.pi_gate, start, &self.e, &self.shift, f);
    }

    /// The penalised `ReLU` of the auxiliary path's gate pre-activations for rows
    /// `start..start + rows` into `f`: those of `pi_gate` unless it reads another
    /// input (then `h` and `x` are scratch).
    fn aux_relu_rows(
        &self,
        p: &Params,
        (start, rows): (usize, usize),
        f: &mut Tensor,
        h: &mut Tensor,
        x: &mut Tensor,
    ) {
        f.resize(&[rows, self.cfg.d_sae]);
        match &self.aux_in {
            None => ops::jumprelu_rows(&self.pi_gate, start, &self.zero, f),
            Some(xin) => {
                take_rows(xin, start, rows, x);
                linear_into(h, x, p.get(W_ENC), p.get(B_GATE));
                ops::relu(h, f);
            }
        }
    }

    /// The dense forward from the gate GEMM on, a row block at a time: the decode, the
    /// L1 penalty's value and the auxiliary decode (without `b_dec`), returned.
    fn dense_forward(&mut self, p: &Params, s: &mut Shared) -> (f64, Tensor) {
        let dev = s.device.clone();
        let b = s.batch();
        self.aux_in = None;
        if self.aux_input_differs() {
            let mut xin = s.x.clone();
            if self.cfg.apply_b_dec_to_input {
                ops::add_row_vec(&mut xin, p.get(B_DEC), -1.0);
            }
            self.aux_in = Some(xin);
        }
        let mut via = Tensor::zeros(&dev, &[b, self.cfg.d_in]);
        let mut l1 = 0.0;
        let mut k = std::mem::replace(&mut self.blk, Blocks::new(&dev));
        for (start, rows) in row_blocks(b) {
            self.latents_rows(start, rows, &mut k.c);
            decode_rows(&mut s.recon, p.get(W_DEC), &k.c, start, &mut k.r);
            // l1 = coefficient * mean_r sum_j relu(pi_gate) * ||W_dec[j]||
            self.aux_relu_rows(p, (start, rows), &mut k.b, &mut k.a, &mut k.x);
            l1 += ops::lp_sparsity(&k.b, Some(&s.n), 1.0, self.c, None, None);
            decode_rows(&mut via, p.get(W_DEC), &k.b, start, &mut k.r);
        }
        self.blk = k;
        (l1, via)
    }

    /// The dense backward, a row block at a time. Per block `c` holds the latents
    /// (then the auxiliary gate's gradient), `a` their gradient (then the magnitudes',
    /// times `e^r`), `b` the penalised `ReLU(gate)`.
    fn dense_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        let dev = s.device.clone();
        let m = self.cfg.d_sae;
        let w_dec = p.get(W_DEC);
        ops::col_sums(&s.d_recon, g.get_mut(B_DEC), 1.0, 1.0);
        ops::col_sums(&self.d_via, g.get_mut(B_DEC), 1.0, 1.0);
        let (mut db_mag, mut db_gate, mut dr) = (
            Tensor::zeros(&dev, &[m]),
            Tensor::zeros(&dev, &[m]),
            Tensor::zeros(&dev, &[m]),
        );
        let mut k = std::mem::replace(&mut self.blk, Blocks::new(&dev));
        for (start, rows) in row_blocks(s.batch()) {
            // Main path: the decoder, then the magnitudes (the gate is a constant mask).
            self.latents_rows(start, rows, &mut k.c);
            let gw = g.get_mut(W_DEC);
            decoder_backward_rows(&s.d_recon, w_dec, &k.c, start, gw, &mut k.a, &mut k.r);
            // The latents are positive exactly where the gate is open and the
            // magnitude positive, and equal the magnitude there.
            ops::mask_positive(&mut k.a, &k.c);
            ops::col_sums(&k.a, &mut db_mag, 1.0, 1.0);
            // d r_j = sum_r d_h * (sae_in @ W_enc * e^r)_j = sum_r d_h * h_mag - b_mag_j db_mag_j
            ops::mul(&mut k.c, &k.a);
            ops::col_sums(&k.c, &mut dr, 1.0, 1.0);
            ops::mul_row_vec(&mut k.a, &self.e);

            // Auxiliary path: via = ReLU(gate) @ W_dec + b_dec, and the L1 penalty on
            // ReLU(gate).
            self.aux_relu_rows(p, (start, rows), &mut k.b, &mut k.c, &mut k.x);
            let gw = g.get_mut(W_DEC);
            decoder_backward_rows(&self.d_via, w_dec, &k.b, start, gw, &mut k.c, &mut k.r);
            let dn = Some(&mut s.dn);
            ops::lp_sparsity(&k.b, Some(&s.n), 1.0, self.c, Some(&mut k.c), dn);
            // ReLU's backward: `b` is positive exactly where the gate is.
            ops::mask_positive(&mut k.c, &k.b);
            ops::col_sums(&k.c, &mut db_gate, 1.0, 1.0);

            // Encoder: W_enc gets sae_in^T (d_h * e^r) and aux_in^T d_gate, one product
            // when the two inputs are the same.
            let gw = g.get_mut(W_ENC);
            take_rows(&s.sae_in, start, rows, &mut k.x);
            match &self.aux_in {
                None => {
                    ops::axpy(&mut k.a, 1.0, &k.c);
                    ops::matmul(gw, &k.x, true, &k.a, false, 1.0, 1.0);
                }
                Some(xin) => {
                    ops::matmul(gw, &k.x, true, &k.a, false, 1.0, 1.0);
                    take_rows(xin, start, rows, &mut k.x);
                    ops::matmul(gw, &k.x, true, &k.c, false, 1.0, 1.0);
                }
            }
        }
        self.blk = k;
        ops::axpy(g.get_mut(B_MAG), 1.0, &db_mag);
        let mut t = p.get(B_MAG).clone();
        ops::mul(&mut t, &db_mag);
        ops::axpy(&mut dr, -1.0, &t);
        ops::axpy(g.get_mut(R_MAG), 1.0, &dr);
        ops::axpy(g.get_mut(B_GATE), 1.0, &db_gate);
        if self.cfg.apply_b_dec_to_input {
            // Both encoders read `... - b_dec`: the magnitude one through W_enc * e^r.
            ops::mul(&mut db_mag, &self.e);
            ops::axpy(&mut db_gate, 1.0, &db_mag);
            s.b_dec_through_encoder(p.get(W_ENC), &db_gate, g.get_mut(B_DEC));
        }
        s.norms_backward(p, g);
    }
    /// The sparse forward from the gate GEMM on: open gates, magnitudes, decode.
    /// `split` has counted the open gates (`pi_gate > 0`) if the path choice needed it.
    fn sparse_forward(&mut self, p: &Params, s: &mut Shared, split: &ops::Split) {
        let dev = s.device.clone();
        self.blk.free();
        split.to_csr(&self.pi_gate, &mut self.gc, None);
        // pi_gate becomes the magnitudes: pi_gate * e^r + (b_mag - b_gate * e^r)
        ops::scale_shift_cols(&mut self.pi_gate, &self.e, &self.shift);
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
        let e = &self.e;
        ops::csr_scale_cols(&mut d_h, e);
        let mut d_gate = self.gc.clone();
        *d_gate.values_mut() = std::mem::replace(&mut self.d_pg, Tensor::zeros(&dev, &[0]));
        let mut db = Tensor::zeros(&dev, &[m]);
        ops::csr_col_dot(&d_gate, None, &mut db, 1.0, 0.0);
        ops::axpy(g.get_mut(B_GATE), 1.0, &db);
        ops::axpy(d_h.values_mut(), 1.0, d_gate.values());
        ops::csr_t_matmul(g.get_mut(W_ENC), &d_h, &s.sae_in, true, 1.0, 1.0);
        if self.cfg.apply_b_dec_to_input {
            ops::mul(&mut db_mag, e);
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
        self.c = c;
        self.magnitude_map(p);
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
        let (l1, via) = self.dense_forward(p, s);
        ops::add_row_vec(&mut s.recon, p.get(B_DEC), 1.0);
        let mse = s.finish();
        Ok(self.losses(p, s, via, mse, input.coefficient * l1 / b as f64))
    }

    fn train_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        if self.path == StepPath::Sparse {
            return self.sparse_backward(p, s, g);
        }
        self.dense_backward(p, s, g);
    }

    fn acts(&self) -> Acts<'_> {
        match self.path {
            StepPath::Sparse => Acts::Sparse(&self.fc),
            StepPath::Dense => Acts::Rows(self),
        }
    }

    fn path(&self) -> StepPath {
        self.path
    }

    fn hidden_pre(&self) -> std::borrow::Cow<'_, Tensor> {
        match self.path {
            StepPath::Sparse => std::borrow::Cow::Borrowed(&self.pi_gate),
            StepPath::Dense => {
                let mut h = self.pi_gate.clone();
                ops::scale_shift_cols(&mut h, &self.e, &self.shift);
                std::borrow::Cow::Owned(h)
            }
        }
    }

    fn fold_w_dec_norm(&self, p: &mut Params, n: &Tensor) -> Result<()> {
        // r_mag needs no scaling: W_enc's scaling carries over to the magnitude path.
        super::fold_norms_into(p, n, &[B_GATE, B_MAG]);
        Ok(())
    }
}

impl LatentRows for Gated {
    fn device(&self) -> Device {
        self.pi_gate.device()
    }

    fn shape(&self) -> (usize, usize) {
        (self.pi_gate.rows(), self.pi_gate.cols())
    }

    fn latents(&self, start: usize, out: &mut Tensor) {
        self.latents_rows(start, out.rows(), out);
    }
}
