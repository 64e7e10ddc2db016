//! `activation-producer run`: the streaming LM stage. Tokens in (a file, a `tokens`
//! stream or its shards), one `activations` record batch out per LM batch, served over
//! Flight and/or cached as shards. With `--producer I/N` this process runs LM batches
//! `I, I+N, I+2N, …`, so N producers merged round-robin emit exactly what one would.

use crate::{plan, select, Plan, SeqposSlice};
use anyhow::{bail, Context, Result};
use kernels::Device;
use lm::{Capture, HookedTransformer, TokenBatch, Workspace};
use pipeline::acts::{activations_batch, activations_schema, ActsMeta};
use pipeline::cli::{interrupt_flag, progress, ClientArgs, ServeArgs};
use pipeline::convert::{convert_batch, convert_schema, ActDtype};
use pipeline::output::{Cache, Output, OutputSpec};
use pipeline::tokens::TokenStream;
use pipeline::{BatchSink, OpenOptions};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Tokens: a `tokens` stream (`grpc://HOST:PORT/tokens`), its shards, or a token
    /// file (.npy, .safetensors, .parquet/.arrow with `input_ids`).
    #[arg(long)]
    pub tokens: String,
    /// The consumer name to read a tokens stream as (the tokenizer's --consumers).
    #[arg(long)]
    pub consumer: Option<String>,
    /// HF checkpoint directory, or a hub repo id (`org/name`, `@revision` optional) in the local HF cache.
    #[arg(long, value_parser = pipeline::hub::model_dir)]
    pub model: PathBuf,
    /// Comma-separated TransformerLens hook names, all captured in one pass that stops
    /// after the last block any of them needs.
    #[arg(long, value_delimiter = ',', required = true)]
    pub hooks: Vec<String>,
    /// Sequences per LM batch (SAELens's store_batch_size_prompts); one output record
    /// batch per LM batch.
    #[arg(long, default_value_t = 32)]
    pub store_batch_size_prompts: usize,
    /// Positions to keep, as a Python slice START:STOP[:STEP] (SAELens's seqpos_slice).
    #[arg(long, allow_hyphen_values = true)]
    pub seqpos_slice: Option<String>,
    /// Keep one attention head of q/k/v/z hooks.
    #[arg(long)]
    pub hook_head_index: Option<usize>,
    /// Drop rows whose token is a special token: the model's tokenizer's (BOS, EOS,
    /// PAD, SEP, decoder start; as SAELens's `exclude_special_tokens: true`), or the
    /// comma-separated ids given.
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub exclude_special_tokens: Option<Vec<u32>>,
    /// Activation storage and wire type: float32 or float16 (SAE math stays f32).
    #[arg(long, default_value = "float32", value_parser = ActDtype::parse)]
    pub dtype: ActDtype,
    /// This process's share, `I/N`: LM batches I, I+N, … (0-based).
    #[arg(long, default_value = "0/1", value_parser = parse_producer)]
    pub producer: (u64, u64),
    /// Start at this output position (this producer's batch index), for resume.
    #[arg(long, default_value_t = 0)]
    pub position: u64,
    /// Stop after this many output batches.
    #[arg(long)]
    pub max_batches: Option<u64>,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Also (or only) cache the stream as shards in this directory.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// The cache's layout: `shards` (ours: manifest + Arrow IPC shards, resumable) or
    /// `saelens` (what SAELens's CacheActivationsRunner writes; its
    /// `cached_activations_path` loads it; whole sequences, float32).
    #[arg(long, value_enum, default_value = "shards")]
    pub format: CacheFormat,
    #[arg(long, value_parser = pipeline::cli::parse_bytes, default_value = "256MiB")]
    pub shard_bytes: usize,
    #[arg(long)]
    pub overwrite: bool,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheFormat {
    Shards,
    Saelens,
}

/// `I/N` with `I < N`.
pub fn parse_producer(s: &str) -> Result<(u64, u64), String> {
    let bad = || {
        format!(
            "'{s}': expected I/N, this producer's index and the number of producers (0 <= I < N)"
        )
    };
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (u64, u64) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(format!(
            "'{s}': producer {i} of {n} does not exist (0 <= I < N; indices start at 0)"
        ));
    }
    Ok((i, n))
}

