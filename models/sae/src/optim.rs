//! torch's Adam and `clip_grad_norm_`, over a [`Params`] set.

use crate::Params;
use kernels::ops;

/// `torch.optim.Adam` (no weight decay, no amsgrad), one moment pair per parameter.
#[derive(Clone, Debug)]
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken so far.
    pub step: u64,
    pub m: Params,
    pub v: Params,
}

impl Adam {
    pub fn new(params: &Params, lr: f64, beta1: f64, beta2: f64) -> Adam {
        Adam {
            lr,
            beta1,
            beta2,
            eps: 1e-8,
            step: 0,
            m: params.zeros_like(),
            v: params.zeros_like(),
        }
    }

    /// One update of every parameter with its gradient.
    pub fn update(&mut self, params: &mut Params, grads: &Params) {
        self.step += 1;
        for (name, p) in params.iter_mut() {
            ops::adam(
                p,
                grads.get(name),
                self.m.get_mut(name),
                self.v.get_mut(name),
                self.lr,
                self.beta1,
                self.beta2,
                self.eps,
                self.step,
            );
        }
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Params, max_norm: f32) -> f32 {
    let mut refs: Vec<&mut kernels::Tensor> = grads.iter_mut().map(|(_, t)| t).collect();
    ops::clip_grad_norm(&mut refs, max_norm)
}
