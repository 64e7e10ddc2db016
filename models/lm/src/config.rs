//! `config.json` of an HF checkpoint → the architecture the forward pass runs.
//!
//! Field names and defaults are transformers'; both the transformers-5 spelling
//! (`rope_parameters`) and the older one (`rotary_pct`, `rope_theta`, `rope_scaling`)
//! are read.

use crate::{LmError, Result};
use kernels::ops::Activation;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `gpt2`: learned positions, LayerNorm, fused Conv1D attention.
    Gpt2,
    /// `gpt_neox` (Pythia): partial rotary, LayerNorm, usually parallel attention + MLP.
    GptNeox,
    /// `llama`, `mistral`, `qwen2`, `qwen3`, `gemma2`, `gemma3_text`, `gemma3` (its text
    /// model): RMSNorm, rotary, gated MLP, grouped-query attention, and the switches below
    /// (q/k norms, Gemma's post-norms, soft-capping, sliding windows).
    Llama,
}

/// Rotary frequencies of one kind of layer: `angle(p, i) = p / (base^(i/half) * linear_factor)`
/// (HF `rope_type` `default`, or `linear` with its `factor`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeFreqs {
    pub base: f32,
    pub linear_factor: f32,
}

/// Rotary embedding of the first `dim` features of each head; Gemma 3's sliding-window
/// layers use their own frequencies (`local`), every other model the same for all.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rotary {
    pub dim: usize,
    pub global: RopeFreqs,
    pub local: RopeFreqs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

/// Everything the forward pass needs to know about the architecture.
#[derive(Clone, Debug)]
pub struct LmConfig {
    pub model_type: String,
    pub family: Family,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_head: usize,
    pub d_mlp: usize,
    pub d_vocab: usize,
    /// Longest context: `n_positions` / `max_position_embeddings`.
    pub n_ctx: usize,
    pub norm: NormKind,
    pub eps: f32,
    pub act: Activation,
    /// SwiGLU-style MLP: `act(x W_gate) * (x W_in)`.
    pub gated_mlp: bool,
    /// GPT-NeoX's `use_parallel_residual`: attention and MLP both read `resid_pre`.
    pub parallel_residual: bool,
    /// Rotary models; `None` for learned positions.
    pub rotary: Option<Rotary>,
    pub tied_embeddings: bool,
    /// Biases on q/k/v, on the attention output, and on the MLP projections.
    pub qkv_bias: bool,
    pub attn_out_bias: bool,
    pub mlp_bias: bool,
    /// Sliding-window attention width (a query sees itself and the `w - 1` keys
    /// before it) on the layers `sliding_layers` marks.
    pub sliding_window: Option<usize>,
    /// Per layer: whether its attention is limited to `sliding_window`.
    pub sliding_layers: Vec<bool>,
    /// Attention scores are `q·k / attn_scale` (TransformerLens's `attn_scale`):
    /// `sqrt(d_head)`, or `sqrt(query_pre_attn_scalar)` for Gemma.
    pub attn_scale: f32,
    /// Gemma 2's `attn_logit_softcapping` and `final_logit_softcapping`: `c·tanh(x/c)`.
    pub attn_softcap: Option<f32>,
    pub logit_softcap: Option<f32>,
    /// Gemma multiplies the token embedding by `sqrt(d_model)`.
    pub embed_scale: Option<f32>,
    /// Gemma's RMSNorm multiplies by `1 + w`: added to every norm weight at load.
    pub norm_weight_offset: f32,
    /// Gemma 2/3's norms of the attention and MLP outputs before the residual add
    /// (TransformerLens's `ln1_post`, `ln2_post`).
    pub post_norms: bool,
    /// Per-head RMSNorm of queries and keys before rotary (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Where the text model's tensors are (Gemma 3's multimodal checkpoints hold
    /// it under `model.language_model.` or `language_model.model.`).
    pub weight_prefixes: Vec<String>,
    /// `bos_token_id`, `eos_token_id`, `pad_token_id`, … found in `config.json`.
    pub special_token_ids: Vec<u32>,
}

struct Fields<'a> {
    v: &'a Value,
    path: PathBuf,
}

