//! The `tokens` stream: a dataset → `context_size` token windows, a chunk at a time.
//!
//! Text is tokenized and packed as one continuous stream (SAELens's ActivationsStore) or
//! in groups exactly as SAELens's `PretokenizeRunner` packs them ([`Grouping`]). An
//! already tokenized dataset is checked against its `sae_lens.json` and sliced to
//! `context_size`, as SAELens's ActivationsStore does.

use crate::pack::{PackOptions, Packer};
use crate::sources::{Dataset, DocumentStream, Documents, ShuffledDocuments, SourceError};
use crate::tokenize::TextTokenizer;
use anyhow::{bail, Context, Result};
use schemas::tokens::METADATA_FILE;
use schemas::{TokenSpec, TokenizationMetadata};
use std::path::PathBuf;

/// What to read and how to cut it: SAELens's `PretokenizeRunnerConfig` fields.
#[derive(clap::Args, Clone, Debug)]
pub struct TokensArgs {
    /// A .jsonl/.json, .csv, .parquet, .arrow or .txt file, an HF save_to_disk
    /// directory, a directory of such files, or a glob ('data/*.parquet').
    #[arg(long, value_parser = pipeline::hub::dataset_path)]
    pub dataset: PathBuf,
    /// A tokenizer.json, or a directory holding one (and tokenizer_config.json), or a
    /// hub repo id (`org/name[@revision]`) in the local HF cache.
    #[arg(long, value_parser = pipeline::hub::tokenizer_path)]
    pub tokenizer: PathBuf,
    #[arg(long, default_value_t = 128)]
    pub context_size: usize,
    /// The column to read (default: tokens, input_ids, text or problem, as SAELens).
    #[arg(long)]
    pub column_name: Option<String>,
    /// SQL over the dataset, which is the table `data`
    /// (e.g. "SELECT text FROM data WHERE length(text) > 200").
    #[arg(long)]
    pub query: Option<String>,
    /// bos, eos, sep, a token id, or none.
    #[arg(long, default_value = "bos")]
    pub begin_batch_token: String,
    #[arg(long, default_value = "none")]
    pub begin_sequence_token: String,
    #[arg(long, default_value = "bos")]
    pub sequence_separator_token: String,
    #[arg(long)]
    pub disable_concat_sequences: bool,
    /// Shuffle the documents before packing (seeded, through a buffer of
    /// --shuffle-buffer documents, so memory stays bounded).
    #[arg(long)]
    pub shuffle_documents: bool,
    #[arg(long, default_value_t = 10_000)]
    pub shuffle_buffer: usize,
    /// Seed of every shuffle (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl TokensArgs {
    /// SAELens's defaults (bos / none / bos, concatenating, no shuffle).
    pub fn new(
        dataset: &std::path::Path,
        tokenizer: &std::path::Path,
        context_size: usize,
    ) -> Self {
        TokensArgs {
            dataset: dataset.to_path_buf(),
            tokenizer: tokenizer.to_path_buf(),
            context_size,
            column_name: None,
            query: None,
            begin_batch_token: "bos".into(),
            begin_sequence_token: "none".into(),
            sequence_separator_token: "bos".into(),
            disable_concat_sequences: false,
            shuffle_documents: false,
            shuffle_buffer: 10_000,
            seed: None,
        }
    }
}

/// Where packing restarts. SAELens's `PretokenizeRunner` packs each `datasets.map`
/// batch on its own (a fresh window, its partial last window dropped), and with
/// `num_proc` > 1 `datasets` first cuts the documents into that many contiguous shards;
/// so the windows depend on both. SAELens's ActivationsStore packs continuously.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grouping {
    /// Documents per group (`pretokenize_batch_size`); 0 = never restart.
    pub batch_size: usize,
    /// Contiguous shards packed separately (`num_proc`); 0 or 1 = one.
    pub num_proc: usize,
}

impl Grouping {
    /// One continuous packing, as SAELens's ActivationsStore tokenizes on the fly.
    pub const CONTINUOUS: Grouping = Grouping {
        batch_size: 0,
        num_proc: 1,
    };
}

/// First document of each of `num_proc` contiguous shards of `n` documents, as
/// `datasets.Dataset.shard(contiguous=True)` cuts them (earlier shards take the
/// remainder); `datasets.map` lowers `num_proc` to `n` when there are fewer documents.
pub fn shard_starts(n: usize, num_proc: usize) -> Vec<usize> {
    let k = num_proc.clamp(1, n.max(1));
    let (div, rem) = (n / k, n % k);
    (0..k).map(|i| div * i + i.min(rem)).collect()
}

