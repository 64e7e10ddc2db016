//! `tokenizer stream`: the `tokens` stream (FixedSizeList windows with the tokenization
//! in the schema metadata): served over Flight (`--listen`), cached as shards
//! (`--output DIR`), or written as one Arrow IPC file (`--output FILE.arrow`). Reads
//! text (tokenized and packed continuously, as SAELens's ActivationsStore does) or a
//! pretokenized dataset (checked and sliced). Batch p holds sequences
//! `p*K..(p+1)*K` (K = `--batch-sequences`), so `--position p` resumes at sequence p*K.

use crate::pretokenize::check_output;
use crate::windows::{Grouping, TokensArgs};
use anyhow::{bail, Result};
use pipeline::cli::{interrupt_flag, ClientArgs, ServeArgs};
use pipeline::files::IpcFileSink;
use pipeline::output::{Cache, Output, OutputSpec};
use pipeline::tokens::{tokens_batch, tokens_schema};
use pipeline::BatchSink;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct StreamArgs {
    #[command(flatten)]
    pub tokens: TokensArgs,
    /// A shard directory, or an Arrow IPC file (`.arrow`) holding the whole stream.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long)]
    pub overwrite: bool,
    /// Sequences per record batch.
    #[arg(long, default_value_t = 64)]
    pub batch_sequences: usize,
    /// Start at this batch (sequence position × batch_sequences), for resume.
    #[arg(long, default_value_t = 0)]
    pub position: u64,
    /// Stop after this many batches.
    #[arg(long)]
    pub max_batches: Option<u64>,
    /// Only check: open the dataset and the tokenizer, tokenize the first documents,
    /// print what was found (JSON) and write nothing.
    #[arg(long)]
    pub check: bool,
    #[arg(long, value_parser = pipeline::cli::parse_bytes, default_value = "256MiB")]
    pub shard_bytes: usize,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Tokenizing threads (default: all cores; 1 when serving, as the tokenizer is
    /// light beside the model and the trainer).
    #[arg(long)]
    pub threads: Option<usize>,
}

enum Sink {
    File(Box<IpcFileSink>),
    Out(Box<Output>),
}

pub fn run(a: &StreamArgs) -> Result<Value> {
    if a.batch_sequences == 0 {
        bail!("--batch-sequences must be at least 1");
    }
    // Serving, the tokenizer is light beside the model and the trainer: one thread.
    let serving = a.serve.listen.is_some();
    let threads = pipeline::cli::stage_threads(a.threads.or(serving.then_some(1)), false)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let ipc_file = a
        .output
        .as_ref()
        .filter(|p| p.extension().is_some_and(|e| e == "arrow"));
    if let Some(f) = ipc_file {
        if a.serve.listen.is_some() || a.position > 0 {
            bail!("--output {}: a single .arrow file is written whole; use a shard directory to serve or resume", f.display());
        }
        check_output(f, a.overwrite)?;
    }
    // As SAELens's ActivationsStore: one continuous packing.
    let mut windows = a.tokens.open(Grouping::CONTINUOUS)?;
    if a.check {
        let first = windows.next().transpose()?.map_or(0, |c| c.len());
        if first == 0 {
            bail!(
                "{}: no {}-token sequence could be made from it",
                a.tokens.dataset.display(),
                a.tokens.context_size
            );
        }
        return Ok(json!({
            "check": "ok",
            "dataset": a.tokens.dataset.display().to_string(),
            "pretokenized": windows.is_pretokenized(),
            "first_sequences": first,
            "context_size": a.tokens.context_size,
            "warnings": windows.warnings,
        }));
    }
    let mut md = tokens_schema(&windows.metadata).metadata().clone();
    md.insert(
        schemas::streams::meta::STREAM.into(),
        schemas::streams::TOKENS.into(),
    );
    md.insert(
        schemas::streams::meta::BATCH_ROWS.into(),
        a.batch_sequences.to_string(),
    );
    let base = tokens_schema(&windows.metadata);
    let schema = Arc::new(base.as_ref().clone().with_metadata(md));
    let cancel = interrupt_flag()?;
    let mut sink: Sink = match ipc_file {
        Some(f) => Sink::File(Box::new(IpcFileSink::create(f, &schema)?)),
        None => Sink::Out(Box::new(Output::open(
            OutputSpec {
                name: schemas::streams::TOKENS.into(),
                serve: a.serve.server(&a.client.config()?, cancel.clone())?,
                window_bytes: a.serve.window_bytes,
                cache: a
                    .output
                    .clone()
                    .map(|d| Cache::shards(d, a.shard_bytes, a.overwrite, a.position > 0)),
                first_position: a.position,
            },
            schema.clone(),
        )?)),
    };
    let write = |sink: &mut Sink, b: &pipeline::RecordBatch| match sink {
        Sink::File(f) => f.write(b),
        Sink::Out(o) => o.write(b),
    };
    let bar = windows.progress("stream");
    let skip = a.position * a.batch_sequences as u64;
    let (mut seen, mut written) = (0u64, 0u64);
    let mut pending: Vec<Vec<u32>> = Vec::new();
    let result: Result<()> = (|| {
        for chunk in windows.by_ref() {
            if cancel.load(Ordering::SeqCst) {
                bail!("interrupted after {written} sequences");
            }
            for w in chunk? {
                seen += 1;
                if seen > skip {
                    pending.push(w);
                }
                if pending.len() == a.batch_sequences {
                    write(&mut sink, &tokens_batch(&schema, &pending)?)?;
                    written += pending.len() as u64;
                    pending.clear();
                    if a.max_batches
                        .is_some_and(|m| written >= m * a.batch_sequences as u64)
                    {
                        return Ok(());
                    }
                }
            }
        }
        if !pending.is_empty() {
            write(&mut sink, &tokens_batch(&schema, &pending)?)?;
            written += pending.len() as u64;
        }
        Ok(())
    })();
    bar.finish_and_clear();
    let c = windows.finish();
    let closed = match (sink, &result) {
        (Sink::File(mut f), Ok(())) => f.finish().map(|_| Value::Null).map_err(anyhow::Error::from),
        (Sink::File(_), Err(_)) => Ok(Value::Null), // dropped unfinished: no file appears
        (Sink::Out(o), r) => (*o)
            .close(
                r.as_ref()
                    .map(|_| ())
                    .map_err(|e| format!("tokenizer: {e:#}")),
            )
            .map_err(anyhow::Error::from),
    };
    result?;
    let closed = closed?;
    let c = c?;
    Ok(json!({
        "output": a.output.as_ref().map(|p| p.display().to_string()),
        "served": closed.get("consumers").is_some(),
        "pretokenized": windows.is_pretokenized(),
        "documents": c.documents,
        "document_tokens": c.document_tokens,
        "sequences": c.windows,
        "sequences_written": written,
        "first_position": a.position,
        "context_size": a.tokens.context_size,
        "warnings": windows.warnings,
    }))
}
