//! `tokenizer pretokenize`: a dataset → a Parquet dataset of `context_size` token
//! windows with an `input_ids` column and SAELens's `sae_lens.json`, as SAELens's
//! `PretokenizeRunner` saves it.

use crate::windows::{Grouping, TokensArgs};
use anyhow::{bail, Result};
use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use schemas::columns::INPUT_IDS;
use schemas::tokens::{DATA_FILE, METADATA_FILE};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// SAELens's `PretokenizeRunnerConfig` fields (defaults there, except `shuffle`); also
/// the command's flags.
#[derive(clap::Args, Debug)]
pub struct PretokenizeArgs {
    #[command(flatten)]
    pub tokens: TokensArgs,
    /// Documents packed together before the window restarts (SAELens's map batch);
    /// 0 = never.
    #[arg(long, default_value_t = 1000)]
    pub pretokenize_batch_size: usize,
    /// SAELens's `num_proc`: `datasets.map` cuts the documents into this many
    /// contiguous shards, each packed on its own, so the windows depend on it (the work
    /// itself runs on all cores regardless).
    #[arg(long, default_value_t = 4)]
    pub num_proc: usize,
    /// Shuffle the packed rows (seeded by --seed); off by default, unlike SAELens.
    #[arg(long)]
    pub shuffle: bool,
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long)]
    pub overwrite: bool,
}

/// Refuses to replace a non-empty `output` unless `overwrite`.
pub fn check_output(output: &Path, overwrite: bool) -> Result<()> {
    let used = output.is_file() || (output.is_dir() && std::fs::read_dir(output)?.next().is_some());
    if used && !overwrite {
        bail!(
            "{} already exists and is not empty; pass --overwrite to replace it",
            output.display()
        );
    }
    Ok(())
}

/// Rows per Parquet row group: bounds the writer's buffer.
const ROW_GROUP_ROWS: usize = 8192;

pub fn run(a: &PretokenizeArgs) -> Result<Value> {
    check_output(&a.output, a.overwrite)?;
    let mut windows = a.tokens.open(Grouping {
        batch_size: a.pretokenize_batch_size,
        num_proc: a.num_proc,
    })?;
    if windows.is_pretokenized() {
        bail!(
            "{}: the column is already tokenized; pretokenize reads text",
            a.tokens.dataset.display()
        );
    }
    let mut metadata = windows.metadata.clone();
    metadata.shuffled |= a.shuffle;
    let dir = pipeline::staging::Staged::dir(&a.output)?;
    let file = std::fs::File::create(dir.tmp.join(DATA_FILE))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    let mut writer: Option<parquet::arrow::ArrowWriter<std::fs::File>> = None;
    let mut write = |rows: &[Vec<u32>]| -> Result<()> {
        let batch = list_batch(rows)?;
        let w = match writer.as_mut() {
            Some(w) => w,
            None => writer.insert(parquet::arrow::ArrowWriter::try_new(
                file.try_clone()?,
                batch.schema(),
                Some(props.clone()),
            )?),
        };
        w.write(&batch)?;
        Ok(())
    };
    let bar = windows.progress("pretokenize");
    if a.shuffle {
        // As SAELens, the packed rows are shuffled (not the documents): all of them
        // are held, as token ids only.
        let mut all: Vec<Vec<u32>> = Vec::new();
        while let Some(chunk) = windows.next() {
            all.extend(chunk?);
            windows.show(&bar);
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.tokens.seed.unwrap_or(0));
        all.shuffle(&mut rng);
        for rows in all.chunks(ROW_GROUP_ROWS) {
            write(rows)?;
        }
    } else {
        while let Some(chunk) = windows.next() {
            write(&chunk?)?;
            windows.show(&bar);
        }
    }
    bar.finish_and_clear();
    let c = windows.finish()?;
    writer.expect("rows were written").close()?;
    std::fs::write(
        dir.tmp.join(METADATA_FILE),
        serde_json::to_string_pretty(&metadata)?,
    )?;
    dir.commit()?;
    Ok(json!({
        "output": a.output.display().to_string(),
        "documents": c.documents,
        "document_tokens": c.document_tokens,
        "sequences": c.windows,
        "context_size": a.tokens.context_size,
        "warnings": windows.warnings,
    }))
}

/// Windows as an `input_ids: List<Int32>` batch (HF `datasets`' `Sequence(int32)`).
fn list_batch(rows: &[Vec<u32>]) -> Result<RecordBatch> {
    let mut lists = ListBuilder::new(Int32Builder::new());
    for w in rows {
        lists.append_value(w.iter().map(|&t| Some(t as i32)));
    }
    let col: ArrayRef = Arc::new(lists.finish());
    Ok(RecordBatch::try_from_iter([(INPUT_IDS, col)])?)
}
