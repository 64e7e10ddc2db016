//! Hook points, named exactly as TransformerLens names them, and the visitor the
//! forward pass calls at each of them.

use crate::config::LmConfig;
use crate::{LmError, Result};
use kernels::Tensor;
use std::fmt;

/// What a hook point carries. Block-level kinds come with a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookKind {
    Embed,
    PosEmbed,
    ResidPre,
    Ln1Normalized,
    Q,
    K,
    V,
    QNormNormalized,
    KNormNormalized,
    RotQ,
    RotK,
    AttnScores,
    Pattern,
    Z,
    Ln1PostNormalized,
    AttnOut,
    ResidMid,
    Ln2Normalized,
    MlpPre,
    MlpPreLinear,
    MlpPost,
    Ln2PostNormalized,
    MlpOut,
    ResidPost,
    LnFinalNormalized,
}

use HookKind::*;

const BLOCK_KINDS: [(HookKind, &str); 22] = [
    (ResidPre, "hook_resid_pre"),
    (Ln1Normalized, "ln1.hook_normalized"),
    (Q, "attn.hook_q"),
    (K, "attn.hook_k"),
    (V, "attn.hook_v"),
    (QNormNormalized, "attn.q_norm.hook_normalized"),
    (KNormNormalized, "attn.k_norm.hook_normalized"),
    (RotQ, "attn.hook_rot_q"),
    (RotK, "attn.hook_rot_k"),
    (AttnScores, "attn.hook_attn_scores"),
    (Pattern, "attn.hook_pattern"),
    (Z, "attn.hook_z"),
    (Ln1PostNormalized, "ln1_post.hook_normalized"),
    (AttnOut, "hook_attn_out"),
    (ResidMid, "hook_resid_mid"),
    (Ln2Normalized, "ln2.hook_normalized"),
    (MlpPre, "mlp.hook_pre"),
    (MlpPreLinear, "mlp.hook_pre_linear"),
    (MlpPost, "mlp.hook_post"),
    (Ln2PostNormalized, "ln2_post.hook_normalized"),
    (MlpOut, "hook_mlp_out"),
    (ResidPost, "hook_resid_post"),
];

/// Which models a row of [`HF_HOOKS`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfFamily {
    Gpt2,
    GptNeox,
    /// Llama, Mistral, Qwen2/3: no norms after attention or MLP.
    Llama,
    /// Gemma 2/3: their `post_*_layernorm` modules end the attention and MLP branches.
    Gemma,
}

impl HfFamily {
    fn of(cfg: &LmConfig) -> HfFamily {
        match cfg.family {
            crate::config::Family::Gpt2 => HfFamily::Gpt2,
            crate::config::Family::GptNeox => HfFamily::GptNeox,
            crate::config::Family::Llama if cfg.post_norms => HfFamily::Gemma,
            crate::config::Family::Llama => HfFamily::Llama,
        }
    }
    /// The module paths of the decoder layers, before the layer index.
    pub fn layer_prefixes(self) -> &'static [&'static str] {
        match self {
            HfFamily::Gpt2 => &["transformer.h."],
            HfFamily::GptNeox => &["gpt_neox.layers."],
            HfFamily::Llama | HfFamily::Gemma => &[
                "model.layers.",
                "model.language_model.layers.",
                "language_model.model.layers.",
            ],
        }
    }
}