/// Running totals of a window stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub documents: usize,
    pub document_tokens: usize,
    pub windows: usize,
}

/// Token windows of a dataset, in chunks; see the module notes.
pub struct TokenWindows {
    docs: Box<dyn Iterator<Item = Result<Documents, SourceError>> + Send>,
    tokenized: bool,
    tok: TextTokenizer,
    packer: Packer,
    group_size: usize,
    /// Shard starts (empty: one shard), and the document index where packing next restarts.
    shards: Vec<usize>,
    next_restart: usize,
    pending: Vec<String>,
    context_size: usize,
    /// The tokenization these windows carry (the `tokens` stream's metadata).
    pub metadata: TokenizationMetadata,
    pub counts: Counts,
    /// Things the user should hear about that are not errors.
    pub warnings: Vec<String>,
    origin: PathBuf,
}

impl TokensArgs {
    /// Opens the dataset and the tokenizer and checks them against each other.
    pub fn open(&self, grouping: Grouping) -> Result<TokenWindows> {
        let ctx = self.context_size;
        if ctx == 0 {
            bail!("--context-size must be positive");
        }
        let tok = TextTokenizer::load(&self.tokenizer)?;
        if let Some((max, who)) = tok.max_context() {
            if ctx > max {
                bail!("--context-size {ctx} is larger than {who} ({max})");
            }
        }
        let pack = PackOptions {
            context_size: ctx,
            begin_batch_token: tok.special_token(&self.begin_batch_token)?,
            begin_sequence_token: tok.special_token(&self.begin_sequence_token)?,
            sequence_separator_token: tok.special_token(&self.sequence_separator_token)?,
            disable_concat_sequences: self.disable_concat_sequences,
        };
        pack.check()
            .map_err(|e| anyhow::anyhow!("--context-size {ctx}: {e}"))?;
        let dataset = Dataset::open(&self.dataset)?;
        let docs = documents(&dataset, self.query.as_deref(), self.column_name.as_deref())?;
        let mut warnings = Vec::new();
        let metadata = if docs.is_tokenized() {
            pretokenized_metadata(&dataset, &tok, &self.tokenizer, ctx, &mut warnings)?
        } else {
            TokenizationMetadata {
                original_column_name: Some(docs.column().to_string()),
                shuffled: self.shuffle_documents,
                seed: self.seed,
                begin_batch_token: TokenSpec::parse(&self.begin_batch_token),
                begin_sequence_token: TokenSpec::parse(&self.begin_sequence_token),
                sequence_separator_token: TokenSpec::parse(&self.sequence_separator_token),
                disable_concat_sequences: self.disable_concat_sequences,
                tokenizer_vocab_hash: Some(tok.vocab_hash()),
                ..TokenizationMetadata::new(
                    &self.tokenizer.display().to_string(),
                    &self.dataset.display().to_string(),
                    ctx,
                )
            }
        };
        let shards = if grouping.num_proc > 1 && !docs.is_tokenized() {
            // The shard sizes need the number of documents: one counting pass.
            let mut n = 0;
            for d in documents(&dataset, self.query.as_deref(), self.column_name.as_deref())? {
                n += d?.len();
            }
            shard_starts(n, grouping.num_proc)
        } else {
            Vec::new()
        };
        let docs_tokenized = docs.is_tokenized();
        let docs: Box<dyn Iterator<Item = _> + Send> = if self.shuffle_documents {
            Box::new(ShuffledDocuments::new(
                docs,
                self.shuffle_buffer,
                self.seed.unwrap_or(0),
            ))
        } else {
            Box::new(docs)
        };
        let mut w = TokenWindows {
            docs,
            tokenized: docs_tokenized,
            tok,
            packer: Packer::new(pack),
            // Pretokenized rows are taken as they are: no packing, no groups.
            group_size: if docs_tokenized {
                0
            } else {
                grouping.batch_size
            },
            shards,
            next_restart: 0,
            pending: Vec::new(),
            context_size: ctx,
            metadata,
            counts: Counts::default(),
            warnings,
            origin: self.dataset.clone(),
        };
        w.next_restart = w.restart_after(0);
        Ok(w)
    }
}

