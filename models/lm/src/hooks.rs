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
    RotQ,
    RotK,
    AttnScores,
    Pattern,
    Z,
    AttnOut,
    ResidMid,
    Ln2Normalized,
    MlpPre,
    MlpPreLinear,
    MlpPost,
    MlpOut,
    ResidPost,
    LnFinalNormalized,
}

use HookKind::*;

const BLOCK_KINDS: [(HookKind, &str); 18] = [
    (ResidPre, "hook_resid_pre"),
    (Ln1Normalized, "ln1.hook_normalized"),
    (Q, "attn.hook_q"),
    (K, "attn.hook_k"),
    (V, "attn.hook_v"),
    (RotQ, "attn.hook_rot_q"),
    (RotK, "attn.hook_rot_k"),
    (AttnScores, "attn.hook_attn_scores"),
    (Pattern, "attn.hook_pattern"),
    (Z, "attn.hook_z"),
    (AttnOut, "hook_attn_out"),
    (ResidMid, "hook_resid_mid"),
    (Ln2Normalized, "ln2.hook_normalized"),
    (MlpPre, "mlp.hook_pre"),
    (MlpPreLinear, "mlp.hook_pre_linear"),
    (MlpPost, "mlp.hook_post"),
    (MlpOut, "hook_mlp_out"),
    (ResidPost, "hook_resid_post"),
];

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

    /// Parses a TransformerLens name and checks it exists in this model.
    pub fn parse(name: &str, cfg: &LmConfig) -> Result<HookPoint> {
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
            _ => true,
        }
    }

    /// Number of heads when the activation has a head dimension (q/k/v/z).
    pub fn n_heads(&self, cfg: &LmConfig) -> Option<usize> {
        match self.kind {
            Q | RotQ | Z => Some(cfg.n_heads),
            K | V | RotK => Some(cfg.n_kv_heads),
            _ => None,
        }
    }

    /// Columns of the activation as the visitor sees it: one row per position, heads
    /// side by side; `AttnScores`/`Pattern` rows are `[seq, head, q_pos]`, columns `k_pos`.
    pub fn width(&self, cfg: &LmConfig, seq_len: usize) -> usize {
        match self.kind {
            Embed | PosEmbed | ResidPre | Ln1Normalized | AttnOut | ResidMid | Ln2Normalized
            | MlpOut | ResidPost | LnFinalNormalized => cfg.d_model,
            Q | RotQ | Z => cfg.d_attn(),
            K | V | RotK => cfg.d_kv(),
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
