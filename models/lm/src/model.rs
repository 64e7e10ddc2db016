//! The hooked transformer: weights laid out for the `kernels` ops, and a forward pass
//! that stops at every TransformerLens hook point.
//!
//! Weights are used as the checkpoint stores them, without TransformerLens's
//! processing (no LayerNorm folding, no centring): what SAELens's
//! `from_pretrained_no_processing` gives.

use crate::config::{Family, LmConfig, NormKind, RopeFreqs};
use crate::hooks::{HookKind, HookPoint, Hooks};
use crate::weights::{cols, to_device, Checkpoint};
use crate::{LmError, Result};
use kernels::ops::{self, AttnShape};
use kernels::{Device, Tensor};
use std::path::Path;

/// `y = x W (+ b)`, with `W` stored as the checkpoint has it: `[out, in]` (Linear)
/// or `[in, out]` (GPT-2's Conv1D).
struct Linear {
    w: Tensor,
    w_in_out: bool,
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor, out: &mut Tensor) {
        ops::matmul(out, x, false, &self.w, !self.w_in_out, 1.0, 0.0);
        if let Some(b) = &self.b {
            ops::add_row_vec(out, b, 1.0);
        }
    }
}

struct Norm {
    w: Tensor,
    b: Option<Tensor>,
}

struct Block {
    ln1: Norm,
    ln2: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `W_in` (GPT-2 `c_fc`, NeoX `dense_h_to_4h`, Llama `up_proj`).
    mlp_in: Linear,
    /// Llama's `gate_proj`.
    mlp_gate: Option<Linear>,
    mlp_out: Linear,
    /// Gemma's norms of the attention and MLP outputs (TransformerLens's `ln1_post`, `ln2_post`).
    post_norms: Option<(Norm, Norm)>,
    /// Per-head q/k RMSNorm weights `[d_head]` (Qwen3, Gemma 3).
    qk_norm: Option<(Tensor, Tensor)>,
}

/// Takes a family's weights out of a checkpoint, trying each name prefix in turn.
struct Loader<'a> {
    ck: &'a mut Checkpoint,
    dev: &'a Device,
    prefixes: &'a [String],
    /// Added to every norm weight (Gemma stores `w - 1`).
    norm_offset: f32,
}

impl Loader<'_> {
    fn names(&self, name: &str) -> Vec<String> {
        self.prefixes.iter().map(|p| format!("{p}{name}")).collect()
    }
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<(String, sae::io::HostTensor)> {
        let names = self.names(name);
        self.ck.take(&names, shape)
    }
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let names = self.names(name);
        self.ck.tensor(self.dev, &names, shape)
    }
    fn norm(&mut self, p: &str, d: usize, bias: bool) -> Result<Norm> {
        Ok(Norm {
            w: self.norm_weight(&format!("{p}.weight"), d)?,
            b: if bias {
                Some(self.tensor(&format!("{p}.bias"), &[d])?)
            } else {
                None
            },
        })
    }
    fn norm_weight(&mut self, name: &str, d: usize) -> Result<Tensor> {
        let (_, mut w) = self.take(name, &[d])?;
        w.values.iter_mut().for_each(|v| *v += self.norm_offset);
        to_device(self.dev, w.values, &[d])
    }
    /// An `nn.Linear`: weight `[out, in]`, kept as `[in, out]` (see [`transpose`]).
    fn linear(&mut self, p: &str, i: usize, o: usize, bias: bool) -> Result<Linear> {
        let (_, w) = self.take(&format!("{p}.weight"), &[o, i])?;
        Ok(Linear {
            w: to_device(self.dev, transpose(&w.values, o, i), &[i, o])?,
            w_in_out: true,
            b: if bias {
                Some(self.tensor(&format!("{p}.bias"), &[o])?)
            } else {
                None
            },
        })
    }
    /// GPT-2's `Conv1D`: weight `[in, out]`, always a bias.
    fn conv1d(&mut self, p: &str, i: usize, o: usize) -> Result<Linear> {
        Ok(Linear {
            w: self.tensor(&format!("{p}.weight"), &[i, o])?,
            w_in_out: true,
            b: Some(self.tensor(&format!("{p}.bias"), &[o])?),
        })
    }
    /// The unembedding `[d_vocab, d_model]` stored under `name` (no prefix), or `None`
    /// when it is tied to the embedding.
    fn unembed(&mut self, cfg: &LmConfig, name: &str) -> Result<Option<Tensor>> {
        if cfg.tied_embeddings {
            return Ok(None);
        }
        Ok(Some(self.ck.tensor(
            self.dev,
            &[name.to_string()],
            &[cfg.d_vocab, cfg.d_model],
        )?))
    }
}

