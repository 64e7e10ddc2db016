//! Matryoshka BatchTopK: BatchTopK plus one reconstruction loss per nested prefix of
//! the latents (`matryoshka_widths`), so early latents must reconstruct on their own.
//! Optionally (`use_matryoshka_aux_loss`) each level's dead latents reconstruct that
//! level's residual.
//!
//! With `use_sparse_activations` the prefix decodes are sparse too: level `l` decodes
//! the selected latents with their values zeroed from column `w_l` on (one CSR product
//! per level, `L k d` per token instead of the dense path's `d m`), and its backward is
//! the same masked products.

use super::batchtopk::update_threshold;
use super::topk::{Select, TopK};
use super::{Acts, Arch, Buffers, Losses, StepInput};
use crate::common::{finish_output, Shared};
use crate::{Params, Result};
use kernels::{ops, Csr, Device, Tensor};
use schemas::tensors::{B_DEC, W_DEC};
use schemas::SaeConfig;

pub(crate) struct Matryoshka {
    core: TopK,
    levels: Vec<usize>,
    /// Per level, `1` on the columns it decodes and `0` after (`[d_sae]`).
    prefix_masks: Vec<Tensor>,
    /// Decoder input, dense `[B, d_sae]` (dense path only).
    fs: Tensor,
    /// Gradient of each inner level's loss with respect to its decode, before output
    /// normalisation (`[B, d_in]` per level except the outermost).
    d_inner: Vec<Tensor>,
}

impl Matryoshka {
    pub fn new(cfg: &SaeConfig, device: &Device) -> Matryoshka {
        let core = TopK::new(cfg, device, Select::Batch);
        let levels = cfg.matryoshka_levels();
        let prefix_masks = levels
            .iter()
            .map(|&w| {
                let v = (0..cfg.d_sae).map(|j| (j < w) as u8 as f32).collect();
                crate::common::vector(device, v)
            })
            .collect();
        Matryoshka {
            core,
            levels,
            prefix_masks,
            fs: Tensor::zeros(device, &[0, 0]),
            d_inner: Vec::new(),
        }
    }

    /// Cumulative decodes `b_dec + fs[:, ..w] @ W_dec[..w]` for every level, after the
    /// output normalisation (`[B, d_in]` each; allocates).
    fn prefix_decodes(&self, p: &Params, s: &Shared) -> Vec<Tensor> {
        let (b, d) = (s.batch(), self.core.cfg.d_in);
        if self.core.sparse {
            return (0..self.levels.len())
                .map(|l| {
                    let mut o = Tensor::zeros(&s.device, &[b, d]);
                    ops::csr_matmul(&mut o, &self.prefix(l), p.get(W_DEC), 1.0, 0.0);
                    ops::add_row_vec(&mut o, p.get(B_DEC), 1.0);
                    finish_output(&mut o, s.norm.as_ref());
                    o
                })
                .collect();
        }
        let mut decoded = Tensor::zeros(&s.device, &[b, d]);
        ops::add_row_vec(&mut decoded, p.get(B_DEC), 1.0);
        let mut out = Vec::with_capacity(self.levels.len());
        let mut prev = 0;
        for &w in &self.levels {
            let (f, wd) = self.segment(p, &s.device, prev, w);
            ops::matmul(&mut decoded, &f, false, &wd, false, 1.0, 1.0);
            let mut o = decoded.clone();
            finish_output(&mut o, s.norm.as_ref());
            out.push(o);
            prev = w;
        }
        out
    }

    /// The decoder input with its values zeroed from level `l`'s width on.
    fn prefix(&self, l: usize) -> Csr {
        let mut f = self.core.fs.clone();
        ops::csr_scale_cols(&mut f, &self.prefix_masks[l]);
        f
    }

    /// The inner levels' backward over the selected latents only: weight gradients and
    /// the decoder input's gradient at its stored entries.
    fn sparse_inner_backward(&self, p: &Params, g: &mut Params) -> Tensor {
        let dev = self.core.fs.device();
        let nnz = self.core.fs.nnz();
        let mut extra = Tensor::zeros(&dev, &[nnz]);
        for (l, d) in self.d_inner.iter().enumerate() {
            let mut f = self.prefix(l);
            ops::csr_t_matmul(g.get_mut(W_DEC), &f, d, false, 1.0, 1.0);
            ops::col_sums(d, g.get_mut(B_DEC), 1.0, 1.0);
            // d @ W_dec^T at the entries, zero past the level's width
            let mut at = Tensor::zeros(&dev, &[nnz]);
            ops::csr_sampled_dot(&f, d, p.get(W_DEC), &mut at);
            *f.values_mut() = at;
            ops::csr_scale_cols(&mut f, &self.prefix_masks[l]);
            ops::axpy(&mut extra, 1.0, f.values());
        }
        extra
    }