/// Hugging Face hook names (SAELens's `hf_hook_name`: a module path, its output, or
/// with `.input` its input) and the TransformerLens hook each one is. The module
/// path is the family's layer prefix, the layer, then `module` (a bare path or
/// `.output` means the module's output). The one table of these aliases.
pub const HF_HOOKS: &[(HfFamily, &str, HookKind)] = &[
    (HfFamily::Gpt2, "", ResidPost),
    (HfFamily::Gpt2, ".input", ResidPre),
    (HfFamily::Gpt2, ".attn", AttnOut),
    (HfFamily::Gpt2, ".attn.c_proj.input", Z),
    (HfFamily::Gpt2, ".mlp", MlpOut),
    (HfFamily::Gpt2, ".mlp.c_proj.input", MlpPost),
    (HfFamily::GptNeox, "", ResidPost),
    (HfFamily::GptNeox, ".input", ResidPre),
    (HfFamily::GptNeox, ".attention", AttnOut),
    (HfFamily::GptNeox, ".attention.dense.input", Z),
    (HfFamily::GptNeox, ".mlp", MlpOut),
    (HfFamily::GptNeox, ".mlp.dense_4h_to_h.input", MlpPost),
    (HfFamily::Llama, "", ResidPost),
    (HfFamily::Llama, ".input", ResidPre),
    (HfFamily::Llama, ".self_attn", AttnOut),
    (HfFamily::Llama, ".self_attn.o_proj.input", Z),
    (HfFamily::Llama, ".mlp", MlpOut),
    (HfFamily::Llama, ".mlp.down_proj.input", MlpPost),
    (HfFamily::Gemma, "", ResidPost),
    (HfFamily::Gemma, ".input", ResidPre),
    (HfFamily::Gemma, ".post_attention_layernorm", AttnOut),
    (HfFamily::Gemma, ".self_attn.o_proj.input", Z),
    (HfFamily::Gemma, ".post_feedforward_layernorm", MlpOut),
    (HfFamily::Gemma, ".mlp.down_proj.input", MlpPost),
];

/// `Some(hook)` when `name` is one of [`HF_HOOKS`] for this model; an error when it
/// is an HF module path with no TransformerLens hook; `None` when it is not an HF path.
fn hf_alias(name: &str, cfg: &LmConfig) -> Option<Result<HookPoint>> {
    let family = HfFamily::of(cfg);
    let (layer, rest) = family.layer_prefixes().iter().find_map(|p| {
        let rest = name.strip_prefix(p)?;
        let end = rest.find('.').unwrap_or(rest.len());
        Some((rest[..end].parse::<usize>().ok()?, &rest[end..]))
    })?;
    let module = rest.strip_suffix(".output").unwrap_or(rest);
    let Some(&(_, _, kind)) = HF_HOOKS
        .iter()
        .find(|(f, m, _)| *f == family && *m == module)
    else {
        let known: Vec<String> = HF_HOOKS
            .iter()
            .filter(|(f, ..)| *f == family)
            .map(|(_, m, k)| {
                format!(
                    "{}{layer}{m} = {}",
                    family.layer_prefixes()[0],
                    HookPoint::block(layer, *k)
                )
            })
            .collect();
        let gemma_note = match (family, module) {
            (HfFamily::Gemma, ".self_attn" | ".mlp") => " (in Gemma that output is taken before its post-norm, where TransformerLens has no hook)",
            _ => "",
        };
        return Some(Err(LmError::Invalid(format!(
            "hook '{name}': this Hugging Face module has no TransformerLens hook{gemma_note}; the HF names of a {} layer are {}",
            cfg.model_type,
            known.join(", ")
        ))));
    };
    if layer >= cfg.n_layers {
        return Some(Err(LmError::LayerOutOfRange {
            name: name.to_string(),
            layer,
            n_layers: cfg.n_layers,
        }));
    }
    Some(Ok(HookPoint::block(layer, kind)))
}

/// One hook point: a kind and, for block hooks, a layer. Orders as the forward pass
/// reaches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HookPoint {
    /// `None` before the blocks (`hook_embed`), `Some(n_layers)` after them (`ln_final`).
    pub layer: Option<usize>,
    pub kind: HookKind,
}

impl HookPoint {
    pub fn block(layer: usize, kind: HookKind) -> HookPoint {
        HookPoint {
            layer: Some(layer),
            kind,
        }
    }

    /// Parses a TransformerLens name, or a Hugging Face one of [`HF_HOOKS`], and checks
    /// it exists in this model.
    pub fn parse(name: &str, cfg: &LmConfig) -> Result<HookPoint> {
        if let Some(alias) = hf_alias(name, cfg) {
            return alias;
        }
        let unknown = || LmError::UnknownHook {
            name: name.to_string(),
            model_type: cfg.model_type.clone(),
            valid: valid_names(cfg).join(", "),
        };
        let hook = match name {
            "hook_embed" => HookPoint {
                layer: None,
                kind: Embed,
            },
            "hook_pos_embed" => HookPoint {
                layer: None,
                kind: PosEmbed,
            },
            "ln_final.hook_normalized" => HookPoint {
                layer: Some(cfg.n_layers),
                kind: LnFinalNormalized,
            },
            _ => {
                let rest = name.strip_prefix("blocks.").ok_or_else(unknown)?;
                let (layer, suffix) = rest.split_once('.').ok_or_else(unknown)?;
                let layer: usize = layer.parse().map_err(|_| unknown())?;
                let kind = BLOCK_KINDS
                    .iter()
                    .find(|(_, s)| *s == suffix)
                    .map(|(k, _)| *k)
                    .ok_or_else(unknown)?;
                if layer >= cfg.n_layers {
                    return Err(LmError::LayerOutOfRange {
                        name: name.to_string(),
                        layer,
                        n_layers: cfg.n_layers,
                    });
                }
                HookPoint::block(layer, kind)
            }
        };
        if !hook.exists_in(cfg) {
            return Err(unknown());
        }
        Ok(hook)
    }

