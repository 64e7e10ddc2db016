//! BatchTopK: TopK over the whole batch (`k` latents per token on average) with a
//! running threshold, the exponential moving average of the smallest selected
//! activation, that replaces the batch selection at inference (saved as JumpReLU).

use super::topk::{Select, TopK};
use super::{Acts, Arch, Buffers, Losses, StepInput};
use crate::common::Shared;
use crate::{Params, Result};
use kernels::{ops, Device, Tensor};
use schemas::SaeConfig;

pub(crate) struct BatchTopK {
    core: TopK,
}

impl BatchTopK {
    pub fn new(cfg: &SaeConfig, device: &Device) -> BatchTopK {
        BatchTopK {
            core: TopK::new(cfg, device, Select::Batch),
        }
    }
}

/// `t = (1 - lr) t + lr * min(positive activations)`, in f64 as SAELens keeps it.
pub(crate) fn update_threshold(core: &TopK, buffers: &mut Buffers) {
    if let Some(min) = ops::min_positive(core.sel.values()) {
        let lr = core.cfg.topk_threshold_lr;
        buffers.topk_threshold = (1.0 - lr) * buffers.topk_threshold + lr * min as f64;
    }
}

impl Arch for BatchTopK {
    fn param_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        self.core.shapes()
    }

    fn encode(&self, p: &Params, sae_in: &Tensor) -> Tensor {
        self.core.encode_inference(p, sae_in)
    }

    fn decode(&self, p: &Params, acts: &Tensor) -> Tensor {
        self.core.decode_inference(p, acts)
    }

    fn train_forward(
        &mut self,
        p: &mut Params,
        s: &mut Shared,
        input: &StepInput,
        b: &mut Buffers,
    ) -> Result<Losses> {
        let mse = self.core.forward_core(p, s, input);
        let aux = self.core.dead_aux_loss(p, s, input)?;
        update_threshold(&self.core, b);
        Ok(vec![
            ("mse_loss".into(), mse),
            ("auxiliary_reconstruction_loss".into(), aux),
        ])
    }

    fn train_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        self.core.backward_core(p, s, g);
    }

    fn acts(&self) -> Acts<'_> {
        Acts::Sparse(&self.core.sel)
    }

    fn path(&self) -> super::StepPath {
        self.core.path()
    }

    fn hidden_pre(&self) -> std::borrow::Cow<'_, Tensor> {
        std::borrow::Cow::Borrowed(self.core.hidden())
    }

    fn fold_w_dec_norm(&self, p: &mut Params, n: &Tensor) -> Result<()> {
        self.core.fold(p, n)
    }
}
