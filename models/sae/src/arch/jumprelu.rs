//! The JumpReLU SAE: `f = h * (h > threshold)`, trained through a rectangle-kernel
//! straight-through estimator of width `jumprelu_bandwidth`.
//!
//! SAELens 6 trains `threshold` directly (clamped at 0 before each step) with a sparsity
//! penalty in one of three modes (`step`: DeepMind's L0, `tanh`: Anthropic's, or
//! `quadratic` around `target_l0`), an optional pre-activation loss on dead latents, and
//! optionally passes the estimator to the pre-activations (`jumprelu_ste_to_input`).
//! SAELens 5 trained `log_threshold` with the `step` penalty (`jumprelu_log_threshold`).

use super::{linear_into, maybe_noise, n_dead, Acts, Arch, Buffers, Losses, StepInput};
use crate::common::Shared;
use crate::{Params, Result};
use kernels::{ops, Device, Tensor};
use schemas::tensors::{B_DEC, B_ENC, LOG_THRESHOLD, THRESHOLD, W_DEC, W_ENC};
use schemas::{SaeConfig, SparsityLossMode};

pub(crate) struct JumpRelu {
    cfg: SaeConfig,
    h: Tensor,
    f: Tensor,
    /// The threshold used in the last forward pass `[d_sae]`.
    t: Tensor,
    /// Gradients accumulated during the forward pass by the sparsity and
    /// pre-activation losses: into `f`, `h` and the threshold.
    d_f: Tensor,
    d_h: Tensor,
    d_t: Tensor,
}

impl JumpRelu {
    pub fn new(cfg: &SaeConfig, device: &Device) -> JumpRelu {
        let z = Tensor::zeros(device, &[0, 0]);
        JumpRelu {
            cfg: cfg.clone(),
            h: z.clone(),
            f: z.clone(),
            t: Tensor::zeros(device, &[0]),
            d_f: z.clone(),
            d_h: z,
            d_t: Tensor::zeros(device, &[0]),
        }
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
        linear_into(&mut self.h, &s.sae_in, p.get(W_ENC), p.get(B_ENC));
        maybe_noise(&self.cfg, &mut self.h, input.noise_seed);
        self.f.resize(self.h.shape());
        ops::jumprelu(&self.h, &self.t, &mut self.f);
        ops::matmul(&mut s.recon, &self.f, false, p.get(W_DEC), false, 1.0, 0.0);
        ops::add_row_vec(&mut s.recon, p.get(B_DEC), 1.0);
        let mse = s.finish();

        for t in [&mut self.d_f, &mut self.d_h] {
            t.resize(self.h.shape());
            ops::fill(t, 0.0);
        }
        self.d_t = Tensor::zeros(&dev, &[m]);
        let coef = input.coefficient;
        let c = (coef / b as f64) as f32;
        let bw = self.cfg.jumprelu_bandwidth as f32;
        let ste_in = self.cfg.jumprelu_ste_to_input;
        let l0_loss = match self.cfg.jumprelu_sparsity_loss_mode {
            SparsityLossMode::Step | SparsityLossMode::Quadratic => {
                let mut l0 = Tensor::zeros(&dev, &[b]);
                ops::step_count_rows(&self.h, &self.t, &mut l0);
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
                let g = crate::common::vector(&dev, grad);
                ops::step_backward(
                    &self.h,
                    &self.t,
                    &g,
                    bw,
                    ste_in,
                    &mut self.d_h,
                    &mut self.d_t,
                );
                coef * per_row.iter().sum::<f64>() / b as f64
            }
            SparsityLossMode::Tanh => {
                let scale = self.cfg.jumprelu_tanh_scale as f32;
                let sum = ops::tanh_sparsity(&self.f, &s.n, scale, c, &mut self.d_f, &mut s.dn);
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
                    let cp = (pa / b as f64) as f32;
                    let sum = ops::pre_act_loss(
                        &self.h,
                        &self.t,
                        dead,
                        &s.n,
                        cp,
                        &mut self.d_h,
                        &mut self.d_t,
                        &mut s.dn,
                    );
                    pa * sum / b as f64
                }
                None => 0.0,
            };
            losses.push(("pre_act_loss".to_string(), v));
        }
        Ok(losses)
    }

    fn train_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        s.decoder_backward_dense(p, &self.f, g, &mut self.d_f, true);
        let bw = self.cfg.jumprelu_bandwidth as f32;
        ops::jumprelu_backward(
            &self.h,
            &self.t,
            &self.d_f,
            bw,
            self.cfg.jumprelu_ste_to_input,
            &mut self.d_h,
            &mut self.d_t,
        );
        s.encoder_backward_dense(
            &self.cfg,
            p.get(W_ENC),
            &s.sae_in,
            &self.d_h,
            g,
            W_ENC,
            B_ENC,
        );
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
        Acts::Dense(&self.f)
    }

    fn hidden_pre(&self) -> &Tensor {
        &self.h
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