    /// Whether this model has the hook (TransformerLens only creates the hooks a
    /// block actually runs).
    pub fn exists_in(&self, cfg: &LmConfig) -> bool {
        let rotary = cfg.rotary.is_some();
        match self.kind {
            PosEmbed => !rotary,
            RotQ | RotK => rotary,
            ResidMid => !cfg.parallel_residual,
            MlpPreLinear => cfg.gated_mlp,
            QNormNormalized | KNormNormalized => cfg.qk_norm,
            Ln1PostNormalized | Ln2PostNormalized => cfg.post_norms,
            _ => true,
        }
    }

    /// Number of heads when the activation has a head dimension (q/k/v/z).
    pub fn n_heads(&self, cfg: &LmConfig) -> Option<usize> {
        match self.kind {
            Q | QNormNormalized | RotQ | Z => Some(cfg.n_heads),
            K | V | KNormNormalized | RotK => Some(cfg.n_kv_heads),
            _ => None,
        }
    }

    /// Columns of the activation as the visitor sees it: one row per position, heads
    /// side by side; `AttnScores`/`Pattern` rows are `[seq, head, q_pos]`, columns `k_pos`.
    pub fn width(&self, cfg: &LmConfig, seq_len: usize) -> usize {
        match self.kind {
            Embed | PosEmbed | ResidPre | Ln1Normalized | Ln1PostNormalized | AttnOut
            | ResidMid | Ln2Normalized | Ln2PostNormalized | MlpOut | ResidPost
            | LnFinalNormalized => cfg.d_model,
            Q | QNormNormalized | RotQ | Z => cfg.d_attn(),
            K | V | KNormNormalized | RotK => cfg.d_kv(),
            AttnScores | Pattern => seq_len,
            MlpPre | MlpPreLinear | MlpPost => cfg.d_mlp,
        }
    }

    /// Whether there is one activation row per token position.
    pub fn per_position(&self) -> bool {
        !matches!(self.kind, AttnScores | Pattern)
    }

    /// The number of blocks a pass must run to reach this hook: TransformerLens's
    /// `stop_at_layer` for it (SAELens's `extract_stop_at_layer_from_tlens_hook_name`).
    pub fn blocks_needed(&self) -> usize {
        match self.layer {
            None => 0,
            Some(l) => match self.kind {
                LnFinalNormalized => l,
                _ => l + 1,
            },
        }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.layer) {
            (Embed, _) => write!(f, "hook_embed"),
            (PosEmbed, _) => write!(f, "hook_pos_embed"),
            (LnFinalNormalized, _) => write!(f, "ln_final.hook_normalized"),
            (kind, layer) => {
                let suffix = BLOCK_KINDS.iter().find(|(k, _)| *k == kind).unwrap().1;
                write!(f, "blocks.{}.{suffix}", layer.unwrap_or(0))
            }
        }
    }
}

/// Every hook name of the model, in the order a pass reaches them.
pub fn valid_names(cfg: &LmConfig) -> Vec<String> {
    all_hooks(cfg).iter().map(|h| h.to_string()).collect()
}

/// Every hook point of the model, in the order a pass reaches them.
pub fn all_hooks(cfg: &LmConfig) -> Vec<HookPoint> {
    let mut out = vec![
        HookPoint {
            layer: None,
            kind: Embed,
        },
        HookPoint {
            layer: None,
            kind: PosEmbed,
        },
    ];
    for l in 0..cfg.n_layers {
        out.extend(BLOCK_KINDS.iter().map(|(k, _)| HookPoint::block(l, *k)));
    }
    out.push(HookPoint {
        layer: Some(cfg.n_layers),
        kind: LnFinalNormalized,
    });
    out.retain(|h| h.exists_in(cfg));
    out
}

