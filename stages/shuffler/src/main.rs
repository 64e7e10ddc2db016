//! `shuffler`: the stage between the activation producers and the SAE trainers. It
//! merges its upstreams in a fixed order, mixes their rows in SAELens's mixing buffer
//! (sized in tokens, with a hard byte cap) and serves record batches of exactly
//! `train_batch_size_tokens` rows — the `batches` stream — to every trainer.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use pipeline::cli::{interrupt_flag, parse_bytes, progress, ClientArgs, ServeArgs};
use pipeline::mixer::{read_snapshot_state, Mixer};
use pipeline::output::{Cache, Output, OutputSpec};
use pipeline::{open_sources, BatchSink, OpenOptions, RecordBatch};
use schemas::streams::{self, meta};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "shuffler",
    version,
    about = "SAELens's mixing buffer as a stage: activations in, training batches out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mix activation streams into training batches and serve (or cache) them.
    ///
    /// The upstreams (Flight URLs, activation caches, files) are merged round-robin in
    /// the order given; every column of a row moves together. Deterministic for a seed:
    /// the batches equal what `sae-trainer train --activations` makes of the same rows
    /// with the same `seed`, `n_batches_in_buffer` and `train_batch_size_tokens`.
    Run(Box<RunArgs>),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Activation streams to mix, merged round-robin in this order.
    #[arg(long, required = true, num_args = 1..)]
    upstream: Vec<String>,
    /// The consumer name to read Flight upstreams as.
    #[arg(long)]
    consumer: Option<String>,
    /// Rows per output batch (SAELens's train_batch_size_tokens).
    #[arg(long)]
    train_batch_size_tokens: usize,
    /// The mixing buffer, in tokens (default: n_batches_in_buffer batches).
    #[arg(long, conflicts_with = "n_batches_in_buffer")]
    buffer_tokens: Option<usize>,
    /// The mixing buffer in batches, as SAELens sizes it (buffer = this × batch).
    #[arg(long, default_value_t = 20)]
    n_batches_in_buffer: usize,
    /// Hard cap on the bytes the buffer may hold; a setting that cannot fit is
    /// refused before the first batch.
    #[arg(long, value_parser = parse_bytes, default_value = "4GiB")]
    max_buffer_bytes: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep stream order (SAELens's `shuffle: false`).
    #[arg(long)]
    no_shuffle: bool,
    /// Stop after this many output batches (the trainers' total).
    #[arg(long)]
    max_batches: Option<u64>,
    /// Output positions (the trainers' checkpoint batches) at which to snapshot the
    /// buffer, RNG and upstream position into --snapshots DIR/POSITION.
    #[arg(long, value_delimiter = ',')]
    snapshot_at: Vec<u64>,
    #[arg(long)]
    snapshots: Option<PathBuf>,
    /// Continue from a snapshot directory: the output continues at its position.
    #[arg(long)]
    resume: Option<PathBuf>,
    #[command(flatten)]
    serve: ServeArgs,
    /// Also (or only) write the batches as shards to this directory.
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long, value_parser = parse_bytes, default_value = "256MiB")]
    shard_bytes: usize,
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    client: ClientArgs,
    /// Threads for the transport (default 1; the mixing itself is one thread).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> std::process::ExitCode {
    match Cli::parse().command {
        Command::Run(a) => match run(&a) {
            Ok(summary) => {
                println!("{summary}");
                pipeline::rendezvous::leave(Ok(&[summary]));
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                pipeline::rendezvous::leave(Err(&format!("{e:#}")));
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

fn run(a: &RunArgs) -> Result<serde_json::Value> {
    // Mixing is one thread; --threads sizes the transport (default 1).
    pipeline::cli::stage_threads(Some(a.threads.unwrap_or(1)), true)?;
    pipeline::sys::tune_allocator();
    let batch = a.train_batch_size_tokens;
    if batch == 0 {
        bail!("--train-batch-size-tokens must be at least 1");
    }
    let buffer_rows = a.buffer_tokens.unwrap_or(a.n_batches_in_buffer * batch);
    if buffer_rows < batch {
        bail!(
            "the buffer ({buffer_rows} tokens) is smaller than one batch ({batch} tokens): raise --buffer-tokens or --n-batches-in-buffer"
        );
    }
    if !a.snapshot_at.is_empty() && a.snapshots.is_none() {
        bail!("--snapshot-at needs --snapshots DIR");
    }
    let state = a.resume.as_deref().map(read_snapshot_state).transpose()?;
    if let Some(st) = &state {
        if st.upstreams.len() != a.upstream.len() {
            bail!(
                "the snapshot was taken with {} upstreams, this run has {}",
                st.upstreams.len(),
                a.upstream.len()
            );
        }
    }
    let client = a.client.config()?;
    let opts = OpenOptions {
        position: state.as_ref().map_or(0, |s| s.upstream_position),
        consumer: a.consumer.clone(),
        client: client.clone(),
        ..Default::default()
    };
    let mut src = open_sources(&a.upstream, &opts)?;
    let in_schema = src.schema();
    let kind = in_schema.metadata().get(meta::STREAM).map(String::as_str);
    if kind.is_some_and(|k| k != streams::ACTIVATIONS) {
        bail!(
            "{} is a '{}' stream; the shuffler reads activations",
            src.describe(),
            kind.unwrap_or_default()
        );
    }
    let per_row = pipeline::stream::row_bytes(&in_schema).map_err(anyhow::Error::msg)?;
    let buffer_bytes = buffer_rows * per_row;
    if buffer_bytes > a.max_buffer_bytes {
        bail!(
            "a buffer of {buffer_rows} tokens × {per_row} bytes per token = {buffer_bytes} bytes does not fit --max-buffer-bytes {} : lower --buffer-tokens (at most {} tokens) or raise the cap",
            a.max_buffer_bytes,
            a.max_buffer_bytes / per_row
        );
    }
    let buffer = (!a.no_shuffle).then_some(buffer_rows);
    let mut mixer = Mixer::new(in_schema.clone(), batch, buffer, a.seed);
    if let Some(dir) = &a.resume {
        mixer.load_snapshot(dir)?;
    }
    let mut md = in_schema.metadata().clone();
    md.insert(meta::STREAM.into(), streams::BATCHES.into());
    md.insert(meta::SHUFFLE_SEED.into(), a.seed.to_string());
    md.insert(meta::BATCH_ROWS.into(), batch.to_string());
    let out_schema = Arc::new(in_schema.as_ref().clone().with_metadata(md));

    let cancel = interrupt_flag()?;
    let first = state.as_ref().map_or(0, |s| s.output_position);
    let mut out = Output::open(
        OutputSpec {
            name: streams::BATCHES.into(),
            serve: a.serve.server(&client, cancel.clone())?,
            window_bytes: a.serve.window_bytes,
            cache: a
                .output
                .clone()
                .map(|d| Cache::shards(d, a.shard_bytes, a.overwrite, a.resume.is_some())),
            first_position: first,
        },
        out_schema.clone(),
    )?;
    let bar = progress("shuffle");
    let mut ended = false;
    let result: Result<()> = (|| {
        let emit = |b: RecordBatch, out: &mut Output| -> Result<()> {
            let b = RecordBatch::try_new(out_schema.clone(), b.columns().to_vec())?;
            out.write(&b)?;
            Ok(())
        };
        loop {
            if cancel.load(Ordering::SeqCst) {
                bail!("interrupted at output position {}", out.position());
            }
            if a.max_batches.is_some_and(|m| out.position() >= m) {
                // Read the upstreams to their end, so their servers know we are done.
                while src.next_batch()?.is_some() {}
                break;
            }
            if let Some(b) = mixer.pop() {
                emit(b, &mut out)?;
                bar.inc(1);
                let p = out.position();
                if a.snapshot_at.contains(&p) {
                    let dir = a.snapshots.as_ref().expect("checked").join(p.to_string());
                    mixer
                        .save_snapshot(&dir, p, src.position(), &a.upstream)
                        .with_context(|| format!("snapshot at position {p}"))?;
                }
                continue;
            }
            if ended {
                break;
            }
            match src.next_batch()? {
                Some(b) => {
                    let rows = b.num_rows();
                    mixer.push(b)?;
                    if mixer.bytes() > a.max_buffer_bytes {
                        bail!(
                            "the buffer holds {} bytes after an upstream batch of {rows} rows, over --max-buffer-bytes {}: upstream batches this large need room beyond the {buffer_rows}-token buffer",
                            mixer.bytes(),
                            a.max_buffer_bytes
                        );
                    }
                }
                None => {
                    mixer.end()?;
                    ended = true;
                }
            }
        }
        Ok(())
    })();
    bar.finish_and_clear();
    let upstream_position = src.position();
    drop(src);
    let summary = out.close(
        result
            .as_ref()
            .map(|_| ())
            .map_err(|e| format!("shuffler: {e:#}")),
    );
    result?;
    let mut summary = summary?;
    summary["upstream_position"] = json!(upstream_position);
    summary["buffer_tokens"] = json!(buffer_rows);
    summary["buffer_peak_bytes"] = json!(mixer.peak_bytes);
    summary["max_buffer_bytes"] = json!(a.max_buffer_bytes);
    summary["peak_rss_mib"] = json!(pipeline::sys::peak_rss_mib());
    Ok(summary)
}
