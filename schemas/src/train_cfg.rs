//! The training config (`sae-trainer train --config sae.yaml`): the training half of
//! SAELens's `LanguageModelSAERunnerConfig`, flat, under SAELens's field names.
//!
//! Defaults follow SAELens 6 where it has the field (Adam beta1 0.9, decoder init norm
//! 0.1 with `W_enc = W_dec^T`, decoder-norm-weighted L1, `b_dec` at zero) and SAELens 5
//! for the options only it had. Unknown fields are errors; [`TrainConfig::validate`]
//! reproduces SAELens 5's `__post_init__` checks with messages that name the field.

use crate::sae_cfg::{
    ActivationFn, Architecture, BDecInitMethod, CfgError, Dtype, MseLossNormalization,
    NormalizeActivations, SaeConfig, SparsityLossMode,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// LR schedules (SAELens's `lr_scheduler_name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrScheduler {
    Constant,
    CosineAnnealing,
    CosineAnnealingWarmRestarts,
}

/// What is trained after `training_tokens` (SAELens 5's `finetuning_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinetuningMethod {
    /// Only the per-latent decoder scale.
    Scale,
    /// The scale, `W_dec` and `b_dec`.
    Decoder,
    /// The scale and `b_dec`.
    UnrotatedDecoder,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    // ---- what the activations are (recorded in the SAE's metadata)
    pub model_name: Option<String>,
    /// Also the column read from Arrow/Parquet activation files.
    pub hook_name: Option<String>,
    pub hook_head_index: Option<i64>,
    pub context_size: i64,
    pub dataset_path: Option<String>,
    pub prepend_bos: bool,

    // ---- the SAE
    pub architecture: String,
    /// Taken from the activations when absent.
    pub d_in: Option<usize>,
    pub d_sae: Option<usize>,
    pub expansion_factor: Option<usize>,
    pub apply_b_dec_to_input: bool,
    pub normalize_activations: String,
    pub reshape_activations: String,
    pub decoder_init_norm: Option<f64>,
    pub dtype: String,
    pub device: String,
    /// SAELens's `autocast`: the dense products take bf16 inputs (f32 accumulation and
    /// everything else in f32). CUDA only.
    pub autocast: bool,
    pub l1_coefficient: f64,
    pub lp_norm: f64,
    pub l1_warm_up_steps: u64,
    pub jumprelu_init_threshold: f64,
    pub jumprelu_bandwidth: f64,
    pub jumprelu_sparsity_loss_mode: String,
    pub l0_coefficient: f64,
    pub l0_warm_up_steps: u64,
    pub pre_act_loss_coefficient: Option<f64>,
    pub jumprelu_tanh_scale: f64,
    pub jumprelu_ste_to_input: bool,
    pub target_l0: Option<f64>,
    pub k: Option<f64>,
    /// SAELens 5 spelling: `activation_fn: topk` with `activation_fn_kwargs: {k: ...}`.
    pub activation_fn: Option<String>,
    pub activation_fn_kwargs: Option<BTreeMap<String, f64>>,
    /// SAELens's switch to sparse decoder products. On the CPU each step chooses its
    /// path by the latents' density whatever this says, and `true` keeps it sparse;
    /// on a GPU it alone picks the sparse path.
    pub use_sparse_activations: bool,
    pub aux_loss_coefficient: f64,
    pub rescale_acts_by_decoder_norm: bool,
    pub topk_threshold_lr: f64,
    pub matryoshka_widths: Vec<usize>,
    pub use_matryoshka_aux_loss: bool,
    pub scale_sparsity_penalty_by_decoder_norm: bool,
    pub normalize_sae_decoder: bool,
    pub use_ghost_grads: bool,
    pub noise_scale: f64,
    pub mse_loss_normalization: Option<String>,
    pub decoder_orthogonal_init: bool,
    pub decoder_heuristic_init: bool,
    pub decoder_heuristic_init_norm: f64,
    pub init_encoder_as_decoder_transpose: bool,
    pub b_dec_init_method: String,
    /// An SAE directory to start from (finetune) instead of a fresh initialisation. The
    /// SAE keeps its own architecture settings; the coefficients and warm-ups above
    /// (`l1_*`, `l0_*`) apply to the run.
    pub from_pretrained_path: Option<String>,

    // ---- the optimisation
    pub lr: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub lr_scheduler_name: String,
    pub lr_warm_up_steps: u64,
    pub lr_decay_steps: u64,
    /// `lr / 10` when absent.
    pub lr_end: Option<f64>,
    pub n_restart_cycles: u64,
    /// Global gradient-norm clipping (SAELens clips at 1.0); `null` disables it.
    pub max_grad_norm: Option<f64>,
    pub training_tokens: u64,
    pub finetuning_tokens: u64,
    pub finetuning_method: Option<String>,
    pub train_batch_size_tokens: usize,
    /// Batches used to estimate the `expected_average_only_in` scaling factor.
    pub n_batches_for_norm_estimate: usize,
    /// Shuffle buffer size, in batches (SAELens's mixing buffer).
    pub n_batches_in_buffer: usize,
    /// `false` keeps file order (to compare with SAELens step by step).
    pub shuffle: bool,
    pub seed: u64,

    // ---- dead latents and sparsity
    pub feature_sampling_window: u64,
    pub dead_feature_window: u64,
    /// Accepted for SAELens configs; SAELens's trainer does not use it either.
    pub dead_feature_threshold: f64,

    // ---- outputs
    /// Steps between metrics lines (SAELens's `wandb_log_frequency`).
    #[serde(alias = "wandb_log_frequency")]
    pub log_frequency: u64,
    pub n_checkpoints: u64,
    /// Relative to the output directory unless absolute.
    pub checkpoint_path: String,
    /// Names the run in the summary; SAELens's default when absent (see
    /// [`TrainConfig::run_name_for`]).
    pub run_name: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let sae = SaeConfig::new(Architecture::Standard, 1, 1);
        TrainConfig {
            model_name: None,
            hook_name: None,
            hook_head_index: None,
            context_size: 128,
            dataset_path: None,
            prepend_bos: true,
            architecture: "standard".into(),
            d_in: None,
            d_sae: None,
            expansion_factor: None,
            apply_b_dec_to_input: true,
            normalize_activations: "none".into(),
            reshape_activations: "none".into(),
            decoder_init_norm: Some(0.1),
            dtype: "float32".into(),
            device: "cpu".into(),
            autocast: false,
            l1_coefficient: sae.l1_coefficient,
            lp_norm: 1.0,
            l1_warm_up_steps: 0,
            jumprelu_init_threshold: sae.jumprelu_init_threshold,
            jumprelu_bandwidth: sae.jumprelu_bandwidth,
            jumprelu_sparsity_loss_mode: "step".into(),
            l0_coefficient: sae.l0_coefficient,
            l0_warm_up_steps: 0,
            pre_act_loss_coefficient: None,
            jumprelu_tanh_scale: sae.jumprelu_tanh_scale,
            jumprelu_ste_to_input: false,
            target_l0: None,
            k: None,
            activation_fn: None,
            activation_fn_kwargs: None,
            use_sparse_activations: false,
            aux_loss_coefficient: 1.0,
            rescale_acts_by_decoder_norm: true,
            topk_threshold_lr: sae.topk_threshold_lr,
            matryoshka_widths: Vec::new(),
            use_matryoshka_aux_loss: false,
            scale_sparsity_penalty_by_decoder_norm: true,
            normalize_sae_decoder: false,
            use_ghost_grads: false,
            noise_scale: 0.0,
            mse_loss_normalization: None,
            decoder_orthogonal_init: false,
            decoder_heuristic_init: false,
            decoder_heuristic_init_norm: 0.1,
            init_encoder_as_decoder_transpose: false,
            b_dec_init_method: "zeros".into(),
            from_pretrained_path: None,
            lr: 3e-4,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            lr_scheduler_name: "constant".into(),
            lr_warm_up_steps: 0,
            lr_decay_steps: 0,
            lr_end: None,
            n_restart_cycles: 1,
            max_grad_norm: Some(1.0),
            training_tokens: 2_000_000,
            finetuning_tokens: 0,
            finetuning_method: None,
            train_batch_size_tokens: 4096,
            n_batches_for_norm_estimate: 1000,
            n_batches_in_buffer: 20,
            shuffle: true,
            seed: 42,
            feature_sampling_window: 2000,
            dead_feature_window: 1000,
            dead_feature_threshold: 1e-8,
            log_frequency: 10,
            n_checkpoints: 0,
            checkpoint_path: "checkpoints".into(),
            run_name: None,
        }
    }
}