/// `[rows, cols]` row-major → `[cols, rows]`. The CPU GEMM packs a right operand
/// stored `[k, n]` faster than one read transposed (`x @ w^T`), so `nn.Linear`
/// weights are laid out `[in, out]` once, at load.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 64;
    let mut out = vec![0f32; v.len()];
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = v[r * cols + c];
                }
            }
        }
    }
    out
}

/// A batch of token ids: `n_seq` rows of `seq_len`, validated against the model.
#[derive(Clone, Debug)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    pub n_seq: usize,
    pub seq_len: usize,
}

impl TokenBatch {
    /// Checks every id against the vocabulary and the length against the context.
    pub fn new(ids: &[i64], n_seq: usize, seq_len: usize, cfg: &LmConfig) -> Result<TokenBatch> {
        if ids.len() != n_seq * seq_len || seq_len == 0 {
            return Err(LmError::Invalid(format!(
                "{} token ids cannot form {n_seq} sequences of {seq_len}",
                ids.len()
            )));
        }
        if seq_len > cfg.n_ctx {
            return Err(LmError::ContextTooLong {
                len: seq_len,
                n_ctx: cfg.n_ctx,
            });
        }
        let mut out = Vec::with_capacity(ids.len());
        for (i, &t) in ids.iter().enumerate() {
            if t < 0 || t as usize >= cfg.d_vocab {
                return Err(LmError::TokenOutOfRange {
                    token: t,
                    seq: i / seq_len,
                    pos: i % seq_len,
                    vocab: cfg.d_vocab,
                });
            }
            out.push(t as u32);
        }
        Ok(TokenBatch {
            ids: out,
            n_seq,
            seq_len,
        })
    }

    pub fn rows(&self) -> usize {
        self.n_seq * self.seq_len
    }

    /// Sequences `start..start + n` as their own batch.
    pub fn slice(&self, start: usize, n: usize) -> TokenBatch {
        TokenBatch {
            ids: self.ids[start * self.seq_len..(start + n) * self.seq_len].to_vec(),
            n_seq: n,
            seq_len: self.seq_len,
        }
    }
}

/// Buffers of one forward pass, kept between passes so that a pass allocates
/// nothing once the batch shape has been seen.
#[derive(Default)]
pub struct Workspace {
    resid: Option<Tensor>,
    normed: Option<Tensor>,
    tmp: Option<Tensor>,
    q: Option<Tensor>,
    k: Option<Tensor>,
    v: Option<Tensor>,
    z: Option<Tensor>,
    attn_out: Option<Tensor>,
    scores: Option<Tensor>,
    pattern: Option<Tensor>,
    mlp_pre: Option<Tensor>,
    mlp_lin: Option<Tensor>,
    mlp_out: Option<Tensor>,
    /// Logits of the last full pass, `[n_seq*seq_len, d_vocab]`.
    pub logits: Option<Tensor>,
    positions: Vec<u32>,
}

fn buf<'a>(slot: &'a mut Option<Tensor>, device: &Device, shape: &[usize]) -> &'a mut Tensor {
    match slot {
        Some(t) => {
            t.resize(shape);
            t
        }
        None => slot.insert(Tensor::zeros(device, shape)),
    }
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace::default()
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        [
            &self.resid,
            &self.normed,
            &self.tmp,
            &self.q,
            &self.k,
            &self.v,
            &self.z,
            &self.attn_out,
            &self.scores,
            &self.pattern,
            &self.mlp_pre,
            &self.mlp_lin,
            &self.mlp_out,
            &self.logits,
        ]
        .iter()
        .filter_map(|t| t.as_ref())
        .map(|t| 4 * t.numel())
        .sum::<usize>()
            + 4 * self.positions.len()
    }

    /// The residual stream after the last pass (what a pass with `stop_at_layer` returns).
    pub fn resid(&self) -> Option<&Tensor> {
        self.resid.as_ref()
    }
}

