//! `activation-producer dump`: the activations of a set of hooks over a token file,
//! one tensor per hook in one safetensors file.

use crate::{check_output, load_model_and_tokens, plan, select, Plan, SeqposSlice};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lm::{Capture, Workspace};
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
    let Plan {
        hooks,
        stop,
        positions,
        sel,
    } = plan(
        cfg,
        &a.hooks,
        a.stop_at_layer,
        a.hook_head_index,
        a.seqpos_slice,
        tokens.seq_len,
    )?;
    let mut values: Vec<Vec<f32>> = vec![Vec::new(); sel.len()];

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
        for ((s, v), act) in sel.iter().zip(&mut values).zip(cap.take()) {
            let act = act.with_context(|| format!("the pass did not reach '{}'", s.hook))?;
            select(s, &act, n, tokens.seq_len, &positions, v);
        }
        start += n;
        bar.inc(n as u64);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let names: Vec<String> = sel.iter().map(|s| s.hook.to_string()).collect();
    let mut out = Vec::new();
    let mut shapes = serde_json::Map::new();
    for ((s, v), name) in sel.into_iter().zip(values).zip(&names) {
        let shape = if s.hook.per_position() {
            vec![tokens.n_seq * positions.len(), s.width]
        } else {
            vec![tokens.n_seq, cfg.n_heads, tokens.seq_len, tokens.seq_len]
        };
        shapes.insert(name.clone(), json!(shape));
        out.push(OutTensor {
            name,
            shape,
            values: v,
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