    /// Columns `[a, b)` of the decoder input and rows `[a, b)` of `W_dec`.
    fn segment(&self, p: &Params, dev: &Device, a: usize, b: usize) -> (Tensor, Tensor) {
        let mut f = Tensor::zeros(dev, &[self.fs.rows(), b - a]);
        ops::copy_cols(&self.fs, a, &mut f);
        let mut w = Tensor::zeros(dev, &[b - a, self.core.cfg.d_in]);
        ops::copy_rows(p.get(W_DEC), a, &mut w);
        (f, w)
    }
}

impl Arch for Matryoshka {
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
        if !self.core.sparse {
            self.fs = Tensor::zeros(&s.device, &[s.batch(), self.core.cfg.d_sae]);
            ops::csr_to_dense(&self.core.fs, &mut self.fs);
        }
        let partial = self.prefix_decodes(p, s);

        let aux = if self.core.cfg.use_matryoshka_aux_loss {
            match input
                .dead_neuron_mask
                .filter(|m| super::n_dead(Some(m)) > 0)
            {
                None => 0.0,
                Some(dead) => {
                    let coef = self.core.cfg.aux_loss_coefficient;
                    let dv = dead.to_vec();
                    let mut total = 0.0;
                    let mut prev = 0;
                    for (l, &w) in self.levels.iter().enumerate() {
                        let mask: Vec<f32> = (0..dv.len())
                            .map(|j| if j >= prev && j < w { dv[j] } else { 0.0 })
                            .collect();
                        let mask = crate::common::vector(&s.device, mask);
                        let mut residual = s.x.clone();
                        ops::axpy(&mut residual, -1.0, &partial[l]);
                        total += self.core.aux_term(p, s, &mask, &residual, coef);
                        prev = w;
                    }
                    coef * total
                }
            }
        } else {
            self.core.dead_aux_loss(p, s, input)?
        };
        update_threshold(&self.core, b);

        let mut losses = vec![
            ("mse_loss".to_string(), mse),
            ("auxiliary_reconstruction_loss".to_string(), aux),
        ];
        self.d_inner.clear();
        let bsz = s.batch() as f32;
        for (l, &w) in self.levels[..self.levels.len() - 1].iter().enumerate() {
            let mut d = Tensor::zeros(&s.device, partial[l].shape());
            let sq = ops::mse(
                &partial[l],
                &s.x,
                s.mse_w.as_ref(),
                Some((&mut d, 1.0 / bsz)),
            );
            s.out_grad_to_pre(&mut d);
            self.d_inner.push(d);
            losses.push((format!("inner_mse_loss_{w}"), sq / bsz as f64));
        }
        Ok(losses)
    }

    fn train_backward(&mut self, p: &Params, s: &mut Shared, g: &mut Params) {
        // Segment i feeds every level l >= i: walk levels from the last inner one down,
        // accumulating their decode gradients.
        if self.core.sparse {
            self.core.d_fs_extra = Some(self.sparse_inner_backward(p, g));
            self.core.backward_core(p, s, g);
            return;
        }
        let dev = s.device.clone();
        let m = self.core.cfg.d_sae;
        let mut d_fs = Tensor::zeros(&dev, &[s.batch(), m]);
        let mut acc = Tensor::zeros(&dev, &[s.batch(), self.core.cfg.d_in]);
        for i in (0..self.d_inner.len()).rev() {
            ops::axpy(&mut acc, 1.0, &self.d_inner[i]);
            let a = if i == 0 { 0 } else { self.levels[i - 1] };
            let b = self.levels[i];
            let (f, w) = self.segment(p, &dev, a, b);
            let mut dw = Tensor::zeros(&dev, w.shape());
            ops::matmul(&mut dw, &f, true, &acc, false, 1.0, 0.0);
            ops::add_rows(g.get_mut(W_DEC), a, &dw);
            let mut df = Tensor::zeros(&dev, f.shape());
            ops::matmul(&mut df, &acc, false, &w, true, 1.0, 0.0);
            ops::add_cols(&mut d_fs, a, &df);
        }
        ops::col_sums(&acc, g.get_mut(B_DEC), 1.0, 1.0);
        let mut extra = Tensor::zeros(&dev, &[self.core.fs.nnz()]);
        ops::csr_gather(&self.core.fs, &d_fs, &mut extra);
        self.core.d_fs_extra = Some(extra);
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
