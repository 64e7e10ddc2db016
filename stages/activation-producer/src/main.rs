//! `activation-producer`: the language-model stage. `run` streams activations,
//! `dump` writes TransformerLens hook
//! activations of an HF checkpoint, `eval` runs SAELens's evals of an SAE spliced into
//! the model, `bench` times the forward pass.

use activation_producer::{bench, dump, eval, SeqposSlice};
use anyhow::Result;
use clap::{Parser, Subcommand};
use schemas::Dtype;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "activation-producer",
    version,
    about = "Hook activations of HF transformer checkpoints, named as TransformerLens names them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream activations: tokens in, one `activations` record batch per LM batch out
    /// (one column per hook, plus seq, pos, token_id), served over Flight (--listen)
    /// and/or cached as shards (--output). A JSON summary goes to stdout at the end.
    Run {
        #[command(flatten)]
        args: Box<activation_producer::run::RunArgs>,
        /// CPU threads (default: all cores; half of them when streaming, see README).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Run the model over a token file and write the activations of some hooks.
    ///
    /// One tensor per hook, named by the hook: `[n_seq * positions, d]` for
    /// per-position hooks (q/k/v/z heads flattened into d, or one head's d_head with
    /// --hook-head-index); attention scores/patterns `[n_seq, n_heads, pos, pos]`.
    /// A JSON summary goes to stdout.
    Dump {
        /// HF checkpoint directory (config.json + model.safetensors or shards), or a hub
        /// repo id (`org/name`, `@revision` optional) in the local HF cache.
        #[arg(long, value_parser = pipeline::hub::model_dir)]
        model: PathBuf,
        /// Token ids `[n_seq, context_size]`: .npy, .safetensors (`input_ids`), or a
        /// Parquet / Arrow file with an `input_ids` column.
        #[arg(long)]
        tokens: PathBuf,
        /// Comma-separated TransformerLens hook names (e.g. blocks.6.hook_resid_pre).
        #[arg(long, value_delimiter = ',', required = true)]
        hooks: Vec<String>,
        /// Run only blocks 0..N (default: the fewest that reach every hook).
        #[arg(long)]
        stop_at_layer: Option<usize>,
        /// Keep one attention head of q/k/v/z hooks.
        #[arg(long)]
        hook_head_index: Option<usize>,
        /// Positions to keep, as a Python slice START:STOP[:STEP] (SAELens's seqpos_slice).
        #[arg(long, allow_hyphen_values = true)]
        seqpos_slice: Option<String>,
        /// Output safetensors file.
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        overwrite: bool,
        /// Sequences per forward pass.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Storage dtype: float32, float16 or bfloat16.
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// SAELens's evals of an SAE spliced into the model, printed as JSON.
    ///
    /// CE loss and KL with the SAE and with the hook zero-ablated, reconstruction,
    /// shrinkage and sparsity metrics; special tokens excluded as SAELens does.
    Eval {
        /// HF checkpoint directory, or a hub repo id in the local HF cache.
        #[arg(long, value_parser = pipeline::hub::model_dir)]
        model: PathBuf,
        /// SAE directory in SAELens's format, or a pretrained SAE as RELEASE:SAE_ID (SAELens's
        /// registry, files from the local HF cache); its metadata.hook_name is the hook.
        #[arg(long)]
        sae: PathBuf,
        #[arg(long)]
        tokens: PathBuf,
        /// Hook to splice at (default: the SAE's metadata.hook_name).
        #[arg(long)]
        hook: Option<String>,
        /// Head to splice at (default: the SAE's metadata.hook_head_index).
        #[arg(long)]
        hook_head_index: Option<usize>,
        #[arg(long, default_value_t = 8)]
        batch_size_prompts: usize,
        #[arg(long, default_value_t = 10)]
        n_eval_reconstruction_batches: usize,
        #[arg(long, default_value_t = 1)]
        n_eval_sparsity_variance_batches: usize,
        /// Token ids to exclude, comma-separated, instead of the model's special tokens
        /// (an empty value excludes none).
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        ignore_tokens: Option<Vec<u32>>,
        /// Also write everything, per-latent metrics included, to this JSON file.
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long)]
        overwrite: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// The feature browser of SAEs: streams tokens once through the model and every
    /// --sae, keeps each latent's top activating contexts (a window around each
    /// sequence's maximum, the activation at every token), its density and activation
    /// histogram, and the tokens its decoder direction promotes and suppresses through
    /// the unembedding (W_dec @ W_U). Writes one HTML page per SAE (a sortable latent
    /// index and a section per latent; opens offline) and the same data as JSON beside it.
    Features {
        #[command(flatten)]
        args: Box<activation_producer::features::FeaturesArgs>,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Check hooks, head index and seqpos slice against a checkpoint's config (no
    /// weights loaded) and print each hook's width as JSON (what `pipeline run` asks
    /// before it starts anything).
    Check(activation_producer::check::CheckArgs),
    /// Forward throughput to --stop-at-layer on a random GPT-2-shaped checkpoint
    /// written by the bench (GPT-2 small by default); prints one JSON line.
    Bench {
        #[command(flatten)]
        args: bench::BenchArgs,
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
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let summary = match cli.command {
        Command::Run { args, threads } => {
            let streaming = pipeline::flight::is_url(&args.tokens) || args.serve.listen.is_some();
            set_threads(Some(pipeline::cli::stage_threads(threads, streaming)?))?;
            pipeline::sys::tune_allocator();
            activation_producer::run::run(&args)?
        }
        Command::Dump {
            model,
            tokens,
            hooks,
            stop_at_layer,
            hook_head_index,
            seqpos_slice,
            output,
            overwrite,
            batch_size,
            dtype,
            device,
            threads,
        } => {
            set_threads(threads)?;
            let dtype = Dtype::parse(&dtype).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
            if dtype == Dtype::F64 {
                anyhow::bail!("--dtype: float64 is not an activation storage type (float32, float16, bfloat16)");
            }
            dump::run(&dump::DumpArgs {
                model,
                tokens,
                hooks,
                stop_at_layer,
                hook_head_index,
                seqpos_slice: seqpos_slice
                    .as_deref()
                    .map(SeqposSlice::parse)
                    .transpose()?,
                output,
                overwrite,
                batch_size,
                dtype,
                device,
            })?
        }
        Command::Eval {
            model,
            sae,
            tokens,
            hook,
            hook_head_index,
            batch_size_prompts,
            n_eval_reconstruction_batches,
            n_eval_sparsity_variance_batches,
            ignore_tokens,
            output,
            overwrite,
            device,
            threads,
        } => {
            set_threads(threads)?;
            eval::run(&eval::EvalArgs {
                model,
                sae,
                tokens,
                hook,
                hook_head_index,
                batch_size_prompts,
                n_eval_reconstruction_batches,
                n_eval_sparsity_variance_batches,
                ignore_tokens,
                output,
                overwrite,
                device,
            })?
        }
        Command::Features { args, threads } => {
            set_threads(threads)?;
            activation_producer::features::run(&args)?
        }
        Command::Check(args) => activation_producer::check::run(&args)?,
        Command::Bench { args, threads } => {
            set_threads(threads)?;
            bench::run(&args)?
        }
    };
    println!("{}", serde_json::to_string(&summary)?);
    pipeline::rendezvous::leave(Ok(&[summary]));
    Ok(())
}

fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        kernels::set_num_threads(t).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}