impl Fields<'_> {
    fn err(&self, message: String) -> LmError {
        LmError::Config {
            path: self.path.clone(),
            message,
        }
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("field '{key}' is missing (a positive integer)")))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(self.err(format!("field '{key}' must be a positive integer, got {v}"))),
            },
        }
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                _ => Err(self.err(format!("field '{key}' must be a positive number, got {v}"))),
            },
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("field '{key}' must be a number, got {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("field '{key}' must be true or false, got {v}"))),
        }
    }
    fn str_or<'b>(&'b self, key: &str, default: &'b str) -> Result<&'b str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(format!("field '{key}' must be a string, got {v}"))),
        }
    }

    fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        match self.str_or(key, default)? {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluNew),
            "silu" | "swish" => Ok(Activation::Silu),
            "relu" => Ok(Activation::Relu),
            other => Err(self.err(format!(
                "field '{key}' = '{other}' is not supported (gelu, gelu_new, gelu_pytorch_tanh, silu, relu)"
            ))),
        }
    }

    /// The linear position factor of a `rope_parameters` / `rope_scaling` object:
    /// 1 for `default`, its `factor` for `linear`; other variants are refused.
    fn rope_kind(&self, p: &Value) -> Result<f64> {
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        match kind {
            "default" => Ok(1.0),
            "linear" => match p.get("factor").and_then(|v| v.as_f64()) {
                Some(f) if f >= 1.0 => Ok(f),
                _ => Err(self.err(format!(
                    "rope_type 'linear' needs a 'factor' of at least 1, got {}",
                    p.get("factor").unwrap_or(&Value::Null)
                ))),
            },
            other => Err(self.err(format!(
                "rope_type '{other}' is not supported (rope_type 'default' or 'linear')"
            ))),
        }
    }

    /// Rotary settings: `(partial_rotary_factor, base, linear_factor)`.
    fn rope(
        &self,
        factor_key: &str,
        default_factor: f64,
        base_key: &str,
    ) -> Result<(f64, f64, f64)> {
        let params = self.get("rope_parameters");
        let scaling = self.get("rope_scaling");
        let mut linear = 1.0;
        for p in [params, scaling].into_iter().flatten() {
            linear = self.rope_kind(p)?;
        }
        let from_params = |k: &str| params.and_then(|p| p.get(k)).and_then(|v| v.as_f64());
        let factor = match from_params("partial_rotary_factor") {
            Some(f) => f,
            None => self.f64_or(factor_key, default_factor)?,
        };
        let base = match from_params("rope_theta") {
            Some(b) => b,
            None => self.f64_or(base_key, 10000.0)?,
        };
        if !(factor > 0.0 && factor <= 1.0) || base <= 0.0 {
            return Err(self.err(format!(
                "rotary settings out of range: partial_rotary_factor {factor}, rope_theta {base}"
            )));
        }
        Ok((factor, base, linear))
    }

    /// Which layers use the sliding window: `layer_types` when the config has it
    /// (transformers 5 writes it), else `fallback(layer)`.
    fn sliding_layers(
        &self,
        n_layers: usize,
        fallback: impl Fn(usize) -> bool,
    ) -> Result<Vec<bool>> {
        let Some(types) = self.get("layer_types") else {
            return Ok((0..n_layers).map(fallback).collect());
        };
        let types = types
            .as_array()
            .filter(|a| a.len() == n_layers)
            .ok_or_else(|| {
                self.err(format!(
                    "field 'layer_types' must list {n_layers} layer types"
                ))
            })?;
        types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(self.err(format!(
                    "field 'layer_types': '{t}' is not supported (sliding_attention, full_attention)"
                ))),
            })
            .collect()
    }

    fn special_ids(&self) -> Vec<u32> {
        let mut ids = Vec::new();
        for key in [
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "sep_token_id",
            "decoder_start_token_id",
        ] {
            match self.get(key) {
                Some(Value::Array(a)) => ids.extend(a.iter().filter_map(|v| v.as_u64())),
                Some(v) => ids.extend(v.as_u64()),
                None => {}
            }
        }
        let mut ids: Vec<u32> = ids.into_iter().map(|i| i as u32).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

impl LmConfig {
    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<LmConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| LmError::io(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| LmError::Config {
            path: path.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(&v, &path)
    }

    /// Parses a config already read; `path` is only used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<LmConfig> {
        let f = Fields {
            v,
            path: path.to_path_buf(),
        };
        let model_type = f
            .get("model_type")
            .and_then(|m| m.as_str())
            .ok_or_else(|| f.err("field 'model_type' is missing".into()))?
            .to_string();
        let mut cfg = match model_type.as_str() {
            "gpt2" => Self::gpt2(&f)?,
            "gpt_neox" => Self::neox(&f)?,
            "llama" | "mistral" | "qwen2" | "qwen3" => Self::llama(&f, &model_type)?,
            "gemma2" | "gemma3_text" => Self::gemma(&f, &model_type)?,
            "gemma3" => {
                // The multimodal checkpoint: its text model, under `text_config`.
                let text = Fields {
                    v: f.get("text_config").unwrap_or(&Value::Null),
                    path: f.path.clone(),
                };
                let mut cfg = Self::gemma(&text, "gemma3_text")?;
                cfg.weight_prefixes = vec!["model.language_model.".into(), "language_model.model.".into()];
                cfg.tied_embeddings = f.bool_or("tie_word_embeddings", cfg.tied_embeddings)?;
                let mut ids = f.special_ids();
                ids.extend(text.special_ids());
                ids.sort_unstable();
                ids.dedup();
                cfg.special_token_ids = ids;
                cfg
            }
            other => {
                return Err(f.err(format!(
                    "model_type '{other}' is not supported (supported: gpt2, gpt_neox, llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma3)"
                )))
            }
        };
        if model_type != "gemma3" {
            cfg.special_token_ids = f.special_ids();
        }
        cfg.model_type = model_type;
        if cfg.attn_scale == 0.0 {
            cfg.attn_scale = (cfg.d_head as f32).sqrt();
        }
        if cfg.sliding_layers.is_empty() {
            cfg.sliding_layers = vec![cfg.sliding_window.is_some(); cfg.n_layers];
        }
        cfg.check(&f)?;
        Ok(cfg)
    }

    /// The fields most models leave at their plain value; the constructors below
    /// override what their family sets.
    fn blank() -> LmConfig {
        LmConfig {
            model_type: String::new(),
            family: Family::Llama,
            n_layers: 0,
            d_model: 0,
            n_heads: 0,
            n_kv_heads: 0,
            d_head: 0,
            d_mlp: 0,
            d_vocab: 0,
            n_ctx: 0,
            norm: NormKind::RmsNorm,
            eps: 1e-6,
            act: Activation::Silu,
            gated_mlp: false,
            parallel_residual: false,
            rotary: None,
            tied_embeddings: false,
            qkv_bias: false,
            attn_out_bias: false,
            mlp_bias: false,
            sliding_window: None,
            sliding_layers: Vec::new(),
            attn_scale: 0.0,
            attn_softcap: None,
            logit_softcap: None,
            embed_scale: None,
            norm_weight_offset: 0.0,
            post_norms: false,
            qk_norm: false,
            weight_prefixes: Vec::new(),
            special_token_ids: Vec::new(),
        }
    }

    fn gpt2(f: &Fields) -> Result<LmConfig> {
        let d_model = f.usize("n_embd")?;
        if f.bool_or("scale_attn_by_inverse_layer_idx", false)?
            || f.bool_or("reorder_and_upcast_attn", false)?
        {
            return Err(f.err(
                "scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported"
                    .into(),
            ));
        }
        if !f.bool_or("scale_attn_weights", true)? {
            return Err(f.err("scale_attn_weights = false is not supported".into()));
        }
        let n_heads = f.usize("n_head")?;
        Ok(LmConfig {
            family: Family::Gpt2,
            n_layers: f.usize("n_layer")?,
            d_model,
            n_heads,
            n_kv_heads: n_heads,
            d_head: d_model / n_heads,
            d_mlp: f.opt_usize("n_inner")?.unwrap_or(4 * d_model),
            d_vocab: f.usize("vocab_size")?,
            n_ctx: f.usize("n_positions")?,
            norm: NormKind::LayerNorm,
            eps: f.f64_or("layer_norm_epsilon", 1e-5)? as f32,
            act: f.activation("activation_function", "gelu_new")?,
            gated_mlp: false,
            parallel_residual: false,
            rotary: None,
            tied_embeddings: f.bool_or("tie_word_embeddings", true)?,
            qkv_bias: true,
            attn_out_bias: true,
            mlp_bias: true,
            weight_prefixes: vec!["transformer.".into(), String::new()],
            ..Self::blank()
        })
    }

    fn neox(f: &Fields) -> Result<LmConfig> {
        let d_model = f.usize("hidden_size")?;
        let n_heads = f.usize("num_attention_heads")?;
        let d_head = d_model / n_heads;
        let (factor, base, linear) = f.rope("rotary_pct", 0.25, "rotary_emb_base")?;
        let bias = f.bool_or("attention_bias", true)?;
        Ok(LmConfig {
            family: Family::GptNeox,
            n_layers: f.usize("num_hidden_layers")?,
            d_model,
            n_heads,
            n_kv_heads: n_heads,
            d_head,
            d_mlp: f.usize("intermediate_size")?,
            d_vocab: f.usize("vocab_size")?,
            n_ctx: f.usize("max_position_embeddings")?,
            norm: NormKind::LayerNorm,
            eps: f.f64_or("layer_norm_eps", 1e-5)? as f32,
            act: f.activation("hidden_act", "gelu")?,
            gated_mlp: false,
            parallel_residual: f.bool_or("use_parallel_residual", true)?,
            // transformers: rotary_ndims = int(head_size * partial_rotary_factor)
            rotary: Some(Rotary::uniform(
                (d_head as f64 * factor) as usize,
                base,
                linear,
            )),
            tied_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias: bias,
            attn_out_bias: bias,
            mlp_bias: true,
            weight_prefixes: vec!["gpt_neox.".into()],
            ..Self::blank()
        })
    }

    fn llama(f: &Fields, model_type: &str) -> Result<LmConfig> {
        let d_model = f.usize("hidden_size")?;
        let n_heads = f.usize("num_attention_heads")?;
        let n_layers = f.usize("num_hidden_layers")?;
        let d_head = f.opt_usize("head_dim")?.unwrap_or(d_model / n_heads);
        let (factor, base, linear) = f.rope("partial_rotary_factor", 1.0, "rope_theta")?;
        let qwen = model_type.starts_with("qwen");
        let sliding_window = match model_type {
            "mistral" => f.opt_usize("sliding_window")?,
            _ if qwen && f.bool_or("use_sliding_window", false)? => {
                f.opt_usize("sliding_window")?
            }
            _ => None,
        };
        // Qwen2/3: layers from `max_window_layers` on slide (transformers' rule).
        let max_window_layers = match qwen {
            true => f.usize_or("max_window_layers", n_layers)?,
            false => 0,
        };
        let sliding_layers = match sliding_window {
            None => vec![false; n_layers],
            Some(_) => f.sliding_layers(n_layers, |l| l >= max_window_layers)?,
        };
        let attention_bias = f.bool_or("attention_bias", false)?;
        Ok(LmConfig {
            n_layers,
            d_model,
            n_heads,
            n_kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
            d_head,
            d_mlp: f.usize("intermediate_size")?,
            d_vocab: f.usize("vocab_size")?,
            n_ctx: f.usize("max_position_embeddings")?,
            eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
            act: f.activation("hidden_act", "silu")?,
            gated_mlp: true,
            rotary: Some(Rotary::uniform(
                (d_head as f64 * factor) as usize,
                base,
                linear,
            )),
            tied_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias: model_type == "qwen2" || attention_bias,
            attn_out_bias: attention_bias,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            sliding_window,
            sliding_layers,
            qk_norm: model_type == "qwen3",
            weight_prefixes: vec!["model.".into()],
            ..Self::blank()
        })
    }

    /// Gemma 2 and Gemma 3's text model. Missing fields take transformers' defaults
    /// (hub configs of Gemma 3 list only what differs from them).
    fn gemma(f: &Fields, model_type: &str) -> Result<LmConfig> {
        let gemma3 = model_type == "gemma3_text";
        if f.bool_or("use_bidirectional_attention", false)? {
            return Err(f.err(
                "use_bidirectional_attention = true is not supported (causal attention only)"
                    .into(),
            ));
        }
        let (vocab, max_pos) = if gemma3 {
            (262_208, 131_072)
        } else {
            (256_000, 8192)
        };
        let d_model = f.usize_or("hidden_size", 2304)?;
        let n_heads = f.usize_or("num_attention_heads", 8)?;
        let n_layers = f.usize_or("num_hidden_layers", 26)?;
        let d_head = f.usize_or("head_dim", 256)?;
        let act = match f.get("hidden_activation") {
            Some(_) => f.activation("hidden_activation", "gelu_pytorch_tanh")?,
            None => f.activation("hidden_act", "gelu_pytorch_tanh")?,
        };
        // Gemma 2: even layers slide; Gemma 3: all but every `sliding_window_pattern`-th.
        let pattern = match gemma3 {
            true => f
                .opt_usize("sliding_window_pattern")?
                .or(f.opt_usize("_sliding_window_pattern")?)
                .unwrap_or(6),
            false => 2,
        };
        let sliding_layers = f.sliding_layers(n_layers, |l| !(l + 1).is_multiple_of(pattern))?;
        let (global, local) = if gemma3 {
            gemma3_rope(f)?
        } else {
            let (_, base, linear) = f.rope("partial_rotary_factor", 1.0, "rope_theta")?;
            let one = RopeFreqs::new(base, linear);
            (one, one)
        };
        let softcap = |key: &str, default: Option<f64>| -> Result<Option<f32>> {
            Ok(match f.v.get(key) {
                None => default,
                Some(Value::Null) => None,
                Some(_) => f.opt_f64(key)?,
            }
            .map(|c| c as f32))
        };
        Ok(LmConfig {
            n_layers,
            d_model,
            n_heads,
            n_kv_heads: f.usize_or("num_key_value_heads", 4)?,
            d_head,
            d_mlp: f.usize_or("intermediate_size", 9216)?,
            d_vocab: f.usize_or("vocab_size", vocab)?,
            n_ctx: f.usize_or("max_position_embeddings", max_pos)?,
            eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
            act,
            gated_mlp: true,
            rotary: Some(Rotary {
                dim: d_head,
                global,
                local,
            }),
            tied_embeddings: f.bool_or("tie_word_embeddings", true)?,
            qkv_bias: f.bool_or("attention_bias", false)?,
            attn_out_bias: f.bool_or("attention_bias", false)?,
            sliding_window: Some(f.usize_or("sliding_window", 4096)?),
            sliding_layers,
            attn_scale: (f.f64_or("query_pre_attn_scalar", 256.0)? as f32).sqrt(),
            attn_softcap: softcap("attn_logit_softcapping", (!gemma3).then_some(50.0))?,
            logit_softcap: softcap("final_logit_softcapping", (!gemma3).then_some(30.0))?,
            embed_scale: Some((d_model as f32).sqrt()),
            norm_weight_offset: 1.0,
            post_norms: true,
            qk_norm: gemma3,
            weight_prefixes: vec!["model.".into()],
            ..Self::blank()
        })
    }

    fn check(&self, f: &Fields) -> Result<()> {
        if self.family != Family::Llama && self.d_head * self.n_heads != self.d_model {
            return Err(f.err(format!(
                "hidden size {} is not divisible by {} attention heads",
                self.d_model, self.n_heads
            )));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(f.err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.n_heads, self.n_kv_heads
            )));
        }
        if let Some(Rotary { dim, .. }) = self.rotary {
            if dim == 0 || !dim.is_multiple_of(2) || dim > self.d_head {
                return Err(f.err(format!(
                    "rotary dimension {dim} (head size {} × partial_rotary_factor) must be even and in 2..={}",
                    self.d_head, self.d_head
                )));
            }
        }
        Ok(())
    }

    /// The sliding window of layer `l`, if its attention has one.
    pub fn window(&self, l: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.sliding_layers[l])
    }

    /// Width of one position's activation at `q`/`z` (all heads side by side).
    pub fn d_attn(&self) -> usize {
        self.n_heads * self.d_head
    }

    /// Width of `k`/`v` (fewer heads under grouped-query attention).
    pub fn d_kv(&self) -> usize {
        self.n_kv_heads * self.d_head
    }
}

