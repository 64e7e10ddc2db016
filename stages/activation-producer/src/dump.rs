//! `activation-producer dump`: the activations of a set of hooks over a token file,
//! one tensor per hook in one safetensors file.

use crate::{check_output, load_model_and_tokens, SeqposSlice};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::Tensor;
use lm::{Capture, HookPoint, Workspace};
use sae::io::{write_safetensors, OutTensor};
use schemas::Dtype;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

pub struct DumpArgs {
    pub model: PathBuf,
    pub tokens: PathBuf,
    pub hooks: Vec<String>,
    pub stop_at_layer: Option<usize>,
    pub hook_head_index: Option<usize>,
    pub seqpos_slice: Option<SeqposSlice>,
    pub output: PathBuf,
    pub overwrite: bool,
    /// Sequences per forward pass.
    pub batch_size: usize,
    pub dtype: Dtype,
    pub device: String,
}

/// What is kept of one hook's activation: the rows of the selected positions and,
/// with a head index, that head's columns.
struct Selection {
    hook: HookPoint,
    head: Option<(usize, usize)>,
    values: Vec<f32>,
    width: usize,
}

pub fn run(a: &DumpArgs) -> Result<Value> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.hooks.is_empty() {
        bail!("--hooks: name at least one hook");
    }
    check_output(&a.output, a.overwrite)?;
    let (model, tokens) = load_model_and_tokens(&a.model, &a.tokens, &a.device)?;
    let cfg = model.cfg();
    let hooks = model.hooks(&a.hooks)?;
    let needed = lm::hooks::stop_at_layer_for(&hooks, cfg.n_layers);
    let stop = match (a.stop_at_layer, needed) {
        (Some(s), _) => {
            model.check_stop_at_layer(s)?;
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
    let positions = a.seqpos_slice.map_or_else(
        || (0..tokens.seq_len).collect(),
        |s| s.positions(tokens.seq_len),
    );
    if positions.is_empty() {
        bail!(
            "--seqpos-slice selects no positions out of {}",
            tokens.seq_len
        );
    }
    let mut sel = Vec::new();
    for &hook in &hooks {
        if !hook.per_position() && (a.seqpos_slice.is_some() || a.hook_head_index.is_some()) {
            bail!("'{hook}' is [n_seq, n_heads, q_pos, k_pos] and is written whole: --seqpos-slice and --hook-head-index apply to per-position hooks only");
        }
        let head = match a.hook_head_index {
            None => None,
            Some(h) => {
                // Checks the index against the hook's heads, with the library's errors.
                lm::Interventions::new().add(cfg, hook, Some(h), lm::Intervention::ZeroAblate)?;
                Some((h * cfg.d_head, cfg.d_head))
            }
        };
        let width = head.map_or(hook.width(cfg, tokens.seq_len), |(_, w)| w);
        sel.push(Selection {
            hook,
            head,
            values: Vec::new(),
            width,
        });
    }

    let bar = ProgressBar::new(tokens.n_seq as u64);
    bar.set_style(
        ProgressStyle::with_template("dump {bar:30} {pos}/{len} sequences {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let mut ws = Workspace::new();
    let mut cap = Capture::new(hooks.clone());
    let started = Instant::now();
    let mut start = 0;
    while start < tokens.n_seq {
        let n = a.batch_size.min(tokens.n_seq - start);
        let batch = tokens.slice(start, n);
        model.run(&mut ws, &batch, stop, &mut cap)?;
        for (s, act) in sel.iter_mut().zip(cap.take()) {
            let act = act.with_context(|| format!("the pass did not reach '{}'", s.hook))?;
            keep(s, &act, n, tokens.seq_len, &positions);
        }
        start += n;
        bar.inc(n as u64);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let names: Vec<String> = sel.iter().map(|s| s.hook.to_string()).collect();
    let mut out = Vec::new();
    let mut shapes = serde_json::Map::new();
    for (s, name) in sel.into_iter().zip(&names) {
        let shape = if s.hook.per_position() {
            vec![tokens.n_seq * positions.len(), s.width]
        } else {
            vec![tokens.n_seq, cfg.n_heads, tokens.seq_len, tokens.seq_len]
        };
        shapes.insert(name.clone(), json!(shape));
        out.push(OutTensor {
            name,
            shape,
            values: s.values,
            dtype: a.dtype,
        });
    }
    write_safetensors(&a.output, &out, a.overwrite)?;
    let n_tokens = tokens.rows();
    Ok(json!({
        "model": a.model.display().to_string(),
        "model_type": cfg.model_type,
        "n_seq": tokens.n_seq,
        "context_size": tokens.seq_len,
        "positions_per_seq": positions.len(),
        "stop_at_layer": stop,
        "hook_head_index": a.hook_head_index,
        "hooks": shapes,
        "dtype": a.dtype.as_str(),
        "tokens_per_second": n_tokens as f64 / seconds,
        "output": a.output.display().to_string(),
    }))
}

/// Appends the selected rows (and head columns) of one batch's activation.
fn keep(s: &mut Selection, act: &Tensor, n_seq: usize, seq_len: usize, positions: &[usize]) {
    let v = act.to_vec();
    let cols = act.cols();
    if !s.hook.per_position() {
        s.values.extend_from_slice(&v);
        return;
    }
    let (c0, w) = s.head.unwrap_or((0, cols));
    for seq in 0..n_seq {
        for &p in positions {
            let r = seq * seq_len + p;
            s.values
                .extend_from_slice(&v[r * cols + c0..r * cols + c0 + w]);
        }
    }
}
