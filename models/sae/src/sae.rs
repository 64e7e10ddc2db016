use crate::arch::{self, Acts, Arch, Buffers, Losses, StepInput, StepPath};
use crate::common::{finish_output, process_input, RowNorm, Shared};
use crate::{init, Params, Result, SaeError};
use kernels::{ops, Device, Tensor};
use schemas::tensors::{B_DEC, LOG_THRESHOLD, THRESHOLD, W_DEC, W_ENC};
use schemas::{Architecture, BDecInitMethod, NormalizeActivations, SaeConfig};

/// A sparse autoencoder: its config, parameters, buffers, and the training state of the
/// last forward pass.
pub struct Sae {
    cfg: SaeConfig,
    /// Parameters under SAELens's names (`W_enc` `[d_in, d_sae]`, `W_dec`
    /// `[d_sae, d_in]`, `b_enc`, `b_dec`, ...).
    pub params: Params,
    pub buffers: Buffers,
    device: Device,
    arch: Box<dyn Arch>,
    shared: Shared,
}

/// The result of [`Sae::training_forward`].
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The total loss (sum of all terms).
    pub loss: f64,
    /// Each term under SAELens's name (`mse_loss`, `l1_loss`, ...), in SAELens's order.
    pub losses: Losses,
}

impl StepOutput {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.losses.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

impl Clone for Sae {
    fn clone(&self) -> Sae {
        Sae::from_parts(
            self.cfg.clone(),
            self.params.clone(),
            self.buffers.clone(),
            &self.device,
        )
        .expect("a valid SAE stays valid")
    }
}

/// Parameter names and shapes an SAE with this config has.
pub fn param_shapes(cfg: &SaeConfig) -> Vec<(&'static str, Vec<usize>)> {
    let mut shapes = arch::build(cfg, &Device::Cpu).param_shapes();
    if cfg.jumprelu_log_threshold {
        for s in shapes.iter_mut() {
            if s.0 == THRESHOLD {
                s.0 = LOG_THRESHOLD;
            }
        }
    }
    shapes
}

impl Sae {
    /// A freshly initialised SAE (see [`crate::init`] for the rules).
    pub fn new(cfg: SaeConfig, device: &Device, seed: u64) -> Result<Sae> {
        cfg.validate()?;
        let shapes = param_shapes(&cfg);
        let params = init::into_params(device, init::init_values(&cfg, &shapes, seed));
        Sae::from_parts(cfg, params, Buffers::default(), device)
    }

    /// An SAE from existing parameters; checks that the names and shapes match the
    /// config.
    pub fn from_parts(
        cfg: SaeConfig,
        params: Params,
        buffers: Buffers,
        device: &Device,
    ) -> Result<Sae> {
        cfg.validate()?;
        for (name, shape) in param_shapes(&cfg) {
            let t = params.try_get(name).ok_or_else(|| {
                SaeError::Unsupported(format!(
                    "a {} SAE needs a parameter '{name}' (have {:?})",
                    cfg.architecture,
                    params.names()
                ))
            })?;
            if t.shape() != shape.as_slice() {
                return Err(SaeError::Shape {
                    name: name.into(),
                    got: t.shape().to_vec(),
                    want: shape,
                    d_in: cfg.d_in,
                    d_sae: cfg.d_sae,
                });
            }
        }
        Ok(Sae {
            arch: arch::build(&cfg, device),
            shared: Shared::new(device),
            cfg,
            params,
            buffers,
            device: device.clone(),
        })
    }

    pub fn cfg(&self) -> &SaeConfig {
        &self.cfg
    }

