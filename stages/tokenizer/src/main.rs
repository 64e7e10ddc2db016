//! `tokenizer`: text datasets → SAELens-identical token windows.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokenizer::pretokenize::{self, PretokenizeArgs};
use tokenizer::stream::{self, StreamArgs};
use tokenizer::train::{self, TrainArgs};

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
    Pretokenize(PretokenizeArgs),
    /// The `tokens` stream (context_size windows, tokenization in the schema metadata):
    /// served over Flight (--listen), cached as shards (--output DIR), or written to
    /// one Arrow IPC file (--output FILE.arrow). Reads text, or a pretokenized dataset,
    /// which is checked against its sae_lens.json and sliced to context_size as SAELens
    /// does.
    Stream(Box<StreamArgs>),
    /// Train a byte-level BPE tokenizer on a dataset's text; writes an HF tokenizer
    /// directory (tokenizer.json + tokenizer_config.json).
    Train(TrainArgs),
    /// Time tokenize + pack over a dataset (repeated); prints tokens/s as JSON.
    Bench {
        /// A dataset file, directory or glob, or a hub dataset repo id in the local HF cache.
        #[arg(long, value_parser = pipeline::hub::dataset_path)]
        dataset: PathBuf,
        /// A tokenizer.json or a directory holding one, or a hub repo id in the local HF cache.
        #[arg(long, value_parser = pipeline::hub::tokenizer_path)]
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
            pipeline::rendezvous::leave(Ok(&[summary]));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            pipeline::rendezvous::leave(Err(&format!("{e:#}")));
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<serde_json::Value> {
    match command {
        Command::Pretokenize(args) => pretokenize::run(&args),
        Command::Stream(args) => stream::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Bench {
            dataset,
            tokenizer,
            context_size,
            repeats,
            threads,
        } => {
            if let Some(t) = threads {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build_global()?;
            }
            tokenizer::bench::run(&dataset, &tokenizer, context_size, repeats)
        }
    }
}