/// The documents of a dataset, or of a query's result over it.
pub fn documents(
    dataset: &Dataset,
    query: Option<&str>,
    column: Option<&str>,
) -> Result<DocumentStream> {
    match query {
        None => Ok(DocumentStream::of(dataset, column)?),
        Some(sql) => query_documents(dataset, sql, column),
    }
}

#[cfg(feature = "sql")]
fn query_documents(dataset: &Dataset, sql: &str, column: Option<&str>) -> Result<DocumentStream> {
    let (schema, batches) = crate::sql::query(dataset, sql)?;
    let origin = PathBuf::from(format!("{} (query)", dataset.spec.display()));
    Ok(DocumentStream::new(batches, &schema, &origin, column)?)
}

#[cfg(not(feature = "sql"))]
fn query_documents(_: &Dataset, _: &str, _: Option<&str>) -> Result<DocumentStream> {
    bail!("--query needs the tokenizer built with its `sql` feature (on by default)")
}

/// SAELens's checks of a pretokenized dataset: the tokenizer it names in
/// `sae_lens.json` must be ours, and its windows at least `context_size` long.
/// A warning goes to stderr when it happens and into the summary's `warnings`.
fn warn(warnings: &mut Vec<String>, message: String) {
    eprintln!("warning: {message}");
    warnings.push(message);
}

fn pretokenized_metadata(
    dataset: &Dataset,
    tok: &TextTokenizer,
    tok_path: &std::path::Path,
    ctx: usize,
    warnings: &mut Vec<String>,
) -> Result<TokenizationMetadata> {
    let path = dataset.home().join(METADATA_FILE);
    let ours = tok.vocab_hash();
    let Ok(text) = std::fs::read_to_string(&path) else {
        warn(
            warnings,
            format!(
                "{}: no {METADATA_FILE}, so the dataset's tokenizer cannot be checked",
                dataset.spec.display()
            ),
        );
        return Ok(TokenizationMetadata {
            tokenizer_vocab_hash: Some(ours),
            ..TokenizationMetadata::new("", &dataset.spec.display().to_string(), ctx)
        });
    };
    let mut meta: TokenizationMetadata = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not SAELens pretokenized-dataset metadata",
            path.display()
        )
    })?;
    let theirs = match &meta.tokenizer_vocab_hash {
        Some(h) => Some(h.clone()),
        // SAELens writes only the name: compare with it where it is a local tokenizer.
        None => TextTokenizer::load(std::path::Path::new(&meta.tokenizer_name))
            .ok()
            .map(|t| t.vocab_hash()),
    };
    match theirs {
        Some(h) if h != ours => bail!(
            "{}: the dataset was tokenized with '{}', whose vocabulary differs from {}'s; tokenize it again with this tokenizer",
            dataset.spec.display(),
            meta.tokenizer_name,
            tok_path.display()
        ),
        Some(_) => {}
        None => warn(warnings, format!(
            "{}: the dataset's tokenizer '{}' cannot be loaded here, so only token ids are checked against the vocabulary",
            dataset.spec.display(),
            meta.tokenizer_name
        )),
    }
    if meta.context_size < ctx {
        bail!(
            "{}: the pretokenized windows have {} tokens ({METADATA_FILE} context_size) but --context-size is {ctx}; it must be at most the dataset's",
            dataset.spec.display(),
            meta.context_size
        );
    }
    if meta.context_size > ctx {
        warn(warnings, format!(
            "the pretokenized windows have {} tokens; only the first {ctx} of each are used, some data will be discarded",
            meta.context_size
        ));
    }
    meta.context_size = ctx;
    meta.tokenizer_vocab_hash = Some(ours);
    Ok(meta)
}

impl TokenWindows {
    /// The first document index after `i` where packing restarts (`usize::MAX`: never).
    fn restart_after(&self, i: usize) -> usize {
        let shard = self.shards.iter().rposition(|&s| s <= i);
        let start = shard.map_or(0, |k| self.shards[k]);
        let shard_end = shard
            .and_then(|k| self.shards.get(k + 1).copied())
            .unwrap_or(usize::MAX);
        if self.group_size == 0 {
            return shard_end;
        }
        let group_end = start + ((i - start) / self.group_size + 1) * self.group_size;
        group_end.min(shard_end)
    }