impl TrainConfig {
    /// Parses YAML; unknown fields and wrong types are errors naming the field.
    pub fn from_yaml(text: &str) -> Result<TrainConfig, CfgError> {
        crate::yaml::check_duplicate_keys(text)?;
        let cfg: TrainConfig =
            serde_norway::from_str(text).map_err(|e| CfgError::new("<yaml>", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("the config serialises")
    }

    pub fn architecture(&self) -> Result<Architecture, CfgError> {
        Architecture::parse(&self.architecture)
    }

    pub fn lr_scheduler(&self) -> Result<LrScheduler, CfgError> {
        match self.lr_scheduler_name.to_lowercase().as_str() {
            "constant" => Ok(LrScheduler::Constant),
            "cosineannealing" => Ok(LrScheduler::CosineAnnealing),
            "cosineannealingwarmrestarts" => Ok(LrScheduler::CosineAnnealingWarmRestarts),
            other => Err(CfgError::new(
                "lr_scheduler_name",
                format!("'{other}' is not one of constant, cosineannealing, cosineannealingwarmrestarts"),
            )),
        }
    }

    pub fn finetuning(&self) -> Result<Option<FinetuningMethod>, CfgError> {
        match self.finetuning_method.as_deref() {
            None => Ok(None),
            Some("scale") => Ok(Some(FinetuningMethod::Scale)),
            Some("decoder") => Ok(Some(FinetuningMethod::Decoder)),
            Some("unrotated_decoder") => Ok(Some(FinetuningMethod::UnrotatedDecoder)),
            Some(other) => Err(CfgError::new(
                "finetuning_method",
                format!("'{other}' is not one of scale, decoder, unrotated_decoder"),
            )),
        }
    }

    pub fn b_dec_init(&self) -> Result<BDecInitMethod, CfgError> {
        BDecInitMethod::parse(&self.b_dec_init_method)
    }

    /// The LR at the end of decay/annealing (`lr / 10` when not set).
    pub fn lr_end(&self) -> f64 {
        self.lr_end.unwrap_or(self.lr / 10.0)
    }

    /// Steps of the whole run, finetuning included (SAELens's `total_training_steps`).
    pub fn total_training_steps(&self) -> u64 {
        (self.training_tokens + self.finetuning_tokens) / self.train_batch_size_tokens.max(1) as u64
    }

    /// The run name, or SAELens's default `{d_sae}-L1-{l1}-LR-{lr}-Tokens-{tokens:.3e}`.
    pub fn run_name_for(&self, d_sae: usize) -> String {
        self.run_name.clone().unwrap_or_else(|| {
            let tokens = format!("{:.3e}", self.training_tokens as f64);
            // Python writes exponents with a sign and two digits: 2.000e+06
            let tokens = match tokens.split_once('e') {
                Some((m, e)) => {
                    let (sign, digits) = e.strip_prefix('-').map_or(("+", e), |d| ("-", d));
                    format!("{m}e{sign}{digits:0>2}")
                }
                None => tokens,
            };
            format!(
                "{d_sae}-L1-{}-LR-{}-Tokens-{tokens}",
                py_float(self.l1_coefficient),
                py_float(self.lr)
            )
        })
    }

    /// `k` from `k` or from SAELens 5's `activation_fn_kwargs`.
    fn topk_k(&self) -> Option<f64> {
        self.k.or_else(|| {
            self.activation_fn_kwargs
                .as_ref()
                .and_then(|kw| kw.get("k").copied())
        })
    }

    /// `d_sae` from `d_sae`, `expansion_factor * d_in`, or 4 * d_in (SAELens 5).
    pub fn d_sae_for(&self, d_in: usize) -> usize {
        self.d_sae
            .unwrap_or(d_in * self.expansion_factor.unwrap_or(4))
    }

    /// SAELens 5's `__post_init__` checks (and SAELens 6's scheduler checks).
    pub fn validate(&self) -> Result<(), CfgError> {
        let arch = self.architecture()?;
        if self.d_sae.is_some() && self.expansion_factor.is_some() {
            return Err(CfgError::new(
                "d_sae",
                "set d_sae or expansion_factor, not both",
            ));
        }
        if let Some(f) = &self.activation_fn {
            let act_is_topk = f == "topk";
            if arch == Architecture::TopK && !act_is_topk {
                return Err(CfgError::new(
                    "activation_fn",
                    "the topk architecture needs activation_fn: topk (or leave it out)",
                ));
            }
            if !act_is_topk {
                ActivationFn::parse(f)?;
            }
        }
        let topk_family = matches!(
            arch,
            Architecture::TopK | Architecture::BatchTopK | Architecture::MatryoshkaBatchTopK
        );
        if topk_family && self.topk_k().is_none() {
            return Err(CfgError::new(
                "k",
                format!("the {arch} architecture needs k (active latents per token)"),
            ));
        }
        self.b_dec_init()?;
        NormalizeActivations::parse(&self.normalize_activations)?;
        if self.normalize_sae_decoder && self.decoder_heuristic_init {
            return Err(CfgError::new(
                "normalize_sae_decoder",
                "you can't normalize the decoder and use decoder_heuristic_init",
            ));
        }
        if self.normalize_sae_decoder && self.scale_sparsity_penalty_by_decoder_norm {
            return Err(CfgError::new(
                "normalize_sae_decoder",
                "weighting the sparsity penalty by decoder norms (scale_sparsity_penalty_by_decoder_norm, on by default) makes no sense with a unit-norm decoder: set it to false",
            ));
        }
        let finetuning = self.finetuning()?;
        if finetuning == Some(FinetuningMethod::Decoder) && self.apply_b_dec_to_input {
            return Err(CfgError::new(
                "finetuning_method",
                "finetuning the decoder needs apply_b_dec_to_input: false",
            ));
        }
        if finetuning.is_some() && self.finetuning_tokens == 0 {
            return Err(CfgError::new(
                "finetuning_tokens",
                "finetuning_method is set but finetuning_tokens is 0",
            ));
        }
        if self.context_size < 0 {
            return Err(CfgError::new(
                "context_size",
                format!("the provided context_size is {}, which is negative; expected a positive context_size", self.context_size),
            ));
        }
        if self.train_batch_size_tokens == 0 {
            return Err(CfgError::new(
                "train_batch_size_tokens",
                "must be at least 1",
            ));
        }
        if self.total_training_steps() == 0 {
            return Err(CfgError::new(
                "training_tokens",
                format!(
                    "{} tokens make no step of {} tokens",
                    self.training_tokens + self.finetuning_tokens,
                    self.train_batch_size_tokens
                ),
            ));
        }
        let positive = |x: f64| x > 0.0;
        if !positive(self.lr) {
            return Err(CfgError::new("lr", "must be positive"));
        }
        for (name, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return Err(CfgError::new(name, format!("must be in [0, 1), got {b}")));
            }
        }
        let sched = self.lr_scheduler()?;
        let steps = self.total_training_steps();
        if self.lr_warm_up_steps + self.lr_decay_steps > steps {
            return Err(CfgError::new(
                "lr_warm_up_steps",
                format!(
                    "lr_warm_up_steps + lr_decay_steps ({}) exceed the {steps} training steps",
                    self.lr_warm_up_steps + self.lr_decay_steps
                ),
            ));
        }
        if self.lr_decay_steps > 0 && sched != LrScheduler::Constant && self.lr_end() == 0.0 {
            return Err(CfgError::new(
                "lr_end",
                "lr_decay_steps with lr_end 0 would decay from 0 to 0",
            ));
        }
        if sched == LrScheduler::CosineAnnealingWarmRestarts {
            if self.n_restart_cycles == 0 {
                return Err(CfgError::new("n_restart_cycles", "must be at least 1"));
            }
            if (steps - self.lr_warm_up_steps - self.lr_decay_steps) / self.n_restart_cycles == 0 {
                return Err(CfgError::new(
                    "n_restart_cycles",
                    "more restart cycles than annealing steps",
                ));
            }
        }
        if let Some(m) = self.max_grad_norm {
            if !positive(m) {
                return Err(CfgError::new(
                    "max_grad_norm",
                    "must be positive (or null to disable clipping)",
                ));
            }
        }
        for (name, v) in [
            ("feature_sampling_window", self.feature_sampling_window),
            ("dead_feature_window", self.dead_feature_window),
            ("log_frequency", self.log_frequency),
            ("n_restart_cycles", self.n_restart_cycles),
        ] {
            if v == 0 {
                return Err(CfgError::new(name, "must be at least 1"));
            }
        }
        if self.dead_feature_threshold < 0.0 {
            return Err(CfgError::new(
                "dead_feature_threshold",
                "must not be negative",
            ));
        }
        if self.shuffle && self.n_batches_in_buffer < 2 {
            return Err(CfgError::new(
                "n_batches_in_buffer",
                "the shuffle buffer needs at least 2 batches",
            ));
        }
        if let Some(d) = self.d_in {
            self.sae_config(d)?;
        }
        Dtype::parse(&self.dtype)?;
        Ok(())
    }

    /// The SAE config this training config describes, for inputs of width `d_in`.
    pub fn sae_config(&self, d_in: usize) -> Result<SaeConfig, CfgError> {
        if let Some(d) = self.d_in {
            if d != d_in {
                return Err(CfgError::new(
                    "d_in",
                    format!("the config says {d}, the activations have {d_in}"),
                ));
            }
        }
        let arch = self.architecture()?;
        let mut c = SaeConfig::new(arch, d_in, self.d_sae_for(d_in));
        c.dtype = Dtype::parse(&self.dtype)?;
        c.device = self.device.clone();
        c.apply_b_dec_to_input = self.apply_b_dec_to_input;
        c.normalize_activations = NormalizeActivations::parse(&self.normalize_activations)?;
        c.reshape_activations =
            crate::sae_cfg::ReshapeActivations::parse(&self.reshape_activations)?;
        c.decoder_init_norm = self.decoder_init_norm;
        c.l1_coefficient = self.l1_coefficient;
        c.lp_norm = self.lp_norm;
        c.l1_warm_up_steps = self.l1_warm_up_steps;
        c.jumprelu_init_threshold = self.jumprelu_init_threshold;
        c.jumprelu_bandwidth = self.jumprelu_bandwidth;
        c.jumprelu_sparsity_loss_mode = SparsityLossMode::parse(&self.jumprelu_sparsity_loss_mode)?;
        c.l0_coefficient = self.l0_coefficient;
        c.l0_warm_up_steps = self.l0_warm_up_steps;
        c.pre_act_loss_coefficient = self.pre_act_loss_coefficient;
        c.jumprelu_tanh_scale = self.jumprelu_tanh_scale;
        c.jumprelu_ste_to_input = self.jumprelu_ste_to_input;
        c.target_l0 = self.target_l0;
        if let Some(k) = self.topk_k() {
            c.k = k;
        }
        c.use_sparse_activations = self.use_sparse_activations;
        c.aux_loss_coefficient = self.aux_loss_coefficient;
        c.rescale_acts_by_decoder_norm = self.rescale_acts_by_decoder_norm;
        c.topk_threshold_lr = self.topk_threshold_lr;
        c.matryoshka_widths = self.matryoshka_widths.clone();
        c.use_matryoshka_aux_loss = self.use_matryoshka_aux_loss;
        c.scale_sparsity_penalty_by_decoder_norm = self.scale_sparsity_penalty_by_decoder_norm;
        c.normalize_sae_decoder = self.normalize_sae_decoder;
        c.use_ghost_grads = self.use_ghost_grads;
        c.noise_scale = self.noise_scale;
        c.mse_loss_normalization = match self.mse_loss_normalization.as_deref() {
            None | Some("none") => None,
            Some(s) => Some(MseLossNormalization::parse(s)?),
        };
        c.decoder_orthogonal_init = self.decoder_orthogonal_init;
        c.decoder_heuristic_init = self.decoder_heuristic_init;
        c.decoder_heuristic_init_norm = self.decoder_heuristic_init_norm;
        c.init_encoder_as_decoder_transpose = self.init_encoder_as_decoder_transpose;
        c.activation_fn = match self.activation_fn.as_deref() {
            None | Some("topk") => ActivationFn::Relu,
            Some(s) => ActivationFn::parse(s)?,
        };
        let mut meta = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            meta.insert(k.to_string(), v);
        };
        if let Some(m) = &self.model_name {
            put("model_name", m.clone().into());
        }
        if let Some(h) = &self.hook_name {
            put("hook_name", h.clone().into());
        }
        put(
            "hook_head_index",
            self.hook_head_index
                .map_or(serde_json::Value::Null, Into::into),
        );
        put("context_size", self.context_size.into());
        put("prepend_bos", self.prepend_bos.into());
        if let Some(d) = &self.dataset_path {
            put("dataset_path", d.clone().into());
        }
        c.metadata = meta;
        c.validate()?;
        Ok(c)
    }
}

/// A float as Python's `str` writes it (`2.0`, `0.0003`, `1e-05`).
fn py_float(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-4 || x.abs() >= 1e16) {
        let s = format!("{x:e}");
        let (m, e) = s.split_once('e').unwrap();
        let (sign, digits) = e.strip_prefix('-').map_or(("+", e), |d| ("-", d));
        format!("{m}e{sign}{digits:0>2}")
    } else if x.fract() == 0.0 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests;
