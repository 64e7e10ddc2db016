//! Matryoshka BatchTopK: BatchTopK plus one reconstruction loss per nested prefix of
//! the latents (`matryoshka_widths`), so early latents must reconstruct on their own.
//! Optionally (`use_matryoshka_aux_loss`) each level's dead latents reconstruct that
//! level's residual.
//!
//! With `use_sparse_activations` the prefix decodes are sparse too: the selected
//! latents are split by level segment (columns `[w_{l-1}, w_l)`), the inner levels'
//! decodes are running sums of the segments' products and the outer level's is the
//! main decode, so every selected latent is decoded once; its backward takes each
//! segment once against the sum of the gradients of the levels it feeds.

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
    /// Decoder input, dense `[B, d_sae]` (dense path only).
    fs: Tensor,
    /// Gradient of each inner level's loss with respect to its decode, before output
    /// normalisation (`[B, d_in]` per level except the outermost).
    d_inner: Vec<Tensor>,
    /// Sparse path: the decoder input's entries in each inner level's segment, with
    /// each entry's position in the whole decoder input.
    segs: Vec<(Csr, Vec<u32>)>,
}

impl Matryoshka {
    pub fn new(cfg: &SaeConfig, device: &Device) -> Matryoshka {
        let core = TopK::new(cfg, device, Select::Batch);
        let levels = cfg.matryoshka_levels();
        Matryoshka {
            core,
            levels,
            fs: Tensor::zeros(device, &[0, 0]),
            d_inner: Vec::new(),
            segs: Vec::new(),
        }
    }

    /// Cumulative decodes `b_dec + fs[:, ..w] @ W_dec[..w]` for every level, after the
    /// output normalisation (`[B, d_in]` each; allocates).
    fn prefix_decodes(&self, p: &Params, s: &Shared) -> Vec<Tensor> {
        let (b, d) = (s.batch(), self.core.cfg.d_in);
        if self.core.sparse {
            let mut decoded = Tensor::zeros(&s.device, &[b, d]);
            let mut out: Vec<Tensor> = self
                .segs
                .iter()
                .map(|(seg, _)| {
                    ops::csr_matmul(&mut decoded, seg, p.get(W_DEC), 1.0, 1.0);
                    let mut o = decoded.clone();
                    ops::add_row_vec(&mut o, p.get(B_DEC), 1.0);
                    finish_output(&mut o, s.norm.as_ref());
                    o
                })
                .collect();
            // The outer level decodes every selected latent: the main reconstruction.
            out.push(s.sae_out.clone());
            return out;
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

    /// The decoder input's entries in each inner level's segment (columns
    /// `[w_{l-1}, w_l)`), with their positions in it. Columns ascend within a row, so a
    /// row's entries of one segment are a run.
    fn split_segments(&self) -> Vec<(Csr, Vec<u32>)> {
        let fs = &self.core.fs;
        let (offsets, cols, vals) = (
            fs.offsets_to_vec(),
            fs.indices_to_vec(),
            fs.values().to_vec(),
        );
        let mut lo = 0;
        self.levels[..self.levels.len() - 1]
            .iter()
            .map(|&hi| {
                let (mut o, mut c, mut v, mut at) = (vec![0u32], vec![], vec![], vec![]);
                for r in 0..fs.rows() {
                    for e in offsets[r] as usize..offsets[r + 1] as usize {
                        if (lo..hi).contains(&(cols[e] as usize)) {
                            c.push(cols[e]);
                            v.push(vals[e]);
                            at.push(e as u32);
                        }
                    }
                    o.push(c.len() as u32);
                }
                lo = hi;
                let seg = Csr::from_parts(&fs.device(), fs.rows(), fs.cols(), o, c, v);
                (seg, at)
            })
            .collect()
    }

    /// The inner levels' backward over the selected latents only: weight gradients and
    /// the decoder input's gradient at its stored entries. Segment `l` feeds the levels
    /// from `l` on, so it meets the sum of their decode gradients, once.
    fn sparse_inner_backward(&self, p: &Params, g: &mut Params) -> Tensor {
        let dev = self.core.fs.device();
        let mut extra = vec![0f32; self.core.fs.nnz()];
        let mut acc = Tensor::zeros(&dev, &[0, 0]);
        for (l, (seg, at)) in self.segs.iter().enumerate().rev() {
            let d = &self.d_inner[l];
            match acc.numel() {
                0 => acc = d.clone(),
                _ => ops::axpy(&mut acc, 1.0, d),
            }
            ops::csr_t_matmul(g.get_mut(W_DEC), seg, &acc, false, 1.0, 1.0);
            let mut dots = Tensor::zeros(&dev, &[seg.nnz()]);
            ops::csr_sampled_dot(seg, &acc, p.get(W_DEC), &mut dots);
            for (&e, v) in at.iter().zip(dots.to_vec()) {
                extra[e as usize] = v;
            }
        }
        if acc.numel() > 0 {
            ops::col_sums(&acc, g.get_mut(B_DEC), 1.0, 1.0);
        }
        crate::common::vector(&dev, extra)
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
        self.segs = match self.core.sparse {
            true => self.split_segments(),
            false => Vec::new(),
        };
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
