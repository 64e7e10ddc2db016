//! The JumpReLU SAE: `f = h * (h > threshold)`, trained through a rectangle-kernel
//! straight-through estimator of width `jumprelu_bandwidth`.
//!
//! SAELens 6 trains `threshold` directly (clamped at 0 before each step) with a sparsity
//! penalty in one of three modes (`step`: DeepMind's L0, `tanh`: Anthropic's, or
//! `quadratic` around `target_l0`), an optional pre-activation loss on dead latents, and
//! optionally passes the estimator to the pre-activations (`jumprelu_ste_to_input`).
//! SAELens 5 trained `log_threshold` with the `step` penalty (`jumprelu_log_threshold`).
//!
//! Like the standard SAE it has a sparse path ([`super::choose_path`], on the density
//! of the entries a gradient can reach): the active latents (`h > t`) and the inactive
//! entries inside the estimator's rectangle are kept as two CSR matrices. The decoder,
//! its weight gradient and the encoder's run over the active ones; the inactive ones
//! need only the latents' gradient (one dot product each), for the threshold's
//! estimator (and for the input's with `jumprelu_ste_to_input`). The pre-activation
//! loss touches every sub-threshold entry of a dead latent, so steps with dead latents
//! and that loss are dense.
//!
//! The dense path runs a row block at a time: the latents and the gradients with
//! respect to them and to `h` are remade per block from `h`, the one full `[B, d_sae]`
//! buffer. Losses whose gradient reaches `h` (the step loss through the estimator, the
//! pre-activation loss) report their value in the forward pass and put their gradient
//! on `h` in the backward pass; the rest of their gradient goes where it went before.

use super::{
    choose_path, linear_into, n_dead, pre_activations, Acts, Arch, Buffers, Losses, StepInput,
    StepPath,
};
use crate::common::{decode_rows, decoder_backward_rows, row_blocks, take_rows, Blocks, Shared};
use crate::{Params, Result};
use kernels::{ops, Csr, Device, Tensor};
use schemas::tensors::{B_DEC, B_ENC, LOG_THRESHOLD, THRESHOLD, W_DEC, W_ENC};
use schemas::{SaeConfig, SparsityLossMode};

pub(crate) struct JumpRelu {
    cfg: SaeConfig,
    h: Tensor,
    /// The threshold used in the last forward pass `[d_sae]`.
    t: Tensor,
    /// The threshold's gradient, begun by the losses in the forward pass.
    d_t: Tensor,
    /// Dense path: its row blocks; the sparsity loss's scale `coefficient / B`; the
    /// step loss's gradient with respect to each row's L0, when it reaches `h`; the
    /// pre-activation loss's scale and dead-latent mask, when it ran.
    blk: Blocks,
    c: f32,
    l0_grad: Option<Vec<f32>>,
    pre_act: Option<(f32, Tensor)>,
    path: StepPath,
    /// Sparse path: the active entries (values `h`, which is the latent there) and the
    /// inactive ones inside the rectangle (values `h`); at each, `[nnz]`, the gradient
    /// the losses put on the latent and on `h` in the forward pass.
    fc: Csr,
    rc: Csr,
    df_a: Tensor,
    df_r: Tensor,
    dh_a: Tensor,
    dh_r: Tensor,
}

impl JumpRelu {
    pub fn new(cfg: &SaeConfig, device: &Device) -> JumpRelu {
        let z = Tensor::zeros(device, &[0, 0]);
        JumpRelu {
            cfg: cfg.clone(),
            h: z,
            t: Tensor::zeros(device, &[0]),
            d_t: Tensor::zeros(device, &[0]),
            blk: Blocks::new(device),
            c: 0.0,
            l0_grad: None,
            pre_act: None,
            path: StepPath::Dense,
            fc: Csr::empty(device),
            rc: Csr::empty(device),
            df_a: Tensor::zeros(device, &[0]),
            df_r: Tensor::zeros(device, &[0]),
            dh_a: Tensor::zeros(device, &[0]),
            dh_r: Tensor::zeros(device, &[0]),
        }
    }

