//! `tokenizer`: text datasets → SAELens-identical token windows.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokenizer::pretokenize::{self, PretokenizeArgs};

#[derive(Parser)]
#[command(
    name = "tokenizer",
    version,
    about = "Tokenize and pack text datasets as SAELens does"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize a dataset and pack it into context_size windows (SAELens's
    /// PretokenizeRunner): writes a Parquet dataset with an `input_ids` column and
    /// `sae_lens.json`, loadable by HF datasets and SAELens. Prints a JSON summary.
    Pretokenize {
        /// A .jsonl/.json, .parquet, .arrow or .txt file, an HF save_to_disk
        /// directory, or a directory of such files.
        #[arg(long)]
        dataset: PathBuf,
        /// A tokenizer.json, or a directory holding one (and tokenizer_config.json).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, default_value_t = 128)]
        context_size: usize,
        /// The text column (default `text`).
        #[arg(long)]
        column_name: Option<String>,
        /// bos, eos, sep, a token id, or none.
        #[arg(long, default_value = "bos")]
        begin_batch_token: String,
        #[arg(long, default_value = "none")]
        begin_sequence_token: String,
        #[arg(long, default_value = "bos")]
        sequence_separator_token: String,
        #[arg(long)]
        disable_concat_sequences: bool,
        /// Shuffle the packed rows (seeded); off by default, unlike SAELens.
        #[arg(long)]
        shuffle: bool,
        #[arg(long)]
        seed: Option<u64>,
        /// Documents packed together before the window restarts (SAELens's map batch).
        #[arg(long, default_value_t = 1000)]
        pretokenize_batch_size: usize,
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        overwrite: bool,
    },
    /// Time tokenize + pack over a dataset (repeated); prints tokens/s as JSON.
    Bench {
        #[arg(long)]
        dataset: PathBuf,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, default_value_t = 128)]
        context_size: usize,
        /// Passes over the dataset; the median is reported.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().command) {
        Ok(summary) => {
            println!("{summary}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<serde_json::Value> {
    let Command::Pretokenize {
        dataset,
        tokenizer,
        context_size,
        column_name,
        begin_batch_token,
        begin_sequence_token,
        sequence_separator_token,
        disable_concat_sequences,
        shuffle,
        seed,
        pretokenize_batch_size,
        output,
        overwrite,
    } = command
    else {
        let Command::Bench {
            dataset,
            tokenizer,
            context_size,
            repeats,
            threads,
        } = command
        else {
            unreachable!()
        };
        if let Some(t) = threads {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build_global()?;
        }
        return tokenizer::bench::run(&dataset, &tokenizer, context_size, repeats);
    };
    pretokenize::run(&PretokenizeArgs {
        dataset,
        tokenizer,
        context_size,
        column_name,
        begin_batch_token,
        begin_sequence_token,
        sequence_separator_token,
        disable_concat_sequences,
        shuffle,
        seed,
        pretokenize_batch_size,
        output,
        overwrite,
    })
}
