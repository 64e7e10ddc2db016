//! `tokenizer pretokenize`: a dataset → a Parquet dataset of `context_size` token
//! windows with an `input_ids` column and SAELens's `sae_lens.json`, as SAELens's
//! `PretokenizeRunner` saves it.

use crate::pack::{pack_documents, PackOptions};
use crate::sources::{read_documents, Documents};
use crate::tokenize::TextTokenizer;
use anyhow::{bail, Context, Result};
use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use schemas::columns::INPUT_IDS;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// SAELens's `PretokenizeRunnerConfig` fields (defaults there, except `shuffle`); also
/// the command's flags.
#[derive(clap::Args, Debug)]
pub struct PretokenizeArgs {
    /// A .jsonl/.json, .parquet, .arrow or .txt file, an HF save_to_disk
    /// directory, or a directory of such files.
    #[arg(long)]
    pub dataset: PathBuf,
    /// A tokenizer.json, or a directory holding one (and tokenizer_config.json).
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[arg(long, default_value_t = 128)]
    pub context_size: usize,
    /// The text column (default `text`).
    #[arg(long)]
    pub column_name: Option<String>,
    /// bos, eos, sep, a token id, or none.
    #[arg(long, default_value = "bos")]
    pub begin_batch_token: String,
    #[arg(long, default_value = "none")]
    pub begin_sequence_token: String,
    #[arg(long, default_value = "bos")]
    pub sequence_separator_token: String,
    #[arg(long)]
    pub disable_concat_sequences: bool,
    /// Shuffle the packed rows (seeded); off by default, unlike SAELens.
    #[arg(long)]
    pub shuffle: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Documents packed together before the window restarts (SAELens's map batch).
    #[arg(long, default_value_t = 1000)]
    pub pretokenize_batch_size: usize,
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long)]
    pub overwrite: bool,
}

/// The file name of the one data file written.
pub const DATA_FILE: &str = "data-00000-of-00001.parquet";
/// SAELens's metadata file beside it.
pub const METADATA_FILE: &str = "sae_lens.json";

/// SAELens writes a token option as `"bos"`/`"eos"`/`"sep"`, an int, or null.
fn option_json(spec: &str) -> Value {
    match spec {
        "none" | "null" | "" => Value::Null,
        s => s.parse::<u64>().map_or_else(|_| json!(s), |i| json!(i)),
    }
}

pub fn run(a: &PretokenizeArgs) -> Result<Value> {
    if a.context_size == 0 {
        bail!("--context-size must be positive");
    }
    let out_used = a.output.is_dir() && std::fs::read_dir(&a.output)?.next().is_some();
    if (out_used || a.output.is_file()) && !a.overwrite {
        bail!(
            "{} already exists and is not empty; pass --overwrite to replace it",
            a.output.display()
        );
    }
    let tok = TextTokenizer::load(&a.tokenizer)?;
    if let Some(max) = tok.model_max_length() {
        if a.context_size > max {
            bail!(
                "--context-size {} is larger than the tokenizer's model_max_length {max}",
                a.context_size
            );
        }
    }
    let opts = PackOptions {
        context_size: a.context_size,
        begin_batch_token: tok.special_token(&a.begin_batch_token)?,
        begin_sequence_token: tok.special_token(&a.begin_sequence_token)?,
        sequence_separator_token: tok.special_token(&a.sequence_separator_token)?,
        disable_concat_sequences: a.disable_concat_sequences,
    };
    let docs = read_documents(&a.dataset, Some(a.column_name.as_deref().unwrap_or("text")))?;
    let texts = match docs {
        Documents::Text(t) => t,
        Documents::Tokens(_) => bail!(
            "{}: the column is already tokenized; pretokenize reads text",
            a.dataset.display()
        ),
    };
    let n_docs = texts.len();
    let ids = tok.encode_all(&texts)?;
    let n_doc_tokens: usize = ids.iter().map(|d| d.len()).sum();
    let mut windows = pack_documents(
        ids.iter().map(|d| d.as_slice()),
        opts,
        a.pretokenize_batch_size,
    );
    if windows.is_empty() {
        bail!(
            "{}: {n_docs} documents ({n_doc_tokens} tokens) fill no window of {} tokens",
            a.dataset.display(),
            a.context_size
        );
    }
    if a.shuffle {
        // As SAELens, the packed rows are shuffled (not the documents).
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed.unwrap_or(0));
        windows.shuffle(&mut rng);
    }

    let metadata = json!({
        "sae_lens_version": schemas::SAELENS_FORMAT_VERSION,
        "tokenizer_name": a.tokenizer.display().to_string(),
        "original_dataset": a.dataset.display().to_string(),
        "original_dataset_name": null,
        "original_split": null,
        "original_data_files": null,
        "original_column_name": a.column_name.as_deref().unwrap_or("text"),
        "context_size": a.context_size,
        "shuffled": a.shuffle,
        "seed": a.seed,
        "begin_batch_token": option_json(&a.begin_batch_token),
        "begin_sequence_token": option_json(&a.begin_sequence_token),
        "sequence_separator_token": option_json(&a.sequence_separator_token),
        "disable_concat_sequences": a.disable_concat_sequences,
        "use_chat_formatting": false,
    });
    write_dataset(&a.output, &windows, &metadata)?;
    Ok(json!({
        "output": a.output.display().to_string(),
        "documents": n_docs,
        "document_tokens": n_doc_tokens,
        "sequences": windows.len(),
        "context_size": a.context_size,
    }))
}

/// Writes the dataset into `DIR.tmp-PID`, then swaps it in for `dir`.
fn write_dataset(dir: &Path, windows: &[Vec<u32>], metadata: &Value) -> Result<()> {
    let name = dir
        .file_name()
        .context("the output needs a directory name")?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.with_file_name(format!("{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut lists = ListBuilder::new(Int32Builder::new());
    for w in windows {
        lists.append_value(w.iter().map(|&t| Some(t as i32)));
    }
    let col: ArrayRef = Arc::new(lists.finish());
    let batch = RecordBatch::try_from_iter([(INPUT_IDS, col)])?;
    let f = std::fs::File::create(tmp.join(DATA_FILE))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), Some(props))?;
    w.write(&batch)?;
    w.close()?;
    std::fs::write(
        tmp.join(METADATA_FILE),
        serde_json::to_string_pretty(metadata)?,
    )?;
    // Swap: the old output (if any) is removed only once the new one is complete.
    let old = dir.with_file_name(format!("{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)?;
    if old.exists() {
        if old.is_dir() {
            std::fs::remove_dir_all(&old)?;
        } else {
            std::fs::remove_file(&old)?;
        }
    }
    Ok(())
}