impl Rotary {
    /// The same frequencies on every layer.
    fn uniform(dim: usize, base: f64, linear_factor: f64) -> Rotary {
        let f = RopeFreqs::new(base, linear_factor);
        Rotary {
            dim,
            global: f,
            local: f,
        }
    }
}

impl RopeFreqs {
    fn new(base: f64, linear_factor: f64) -> RopeFreqs {
        RopeFreqs {
            base: base as f32,
            linear_factor: linear_factor as f32,
        }
    }
}

/// Gemma 3's two sets of frequencies: `rope_parameters` by layer type
/// (transformers 5), or `rope_theta` + `rope_scaling` for the full-attention layers and
/// `rope_local_base_freq` for the sliding ones. Returns `(global, local)`.
fn gemma3_rope(f: &Fields) -> Result<(RopeFreqs, RopeFreqs)> {
    let freqs = |p: Option<&Value>, base_key: &str, default: f64| -> Result<RopeFreqs> {
        let linear = match p {
            Some(p) => f.rope_kind(p)?,
            None => 1.0,
        };
        let base = match p.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()) {
            Some(b) => b,
            None => f.f64_or(base_key, default)?,
        };
        Ok(RopeFreqs::new(base, linear))
    };
    let params = f.get("rope_parameters");
    let by_type = |t: &str| params.and_then(|p| p.get(t)).filter(|v| !v.is_null());
    if by_type("full_attention").is_some() || by_type("sliding_attention").is_some() {
        Ok((
            freqs(by_type("full_attention"), "rope_theta", 1e6)?,
            freqs(by_type("sliding_attention"), "rope_local_base_freq", 1e4)?,
        ))
    } else {
        Ok((
            freqs(params.or(f.get("rope_scaling")), "rope_theta", 1e6)?,
            freqs(None, "rope_local_base_freq", 1e4)?,
        ))
    }
}