    /// Changes fields of the config that do not change the parameter set (coefficients,
    /// metadata, ...). The parameter set is checked again.
    pub fn set_cfg(&mut self, cfg: SaeConfig) -> Result<()> {
        let params = std::mem::take(&mut self.params);
        *self = Sae::from_parts(cfg, params, self.buffers.clone(), &self.device)?;
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Zero gradients shaped like the parameters.
    pub fn zero_grads(&self) -> Params {
        self.params.zeros_like()
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        if x.shape().len() != 2 || x.cols() != self.cfg.d_in {
            return Err(SaeError::Shape {
                name: "input".into(),
                got: x.shape().to_vec(),
                want: vec![x.rows(), self.cfg.d_in],
                d_in: self.cfg.d_in,
                d_sae: self.cfg.d_sae,
            });
        }
        Ok(())
    }

    /// Inference encode: latents `[n, d_sae]` for inputs `[n, d_in]` (allocates).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let norm = RowNorm::from_input(&self.cfg, x);
        let sae_in = process_input(&self.cfg, &self.params, x, norm.as_ref());
        Ok(self.arch.encode(&self.params, &sae_in))
    }

    /// Inference decode of latents `[n, d_sae]`. SAEs with a run-time input
    /// normalisation need the input to undo it: use [`Sae::forward`].
    pub fn decode(&self, acts: &Tensor) -> Result<Tensor> {
        if matches!(
            self.cfg.normalize_activations,
            NormalizeActivations::ConstantNormRescale | NormalizeActivations::LayerNorm
        ) {
            return Err(SaeError::Unsupported(format!(
                "decode alone cannot undo normalize_activations '{}': use forward",
                self.cfg.normalize_activations
            )));
        }
        Ok(self.arch.decode(&self.params, acts))
    }

    /// Inference encode then decode: `(feature_acts, sae_out)`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_input(x)?;
        let norm = RowNorm::from_input(&self.cfg, x);
        let sae_in = process_input(&self.cfg, &self.params, x, norm.as_ref());
        let acts = self.arch.encode(&self.params, &sae_in);
        let mut out = self.arch.decode(&self.params, &acts);
        finish_output(&mut out, norm.as_ref());
        // Finite weights and inputs can still overflow; say so rather than hand on NaN.
        if ops::non_finite(x).is_none() {
            for (what, t) in [("feature_acts", &acts), ("sae_out", &out)] {
                if let Some((count, first)) = ops::non_finite(t) {
                    let cols = t.cols().max(1);
                    return Err(SaeError::NonFinite {
                        what: format!("the SAE's {what} from a finite input"),
                        count,
                        row: first / cols,
                        col: first % cols,
                    });
                }
            }
        }
        Ok((acts, out))
    }

    /// SAELens's `training_forward_pass`: all loss terms for one batch. Keeps what
    /// [`Sae::backward`] needs.
    pub fn training_forward(&mut self, input: &StepInput) -> Result<StepOutput> {
        self.check_input(input.sae_in)?;
        if let Some(m) = input.dead_neuron_mask {
            if m.shape() != [self.cfg.d_sae] {
                return Err(SaeError::Shape {
                    name: "dead_neuron_mask".into(),
                    got: m.shape().to_vec(),
                    want: vec![self.cfg.d_sae],
                    d_in: self.cfg.d_in,
                    d_sae: self.cfg.d_sae,
                });
            }
        }
        self.shared.prepare(&self.cfg, &self.params, input.sae_in);
        let losses = self.arch.train_forward(
            &mut self.params,
            &mut self.shared,
            input,
            &mut self.buffers,
        )?;
        let loss = losses.iter().map(|(_, v)| v).sum();
        Ok(StepOutput { loss, losses })
    }

    /// Adds the gradient of the last [`Sae::training_forward`]'s total loss to `grads`
    /// (from [`Sae::zero_grads`]).
    pub fn backward(&mut self, grads: &mut Params) {
        self.arch
            .train_backward(&self.params, &mut self.shared, grads);
    }

    /// Makes every following training step take `path` where the architecture has
    /// both (`None`: chosen by density). For tests and benchmarks.
    pub fn force_path(&mut self, path: Option<StepPath>) {
        self.shared.force_path = path;
    }