    /// The backward pass over the two sparse sets only.
    fn sparse_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        let dev = s.device.clone();
        let (bw, ste_in) = (
            self.cfg.jumprelu_bandwidth as f32,
            self.cfg.jumprelu_ste_to_input,
        );
        let w_dec = p.get(W_DEC);
        ops::col_sums(&s.d_recon, g.get_mut(B_DEC), 1.0, 1.0);
        ops::csr_t_matmul(g.get_mut(W_DEC), &self.fc, &s.d_recon, false, 1.0, 1.0);
        let mut d_t = std::mem::replace(&mut self.d_t, Tensor::zeros(&dev, &[0]));
        let mut d_h = Vec::with_capacity(2);
        for (a, df, dh) in [
            (&self.fc, &mut self.df_a, &mut self.dh_a),
            (&self.rc, &mut self.df_r, &mut self.dh_r),
        ] {
            let mut d_f = Tensor::zeros(&dev, &[a.nnz()]);
            ops::csr_sampled_dot(a, &s.d_recon, w_dec, &mut d_f);
            ops::axpy(&mut d_f, 1.0, df);
            ops::csr_jumprelu_backward(a, &self.t, &d_f, bw, ste_in, dh, &mut d_t);
            d_h.push(std::mem::replace(dh, Tensor::zeros(&dev, &[0])));
        }
        self.d_t = d_t;
        // Inactive entries pass nothing to h unless the estimator goes to the input.
        let sets = match ste_in {
            true => 2,
            false => 1,
        };
        let mut db = Tensor::zeros(&dev, &[self.cfg.d_sae]);
        for (a, dh) in [&mut self.fc, &mut self.rc].into_iter().zip(d_h).take(sets) {
            let h = std::mem::replace(a.values_mut(), dh);
            ops::csr_t_matmul(g.get_mut(W_ENC), a, &s.sae_in, true, 1.0, 1.0);
            ops::csr_col_dot(a, None, &mut db, 1.0, 1.0);
            *a.values_mut() = h;
        }
        ops::axpy(g.get_mut(B_ENC), 1.0, &db);
        if self.cfg.apply_b_dec_to_input {
            s.b_dec_through_encoder(p.get(W_ENC), &db, g.get_mut(B_DEC));
        }
    }

    /// The dense backward, a row block at a time: per block `a` holds `h`, `b` the
    /// latents (then `d_h` when a loss adds to it), `c` their gradient (else `d_h`).
    fn dense_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        let dev = s.device.clone();
        let m = self.cfg.d_sae;
        let (bw, ste_in) = (
            self.cfg.jumprelu_bandwidth as f32,
            self.cfg.jumprelu_ste_to_input,
        );
        let (tanh, scale) = (self.tanh_mode(), self.cfg.jumprelu_tanh_scale as f32);
        // The forward pass gave these losses' gradients to the threshold and `dn`.
        let (mut no_dt, mut no_dn) = (Tensor::zeros(&dev, &[m]), Tensor::zeros(&dev, &[m]));
        ops::col_sums(&s.d_recon, g.get_mut(B_DEC), 1.0, 1.0);
        let mut db = Tensor::zeros(&dev, &[m]);
        let (t, k) = (&self.t, &mut self.blk);
        for (start, rows) in row_blocks(s.batch()) {
            take_rows(&self.h, start, rows, &mut k.a);
            k.b.resize(k.a.shape());
            ops::jumprelu(&k.a, t, &mut k.b);
            let (w, gw) = (p.get(W_DEC), g.get_mut(W_DEC));
            decoder_backward_rows(&s.d_recon, w, &k.b, start, gw, &mut k.c, &mut k.r);
            if tanh {
                ops::tanh_sparsity(&k.b, &s.n, scale, self.c, &mut k.c, &mut no_dn);
            }
            let d_h = if self.l0_grad.is_some() || self.pre_act.is_some() {
                ops::fill(&mut k.b, 0.0);
                if let Some(l0_grad) = &self.l0_grad {
                    let gr = crate::common::vector(&dev, l0_grad[start..start + rows].to_vec());
                    ops::step_backward(&k.a, t, &gr, bw, true, &mut k.b, &mut self.d_t);
                }
                if let Some((cp, dead)) = &self.pre_act {
                    let (dt, dn) = (&mut no_dt, &mut no_dn);
                    ops::pre_act_loss(&k.a, t, dead, &s.n, *cp, &mut k.b, dt, dn);
                }
                ops::jumprelu_backward(&k.a, t, &k.c, bw, ste_in, &mut k.b, &mut self.d_t);
                &k.b
            } else {
                ops::jumprelu_backward_in_place(&k.a, t, &mut k.c, bw, ste_in, &mut self.d_t);
                &k.c
            };
            let gw = g.get_mut(W_ENC);
            s.encoder_backward_rows(&s.sae_in, d_h, start, gw, &mut db, &mut k.x);
        }
        s.encoder_bias_backward(&self.cfg, p.get(W_ENC), &db, g, B_ENC);
    }

    /// Whether the sparsity loss is the tanh penalty.
    fn tanh_mode(&self) -> bool {
        self.cfg.jumprelu_sparsity_loss_mode == SparsityLossMode::Tanh
    }

    fn threshold(&self, p: &Params) -> Tensor {
        if self.cfg.jumprelu_log_threshold {
            let lt = p.get(LOG_THRESHOLD);
            let mut t = lt.clone();
            ops::exp(lt, &mut t);
            t
        } else {
            p.get(THRESHOLD).clone()
        }
    }
}

