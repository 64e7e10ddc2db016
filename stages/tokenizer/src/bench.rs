//! `tokenizer bench`: tokenize + pack throughput (SAELens's default token options), in
//! memory and end to end through the window stream (reading the file, SAELens's
//! default `num_proc` 4 shards and map batches of 1000).

use crate::pack::{pack_documents, PackOptions};
use crate::sources::{read_documents, Documents};
use crate::tokenize::TextTokenizer;
use crate::windows::{Grouping, TokensArgs};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

pub fn run(dataset: &Path, tokenizer: &Path, context_size: usize, repeats: usize) -> Result<Value> {
    let tok = TextTokenizer::load(tokenizer)?;
    let Documents::Text(texts) = read_documents(dataset, Some("text"))? else {
        bail!("{}: already tokenized", dataset.display());
    };
    let opts = PackOptions {
        context_size,
        begin_batch_token: tok.special_token("bos")?,
        begin_sequence_token: None,
        sequence_separator_token: tok.special_token("bos")?,
        disable_concat_sequences: false,
    };
    let (mut memory, mut stream) = (Vec::new(), Vec::new());
    let (mut n_tokens, mut n_windows) = (0, 0);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let ids = tok.encode_all(&texts)?;
        let windows = pack_documents(ids.iter().map(|d| d.as_slice()), opts, 1000);
        memory.push(t.elapsed().as_secs_f64());
        n_tokens = ids.iter().map(|d| d.len()).sum::<usize>();
        n_windows = windows.len();

        let t = Instant::now();
        let mut args = TokensArgs::new(dataset, tokenizer, context_size);
        args.column_name = Some("text".into());
        let mut w = args.open(Grouping {
            batch_size: 1000,
            num_proc: 4,
        })?;
        for chunk in w.by_ref() {
            chunk?;
        }
        stream.push(t.elapsed().as_secs_f64());
    }
    let (memory, stream) = (median(memory), median(stream));
    Ok(json!({
        "documents": texts.len(),
        "characters": texts.iter().map(|t| t.len()).sum::<usize>(),
        "document_tokens": n_tokens,
        "windows": n_windows,
        "threads": rayon::current_num_threads(),
        "seconds_median": memory,
        "tokens_per_second": n_tokens as f64 / memory,
        "stream_seconds_median": stream,
        "stream_tokens_per_second": n_tokens as f64 / stream,
    }))
}