/// Calls the visitor at `hook` if it wants it.
fn at(hooks: &mut dyn Hooks, hook: HookPoint, t: &mut Tensor) -> Result<()> {
    if hooks.wants(&hook) {
        hooks.visit(&hook, t)?;
    }
    Ok(())
}

/// A transformer language model loaded from an HF checkpoint.
pub struct HookedTransformer {
    cfg: LmConfig,
    device: Device,
    embed: Tensor,
    pos_embed: Option<Tensor>,
    blocks: Vec<Block>,
    ln_final: Norm,
    /// `[d_vocab, d_model]`; `None` when tied to `embed`.
    unembed: Option<Tensor>,
    /// Rotary `(cos, sin)` tables `[n_ctx, rotary_dim]` of the full-attention layers and
    /// of the sliding-window ones (the same values unless the model gives them their own).
    rot_global: Option<(Tensor, Tensor)>,
    rot_local: Option<(Tensor, Tensor)>,
}

impl HookedTransformer {
    /// Loads `DIR/config.json` and the safetensors weights beside it.
    pub fn load(dir: &Path, device: &Device) -> Result<HookedTransformer> {
        // The SAE ops have CUDA forms; the transformer's (attention, norms) not yet.
        if *device != Device::Cpu {
            return Err(LmError::Invalid(format!(
                "the transformer runs on the CPU only so far; use device cpu (asked for {device})"
            )));
        }
        let cfg = LmConfig::from_dir(dir)?;
        let mut ck = Checkpoint::open(dir)?;
        let model = match cfg.family {
            Family::Gpt2 => Self::load_gpt2(cfg, &mut ck, device)?,
            Family::GptNeox => Self::load_neox(cfg, &mut ck, device)?,
            Family::Llama => Self::load_llama(cfg, &mut ck, device)?,
        };
        Ok(model)
    }

    pub fn cfg(&self) -> &LmConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The unembedding `W_U` as stored, `[d_vocab, d_model]` (the embedding when tied).
    pub fn unembedding(&self) -> &Tensor {
        self.unembed.as_ref().unwrap_or(&self.embed)
    }

