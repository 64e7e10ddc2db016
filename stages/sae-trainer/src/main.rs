//! `sae-trainer`: the SAE stage of the pipeline. `train` trains an SAE on activation
//! files as SAELens does, `bench` times training steps, `encode` applies a trained SAE
//! (any SAELens directory) to activations in a file.

use clap::{Parser, Subcommand};
use sae_trainer::train::Input;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sae-trainer",
    version,
    about = "Train and apply sparse autoencoders (SAELens-compatible)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an SAE on activations (SAELens's training loop).
    ///
    /// Writes to the output directory: the inference SAE in SAELens's format
    /// (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`), `metrics.jsonl`
    /// (SAELens's metric names), the resolved `config.yaml`, and `checkpoints/` (every
    /// `n_checkpoints`, and on Ctrl-C / SIGTERM). A JSON summary goes to stdout.
    Train {
        /// The training config (YAML, SAELens field names; see examples/). Repeat it to
        /// train several SAEs in this process on one read of the data, each with its
        /// own --output.
        #[arg(long, required = true)]
        config: Vec<PathBuf>,
        /// Activations: a `.safetensors` file (`FILE:TENSOR` to pick one tensor), an
        /// Arrow IPC or Parquet file with a column named by `hook_name`, a directory
        /// of such files, or an activation cache (shards); mixed here as the config's
        /// `shuffle`, `n_batches_in_buffer` and `seed` say.
        #[arg(
            long,
            conflicts_with = "upstream",
            required_unless_present = "upstream"
        )]
        activations: Option<String>,
        /// A `batches` stream (a shuffler's `grpc://HOST:PORT/batches`, or its shards):
        /// each record batch is one step; the config's `hook_name` picks the column.
        #[arg(long)]
        upstream: Option<String>,
        /// The consumer name to read --upstream as (the shuffler's --consumers).
        #[arg(long)]
        consumer: Option<String>,
        /// Run directory (one per --config).
        #[arg(long, default_value = "out/run")]
        output: Vec<PathBuf>,
        /// Continue from a checkpoint directory (bit-identical to an uninterrupted run);
        /// one per --config.
        #[arg(long)]
        resume: Vec<PathBuf>,
        /// Replace the outputs of an earlier run in the output directory.
        #[arg(long)]
        overwrite: bool,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        client: pipeline::cli::ClientArgs,
    },
    /// Time training steps on random N(0, 1) data (`d_in` must be in the config);
    /// prints one JSON line with tokens/s, the median step time and peak memory.
    Bench {
        #[arg(long)]
        config: PathBuf,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Device instead of the config's: cpu, cuda or cuda:N.
        #[arg(long)]
        device: Option<String>,
        /// How the dense products are done: f32, tf32 or bf16 (bf16 inputs, f32
        /// accumulation); the last two on CUDA only.
        #[arg(long, default_value = "f32")]
        matmul: String,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// The decoder/backward path (every architecture has both on the CPU; a
        /// GPU's is dense, or TopK's sparse with `use_sparse_activations`): auto (by
        /// latent density), dense or sparse.
        #[arg(long, default_value = "auto", value_parser = ["auto", "dense", "sparse"])]
        path: String,
        /// Shift the encoder bias so that this fraction of the first batch's
        /// pre-activations is positive, as in a trained L1 SAE (say 0.02); random
        /// initialisations fire about half their latents.
        #[arg(long)]
        target_density: Option<f64>,
    },
    /// Apply an SAE to activations: writes `feature_acts` and `sae_out`.
    ///
    /// The input is a safetensors tensor `[..., d_in]` (f32, f16, bf16 or f64; for
    /// `hook_z` SAEs also `[..., n_heads, d_head]`). `feature_acts` is
    /// `[..., d_sae]` and `sae_out` has the input's shape; both are f32. A JSON summary
    /// (tokens, mean L0, MSE, explained variance) goes to stdout.
    Encode {
        /// SAE directory (`cfg.json` + `sae_weights.safetensors`, as SAELens saves), or a
        /// pretrained SAE as RELEASE:SAE_ID (SAELens's registry, the local HF cache).
        #[arg(long)]
        sae: PathBuf,
        /// Activations: `FILE.safetensors` (a file with one tensor) or
        /// `FILE.safetensors:TENSOR`.
        #[arg(long)]
        input: String,
        /// Output safetensors file.
        #[arg(long)]
        output: PathBuf,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
        /// Rows per chunk (bounds the working memory).
        #[arg(long, default_value_t = 4096)]
        batch_size: usize,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            pipeline::rendezvous::leave(Err(&format!("{e:#}")));
            // The whole chain on one line: what failed, then why.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train {
            config,
            activations,
            upstream,
            consumer,
            output,
            resume,
            overwrite,
            threads,
            client,
        } => {
            let streaming = upstream.as_deref().is_some_and(pipeline::flight::is_url);
            set_threads(Some(pipeline::cli::stage_threads(threads, streaming)?))?;
            pipeline::sys::tune_allocator();
            let input = match (activations, upstream) {
                (Some(a), _) => Input::Files(a),
                (None, Some(u)) => Input::Upstream {
                    spec: u,
                    client: client.config()?,
                    consumer,
                },
                (None, None) => anyhow::bail!("give --activations or --upstream"),
            };
            let summaries = sae_trainer::train::run(&sae_trainer::train::TrainArgs {
                configs: config,
                outputs: output,
                resume,
                input,
                overwrite,
            })?;
            for s in &summaries {
                println!("{}", serde_json::to_string(s)?);
            }
            pipeline::rendezvous::leave(Ok(&summaries));
        }
        Command::Bench {
            config,
            steps,
            warmup,
            device,
            matmul,
            threads,
            path,
            target_density,
        } => {
            set_threads(threads)?;
            // As `train` runs its steps (measured: without it a 768 x 24576 step spent
            // about 9 % of its time faulting in pages of re-allocated buffers).
            pipeline::sys::tune_allocator();
            let summary = sae_trainer::bench::run(&sae_trainer::bench::BenchArgs {
                config,
                steps,
                warmup,
                device,
                matmul,
                path,
                target_density,
            })?;
            println!("{}", serde_json::to_string(&summary)?);
        }
        Command::Encode {
            sae,
            input,
            output,
            overwrite,
            batch_size,
            device,
            threads,
        } => {
            set_threads(threads)?;
            let summary = sae_trainer::encode::run(&sae_trainer::encode::EncodeArgs {
                sae_dir: sae,
                input,
                output,
                overwrite,
                batch_size,
                device,
            })?;
            println!("{}", serde_json::to_string(&summary)?);
        }
    }
    Ok(())
}

fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(t) = threads {
        kernels::set_num_threads(t).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}