    /// A progress line on stderr (hidden when stderr is not a terminal); call
    /// [`TokenWindows::show`] after each chunk.
    pub fn progress(&self, what: &str) -> indicatif::ProgressBar {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{what} {{spinner}} {{pos}} documents {{msg}} {{elapsed}}"
            ))
            .expect("valid template"),
        );
        bar
    }

    /// Updates a bar from [`TokenWindows::progress`].
    pub fn show(&self, bar: &indicatif::ProgressBar) {
        bar.set_position(self.counts.documents as u64);
        bar.set_message(format!(
            "{} tokens, {} windows",
            self.counts.document_tokens, self.counts.windows
        ));
    }

    /// The totals once the stream is drained; an error if no window came out.
    pub fn finish(&self) -> Result<Counts> {
        let c = self.counts.clone();
        if c.windows == 0 {
            bail!(
                "{}: {} documents ({} tokens) fill no window of {} tokens",
                self.origin.display(),
                c.documents,
                c.document_tokens,
                self.context_size
            );
        }
        Ok(c)
    }

    /// The tokenizer in use.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tok
    }

    /// Whether the dataset was already tokenized.
    pub fn is_pretokenized(&self) -> bool {
        self.tokenized
    }

    fn slice(&mut self, rows: Vec<Vec<u32>>) -> Result<Vec<Vec<u32>>> {
        let vocab = self.tok.vocab_size();
        let first_row = self.counts.documents;
        let mut out = Vec::with_capacity(rows.len());
        for (i, mut row) in rows.into_iter().enumerate() {
            let r = first_row + i;
            if row.len() < self.context_size {
                bail!(
                    "{}: row {r} has {} tokens, fewer than --context-size {}",
                    self.origin.display(),
                    row.len(),
                    self.context_size
                );
            }
            if let Some(bad) = row.iter().find(|&&t| t >= vocab) {
                bail!(
                    "{}: row {r} holds token id {bad}, outside the tokenizer's vocabulary (0..{vocab}): was it tokenized with another tokenizer?",
                    self.origin.display()
                );
            }
            self.counts.document_tokens += row.len();
            // The row is ours: cut it in place rather than copy the window out.
            row.truncate(self.context_size);
            out.push(row);
        }
        self.counts.documents = first_row + out.len();
        Ok(out)
    }

    /// Tokenizes and packs `texts` (at most one group's worth).
    fn pack(&mut self, texts: &[String], end_of_group: bool) -> Result<Vec<Vec<u32>>> {
        let ids = self.tok.encode_all(texts)?;
        let mut out = Vec::new();
        for d in &ids {
            self.packer.push(d, &mut out);
        }
        if end_of_group {
            self.packer.reset();
        }
        self.counts.documents += ids.len();
        self.counts.document_tokens += ids.iter().map(Vec::len).sum::<usize>();
        Ok(out)
    }
}

/// Documents tokenized at once (in parallel) when the group is longer.
const CHUNK: usize = 1000;

impl Iterator for TokenWindows {
    type Item = Result<Vec<Vec<u32>>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let to_restart = self.next_restart - self.counts.documents;
            let want = to_restart.min(CHUNK);
            let mut exhausted = false;
            while self.pending.len() < want {
                match self.docs.next() {
                    None => {
                        exhausted = true;
                        break;
                    }
                    Some(Err(e)) => return Some(Err(e.into())),
                    Some(Ok(Documents::Text(t))) => self.pending.extend(t),
                    Some(Ok(Documents::Tokens(rows))) => {
                        let out = self.slice(rows);
                        if let Ok(w) = &out {
                            self.counts.windows += w.len();
                        }
                        return Some(out);
                    }
                }
            }
            if self.pending.is_empty() && exhausted {
                return None;
            }
            let n = want.min(self.pending.len());
            let group: Vec<String> = self.pending.drain(..n).collect();
            let out = self.pack(&group, n == to_restart);
            if n == to_restart {
                self.next_restart = self.restart_after(self.counts.documents);
            }
            match out {
                Ok(w) if w.is_empty() => continue,
                Ok(w) => {
                    self.counts.windows += w.len();
                    return Some(Ok(w));
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::shard_starts;

    #[test]
    fn shards_are_cut_as_datasets_cuts_them() {
        // datasets: div = n // k, mod = n % k, start = div * i + min(i, mod).
        assert_eq!(shard_starts(10, 4), [0, 3, 6, 8]);
        assert_eq!(shard_starts(500, 4), [0, 125, 250, 375]);
        assert_eq!(
            shard_starts(3, 4),
            [0, 1, 2],
            "num_proc lowered to the size"
        );
        assert_eq!(shard_starts(7, 1), [0]);
        assert_eq!(shard_starts(0, 4), [0]);
    }
}
