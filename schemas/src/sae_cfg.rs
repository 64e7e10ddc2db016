//! SAELens SAE configs (`cfg.json`), in both directions.
//!
//! [`SaeConfig`] is one flat struct holding every option of every architecture, under
//! SAELens's field names. It reads:
//! * SAELens 6.x training configs (`save_model`: architecture fields + `metadata`),
//! * SAELens 6.x inference configs (`save_inference_model`, e.g. a BatchTopK SAE saved
//!   as `jumprelu`),
//! * pre-6.0 configs (SAELens 5's flat `TrainingSAEConfig`, and the whole
//!   `LanguageModelSAERunnerConfig` that older checkpoints on the hub carry),
//!
//! and writes the two SAELens 6 formats. As SAELens does, unknown fields in a
//! `cfg.json` are ignored when reading (files carry runner settings); a field that is
//! present with the wrong type is an error naming it.
//!
//! Options SAELens 6 dropped but SAELens 5 (the seed) had, such as ghost grads or a
//! unit-norm decoder, are kept here too. They are written to `cfg.json` only when they
//! differ from SAELens 6 behaviour; SAELens ignores them when it loads the file.

use serde_json::{Map, Value};
use std::fmt;

/// A config problem, naming the field and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct CfgError {
    pub field: String,
    pub message: String,
}

impl CfgError {
    fn describe(&self) -> String {
        if self.field.starts_with('<') {
            self.message.clone()
        } else {
            format!("field `{}`: {}", self.field, self.message)
        }
    }

