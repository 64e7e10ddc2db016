//! Library part of the `activation-producer` stage (the binary is a thin `main` over it).

pub mod bench;
pub mod check;
pub mod dump;
pub mod eval;
pub mod features;
pub mod run;

use anyhow::{bail, Context, Result};
use kernels::{Device, Tensor};
use lm::{HookPoint, HookedTransformer, TokenBatch};
use std::path::Path;

pub use schemas::seqpos::SeqposSlice;

/// Loads the model and the token file, checking the tokens against the model.
pub fn load_model_and_tokens(
    model: &Path,
    tokens: &Path,
    device: &str,
) -> Result<(HookedTransformer, TokenBatch)> {
    let device = Device::parse(device)?;
    let model = HookedTransformer::load(model, &device)
        .with_context(|| format!("cannot load the model in {}", model.display()))?;
    let rows = pipeline::read_tokens(tokens)?;
    let batch = TokenBatch::new(&rows.ids, rows.n_seq, rows.seq_len, model.cfg())
        .with_context(|| format!("tokens in {}", tokens.display()))?;
    Ok((model, batch))
}

/// What a pass keeps: the hooks, where it stops, the positions kept of each sequence,
/// and per hook which columns.
pub struct Plan {
    pub hooks: Vec<HookPoint>,
    pub stop: Option<usize>,
    pub positions: Vec<usize>,
    pub sel: Vec<Selection>,
}

/// What is kept of one hook's activation: the rows of the selected positions and,
/// with a head index, that head's columns.
pub struct Selection {
    pub hook: HookPoint,
    pub head: Option<(usize, usize)>,
    pub width: usize,
}

/// Checks the hooks, `stop_at_layer`, head index and seqpos slice against the model.
pub fn plan(
    cfg: &lm::LmConfig,
    names: &[String],
    stop_at_layer: Option<usize>,
    hook_head_index: Option<usize>,
    seqpos_slice: Option<SeqposSlice>,
    seq_len: usize,
) -> Result<Plan> {
    if names.is_empty() {
        bail!("--hooks: name at least one hook");
    }
    let hooks = names
        .iter()
        .map(|n| HookPoint::parse(n, cfg))
        .collect::<lm::Result<Vec<_>>>()?;
    let needed = lm::hooks::stop_at_layer_for(&hooks, cfg.n_layers);
    let stop = match (stop_at_layer, needed) {
        (Some(s), _) => {
            if s > cfg.n_layers {
                return Err(lm::LmError::StopAtLayer {
                    stop: s,
                    n_layers: cfg.n_layers,
                }
                .into());
            }
            if let Some(h) = hooks
                .iter()
                .find(|h| needed.is_none() || h.blocks_needed() > s)
            {
                bail!(
                    "--stop-at-layer {s} stops before hook '{h}', which needs {}",
                    match needed {
                        None => "the full model (no --stop-at-layer)".to_string(),
                        Some(_) => format!("--stop-at-layer {} or more", h.blocks_needed()),
                    }
                );
            }
            Some(s)
        }
        (None, n) => n,
    };
    let positions = seqpos_slice.map_or_else(|| (0..seq_len).collect(), |s| s.positions(seq_len));
    if positions.is_empty() {
        bail!("--seqpos-slice selects no positions out of {seq_len}");
    }
    let mut sel = Vec::new();
    for &hook in &hooks {
        if !hook.per_position() && (seqpos_slice.is_some() || hook_head_index.is_some()) {
            bail!("'{hook}' is [n_seq, n_heads, q_pos, k_pos] and is written whole: --seqpos-slice and --hook-head-index apply to per-position hooks only");
        }
        let head = match hook_head_index {
            None => None,
            Some(h) => {
                // Checks the index against the hook's heads, with the library's errors.
                lm::Interventions::new().add(cfg, hook, Some(h), lm::Intervention::ZeroAblate)?;
                Some((h * cfg.d_head, cfg.d_head))
            }
        };
        let width = head.map_or(hook.width(cfg, seq_len), |(_, w)| w);
        sel.push(Selection { hook, head, width });
    }
    Ok(Plan {
        hooks,
        stop,
        positions,
        sel,
    })
}

/// Appends the selected rows (and head columns) of one batch's activation to `out`.
pub fn select(
    s: &Selection,
    act: &Tensor,
    n_seq: usize,
    seq_len: usize,
    positions: &[usize],
    out: &mut Vec<f32>,
) {
    let v = act.to_vec();
    let cols = act.cols();
    if !s.hook.per_position() {
        out.extend_from_slice(&v);
        return;
    }
    let (c0, w) = s.head.unwrap_or((0, cols));
    for seq in 0..n_seq {
        for &p in positions {
            let r = seq * seq_len + p;
            out.extend_from_slice(&v[r * cols + c0..r * cols + c0 + w]);
        }
    }
}

/// Refuses to replace an existing output unless asked.
pub fn check_output(path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        bail!(
            "{} already exists; pass --overwrite to replace it",
            path.display()
        );
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!("the output's directory {} does not exist", parent.display());
        }
    }
    Ok(())
}