/// Called by the forward pass at every hook point it reaches.
pub trait Hooks {
    /// Whether the pass should call [`Hooks::visit`] at `hook`. Attention scores and
    /// patterns are only materialised when some hook wants them.
    fn wants(&self, hook: &HookPoint) -> bool;
    /// Sees (and may change in place) the activation at `hook`: `[n_seq*seq_len,
    /// width]` with heads side by side, or `[n_seq*n_heads*seq_len, seq_len]` for
    /// scores and patterns. A change flows on into the rest of the pass.
    fn visit(&mut self, hook: &HookPoint, act: &mut Tensor) -> Result<()>;
}

/// No hooks: a plain forward pass.
pub struct NoHooks;

impl Hooks for NoHooks {
    fn wants(&self, _: &HookPoint) -> bool {
        false
    }
    fn visit(&mut self, _: &HookPoint, _: &mut Tensor) -> Result<()> {
        Ok(())
    }
}

/// Copies the activations of a set of hooks (TransformerLens's `run_with_cache`).
pub struct Capture {
    pub hooks: Vec<HookPoint>,
    pub acts: Vec<Option<Tensor>>,
}

impl Capture {
    pub fn new(hooks: Vec<HookPoint>) -> Capture {
        let acts = hooks.iter().map(|_| None).collect();
        Capture { hooks, acts }
    }

    /// The captured activation of `hook`, if the pass reached it.
    pub fn get(&self, hook: &HookPoint) -> Option<&Tensor> {
        let i = self.hooks.iter().position(|h| h == hook)?;
        self.acts[i].as_ref()
    }

    /// Takes the captured activations out, in the order the hooks were given.
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        std::mem::replace(&mut self.acts, self.hooks.iter().map(|_| None).collect())
    }
}

impl Hooks for Capture {
    fn wants(&self, hook: &HookPoint) -> bool {
        self.hooks.contains(hook)
    }
    fn visit(&mut self, hook: &HookPoint, act: &mut Tensor) -> Result<()> {
        // Every captured activation is checked once per batch (scores hold -inf at
        // masked positions by design): token ids are always finite, so a NaN or an
        // infinity here is the model's, and nothing downstream should train on it.
        if hook.kind != AttnScores {
            check_finite(hook, act)?;
        }
        for (h, slot) in self.hooks.iter().zip(&mut self.acts) {
            if h == hook {
                match slot {
                    // Reuse the buffer of an earlier pass.
                    Some(t) if t.shape() == act.shape() => kernels::ops::copy(t, act),
                    _ => *slot = Some(act.clone()),
                }
            }
        }
        Ok(())
    }
}

fn check_finite(hook: &HookPoint, act: &Tensor) -> Result<()> {
    let Some((count, first)) = kernels::ops::non_finite(act) else {
        return Ok(());
    };
    let cols = act.cols().max(1);
    Err(LmError::NonFiniteActivation {
        hook: hook.to_string(),
        count,
        row: first / cols,
        col: first % cols,
    })
}

/// Runs two visitors at every hook, `a` first.
pub struct Both<'a, A: Hooks + ?Sized, B: Hooks + ?Sized>(pub &'a mut A, pub &'a mut B);

impl<A: Hooks + ?Sized, B: Hooks + ?Sized> Hooks for Both<'_, A, B> {
    fn wants(&self, hook: &HookPoint) -> bool {
        self.0.wants(hook) || self.1.wants(hook)
    }
    fn visit(&mut self, hook: &HookPoint, act: &mut Tensor) -> Result<()> {
        if self.0.wants(hook) {
            self.0.visit(hook, act)?;
        }
        if self.1.wants(hook) {
            self.1.visit(hook, act)?;
        }
        Ok(())
    }
}

/// The `stop_at_layer` a pass needs to reach every hook in `hooks`: `None` (a full
/// pass) when one of them is `ln_final`, else the deepest block needed.
pub fn stop_at_layer_for(hooks: &[HookPoint], n_layers: usize) -> Option<usize> {
    if hooks.iter().any(|h| h.kind == LnFinalNormalized) {
        return None;
    }
    Some(
        hooks
            .iter()
            .map(|h| h.blocks_needed())
            .max()
            .unwrap_or(0)
            .min(n_layers),
    )
}