    pub fn new(field: &str, message: impl Into<String>) -> CfgError {
        CfgError {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident, $field:literal { $($var:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($var),+ }
        impl $name {
            /// All accepted spellings, for error messages.
            pub const NAMES: &'static [&'static str] = &[$($s),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
            pub fn parse(s: &str) -> Result<Self, CfgError> {
                match s {
                    $($s => Ok($name::$var),)+
                    _ => Err(CfgError::new($field, format!(
                        "'{s}' is not one of {}", Self::NAMES.join(", ")))),
                }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

string_enum!(
    /// SAE architectures (SAELens names).
    Architecture, "architecture" {
        Standard => "standard",
        Gated => "gated",
        JumpRelu => "jumprelu",
        TopK => "topk",
        BatchTopK => "batchtopk",
        MatryoshkaBatchTopK => "matryoshka_batchtopk",
    }
);

string_enum!(
    /// How SAE inputs are normalised.
    NormalizeActivations, "normalize_activations" {
        None => "none",
        ExpectedAverageOnlyIn => "expected_average_only_in",
        ConstantNormRescale => "constant_norm_rescale",
        LayerNorm => "layer_norm",
    }
);

string_enum!(
    /// `hook_z` SAEs take `[..., n_heads, d_head]` inputs and flatten the heads.
    ReshapeActivations, "reshape_activations" {
        None => "none",
        HookZ => "hook_z",
    }
);

string_enum!(
    /// JumpReLU sparsity penalty: DeepMind's L0 (`step`), Anthropic's `tanh`, or Gemma
    /// Scope 2's `quadratic` penalty around `target_l0`.
    SparsityLossMode, "jumprelu_sparsity_loss_mode" {
        Step => "step",
        Tanh => "tanh",
        Quadratic => "quadratic",
    }
);

string_enum!(
    /// SAELens 5's optional MSE normalisation.
    MseLossNormalization, "mse_loss_normalization" {
        DenseBatch => "dense_batch",
    }
);

string_enum!(
    /// SAELens 5's activation function of the standard SAE.
    ActivationFn, "activation_fn" {
        Relu => "relu",
        TanhRelu => "tanh-relu",
    }
);

string_enum!(
    /// How `b_dec` is initialised from the first batch of activations.
    BDecInitMethod, "b_dec_init_method" {
        GeometricMedian => "geometric_median",
        Mean => "mean",
        Zeros => "zeros",
    }
);

/// Parameter storage type on disk. The SAE math itself always runs in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    F16,
    BF16,
}

impl Dtype {
    pub const NAMES: &'static [&'static str] = &["float32", "float64", "float16", "bfloat16"];
    /// SAELens's canonical spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
        }
    }
    /// Accepts `float32` and `torch.float32` spellings, as SAELens does.
    pub fn parse(s: &str) -> Result<Dtype, CfgError> {
        match s.strip_prefix("torch.").unwrap_or(s) {
            "float32" => Ok(Dtype::F32),
            "float64" => Ok(Dtype::F64),
            "float16" => Ok(Dtype::F16),
            "bfloat16" => Ok(Dtype::BF16),
            _ => Err(CfgError::new(
                "dtype",
                format!("'{s}' is not one of {}", Self::NAMES.join(", ")),
            )),
        }
    }
}

/// Every SAE option, under SAELens field names. See the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct SaeConfig {
    // --- SAEConfig (every SAE)
    pub architecture: Architecture,
    pub d_in: usize,
    pub d_sae: usize,
    pub dtype: Dtype,
    pub device: String,
    pub apply_b_dec_to_input: bool,
    pub normalize_activations: NormalizeActivations,
    pub reshape_activations: ReshapeActivations,
    /// SAELens's free-form metadata (model, hook, versions, training details).
    pub metadata: Map<String, Value>,

    // --- TrainingSAEConfig
    /// Decoder rows are initialised to this norm and `W_enc = W_dec^T` (SAELens 6).
    /// `None` selects SAELens 5's initialisation (independent kaiming-uniform).
    pub decoder_init_norm: Option<f64>,

    // --- standard, gated
    pub l1_coefficient: f64,
    pub lp_norm: f64,
    pub l1_warm_up_steps: u64,

    // --- jumprelu
    pub jumprelu_init_threshold: f64,
    pub jumprelu_bandwidth: f64,
    pub jumprelu_sparsity_loss_mode: SparsityLossMode,
    pub l0_coefficient: f64,
    pub l0_warm_up_steps: u64,
    pub pre_act_loss_coefficient: Option<f64>,
    pub jumprelu_tanh_scale: f64,
    pub jumprelu_ste_to_input: bool,
    pub target_l0: Option<f64>,

    // --- topk, batchtopk, matryoshka_batchtopk
    /// Active latents per token (topk: an integer; batchtopk: the batch average).
    pub k: f64,
    /// SAELens's switch to sparse decoder products. On the CPU each step chooses its
    /// path by the latents' density whatever this says, and `true` keeps it sparse;
    /// on a GPU it alone picks the sparse path.
    pub use_sparse_activations: bool,
    pub aux_loss_coefficient: f64,
    pub rescale_acts_by_decoder_norm: bool,
    pub topk_threshold_lr: f64,
    pub matryoshka_widths: Vec<usize>,
    pub use_matryoshka_aux_loss: bool,

    // --- SAELens 5 (seed) options; SAELens 6 behaviour in brackets
    /// Weight the standard SAE's Lp penalty by decoder row norms [always].
    pub scale_sparsity_penalty_by_decoder_norm: bool,
    /// Keep decoder rows at unit norm during training [false].
    pub normalize_sae_decoder: bool,
    /// Ghost grads for dead latents, standard SAEs only [false].
    pub use_ghost_grads: bool,
    /// Gaussian noise added to pre-activations in training [0].
    pub noise_scale: f64,
    pub mse_loss_normalization: Option<MseLossNormalization>,
    pub decoder_orthogonal_init: bool,
    pub decoder_heuristic_init: bool,
    pub decoder_heuristic_init_norm: f64,
    pub init_encoder_as_decoder_transpose: bool,
    /// Standard SAE activation [relu].
    pub activation_fn: ActivationFn,
    /// Train JumpReLU's `log_threshold` rather than `threshold` (SAELens 5) [false].
    pub jumprelu_log_threshold: bool,
    /// TopK AuxK decodes with `b_dec` and the output normalisation (SAELens 5) [false].
    pub topk_aux_uses_decoder_bias: bool,
}

/// Metadata keys SAELens keeps when it converts a pre-6.0 config.
const LLM_METADATA_KEYS: &[&str] = &[
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
    "hook_name_out",
    "hook_head_index_out",
    "hf_hook_name",
    "hf_hook_name_out",
];

impl SaeConfig {
    /// A config with SAELens 6.x training defaults for `architecture`.
    pub fn new(architecture: Architecture, d_in: usize, d_sae: usize) -> SaeConfig {
        let topk_family = matches!(
            architecture,
            Architecture::TopK | Architecture::BatchTopK | Architecture::MatryoshkaBatchTopK
        );
        SaeConfig {
            architecture,
            d_in,
            d_sae,
            dtype: Dtype::F32,
            device: "cpu".into(),
            apply_b_dec_to_input: true,
            normalize_activations: NormalizeActivations::None,
            reshape_activations: ReshapeActivations::None,
            metadata: Map::new(),
            decoder_init_norm: Some(0.1),
            l1_coefficient: 1.0,
            lp_norm: 1.0,
            l1_warm_up_steps: 0,
            jumprelu_init_threshold: 0.01,
            jumprelu_bandwidth: 0.05,
            jumprelu_sparsity_loss_mode: SparsityLossMode::Step,
            l0_coefficient: 1.0,
            l0_warm_up_steps: 0,
            pre_act_loss_coefficient: None,
            jumprelu_tanh_scale: 4.0,
            jumprelu_ste_to_input: false,
            target_l0: None,
            k: 100.0,
            use_sparse_activations: false,
            aux_loss_coefficient: 1.0,
            // TopKTrainingSAEConfig defaults to true; the inference TopKSAEConfig to false.
            rescale_acts_by_decoder_norm: topk_family,
            topk_threshold_lr: 0.01,
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
            activation_fn: ActivationFn::Relu,
            jumprelu_log_threshold: false,
            topk_aux_uses_decoder_bias: false,
        }
    }