pub fn run(a: &RunArgs) -> Result<Value> {
    let b = a.store_batch_size_prompts;
    if b == 0 {
        bail!("--store-batch-size-prompts must be at least 1");
    }
    let (me, n_prod) = a.producer;
    let client = a.client.config()?;
    let device = Device::parse(&a.device)?;
    let model = HookedTransformer::load(&a.model, &device)
        .with_context(|| format!("cannot load the model in {}", a.model.display()))?;
    // Our first LM batch is global batch position*N + I: its first sequence.
    let first_seq = (a.position * n_prod + me) * b as u64;
    let mut tokens = TokenStream::open_at(
        &a.tokens,
        &OpenOptions {
            consumer: a.consumer.clone(),
            client: client.clone(),
            ..Default::default()
        },
        first_seq,
    )?;
    let seq_len = tokens.seq_len();
    let seqpos = a
        .seqpos_slice
        .as_deref()
        .map(SeqposSlice::parse)
        .transpose()?;
    let Plan {
        hooks,
        stop,
        positions,
        sel,
    } = plan(
        model.cfg(),
        &a.hooks,
        None,
        a.hook_head_index,
        seqpos,
        seq_len,
    )?;
    if let Some(s) = sel.iter().find(|s| !s.hook.per_position()) {
        bail!(
            "'{}' is an attention pattern [n_heads, q_pos, k_pos], not one row per token: the activations stream carries per-position hooks",
            s.hook
        );
    }
    let special: Vec<u32> = match &a.exclude_special_tokens {
        None => Vec::new(),
        Some(ids) if !ids.is_empty() => ids.clone(),
        Some(_) => lm::special_token_ids(&a.model, model.cfg()),
    };
    let names: Vec<(String, usize)> = sel.iter().map(|s| (s.hook.to_string(), s.width)).collect();
    let model_name = a.model.display().to_string();
    let schema = activations_schema(
        &names,
        &ActsMeta {
            model: model_name.as_str(),
            seqpos_slice: a.seqpos_slice.as_deref(),
            hook_head_index: a.hook_head_index,
        },
    );
    let out_schema = match a.dtype {
        ActDtype::F32 => schema.clone(),
        d => convert_schema(&schema, d),
    };

    let cancel = interrupt_flag()?;
    let mut out = Output::open(
        OutputSpec {
            name: schemas::streams::ACTIVATIONS.into(),
            serve: a.serve.server(&client, cancel.clone())?,
            window_bytes: a.serve.window_bytes,
            cache: a.output.clone().map(|d| match a.format {
                CacheFormat::Saelens => Cache::Saelens {
                    dir: d,
                    context: seq_len,
                    shard_bytes: a.shard_bytes as u64,
                    overwrite: a.overwrite,
                },
                CacheFormat::Shards => Cache::shards(d, a.shard_bytes, a.overwrite, a.position > 0),
            }),
            first_position: a.position,
        },
        out_schema.clone(),
    )?;
    let bar = progress(&format!("producer {me}/{n_prod}"));
    let started = Instant::now();
    let mut n_tokens = 0u64;
    let result: Result<()> = (|| {
        let mut ws = Workspace::new();
        let mut cap = Capture::new(hooks.clone());
        // LM batch g (global) covers sequences g*b..(g+1)*b; ours are g = j*N + I.
        let mut j = a.position;
        let skip = |t: &mut TokenStream, upto: u64| -> Result<()> {
            while t.position() < upto {
                let want = (upto - t.position()).min(4096) as usize;
                if t.next_seqs(want)?.is_empty() {
                    break;
                }
            }
            Ok(())
        };
        loop {
            if cancel.load(Ordering::SeqCst) {
                bail!("interrupted at output position {j}");
            }
            if a.max_batches.is_some_and(|m| j - a.position >= m) {
                // Read the tokens to their end, so their server knows this consumer is done.
                while !tokens.next_seqs(4096)?.is_empty() {}
                break;
            }
            let g = j * n_prod + me;
            let first_seq = g * b as u64;
            skip(&mut tokens, first_seq)?;
            if tokens.position() < first_seq {
                break;
            }
            let ids = tokens.next_seqs(b)?;
            if ids.is_empty() {
                break;
            }
            let n = ids.len() / seq_len;
            let batch = TokenBatch::new(&ids, n, seq_len, model.cfg())
                .with_context(|| format!("tokens of {}", tokens.describe()))?;
            model.run(&mut ws, &batch, stop, &mut cap)?;
            // Rows kept: the selected positions, minus excluded tokens.
            let mut keep = Vec::with_capacity(n * positions.len());
            let (mut seq, mut pos, mut tok) = (Vec::new(), Vec::new(), Vec::new());
            for s in 0..n {
                for &p in &positions {
                    let t = batch.ids[s * seq_len + p];
                    let k = !special.contains(&t);
                    keep.push(k);
                    if k {
                        seq.push(first_seq + s as u64);
                        pos.push(p as u32);
                        tok.push(t as i32);
                    }
                }
            }
            let mut cols = Vec::with_capacity(sel.len());
            for (s, act) in sel.iter().zip(cap.take()) {
                let act = act.with_context(|| format!("the pass did not reach '{}'", s.hook))?;
                let mut v = Vec::new();
                select(s, &act, n, seq_len, &positions, &mut v);
                if keep.iter().any(|k| !k) {
                    v = v
                        .chunks(s.width)
                        .zip(&keep)
                        .filter(|(_, k)| **k)
                        .flat_map(|(r, _)| r.iter().copied())
                        .collect();
                }
                cols.push(v);
            }
            n_tokens += tok.len() as u64;
            let mut rb = activations_batch(&schema, cols, seq, pos, tok)?;
            if a.dtype != ActDtype::F32 {
                rb = convert_batch(&rb, &out_schema)?;
            }
            out.write(&rb)?;
            bar.inc(1);
            j += 1;
        }
        Ok(())
    })();
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let summary = out.close(
        result
            .as_ref()
            .map(|_| ())
            .map_err(|e| format!("producer {me}/{n_prod}: {e:#}")),
    );
    result?;
    let mut summary = summary?;
    summary["producer"] = json!(format!("{me}/{n_prod}"));
    summary["hooks"] = json!(names
        .iter()
        .map(|(h, d)| json!({"hook": h, "d": d}))
        .collect::<Vec<_>>());
    summary["tokens"] = json!(n_tokens);
    summary["tokens_per_second"] = json!(n_tokens as f64 / seconds);
    summary["stop_at_layer"] = json!(stop);
    summary["peak_rss_mib"] = json!(pipeline::sys::peak_rss_mib());
    Ok(summary)
}