impl Arch for JumpRelu {
    fn param_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        let (d, m) = (self.cfg.d_in, self.cfg.d_sae);
        vec![
            (W_ENC, vec![d, m]),
            (B_ENC, vec![m]),
            (W_DEC, vec![m, d]),
            (B_DEC, vec![d]),
            (THRESHOLD, vec![m]),
        ]
    }

    /// SAELens's inference JumpReLU: `ReLU(h) * (h > threshold)`.
    fn encode(&self, p: &Params, sae_in: &Tensor) -> Tensor {
        let mut h = Tensor::zeros(&sae_in.device(), &[0, 0]);
        linear_into(&mut h, sae_in, p.get(W_ENC), p.get(B_ENC));
        relu_masked_by(&h, &self.threshold(p))
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
        let m = self.cfg.d_sae;
        if !self.cfg.jumprelu_log_threshold {
            // SAELens 6 projects the threshold onto >= 0 before every forward pass.
            let t = p.get_mut(THRESHOLD);
            let v: Vec<f32> = t.to_vec().iter().map(|x| x.max(0.0)).collect();
            *t = Tensor::from_vec(&dev, &[m], v)?;
        }
        self.t = self.threshold(p);
        let bw = self.cfg.jumprelu_bandwidth as f32;
        // The cuts read the threshold on the host: only the CPU has a sparse path.
        let split = (dev == Device::Cpu).then(|| ops::Split::jumprelu(&self.t, bw));
        let (w, bias) = (p.get(W_ENC), p.get(B_ENC));
        pre_activations(
            &self.cfg,
            &mut self.h,
            &s.sae_in,
            (w, bias),
            input.noise_seed,
            split.as_ref(),
        );
        let pre_act_dense =
            self.cfg.pre_act_loss_coefficient.is_some() && n_dead(input.dead_neuron_mask) > 0;
        self.path = match (pre_act_dense, &split) {
            (false, Some(split)) => choose_path(s, || split.nnz(&self.h), b, m),
            _ => StepPath::Dense,
        };
        let sparse = self.path == StepPath::Sparse;
        let coef = input.coefficient;
        let c = (coef / b as f64) as f32;
        self.c = c;
        let scale = self.cfg.jumprelu_tanh_scale as f32;
        // The tanh loss's sum over the dense blocks (its gradient waits for the backward).
        let mut tanh_sum = 0.0;
        (self.l0_grad, self.pre_act) = (None, None);
        if sparse {
            self.blk.free();
            let split = split.expect("the sparse path runs on the CPU");
            split.to_csr(&self.h, &mut self.fc, Some(&mut self.rc));
            ops::csr_matmul(&mut s.recon, &self.fc, p.get(W_DEC), 1.0, 0.0);
            let (na, nr) = (self.fc.nnz(), self.rc.nnz());
            (self.df_a, self.dh_a) = (Tensor::zeros(&dev, &[na]), Tensor::zeros(&dev, &[na]));
            (self.df_r, self.dh_r) = (Tensor::zeros(&dev, &[nr]), Tensor::zeros(&dev, &[nr]));
        } else {
            (self.fc, self.rc) = (Csr::empty(&dev), Csr::empty(&dev));
            let tanh = self.tanh_mode();
            let k = &mut self.blk;
            for (start, rows) in row_blocks(b) {
                k.b.resize(&[rows, m]);
                ops::jumprelu_rows(&self.h, start, &self.t, &mut k.b);
                if tanh {
                    // The loss's value and `dn` now, `d_f` (here thrown away) per block
                    // in the backward.
                    k.c.resize(&[rows, m]);
                    tanh_sum += ops::tanh_sparsity(&k.b, &s.n, scale, c, &mut k.c, &mut s.dn);
                }
                decode_rows(&mut s.recon, p.get(W_DEC), &k.b, start, &mut k.r);
            }
        }
        ops::add_row_vec(&mut s.recon, p.get(B_DEC), 1.0);
        let mse = s.finish();

        self.d_t = Tensor::zeros(&dev, &[m]);
        let ste_in = self.cfg.jumprelu_ste_to_input;
        let l0_loss = match self.cfg.jumprelu_sparsity_loss_mode {
            SparsityLossMode::Step | SparsityLossMode::Quadratic => {
                let mut l0 = Tensor::zeros(&dev, &[b]);
                match sparse {
                    true => ops::csr_row_nonzero_counts(&self.fc, &mut l0),
                    false => ops::step_count_rows(&self.h, &self.t, &mut l0),
                }
                let l0v = l0.to_vec();
                // per-row loss and its derivative with respect to the row's L0
                let (per_row, grad): (Vec<f64>, Vec<f32>) =
                    match (self.cfg.jumprelu_sparsity_loss_mode, self.cfg.target_l0) {
                        (SparsityLossMode::Quadratic, Some(target)) => l0v
                            .iter()
                            .map(|&l| {
                                let d = l as f64 - target;
                                (2.0 / target * d * d, (c as f64 * 4.0 / target * d) as f32)
                            })
                            .unzip(),
                        _ => l0v.iter().map(|&l| (l as f64, c)).unzip(),
                    };
                if sparse {
                    let g = crate::common::vector(&dev, grad);
                    for (a, dh) in [(&self.fc, &mut self.dh_a), (&self.rc, &mut self.dh_r)] {
                        ops::csr_step_backward(a, &self.t, &g, bw, ste_in, dh, &mut self.d_t);
                    }
                } else if ste_in {
                    // Reaches `h`: the backward's blocks take it, threshold and all.
                    self.l0_grad = Some(grad);
                } else {
                    let g = crate::common::vector(&dev, grad);
                    ops::step_backward_threshold(&self.h, &self.t, &g, bw, &mut self.d_t);
                }
                coef * per_row.iter().sum::<f64>() / b as f64
            }
            SparsityLossMode::Tanh => {
                let sum = if sparse {
                    // Inactive entries (latent 0) add nothing to the sum or to dn, and
                    // c s n_j to their latent's gradient.
                    ops::csr_col_expand(&self.rc, &s.n, &mut self.df_r);
                    ops::scale(&mut self.df_r, c * scale);
                    ops::csr_tanh_sparsity(&self.fc, &s.n, scale, c, &mut self.df_a, &mut s.dn)
                } else {
                    tanh_sum
                };
                coef * sum / b as f64
            }
        };
        let mut losses = vec![
            ("mse_loss".to_string(), mse),
            ("l0_loss".to_string(), l0_loss),
        ];
        if let Some(pa) = self.cfg.pre_act_loss_coefficient {
            let dead = input
                .dead_neuron_mask
                .filter(|_| n_dead(input.dead_neuron_mask) > 0);
            let v = match dead {
                Some(dead) => {
                    // The value and the gradients to the threshold and `dn` now, to `h`
                    // per block in the backward (a dense step: see `pre_act_dense`).
                    let cp = (pa / b as f64) as f32;
                    let k = &mut self.blk;
                    let mut sum = 0.0;
                    for (start, rows) in row_blocks(b) {
                        take_rows(&self.h, start, rows, &mut k.a);
                        k.c.resize(k.a.shape());
                        let (t, n) = (&self.t, &s.n);
                        let (dt, dn) = (&mut self.d_t, &mut s.dn);
                        sum += ops::pre_act_loss(&k.a, t, dead, n, cp, &mut k.c, dt, dn);
                    }
                    self.pre_act = Some((cp, dead.clone()));
                    pa * sum / b as f64
                }
                None => 0.0,
            };
            losses.push(("pre_act_loss".to_string(), v));
        }
        Ok(losses)
    }

    fn train_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        if self.path == StepPath::Sparse {
            self.sparse_backward(p, s, g);
        } else {
            self.dense_backward(p, s, g);
        }
        s.norms_backward(p, g);
        if self.cfg.jumprelu_log_threshold {
            // d/d log t = t * d/dt
            let mut dlt = self.d_t.clone();
            ops::mul(&mut dlt, &self.t);
            ops::axpy(g.get_mut(LOG_THRESHOLD), 1.0, &dlt);
        } else {
            ops::axpy(g.get_mut(THRESHOLD), 1.0, &self.d_t);
        }
    }

    fn acts(&self) -> Acts<'_> {
        match self.path {
            StepPath::Sparse => Acts::Sparse(&self.fc),
            // The threshold is >= 0 (clamped, or an exponential).
            StepPath::Dense => Acts::Above {
                pre: &self.h,
                cut: &self.t,
                tanh: false,
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
        let name = if self.cfg.jumprelu_log_threshold {
            LOG_THRESHOLD
        } else {
            THRESHOLD
        };
        if self.cfg.jumprelu_log_threshold {
            // log(t * n) = log t + log n
            let logn: Vec<f32> = n.to_vec().iter().map(|v| v.ln()).collect();
            ops::axpy(
                p.get_mut(name),
                1.0,
                &crate::common::vector(&n.device(), logn),
            );
        } else {
            ops::mul(p.get_mut(name), n);
        }
        Ok(())
    }
}

/// `ReLU(h) * (h > t)` for thresholds of any sign.
fn relu_masked_by(h: &Tensor, t: &Tensor) -> Tensor {
    let mut f = Tensor::zeros(&h.device(), h.shape());
    ops::relu(h, &mut f);
    // the gate is open where h - t > 0
    let mut gate = h.clone();
    ops::add_row_vec(&mut gate, t, -1.0);
    ops::mask_positive(&mut f, &gate);
    f
}