    /// Parses the text of a `cfg.json`.
    pub fn from_json_str(text: &str) -> Result<SaeConfig, CfgError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| CfgError::new("<json>", format!("not valid JSON: {e}")))?;
        Self::from_json(&v)
    }

    /// Reads a SAELens `cfg.json` value of any version (see the module docs).
    pub fn from_json(v: &Value) -> Result<SaeConfig, CfgError> {
        let obj = v
            .as_object()
            .ok_or_else(|| CfgError::new("<json>", "expected a JSON object"))?;
        let version = obj
            .get("sae_lens_version")
            .and_then(Value::as_str)
            .or_else(|| {
                obj.get("metadata")
                    .and_then(|m| m.get("sae_lens_version"))
                    .and_then(Value::as_str)
            });
        let pre6 = version.is_none_or(|s| major_version(s).is_none_or(|m| m < 6));
        let cfg = if pre6 {
            Self::from_pre6(obj)?
        } else {
            Self::from_v6(obj)?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn from_v6(obj: &Map<String, Value>) -> Result<SaeConfig, CfgError> {
        let r = Reader(obj);
        let arch = Architecture::parse(&r.req_str("architecture")?)?;
        let mut c = SaeConfig::new(arch, r.req_usize("d_in")?, r.req_usize("d_sae")?);
        // An inference TopK config defaults to no rescaling; a training one to rescaling.
        // The training save always writes the field, so the inference default applies
        // only when it is absent.
        c.rescale_acts_by_decoder_norm = false;
        c.read_common(&r)?;
        c.read_arch_fields(&r)?;
        c.read_seed_fields(&r)?;
        if let Some(m) = obj.get("metadata") {
            c.metadata = m
                .as_object()
                .cloned()
                .ok_or_else(|| CfgError::new("metadata", "expected a JSON object"))?;
        }
        Ok(c)
    }

    /// SAELens's `handle_pre_6_0_config`, plus SAELens 5's training fields.
    fn from_pre6(obj: &Map<String, Value>) -> Result<SaeConfig, CfgError> {
        let mut o = Map::new();
        for (k, v) in obj {
            let k = match k.as_str() {
                "hook_point" => "hook_name",
                "hook_point_head_index" => "hook_head_index",
                "activation_fn_str" => "activation_fn",
                other => other,
            };
            o.insert(k.to_string(), v.clone());
        }
        let r = Reader(&o);
        let act = r.opt_str("activation_fn")?.unwrap_or_else(|| "relu".into());
        let mut arch = Architecture::parse(
            &r.opt_str("architecture")?
                .unwrap_or_else(|| "standard".into()),
        )?;
        let mut k = None;
        if act == "topk" {
            let kw = o.get("activation_fn_kwargs").and_then(|v| v.get("k"));
            match kw {
                Some(v) => {
                    arch = Architecture::TopK;
                    k = Some(v.as_f64().ok_or_else(|| {
                        CfgError::new(
                            "activation_fn_kwargs.k",
                            format!("expected a number, got {v}"),
                        )
                    })?);
                }
                None => {
                    return Err(CfgError::new(
                        "activation_fn_kwargs",
                        "activation_fn 'topk' needs activation_fn_kwargs.k",
                    ))
                }
            }
        }
        let mut c = SaeConfig::new(arch, r.req_usize("d_in")?, r.req_usize("d_sae")?);
        c.read_common(&r)?;
        if let Some(k) = k {
            c.k = k;
        }
        c.activation_fn = match act.as_str() {
            "topk" => ActivationFn::Relu,
            other => ActivationFn::parse(other)?,
        };
        // SAELens 5 semantics for what the old files leave out.
        c.decoder_init_norm = None;
        c.rescale_acts_by_decoder_norm = false;
        c.scale_sparsity_penalty_by_decoder_norm = false;
        c.jumprelu_log_threshold = arch == Architecture::JumpRelu;
        c.topk_aux_uses_decoder_bias = arch == Architecture::TopK;
        c.jumprelu_init_threshold = 0.001;
        c.jumprelu_bandwidth = 0.001;
        c.l1_coefficient = 1e-3;
        c.normalize_sae_decoder = false;
        c.read_arch_fields(&r)?;
        c.read_seed_fields(&r)?;
        // SAELens 5 used l1_coefficient as the JumpReLU L0 coefficient.
        if arch == Architecture::JumpRelu && !o.contains_key("l0_coefficient") {
            c.l0_coefficient = c.l1_coefficient;
            c.l0_warm_up_steps = c.l1_warm_up_steps;
        }
        if !o.contains_key("reshape_activations") {
            let hook = r.opt_str("hook_name")?.unwrap_or_default();
            if hook.contains("hook_z") {
                c.reshape_activations = ReshapeActivations::HookZ;
            }
        }
        let mut meta = Map::new();
        for key in LLM_METADATA_KEYS {
            if let Some(v) = o.get(*key) {
                meta.insert(key.to_string(), v.clone());
            }
        }
        c.metadata = meta;
        Ok(c)
    }

    fn read_common(&mut self, r: &Reader) -> Result<(), CfgError> {
        if let Some(s) = r.opt_str("dtype")? {
            self.dtype = Dtype::parse(&s)?;
        }
        if let Some(s) = r.opt_str("device")? {
            self.device = s;
        }
        if let Some(b) = r.opt_bool("apply_b_dec_to_input")? {
            self.apply_b_dec_to_input = b;
        }
        match r.0.get("normalize_activations") {
            None | Some(Value::Null) => {}
            // Old configs stored a bool: true meant expected_average_only_in.
            Some(Value::Bool(b)) => {
                self.normalize_activations = if *b {
                    NormalizeActivations::ExpectedAverageOnlyIn
                } else {
                    NormalizeActivations::None
                }
            }
            Some(Value::String(s)) => {
                if s == "covariance_whitening" {
                    return Err(CfgError::new(
                        "normalize_activations",
                        "'covariance_whitening' is not supported yet",
                    ));
                }
                self.normalize_activations = NormalizeActivations::parse(s)?
            }
            Some(v) => {
                return Err(CfgError::new(
                    "normalize_activations",
                    format!("expected a string, got {v}"),
                ))
            }
        }
        if let Some(s) = r.opt_str("reshape_activations")? {
            self.reshape_activations = ReshapeActivations::parse(&s)?;
        }
        Ok(())
    }

    fn read_arch_fields(&mut self, r: &Reader) -> Result<(), CfgError> {
        if r.0.contains_key("decoder_init_norm") {
            self.decoder_init_norm = r.opt_f64_or_null("decoder_init_norm")?;
        }
        r.set_f64("l1_coefficient", &mut self.l1_coefficient)?;
        r.set_f64("lp_norm", &mut self.lp_norm)?;
        r.set_u64("l1_warm_up_steps", &mut self.l1_warm_up_steps)?;
        r.set_f64("jumprelu_init_threshold", &mut self.jumprelu_init_threshold)?;
        r.set_f64("jumprelu_bandwidth", &mut self.jumprelu_bandwidth)?;
        if let Some(s) = r.opt_str("jumprelu_sparsity_loss_mode")? {
            self.jumprelu_sparsity_loss_mode = SparsityLossMode::parse(&s)?;
        }
        r.set_f64("l0_coefficient", &mut self.l0_coefficient)?;
        r.set_u64("l0_warm_up_steps", &mut self.l0_warm_up_steps)?;
        if r.0.contains_key("pre_act_loss_coefficient") {
            self.pre_act_loss_coefficient = r.opt_f64_or_null("pre_act_loss_coefficient")?;
        }
        r.set_f64("jumprelu_tanh_scale", &mut self.jumprelu_tanh_scale)?;
        r.set_bool("jumprelu_ste_to_input", &mut self.jumprelu_ste_to_input)?;
        if r.0.contains_key("target_l0") {
            self.target_l0 = r.opt_f64_or_null("target_l0")?;
        }
        r.set_f64("k", &mut self.k)?;
        r.set_bool("use_sparse_activations", &mut self.use_sparse_activations)?;
        r.set_f64("aux_loss_coefficient", &mut self.aux_loss_coefficient)?;
        r.set_bool(
            "rescale_acts_by_decoder_norm",
            &mut self.rescale_acts_by_decoder_norm,
        )?;
        r.set_f64("topk_threshold_lr", &mut self.topk_threshold_lr)?;
        if let Some(v) = r.0.get("matryoshka_widths") {
            let arr = v.as_array().ok_or_else(|| {
                CfgError::new(
                    "matryoshka_widths",
                    format!("expected a list of integers, got {v}"),
                )
            })?;
            self.matryoshka_widths = arr
                .iter()
                .map(|w| {
                    w.as_u64().map(|w| w as usize).ok_or_else(|| {
                        CfgError::new(
                            "matryoshka_widths",
                            format!("expected a list of integers, got {v}"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        r.set_bool("use_matryoshka_aux_loss", &mut self.use_matryoshka_aux_loss)?;
        Ok(())
    }

    fn read_seed_fields(&mut self, r: &Reader) -> Result<(), CfgError> {
        r.set_bool(
            "scale_sparsity_penalty_by_decoder_norm",
            &mut self.scale_sparsity_penalty_by_decoder_norm,
        )?;
        r.set_bool("normalize_sae_decoder", &mut self.normalize_sae_decoder)?;
        r.set_bool("use_ghost_grads", &mut self.use_ghost_grads)?;
        r.set_f64("noise_scale", &mut self.noise_scale)?;
        match r.0.get("mse_loss_normalization") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" => self.mse_loss_normalization = None,
            Some(Value::String(s)) => {
                self.mse_loss_normalization = Some(MseLossNormalization::parse(s)?)
            }
            Some(v) => {
                return Err(CfgError::new(
                    "mse_loss_normalization",
                    format!("expected a string or null, got {v}"),
                ))
            }
        }
        r.set_bool("decoder_orthogonal_init", &mut self.decoder_orthogonal_init)?;
        r.set_bool("decoder_heuristic_init", &mut self.decoder_heuristic_init)?;
        r.set_f64(
            "decoder_heuristic_init_norm",
            &mut self.decoder_heuristic_init_norm,
        )?;
        r.set_bool(
            "init_encoder_as_decoder_transpose",
            &mut self.init_encoder_as_decoder_transpose,
        )?;
        r.set_bool("jumprelu_log_threshold", &mut self.jumprelu_log_threshold)?;
        r.set_bool(
            "topk_aux_uses_decoder_bias",
            &mut self.topk_aux_uses_decoder_bias,
        )?;
        Ok(())
    }

    /// SAELens's checks, with messages naming the field.
    pub fn validate(&self) -> Result<(), CfgError> {
        if self.d_in == 0 {
            return Err(CfgError::new("d_in", "must be positive"));
        }
        if self.d_sae == 0 {
            return Err(CfgError::new("d_sae", "must be positive"));
        }
        // NaN fails every check written as "must be positive"
        let positive = |x: f64| x > 0.0;
        if !positive(self.lp_norm) {
            return Err(CfgError::new(
                "lp_norm",
                format!("must be positive, got {}", self.lp_norm),
            ));
        }
        let max_k = self.d_sae as f64;
        match self.architecture {
            Architecture::TopK if self.k < 1.0 || self.k.fract() != 0.0 || self.k > max_k => {
                return Err(CfgError::new(
                    "k",
                    format!(
                        "topk needs an integer k in 1..={}, got {}",
                        self.d_sae, self.k
                    ),
                ));
            }
            Architecture::BatchTopK | Architecture::MatryoshkaBatchTopK
                if !positive(self.k) || self.k > max_k =>
            {
                return Err(CfgError::new(
                    "k",
                    format!(
                        "{} needs 0 < k <= d_sae ({}), got {}",
                        self.architecture, self.d_sae, self.k
                    ),
                ));
            }
            Architecture::JumpRelu => {
                if !positive(self.jumprelu_bandwidth) {
                    return Err(CfgError::new("jumprelu_bandwidth", "must be positive"));
                }
                if self.jumprelu_sparsity_loss_mode == SparsityLossMode::Quadratic {
                    match self.target_l0 {
                        None => {
                            return Err(CfgError::new(
                                "target_l0",
                                "must be set for jumprelu_sparsity_loss_mode 'quadratic'",
                            ))
                        }
                        Some(t) if t <= 0.0 => {
                            return Err(CfgError::new("target_l0", "must be greater than 0"))
                        }
                        Some(t) if t > self.d_sae as f64 => {
                            return Err(CfgError::new(
                                "target_l0",
                                format!("must be at most d_sae ({}), got {t}", self.d_sae),
                            ))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        if self.architecture == Architecture::MatryoshkaBatchTopK {
            let w = &self.matryoshka_widths;
            if w.is_empty() {
                return Err(CfgError::new("matryoshka_widths", "must not be empty"));
            }
            if w.contains(&0) {
                return Err(CfgError::new(
                    "matryoshka_widths",
                    "must contain only positive widths",
                ));
            }
            if w.windows(2).any(|p| p[0] >= p[1]) {
                return Err(CfgError::new(
                    "matryoshka_widths",
                    "must be strictly increasing",
                ));
            }
            if *w.last().unwrap() > self.d_sae {
                return Err(CfgError::new(
                    "matryoshka_widths",
                    format!("widths must not exceed d_sae ({})", self.d_sae),
                ));
            }
        }
        if self.use_ghost_grads && self.architecture != Architecture::Standard {
            return Err(CfgError::new(
                "use_ghost_grads",
                format!("{} SAEs do not support ghost grads", self.architecture),
            ));
        }
        if self.activation_fn == ActivationFn::TanhRelu
            && self.architecture != Architecture::Standard
        {
            return Err(CfgError::new(
                "activation_fn",
                "'tanh-relu' is only supported for standard SAEs",
            ));
        }
        if self.jumprelu_log_threshold && self.architecture != Architecture::JumpRelu {
            return Err(CfgError::new(
                "jumprelu_log_threshold",
                "only applies to jumprelu SAEs",
            ));
        }
        if self.topk_aux_uses_decoder_bias && self.architecture != Architecture::TopK {
            return Err(CfgError::new(
                "topk_aux_uses_decoder_bias",
                "only applies to topk SAEs",
            ));
        }
        Ok(())
    }

    /// Matryoshka level widths with the final level `d_sae` appended when missing (as
    /// SAELens does, with a warning there).
    pub fn matryoshka_levels(&self) -> Vec<usize> {
        let mut w = self.matryoshka_widths.clone();
        if w.last() != Some(&self.d_sae) {
            w.push(self.d_sae);
        }
        w
    }

    /// The architecture an inference save uses: BatchTopK-family SAEs become JumpReLU.
    pub fn inference_architecture(&self) -> Architecture {
        match self.architecture {
            Architecture::BatchTopK | Architecture::MatryoshkaBatchTopK => Architecture::JumpRelu,
            a => a,
        }
    }

    /// The training fields SAELens writes for this architecture, in its order.
    fn arch_fields(&self) -> Vec<(&'static str, Value)> {
        let f = |x: f64| Value::from(x);
        let opt = |x: Option<f64>| x.map_or(Value::Null, Value::from);
        let mut v: Vec<(&'static str, Value)> =
            vec![("decoder_init_norm", opt(self.decoder_init_norm))];
        match self.architecture {
            Architecture::Standard => {
                v.push(("l1_coefficient", f(self.l1_coefficient)));
                v.push(("lp_norm", f(self.lp_norm)));
                v.push(("l1_warm_up_steps", self.l1_warm_up_steps.into()));
            }
            Architecture::Gated => {
                v.push(("l1_coefficient", f(self.l1_coefficient)));
                v.push(("l1_warm_up_steps", self.l1_warm_up_steps.into()));
            }
            Architecture::JumpRelu => {
                v.push(("jumprelu_init_threshold", f(self.jumprelu_init_threshold)));
                v.push(("jumprelu_bandwidth", f(self.jumprelu_bandwidth)));
                v.push((
                    "jumprelu_sparsity_loss_mode",
                    self.jumprelu_sparsity_loss_mode.as_str().into(),
                ));
                v.push(("l0_coefficient", f(self.l0_coefficient)));
                v.push(("l0_warm_up_steps", self.l0_warm_up_steps.into()));
                v.push((
                    "pre_act_loss_coefficient",
                    opt(self.pre_act_loss_coefficient),
                ));
                v.push(("jumprelu_tanh_scale", f(self.jumprelu_tanh_scale)));
                v.push(("jumprelu_ste_to_input", self.jumprelu_ste_to_input.into()));
                v.push(("target_l0", opt(self.target_l0)));
            }
            Architecture::TopK | Architecture::BatchTopK | Architecture::MatryoshkaBatchTopK => {
                let k = if self.architecture == Architecture::TopK {
                    Value::from(self.k as u64)
                } else {
                    num(self.k)
                };
                v.push(("k", k));
                v.push(("use_sparse_activations", self.use_sparse_activations.into()));
                v.push(("aux_loss_coefficient", f(self.aux_loss_coefficient)));
                v.push((
                    "rescale_acts_by_decoder_norm",
                    self.rescale_acts_by_decoder_norm.into(),
                ));
                if self.architecture != Architecture::TopK {
                    v.push(("topk_threshold_lr", f(self.topk_threshold_lr)));
                }
                if self.architecture == Architecture::MatryoshkaBatchTopK {
                    v.push(("matryoshka_widths", self.matryoshka_widths.clone().into()));
                    v.push((
                        "use_matryoshka_aux_loss",
                        self.use_matryoshka_aux_loss.into(),
                    ));
                }
            }
        }
        v
    }

    /// Seed-only options that differ from SAELens 6 behaviour.
    fn seed_fields(&self) -> Vec<(&'static str, Value)> {
        let mut v: Vec<(&'static str, Value)> = Vec::new();
        if self.architecture == Architecture::Standard
            && !self.scale_sparsity_penalty_by_decoder_norm
        {
            v.push(("scale_sparsity_penalty_by_decoder_norm", false.into()));
        }
        if self.normalize_sae_decoder {
            v.push(("normalize_sae_decoder", true.into()));
        }
        if self.use_ghost_grads {
            v.push(("use_ghost_grads", true.into()));
        }
        if self.noise_scale != 0.0 {
            v.push(("noise_scale", self.noise_scale.into()));
        }
        if let Some(m) = self.mse_loss_normalization {
            v.push(("mse_loss_normalization", m.as_str().into()));
        }
        if self.decoder_orthogonal_init {
            v.push(("decoder_orthogonal_init", true.into()));
        }
        if self.decoder_heuristic_init {
            v.push(("decoder_heuristic_init", true.into()));
            v.push((
                "decoder_heuristic_init_norm",
                self.decoder_heuristic_init_norm.into(),
            ));
        }
        if self.init_encoder_as_decoder_transpose {
            v.push(("init_encoder_as_decoder_transpose", true.into()));
        }
        if self.activation_fn != ActivationFn::Relu {
            v.push(("activation_fn", self.activation_fn.as_str().into()));
        }
        if self.jumprelu_log_threshold {
            v.push(("jumprelu_log_threshold", true.into()));
        }
        if self.topk_aux_uses_decoder_bias {
            v.push(("topk_aux_uses_decoder_bias", true.into()));
        }
        v
    }

    fn base_fields(&self, out: &mut Map<String, Value>) {
        out.insert("d_in".into(), self.d_in.into());
        out.insert("d_sae".into(), self.d_sae.into());
        out.insert("dtype".into(), self.dtype.as_str().into());
        out.insert("device".into(), self.device.clone().into());
        out.insert(
            "apply_b_dec_to_input".into(),
            self.apply_b_dec_to_input.into(),
        );
        out.insert(
            "normalize_activations".into(),
            self.normalize_activations.as_str().into(),
        );
        out.insert(
            "reshape_activations".into(),
            self.reshape_activations.as_str().into(),
        );
    }

    /// The metadata block with SAELens's training info filled in.
    fn metadata_with_training_info(&self) -> Map<String, Value> {
        let mut m = self.metadata.clone();
        // The file is in this format whatever version the SAE came from (SAELens reads
        // anything older as a pre-6.0 config); `sae_lens_training_version` keeps that.
        m.insert(
            "sae_lens_version".into(),
            crate::SAELENS_FORMAT_VERSION.into(),
        );
        m.entry("sae_lens_training_version")
            .or_insert_with(|| crate::SAELENS_FORMAT_VERSION.into());
        m.insert(
            "training_architecture".into(),
            self.architecture.as_str().into(),
        );
        let inference_keys: &[&str] = match self.inference_architecture() {
            Architecture::TopK => &["k", "rescale_acts_by_decoder_norm"],
            _ => &[],
        };
        let details: Map<String, Value> = self
            .arch_fields()
            .into_iter()
            .filter(|(k, _)| !inference_keys.contains(k))
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        m.insert(
            "training_architecture_details".into(),
            Value::Object(details),
        );
        m
    }

    /// The `cfg.json` of a training save (SAELens's `save_model`).
    pub fn to_training_json(&self) -> Value {
        let mut out = Map::new();
        self.base_fields(&mut out);
        out.insert(
            "metadata".into(),
            Value::Object(self.metadata_with_training_info()),
        );
        for (k, v) in self.arch_fields().into_iter().chain(self.seed_fields()) {
            out.insert(k.into(), v);
        }
        out.insert("architecture".into(), self.architecture.as_str().into());
        Value::Object(out)
    }

    /// The `cfg.json` of an inference save (SAELens's `save_inference_model`).
    pub fn to_inference_json(&self) -> Value {
        let mut out = Map::new();
        self.base_fields(&mut out);
        out.insert(
            "metadata".into(),
            Value::Object(self.metadata_with_training_info()),
        );
        let arch = self.inference_architecture();
        if arch == Architecture::TopK {
            out.insert("k".into(), (self.k as u64).into());
            out.insert(
                "rescale_acts_by_decoder_norm".into(),
                self.rescale_acts_by_decoder_norm.into(),
            );
        }
        out.insert("architecture".into(), arch.as_str().into());
        Value::Object(out)
    }

    /// The config an inference SAE loaded from [`Self::to_inference_json`] has.
    pub fn inference_config(&self) -> SaeConfig {
        let mut c = SaeConfig::new(self.inference_architecture(), self.d_in, self.d_sae);
        c.dtype = self.dtype;
        c.device = self.device.clone();
        c.apply_b_dec_to_input = self.apply_b_dec_to_input;
        c.normalize_activations = self.normalize_activations;
        c.reshape_activations = self.reshape_activations;
        c.metadata = self.metadata_with_training_info();
        c.k = self.k;
        c.rescale_acts_by_decoder_norm =
            c.architecture == Architecture::TopK && self.rescale_acts_by_decoder_norm;
        c
    }
}

/// A float that is a whole number is written as an integer, as Python would for a
/// `k` given as an int.
fn num(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

fn major_version(s: &str) -> Option<u64> {
    s.split('.').next()?.trim().parse().ok()
}

/// Typed access to a JSON object, with errors naming the field.
struct Reader<'a>(&'a Map<String, Value>);

impl Reader<'_> {
    fn req_str(&self, k: &str) -> Result<String, CfgError> {
        self.opt_str(k)?
            .ok_or_else(|| CfgError::new(k, "is missing"))
    }
    fn opt_str(&self, k: &str) -> Result<Option<String>, CfgError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(CfgError::new(k, format!("expected a string, got {v}"))),
        }
    }
    fn req_usize(&self, k: &str) -> Result<usize, CfgError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Err(CfgError::new(k, "is missing")),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                CfgError::new(k, format!("expected a non-negative integer, got {v}"))
            }),
        }
    }
    fn opt_bool(&self, k: &str) -> Result<Option<bool>, CfgError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(CfgError::new(k, format!("expected true or false, got {v}"))),
        }
    }
    fn set_bool(&self, k: &str, out: &mut bool) -> Result<(), CfgError> {
        if let Some(b) = self.opt_bool(k)? {
            *out = b;
        }
        Ok(())
    }
    fn opt_f64_or_null(&self, k: &str) -> Result<Option<f64>, CfgError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| CfgError::new(k, format!("expected a number or null, got {v}"))),
        }
    }
    fn set_f64(&self, k: &str, out: &mut f64) -> Result<(), CfgError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(()),
            Some(v) => {
                *out = v
                    .as_f64()
                    .ok_or_else(|| CfgError::new(k, format!("expected a number, got {v}")))?;
                Ok(())
            }
        }
    }
    fn set_u64(&self, k: &str, out: &mut u64) -> Result<(), CfgError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(()),
            Some(v) => {
                *out = v.as_u64().ok_or_else(|| {
                    CfgError::new(k, format!("expected a non-negative integer, got {v}"))
                })?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