    /// The bytes a training step holds by this crate's formula: the parameters,
    /// their gradients and Adam's two moments, the one `[batch, d_sae]` buffer, and
    /// the path's own: a dense step's three row blocks of `batch / 8` rows, or about
    /// 28 bytes per active latent of a sparse one (the CSR latents, their values'
    /// gradient and the products' row starts). Not counted: `[batch, d_in]` tensors,
    /// ghost grads' two buffers, the program itself.
    pub fn step_memory_formula(&self, batch: usize, path: StepPath, active: usize) -> u64 {
        let params: usize = self.params.iter().map(|(_, t)| t.numel()).sum();
        let buffer = batch * self.cfg.d_sae;
        let own = match path {
            StepPath::Dense => 3 * batch.div_ceil(crate::common::DENSE_BLOCKS) * self.cfg.d_sae * 4,
            StepPath::Sparse => 28 * active,
        };
        (4 * params * 4 + buffer * 4 + own) as u64
    }

    /// Whether the last training step's decoder and backward ran dense or sparse.
    pub fn last_path(&self) -> StepPath {
        self.arch.path()
    }

    /// Latents of the last training forward pass.
    pub fn last_acts(&self) -> Acts<'_> {
        self.arch.acts()
    }

    /// Latents of the last training forward pass as a dense `[B, d_sae]` copy.
    pub fn last_feature_acts(&self) -> Tensor {
        self.arch.acts().to_dense()
    }

    /// Pre-activations of the last training forward pass (`encode_with_hidden_pre`'s
    /// second value).
    pub fn last_hidden_pre(&self) -> std::borrow::Cow<'_, Tensor> {
        self.arch.hidden_pre()
    }

    /// Reconstruction of the last training forward pass.
    pub fn last_sae_out(&self) -> &Tensor {
        &self.shared.sae_out
    }

    /// Decoder row norms `[d_sae]`, clamped at 1e-8 as SAELens's `get_W_dec_norm`.
    pub fn w_dec_norms(&self) -> Tensor {
        let mut n = Tensor::zeros(&self.device, &[self.cfg.d_sae]);
        ops::row_norms(self.params.get(W_DEC), &mut n);
        let v: Vec<f32> = n.to_vec().iter().map(|x| x.max(1e-8)).collect();
        Tensor::from_vec(&self.device, &[self.cfg.d_sae], v).expect("shape")
    }

    /// Folds decoder row norms into the encoder so that decoder rows have unit norm and
    /// the SAE computes the same function (`fold_W_dec_norm`).
    pub fn fold_w_dec_norm(&mut self) -> Result<()> {
        let n = self.w_dec_norms();
        self.arch.fold_w_dec_norm(&mut self.params, &n)
    }

    /// Folds an input scaling factor into the weights so the SAE takes unscaled inputs
    /// (`fold_activation_norm_scaling_factor`).
    pub fn fold_activation_norm_scaling_factor(&mut self, factor: f64) {
        let f = factor as f32;
        ops::scale(self.params.get_mut(W_ENC), f);
        ops::scale(self.params.get_mut(W_DEC), 1.0 / f);
        ops::scale(self.params.get_mut(B_DEC), 1.0 / f);
        if matches!(
            self.cfg.architecture,
            Architecture::BatchTopK | Architecture::MatryoshkaBatchTopK
        ) && self.cfg.rescale_acts_by_decoder_norm
        {
            // The threshold is in units of hidden_pre * ||W_dec||, which just shrank.
            self.buffers.topk_threshold /= factor;
        }
        self.cfg.normalize_activations = NormalizeActivations::None;
        self.arch = arch::build(&self.cfg, &self.device);
    }

    /// SAELens 5's unit-norm decoder: rows set to norm 1 (before each training step).
    pub fn set_decoder_norm_to_unit_norm(&mut self) {
        let n = self.w_dec_norms();
        let inv = crate::common::reciprocal(&n);
        let zero = Tensor::zeros(&self.device, &[self.cfg.d_sae]);
        ops::row_affine(self.params.get_mut(W_DEC), &inv, &zero);
    }

    /// SAELens 5's `remove_gradient_parallel_to_decoder_directions`: removes from each
    /// row of `grads[W_dec]` its component along the decoder row.
    pub fn remove_gradient_parallel_to_decoder_directions(&self, grads: &mut Params) {
        let w = self.params.get(W_DEC);
        let g = grads.get_mut(W_DEC);
        let mut dots = Tensor::zeros(&self.device, &[self.cfg.d_sae]);
        ops::row_dots(g, w, &mut dots);
        ops::scale(&mut dots, -1.0);
        ops::add_scaled_rows(g, w, &dots);
    }

    /// The SAE as SAELens's `save_inference_model` writes it: TopK decoder norms folded
    /// in, BatchTopK-family SAEs turned into JumpReLU SAEs with their running threshold,
    /// a `log_threshold` turned into `threshold`.
    pub fn inference_form(&self) -> Result<Sae> {
        let cfg = self.cfg.inference_config();
        let mut p = self.params.clone();
        let topk_family = matches!(
            self.cfg.architecture,
            Architecture::TopK | Architecture::BatchTopK | Architecture::MatryoshkaBatchTopK
        );
        if topk_family && self.cfg.rescale_acts_by_decoder_norm {
            let n = self.w_dec_norms();
            arch::fold_norms_into(&mut p, &n, &[schemas::tensors::B_ENC]);
        }
        if matches!(
            self.cfg.architecture,
            Architecture::BatchTopK | Architecture::MatryoshkaBatchTopK
        ) {
            // SAELens: torch.ones_like(b_enc) * topk_threshold, stored in the params' f32.
            let t = self.buffers.topk_threshold as f32;
            p.insert(THRESHOLD, Tensor::full(&self.device, &[self.cfg.d_sae], t));
        }
        if let Some(lt) = p.remove(LOG_THRESHOLD) {
            let v: Vec<f32> = lt.to_vec().iter().map(|x| x.exp()).collect();
            p.insert(THRESHOLD, Tensor::from_vec(&self.device, lt.shape(), v)?);
        }
        Sae::from_parts(cfg, p, Buffers::default(), &self.device)
    }

    /// SAELens's `b_dec` initialisation from a batch of (scaled) activations `[n, d_in]`:
    /// their geometric median, their mean, or zeros.
    pub fn initialize_b_dec(&mut self, method: BDecInitMethod, activations: &Tensor) -> Result<()> {
        self.check_input(activations)?;
        let d = self.cfg.d_in;
        let v = match method {
            BDecInitMethod::Zeros => vec![0.0; d],
            BDecInitMethod::Mean => {
                let mut m = Tensor::zeros(&self.device, &[d]);
                ops::col_sums(activations, &mut m, 1.0 / activations.rows() as f32, 0.0);
                m.to_vec()
            }
            BDecInitMethod::GeometricMedian => {
                crate::geometric_median::geometric_median_default(&activations.to_vec(), d).median
            }
        };
        *self.params.get_mut(B_DEC) = Tensor::from_vec(&self.device, &[d], v)?;
        Ok(())
    }

    /// The sparsity coefficient this architecture trains with: SAELens's name (`l1` or
    /// `l0`), final value and warm-up steps. `None` for the TopK family.
    pub fn sparsity_coefficient(&self) -> Option<(&'static str, f64, u64)> {
        match self.cfg.architecture {
            Architecture::Standard | Architecture::Gated => {
                Some(("l1", self.cfg.l1_coefficient, self.cfg.l1_warm_up_steps))
            }
            Architecture::JumpRelu => {
                Some(("l0", self.cfg.l0_coefficient, self.cfg.l0_warm_up_steps))
            }
            _ => None,
        }
    }
}
