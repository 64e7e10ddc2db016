//! `tokenizer stream`: the `tokens` stream (FixedSizeList windows with the tokenization
//! in the schema metadata) written to an Arrow IPC file, the form a cached stream takes.
//! Reads text (tokenized and packed continuously, as SAELens's ActivationsStore does)
//! or a pretokenized dataset (checked and sliced).

use crate::pretokenize::check_output;
use crate::windows::{Grouping, TokensArgs};
use anyhow::Result;
use pipeline::tokens::{tokens_batch, tokens_schema};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct StreamArgs {
    #[command(flatten)]
    pub tokens: TokensArgs,
    /// The Arrow IPC file to write (`.arrow`).
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(a: &StreamArgs) -> Result<Value> {
    check_output(&a.output, a.overwrite)?;
    // As SAELens's ActivationsStore: one continuous packing.
    let mut windows = a.tokens.open(Grouping::CONTINUOUS)?;
    let schema = tokens_schema(&windows.metadata);
    let staged = pipeline::staging::Staged::file(&a.output)?;
    let mut w =
        arrow_ipc::writer::FileWriter::try_new(std::fs::File::create(&staged.tmp)?, &schema)?;
    let bar = windows.progress("stream");
    while let Some(chunk) = windows.next() {
        let chunk = chunk?;
        if !chunk.is_empty() {
            w.write(&tokens_batch(&schema, &chunk)?)?;
        }
        windows.show(&bar);
    }
    bar.finish_and_clear();
    let c = windows.finish()?;
    w.finish()?;
    staged.commit()?;
    Ok(json!({
        "output": a.output.display().to_string(),
        "pretokenized": windows.is_pretokenized(),
        "documents": c.documents,
        "document_tokens": c.document_tokens,
        "sequences": c.windows,
        "context_size": a.tokens.context_size,
        "warnings": windows.warnings,
    }))
}