/// The token ids SAELens's evals leave out (`get_special_token_ids`: the tokenizer's
/// BOS, EOS, PAD, SEP and decoder-start ids). Read from `tokenizer_config.json` (token
/// strings resolved through `tokenizer.json` or `added_tokens_decoder`) when the
/// model directory has one, else from `config.json`'s `*_token_id` fields.
pub fn special_token_ids(dir: &Path, cfg: &LmConfig) -> Vec<u32> {
    let read = |name: &str| -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
    };
    let Some(tc) = read("tokenizer_config.json") else {
        return cfg.special_token_ids.clone();
    };
    let tj = read("tokenizer.json");
    let id_of = |content: &str| -> Option<u32> {
        let from_added = |list: &Value| {
            list.as_array()?
                .iter()
                .find(|t| t["content"] == content)
                .and_then(|t| t["id"].as_u64())
        };
        let from_decoder = |map: &Value| {
            map.as_object()?
                .iter()
                .find(|(_, t)| t["content"] == content)
                .and_then(|(id, _)| id.parse::<u64>().ok())
        };
        tj.as_ref()
            .and_then(|t| {
                from_added(&t["added_tokens"]).or_else(|| t["model"]["vocab"][content].as_u64())
            })
            .or_else(|| from_decoder(&tc["added_tokens_decoder"]))
            .map(|i| i as u32)
    };
    let mut ids: Vec<u32> = ["bos_token", "eos_token", "pad_token", "sep_token"]
        .iter()
        .filter_map(|k| {
            let v = &tc[*k];
            v.as_str().or_else(|| v["content"].as_str())
        })
        .filter_map(id_of)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}
