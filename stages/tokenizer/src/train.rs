//! `tokenizer train`: a byte-level BPE tokenizer (GPT-2's scheme: byte-level
//! pre-tokenizer and decoder, no normalizer) trained on a dataset's text, saved as an HF
//! tokenizer directory (`tokenizer.json` + `tokenizer_config.json`) that this stage,
//! the `tokenizers` library and HF `AutoTokenizer` all load.

use crate::sources::{Dataset, Documents};
use crate::windows::documents;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Mutex;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// A dataset as for `pretokenize` (its text column is read).
    #[arg(long)]
    pub dataset: PathBuf,
    #[arg(long)]
    pub column_name: Option<String>,
    /// SQL over the dataset (the table `data`).
    #[arg(long)]
    pub query: Option<String>,
    /// Vocabulary size, special tokens and the 256 bytes included.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// A pair is merged only if it occurs at least this often.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Special tokens, comma-separated; the first is also bos/eos/unk.
    #[arg(long, default_value = "<|endoftext|>", value_delimiter = ',')]
    pub special_tokens: Vec<String>,
    /// model_max_length written to tokenizer_config.json (none if absent).
    #[arg(long)]
    pub model_max_length: Option<usize>,
    /// The directory to write.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(a: &TrainArgs) -> Result<Value> {
    crate::pretokenize::check_output(&a.output, a.overwrite)?;
    let minimum = 256 + a.special_tokens.len();
    if a.vocab_size < minimum {
        bail!(
            "--vocab-size {} is below the 256 bytes plus {} special tokens",
            a.vocab_size,
            a.special_tokens.len()
        );
    }
    let dataset = Dataset::open(&a.dataset)?;
    let docs = documents(&dataset, a.query.as_deref(), a.column_name.as_deref())?;
    if docs.is_tokenized() {
        bail!(
            "{}: column '{}' is already tokenized; training reads text",
            a.dataset.display(),
            docs.column()
        );
    }
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::default()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
    .with_post_processor(Some(ByteLevel::default().trim_offsets(false).into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let specials: Vec<AddedToken> = a
        .special_tokens
        .iter()
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(a.vocab_size)
        .min_frequency(a.min_frequency)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    // The trainer pulls documents as it goes; a read error stops it and is reported.
    let failure = Mutex::new(None);
    let (mut n_docs, mut n_chars) = (0usize, 0usize);
    let texts = docs
        .map_while(|d| match d {
            Ok(Documents::Text(t)) => Some(t),
            Ok(Documents::Tokens(_)) => None,
            Err(e) => {
                *failure.lock().unwrap() = Some(e);
                None
            }
        })
        .flatten()
        .inspect(|t| {
            n_docs += 1;
            n_chars += t.len();
        });
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| anyhow::anyhow!("training failed: {e}"))?;
    if let Some(e) = failure.into_inner().unwrap() {
        return Err(e.into());
    }
    if n_docs == 0 {
        bail!("{}: no documents", a.dataset.display());
    }
    let staged = pipeline::staging::Staged::dir(&a.output)?;
    tokenizer
        .save(staged.tmp.join("tokenizer.json"), true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let first = a.special_tokens.first();
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": first,
        "eos_token": first,
        "unk_token": first,
        "add_prefix_space": false,
    });
    if let Some(m) = a.model_max_length {
        config["model_max_length"] = json!(m);
    }
    std::fs::write(
        staged.tmp.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    staged.commit()?;
    Ok(json!({
        "output": a.output.display().to_string(),
        "documents": n_docs,
        "characters": n_chars,
        "vocab_size": tokenizer.get_vocab_size(true),
    }))
}
