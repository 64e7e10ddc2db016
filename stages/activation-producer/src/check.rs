//! `activation-producer check`: what `pipeline run` asks before it starts anything. Reads
//! the checkpoint's config (no weights), checks the hooks, head index and seqpos slice
//! against it, and prints each hook's width and the size of the weights.

use crate::{plan, SeqposSlice};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CheckArgs {
    /// HF checkpoint directory, or a hub repo id (`org/name`, `@revision` optional) in the local HF cache.
    #[arg(long, value_parser = pipeline::hub::model_dir)]
    pub model: PathBuf,
    #[arg(long, value_delimiter = ',', required = true)]
    pub hooks: Vec<String>,
    #[arg(long, default_value_t = 128)]
    pub context_size: usize,
    #[arg(long, allow_hyphen_values = true)]
    pub seqpos_slice: Option<String>,
    #[arg(long)]
    pub hook_head_index: Option<usize>,
}

pub fn run(a: &CheckArgs) -> Result<Value> {
    let cfg = lm::LmConfig::from_dir(&a.model)
        .with_context(|| format!("cannot read the model config in {}", a.model.display()))?;
    if a.context_size > cfg.n_ctx {
        anyhow::bail!(
            "context_size {} is longer than the model's {} positions",
            a.context_size,
            cfg.n_ctx
        );
    }
    let seqpos = a
        .seqpos_slice
        .as_deref()
        .map(SeqposSlice::parse)
        .transpose()?;
    let p = plan(
        &cfg,
        &a.hooks,
        None,
        a.hook_head_index,
        seqpos,
        a.context_size,
    )?;
    // The weights' size, for the run's memory estimate: every safetensors file.
    let mut weights_bytes = 0u64;
    for e in
        std::fs::read_dir(&a.model).with_context(|| format!("cannot list {}", a.model.display()))?
    {
        let e = e?;
        if e.path().extension().is_some_and(|x| x == "safetensors") {
            weights_bytes += e.metadata()?.len();
        }
    }
    Ok(json!({
        "check": "ok",
        "model_type": cfg.model_type,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "hooks": a.hooks.iter().zip(&p.sel).map(|(h, s)| json!({"hook": h, "d": s.width})).collect::<Vec<_>>(),
        "positions": p.positions.len(),
        "stop_at_layer": p.stop,
        "weights_bytes": weights_bytes,
    }))
}
