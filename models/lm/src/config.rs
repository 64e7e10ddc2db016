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
    /// `llama`, `mistral`, `qwen2`: RMSNorm, rotary, SwiGLU, grouped-query attention.
    Llama,
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
    /// `Some((rotary_dim, base))` for rotary models, `None` for learned positions.
    pub rotary: Option<(usize, f32)>,
    pub tied_embeddings: bool,
    /// Biases on q/k/v, on the attention output, and on the MLP projections.
    pub qkv_bias: bool,
    pub attn_out_bias: bool,
    pub mlp_bias: bool,
    /// Sliding-window attention width when the config turns it on.
    pub sliding_window: Option<usize>,
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

    /// Rotary settings: `(partial_rotary_factor, base)`. Refuses scaled RoPE variants,
    /// whose frequencies differ from the plain ones implemented here.
    fn rope(&self, factor_key: &str, default_factor: f64, base_key: &str) -> Result<(f64, f64)> {
        let params = self.get("rope_parameters");
        let scaling = self.get("rope_scaling");
        for p in [params, scaling].into_iter().flatten() {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(self.err(format!(
                    "rope_type '{kind}' is not supported (only plain rotary embeddings, rope_type 'default')"
                )));
            }
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
        Ok((factor, base))
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
            "llama" | "mistral" | "qwen2" => Self::llama(&f, &model_type)?,
            other => {
                return Err(f.err(format!(
                    "model_type '{other}' is not supported (supported: gpt2, gpt_neox, llama, mistral, qwen2)"
                )))
            }
        };
        cfg.model_type = model_type;
        cfg.special_token_ids = f.special_ids();
        cfg.check(&f)?;
        Ok(cfg)
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
            model_type: String::new(),
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
            sliding_window: None,
            special_token_ids: Vec::new(),
        })
    }

    fn neox(f: &Fields) -> Result<LmConfig> {
        let d_model = f.usize("hidden_size")?;
        let n_heads = f.usize("num_attention_heads")?;
        let d_head = d_model / n_heads;
        let (factor, base) = f.rope("rotary_pct", 0.25, "rotary_emb_base")?;
        let bias = f.bool_or("attention_bias", true)?;
        Ok(LmConfig {
            model_type: String::new(),
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
            rotary: Some(((d_head as f64 * factor) as usize, base as f32)),
            tied_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias: bias,
            attn_out_bias: bias,
            mlp_bias: true,
            sliding_window: None,
            special_token_ids: Vec::new(),
        })
    }

    fn llama(f: &Fields, model_type: &str) -> Result<LmConfig> {
        let d_model = f.usize("hidden_size")?;
        let n_heads = f.usize("num_attention_heads")?;
        let d_head = f.opt_usize("head_dim")?.unwrap_or(d_model / n_heads);
        let (factor, base) = f.rope("partial_rotary_factor", 1.0, "rope_theta")?;
        let qwen = model_type == "qwen2";
        let sliding_window = match model_type {
            "mistral" => f.opt_usize("sliding_window")?,
            "qwen2" if f.bool_or("use_sliding_window", false)? => f.opt_usize("sliding_window")?,
            _ => None,
        };
        let attention_bias = f.bool_or("attention_bias", false)?;
        Ok(LmConfig {
            model_type: String::new(),
            family: Family::Llama,
            n_layers: f.usize("num_hidden_layers")?,
            d_model,
            n_heads,
            n_kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
            d_head,
            d_mlp: f.usize("intermediate_size")?,
            d_vocab: f.usize("vocab_size")?,
            n_ctx: f.usize("max_position_embeddings")?,
            norm: NormKind::RmsNorm,
            eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
            act: f.activation("hidden_act", "silu")?,
            gated_mlp: true,
            parallel_residual: false,
            rotary: Some(((d_head as f64 * factor) as usize, base as f32)),
            tied_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias: qwen || attention_bias,
            attn_out_bias: attention_bias,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            sliding_window,
            special_token_ids: Vec::new(),
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
        if let Some((dim, _)) = self.rotary {
            if dim == 0 || !dim.is_multiple_of(2) || dim > self.d_head {
                return Err(f.err(format!(
                    "rotary dimension {dim} (head size {} × partial_rotary_factor) must be even and in 2..={}",
                    self.d_head, self.d_head
                )));
            }
        }
        Ok(())
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