    /// Number of parameters held (a tied unembedding counts once).
    pub fn n_params(&self) -> usize {
        let lin = |l: &Linear| l.w.numel() + l.b.as_ref().map_or(0, |b| b.numel());
        let norm = |n: &Norm| n.w.numel() + n.b.as_ref().map_or(0, |b| b.numel());
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                norm(&b.ln1)
                    + norm(&b.ln2)
                    + [&b.q, &b.k, &b.v, &b.o, &b.mlp_in, &b.mlp_out]
                        .iter()
                        .map(|l| lin(l))
                        .sum::<usize>()
                    + b.mlp_gate.as_ref().map_or(0, lin)
                    + b.post_norms.as_ref().map_or(0, |(a, m)| norm(a) + norm(m))
                    + b.qk_norm.as_ref().map_or(0, |(q, k)| q.numel() + k.numel())
            })
            .sum();
        self.embed.numel()
            + self.pos_embed.as_ref().map_or(0, |p| p.numel())
            + blocks
            + norm(&self.ln_final)
            + self.unembed.as_ref().map_or(0, |u| u.numel())
    }

    fn new(
        cfg: LmConfig,
        device: &Device,
        embed: Tensor,
        blocks: Vec<Block>,
        ln_final: Norm,
    ) -> Self {
        let tables = |dim: usize, f: RopeFreqs| {
            let (c, s) = rotary_tables(cfg.n_ctx, dim, f);
            (
                Tensor::from_vec(device, &[cfg.n_ctx, dim], c).unwrap(),
                Tensor::from_vec(device, &[cfg.n_ctx, dim], s).unwrap(),
            )
        };
        let (rot_global, rot_local) = match cfg.rotary {
            Some(r) => (
                Some(tables(r.dim, r.global)),
                (r.local != r.global).then(|| tables(r.dim, r.local)),
            ),
            None => (None, None),
        };
        HookedTransformer {
            cfg,
            device: device.clone(),
            embed,
            pos_embed: None,
            blocks,
            ln_final,
            unembed: None,
            rot_global,
            rot_local,
        }
    }

    fn load_gpt2(cfg: LmConfig, ck: &mut Checkpoint, dev: &Device) -> Result<Self> {
        // Hub GPT-2 checkpoints name tensors with or without the `transformer.` prefix.
        let mut ld = Loader {
            ck,
            dev,
            prefixes: &cfg.weight_prefixes,
            norm_offset: 0.0,
        };
        let (d, da, dm) = (cfg.d_model, cfg.d_attn(), cfg.d_mlp);
        let embed = ld.tensor("wte.weight", &[cfg.d_vocab, d])?;
        let pos = ld.tensor("wpe.weight", &[cfg.n_ctx, d])?;
        let mut blocks = Vec::new();
        for l in 0..cfg.n_layers {
            let p = format!("h.{l}");
            // q | k | v side by side in one Conv1D.
            let (_, w) = ld.take(&format!("{p}.attn.c_attn.weight"), &[d, 3 * da])?;
            let (_, b) = ld.take(&format!("{p}.attn.c_attn.bias"), &[3 * da])?;
            let part = |i: usize| -> Result<Linear> {
                Ok(Linear {
                    w: to_device(dev, cols(&w.values, 3 * da, i * da, da), &[d, da])?,
                    w_in_out: true,
                    b: Some(to_device(
                        dev,
                        b.values[i * da..(i + 1) * da].to_vec(),
                        &[da],
                    )?),
                })
            };
            blocks.push(Block {
                ln1: ld.norm(&format!("{p}.ln_1"), d, true)?,
                ln2: ld.norm(&format!("{p}.ln_2"), d, true)?,
                q: part(0)?,
                k: part(1)?,
                v: part(2)?,
                o: ld.conv1d(&format!("{p}.attn.c_proj"), da, d)?,
                mlp_in: ld.conv1d(&format!("{p}.mlp.c_fc"), d, dm)?,
                mlp_gate: None,
                mlp_out: ld.conv1d(&format!("{p}.mlp.c_proj"), dm, d)?,
                post_norms: None,
                qk_norm: None,
            });
        }
        let ln_final = ld.norm("ln_f", d, true)?;
        let unembed = ld.unembed(&cfg, "lm_head.weight")?;
        let mut m = Self::new(cfg, dev, embed, blocks, ln_final);
        m.pos_embed = Some(pos);
        m.unembed = unembed;
        Ok(m)
    }

    fn load_neox(cfg: LmConfig, ck: &mut Checkpoint, dev: &Device) -> Result<Self> {
        let mut ld = Loader {
            ck,
            dev,
            prefixes: &cfg.weight_prefixes,
            norm_offset: 0.0,
        };
        let (d, dh, h, dm) = (cfg.d_model, cfg.d_head, cfg.n_heads, cfg.d_mlp);
        let embed = ld.tensor("embed_in.weight", &[cfg.d_vocab, d])?;
        let mut blocks = Vec::new();
        for l in 0..cfg.n_layers {
            let p = format!("layers.{l}");
            // Fused QKV rows are laid out per head: [n_heads, (q, k, v), d_head].
            let (_, w) = ld.take(
                &format!("{p}.attention.query_key_value.weight"),
                &[3 * d, d],
            )?;
            let b = if cfg.qkv_bias {
                Some(
                    ld.take(&format!("{p}.attention.query_key_value.bias"), &[3 * d])?
                        .1,
                )
            } else {
                None
            };
            let part = |i: usize| -> Result<Linear> {
                let rows = |v: &[f32], width: usize| -> Vec<f32> {
                    (0..h)
                        .flat_map(|head| {
                            let r0 = (head * 3 + i) * dh;
                            v[r0 * width..(r0 + dh) * width].iter().copied()
                        })
                        .collect()
                };
                Ok(Linear {
                    w: to_device(dev, transpose(&rows(&w.values, d), d, d), &[d, d])?,
                    w_in_out: true,
                    b: match &b {
                        Some(b) => Some(to_device(dev, rows(&b.values, 1), &[d])?),
                        None => None,
                    },
                })
            };
            blocks.push(Block {
                ln1: ld.norm(&format!("{p}.input_layernorm"), d, true)?,
                ln2: ld.norm(&format!("{p}.post_attention_layernorm"), d, true)?,
                q: part(0)?,
                k: part(1)?,
                v: part(2)?,
                o: ld.linear(&format!("{p}.attention.dense"), d, d, cfg.attn_out_bias)?,
                mlp_in: ld.linear(&format!("{p}.mlp.dense_h_to_4h"), d, dm, true)?,
                mlp_gate: None,
                mlp_out: ld.linear(&format!("{p}.mlp.dense_4h_to_h"), dm, d, true)?,
                post_norms: None,
                qk_norm: None,
            });
        }
        let ln_final = ld.norm("final_layer_norm", d, true)?;
        let unembed = ld.unembed(&cfg, "embed_out.weight")?;
        let mut m = Self::new(cfg, dev, embed, blocks, ln_final);
        m.unembed = unembed;
        Ok(m)
    }

    fn load_llama(cfg: LmConfig, ck: &mut Checkpoint, dev: &Device) -> Result<Self> {
        let mut ld = Loader {
            ck,
            dev,
            prefixes: &cfg.weight_prefixes,
            norm_offset: cfg.norm_weight_offset,
        };
        let (d, da, dkv, dm, dh) = (cfg.d_model, cfg.d_attn(), cfg.d_kv(), cfg.d_mlp, cfg.d_head);
        let embed = ld.tensor("embed_tokens.weight", &[cfg.d_vocab, d])?;
        let mut blocks = Vec::new();
        for l in 0..cfg.n_layers {
            let p = format!("layers.{l}");
            let a = format!("{p}.self_attn");
            let (qb, ob, mb) = (cfg.qkv_bias, cfg.attn_out_bias, cfg.mlp_bias);
            // Gemma's `post_attention_layernorm` normalises the attention output; the
            // MLP's input norm is its `pre_feedforward_layernorm`.
            let (ln2, post_norms) = if cfg.post_norms {
                (
                    ld.norm(&format!("{p}.pre_feedforward_layernorm"), d, false)?,
                    Some((
                        ld.norm(&format!("{p}.post_attention_layernorm"), d, false)?,
                        ld.norm(&format!("{p}.post_feedforward_layernorm"), d, false)?,
                    )),
                )
            } else {
                (
                    ld.norm(&format!("{p}.post_attention_layernorm"), d, false)?,
                    None,
                )
            };
            let qk_norm = if cfg.qk_norm {
                Some((
                    ld.norm_weight(&format!("{a}.q_norm.weight"), dh)?,
                    ld.norm_weight(&format!("{a}.k_norm.weight"), dh)?,
                ))
            } else {
                None
            };
            blocks.push(Block {
                ln1: ld.norm(&format!("{p}.input_layernorm"), d, false)?,
                ln2,
                q: ld.linear(&format!("{a}.q_proj"), d, da, qb)?,
                k: ld.linear(&format!("{a}.k_proj"), d, dkv, qb)?,
                v: ld.linear(&format!("{a}.v_proj"), d, dkv, qb)?,
                o: ld.linear(&format!("{a}.o_proj"), da, d, ob)?,
                mlp_in: ld.linear(&format!("{p}.mlp.up_proj"), d, dm, mb)?,
                mlp_gate: Some(ld.linear(&format!("{p}.mlp.gate_proj"), d, dm, mb)?),
                mlp_out: ld.linear(&format!("{p}.mlp.down_proj"), dm, d, mb)?,
                post_norms,
                qk_norm,
            });
        }
        let ln_final = ld.norm("norm", d, false)?;
        let unembed = ld.unembed(&cfg, "lm_head.weight")?;
        let mut m = Self::new(cfg, dev, embed, blocks, ln_final);
        m.unembed = unembed;
        Ok(m)
    }

    /// Parses hook names against this model.
    pub fn hooks(&self, names: &[impl AsRef<str>]) -> Result<Vec<HookPoint>> {
        names
            .iter()
            .map(|n| HookPoint::parse(n.as_ref(), &self.cfg))
            .collect()
    }

    /// Checks a `stop_at_layer` value: `0..=n_layers` (0 stops after the embeddings).
    pub fn check_stop_at_layer(&self, stop: usize) -> Result<()> {
        if stop > self.cfg.n_layers {
            return Err(LmError::StopAtLayer {
                stop,
                n_layers: self.cfg.n_layers,
            });
        }
        Ok(())
    }

    /// One forward pass. With `stop_at_layer = Some(n)` only blocks `0..n` run and the
    /// residual stream is left in the workspace; otherwise the logits are.
    pub fn run(
        &self,
        ws: &mut Workspace,
        batch: &TokenBatch,
        stop_at_layer: Option<usize>,
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let stop = stop_at_layer.unwrap_or(cfg.n_layers);
        self.check_stop_at_layer(stop)?;
        let (rows, d, dev) = (batch.rows(), cfg.d_model, &self.device);
        let resid = buf(&mut ws.resid, dev, &[rows, d]);
        ops::embedding(&self.embed, &batch.ids, resid);
        if let Some(s) = cfg.embed_scale {
            ops::scale(resid, s);
        }
        at(
            hooks,
            HookPoint {
                layer: None,
                kind: HookKind::Embed,
            },
            resid,
        )?;
        if let Some(pos) = &self.pos_embed {
            ws.positions.clear();
            ws.positions
                .extend((0..rows).map(|r| (r % batch.seq_len) as u32));
            let p = buf(&mut ws.tmp, dev, &[rows, d]);
            ops::embedding(pos, &ws.positions, p);
            at(
                hooks,
                HookPoint {
                    layer: None,
                    kind: HookKind::PosEmbed,
                },
                p,
            )?;
            ops::axpy(ws.resid.as_mut().unwrap(), 1.0, p);
        }
        for l in 0..stop {
            self.block(l, ws, batch, hooks)?;
        }
        if stop_at_layer.is_none() {
            let normed = buf(&mut ws.normed, dev, &[rows, d]);
            let hook = HookPoint {
                layer: Some(cfg.n_layers),
                kind: HookKind::LnFinalNormalized,
            };
            self.norm(
                &self.ln_final,
                ws.resid.as_ref().unwrap(),
                normed,
                hook,
                hooks,
            )?;
            let logits = buf(&mut ws.logits, dev, &[rows, cfg.d_vocab]);
            let w_u = self.unembed.as_ref().unwrap_or(&self.embed);
            ops::matmul(logits, normed, false, w_u, true, 1.0, 0.0);
            if let Some(c) = cfg.logit_softcap {
                softcap(logits, c);
            }
        }
        Ok(())
    }

    fn norm(
        &self,
        n: &Norm,
        x: &Tensor,
        out: &mut Tensor,
        hook: HookPoint,
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
        match self.cfg.norm {
            NormKind::LayerNorm => ops::layer_norm(x, self.cfg.eps, out),
            NormKind::RmsNorm => ops::rms_norm(x, self.cfg.eps, out),
        }
        at(hooks, hook, out)?;
        ops::mul_row_vec(out, &n.w);
        if let Some(b) = &n.b {
            ops::add_row_vec(out, b, 1.0);
        }
        Ok(())
    }

    /// Gemma's norm of a branch output, in place (`scratch` ends up holding the input).
    fn post_norm(
        &self,
        n: &Norm,
        x: &mut Tensor,
        scratch: &mut Tensor,
        hook: HookPoint,
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
        self.norm(n, x, scratch, hook, hooks)?;
        std::mem::swap(x, scratch);
        Ok(())
    }

    fn block(
        &self,
        l: usize,
        ws: &mut Workspace,
        batch: &TokenBatch,
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let b = &self.blocks[l];
        let hp = |kind| HookPoint::block(l, kind);
        let (rows, dev) = (batch.rows(), &self.device);
        let (d, da, dkv, dm) = (cfg.d_model, cfg.d_attn(), cfg.d_kv(), cfg.d_mlp);
        let resid = ws.resid.as_mut().unwrap();
        at(hooks, hp(HookKind::ResidPre), resid)?;

        // Attention.
        let normed = buf(&mut ws.normed, dev, &[rows, d]);
        self.norm(&b.ln1, resid, normed, hp(HookKind::Ln1Normalized), hooks)?;
        let q = buf(&mut ws.q, dev, &[rows, da]);
        let k = buf(&mut ws.k, dev, &[rows, dkv]);
        let v = buf(&mut ws.v, dev, &[rows, dkv]);
        b.q.forward(normed, q);
        b.k.forward(normed, k);
        b.v.forward(normed, v);
        at(hooks, hp(HookKind::Q), q)?;
        at(hooks, hp(HookKind::K), k)?;
        at(hooks, hp(HookKind::V), v)?;
        if let Some((wq, wk)) = &b.qk_norm {
            for (x, w, kind) in [
                (&mut *q, wq, HookKind::QNormNormalized),
                (&mut *k, wk, HookKind::KNormNormalized),
            ] {
                ops::head_rms_norm(x, cfg.d_head, cfg.eps);
                at(hooks, hp(kind), x)?;
                ops::mul_head_vec(x, w);
            }
        }
        let window = cfg.window(l);
        let rot = match window {
            Some(_) => self.rot_local.as_ref().or(self.rot_global.as_ref()),
            None => self.rot_global.as_ref(),
        };
        if let Some((cos, sin)) = rot {
            ops::rotary(q, cfg.n_heads, cfg.d_head, batch.seq_len, cos, sin);
            ops::rotary(k, cfg.n_kv_heads, cfg.d_head, batch.seq_len, cos, sin);
            at(hooks, hp(HookKind::RotQ), q)?;
            at(hooks, hp(HookKind::RotK), k)?;
        }
        let sh = AttnShape {
            n_seq: batch.n_seq,
            seq_len: batch.seq_len,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            d_head: cfg.d_head,
            window,
            softcap: cfg.attn_softcap,
        };
        let scale = 1.0 / cfg.attn_scale;
        let z = buf(&mut ws.z, dev, &[rows, da]);
        if hooks.wants(&hp(HookKind::AttnScores)) || hooks.wants(&hp(HookKind::Pattern)) {
            let t = batch.seq_len;
            let n = batch.n_seq * cfg.n_heads * t;
            let scores = buf(&mut ws.scores, dev, &[n, t]);
            ops::attention_scores(q, k, sh, scale, scores);
            at(hooks, hp(HookKind::AttnScores), scores)?;
            let pattern = buf(&mut ws.pattern, dev, &[n, t]);
            ops::causal_softmax(scores, t, pattern);
            at(hooks, hp(HookKind::Pattern), pattern)?;
            ops::attention_apply(pattern, v, sh, z);
        } else {
            ops::causal_attention(q, k, v, sh, scale, z);
        }
        at(hooks, hp(HookKind::Z), z)?;
        let attn_out = buf(&mut ws.attn_out, dev, &[rows, d]);
        b.o.forward(z, attn_out);
        if let Some((post, _)) = &b.post_norms {
            self.post_norm(
                post,
                attn_out,
                normed,
                hp(HookKind::Ln1PostNormalized),
                hooks,
            )?;
        }
        at(hooks, hp(HookKind::AttnOut), attn_out)?;

        // MLP, reading resid_pre (parallel) or resid_mid (sequential).
        if !cfg.parallel_residual {
            ops::axpy(resid, 1.0, attn_out);
            at(hooks, hp(HookKind::ResidMid), resid)?;
        }
        self.norm(&b.ln2, resid, normed, hp(HookKind::Ln2Normalized), hooks)?;
        let pre = buf(&mut ws.mlp_pre, dev, &[rows, dm]);
        match &b.mlp_gate {
            None => {
                b.mlp_in.forward(normed, pre);
                at(hooks, hp(HookKind::MlpPre), pre)?;
                ops::activation(pre, cfg.act);
            }
            Some(gate) => {
                let lin = buf(&mut ws.mlp_lin, dev, &[rows, dm]);
                gate.forward(normed, pre);
                at(hooks, hp(HookKind::MlpPre), pre)?;
                b.mlp_in.forward(normed, lin);
                at(hooks, hp(HookKind::MlpPreLinear), lin)?;
                ops::activation(pre, cfg.act);
                ops::mul(pre, lin);
            }
        }
        at(hooks, hp(HookKind::MlpPost), pre)?;
        let mlp_out = buf(&mut ws.mlp_out, dev, &[rows, d]);
        b.mlp_out.forward(pre, mlp_out);
        if let Some((_, post)) = &b.post_norms {
            self.post_norm(
                post,
                mlp_out,
                normed,
                hp(HookKind::Ln2PostNormalized),
                hooks,
            )?;
        }
        at(hooks, hp(HookKind::MlpOut), mlp_out)?;
        if cfg.parallel_residual {
            ops::axpy(resid, 1.0, attn_out);
        }
        ops::axpy(resid, 1.0, mlp_out);
        at(hooks, hp(HookKind::ResidPost), resid)?;
        Ok(())
    }

    /// Per-token next-token cross-entropy of the last full pass, `[n_seq, seq_len-1]`
    /// flattened (TransformerLens's `loss_per_token=True`).
    pub fn loss_per_token(&self, ws: &Workspace, batch: &TokenBatch) -> Result<Vec<f32>> {
        let logits = ws
            .logits
            .as_ref()
            .ok_or_else(|| LmError::Invalid("no logits: run a full forward pass first".into()))?;
        Ok(self.loss_per_token_of(logits, batch))
    }

    /// [`HookedTransformer::loss_per_token`] for logits `[n_seq*seq_len, d_vocab]` of `batch`.
    pub fn loss_per_token_of(&self, logits: &Tensor, batch: &TokenBatch) -> Vec<f32> {
        let t = batch.seq_len;
        // The last position of each sequence has no next token; score it against 0 and drop it.
        let targets: Vec<u32> = (0..batch.rows())
            .map(|r| if r % t + 1 < t { batch.ids[r + 1] } else { 0 })
            .collect();
        let mut ce = Tensor::zeros(&self.device, &[batch.rows()]);
        ops::cross_entropy(logits, &targets, &mut ce);
        ce.to_vec()
            .into_iter()
            .enumerate()
            .filter(|(r, _)| r % t + 1 < t)
            .map(|(_, v)| v)
            .collect()
    }
}

/// `x = c·tanh(x/c)` (Gemma 2's logit soft-capping).
fn softcap(x: &mut Tensor, c: f32) {
    ops::scale(x, 1.0 / c);
    ops::tanh(x);
    ops::scale(x, c);
}

/// Rotary `cos`/`sin` tables `[n_ctx, dim]` as TransformerLens computes them in f32:
/// angle(p, i) = p / (base^((i mod dim/2) / (dim/2)) · linear_factor).
fn rotary_tables(n_ctx: usize, dim: usize, f: RopeFreqs) -> (Vec<f32>, Vec<f32>) {
    let half = dim / 2;
    let freq: Vec<f32> = (0..half)
        .map(|i| f.base.powf(i as f32 / half as f32) * f.linear_factor)
        .collect();
    let mut cos = Vec::with_capacity(n_ctx * dim);
    let mut sin = Vec::with_capacity(n_ctx * dim);
    for p in 0..n_ctx {
        for i in 0..dim {
            let angle = p as f32 / freq[i % half];
            cos.push((angle as f64).cos() as f32);
            sin.push((angle as f64).sin() as f32);
        }
    }
    (cos, sin)
}
