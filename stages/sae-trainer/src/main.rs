//! `sae-trainer`: the SAE stage of the pipeline. For now it has one command, `encode`,
//! which applies a trained SAE (any SAELens directory) to activations in a file.

use clap::{Parser, Subcommand};
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
    /// Apply an SAE to activations: writes `feature_acts` and `sae_out`.
    ///
    /// The input is a safetensors tensor `[..., d_in]` (f32, f16, bf16 or f64; for
    /// `hook_z` SAEs also `[..., n_heads, d_head]`). `feature_acts` is
    /// `[..., d_sae]` and `sae_out` has the input's shape; both are f32. A JSON summary
    /// (tokens, mean L0, MSE, explained variance) goes to stdout.
    Encode {
        /// SAE directory (`cfg.json` + `sae_weights.safetensors`, as SAELens saves).
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
            // The whole chain on one line: what failed, then why.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Encode {
            sae,
            input,
            output,
            overwrite,
            batch_size,
            device,
            threads,
        } => {
            if let Some(t) = threads {
                kernels::set_num_threads(t).map_err(anyhow::Error::msg)?;
            }
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
