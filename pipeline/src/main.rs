//! `pipeline`: run a whole SAELens training run or sweep (`run`), and look at, copy,
//! serve and benchmark the pipeline's streams.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Train SAEs with saestream's stages (`pipeline run sweep.yaml`); inspect, copy, serve and benchmark the streams between them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train every SAE of a sweep.yaml (or a SAELens runner_cfg.json) on one activation
    /// stream: checks everything, starts tokenizer → activation-producer ×P → shuffler
    /// → sae-trainer ×N on loopback, then runs SAELens's evals per SAE. Writes the run
    /// directory: sweep.yaml (resolved), plan.json, logs/, saes/<point>/ (SAELens SAE,
    /// runner_cfg.json, metrics.jsonl, evals.json, features.html), summary.json,
    /// report.html.
    Run(cmd::run::Args),
    /// Check a run and write its run directory without starting anything: the stage
    /// list, the run's CA and token, and with --slurm a heterogeneous-job sbatch script
    /// (--k8s: a Kubernetes JobSet).
    Plan(cmd::run::PlanArgs),
    /// Start one stage of a planned run on this host (what the Slurm job's srun and a
    /// by-hand launch run): the role from the arguments, the index from --index or
    /// $SLURM_PROCID; upstreams are found through the run's rendezvous.
    Stage(cmd::run::remote::StageArgs),
    /// Serve a cluster run's rendezvous (the Slurm job starts it on its first host).
    Rendezvous(cmd::run::remote::RendezvousArgs),
    /// Describe a stream: its schema and metadata, batches, rows and position. For a
    /// Flight endpoint (`grpc://HOST:PORT` lists every stream it serves, with each
    /// consumer's position); for a shard directory (every shard's checksum is verified);
    /// for activation files (read through). Prints JSON.
    Inspect(cmd::inspect::Args),
    /// Copy a stream: replay shards or files to a Flight endpoint, capture a Flight
    /// stream as shards, or read it through (`-`).
    ///
    /// FROM is a `grpc://HOST:PORT/STREAM` URL, a shard directory, an activation file or
    /// directory, or `synthetic:KIND?...`; several FROMs are merged round-robin in the
    /// order given. TO is a directory (shards + manifest.json), `grpc://HOST:PORT/NAME`
    /// (serve it there; port 0 picks one; the first stdout line is
    /// {"listening": URL}), or `-` (read every value, print a summary).
    Copy(cmd::copy::Args),
    /// Write a run directory's report, RUN_DIR/report.html: one self-contained page
    /// (opens offline in any browser) with each SAE's training curves, the sweep's
    /// L0/explained-variance and L0/CE-loss-score frontiers, feature density histograms,
    /// SAELens's eval metrics, each point's config and the stages' throughput. `pipeline
    /// run` writes it too, at every log step and at the end.
    Report(cmd::report::Args),
    /// Measure Flight throughput on loopback: activation batches from a server process
    /// to a client process that reads every value, f32 and f16, one stream and two in
    /// parallel, with raw TCP as the ceiling. One JSON line per setting.
    BenchFlight(cmd::bench::Args),
}

fn main() {
    pipeline::sys::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Run(a) => cmd::run::run(a),
        Command::Plan(a) => cmd::run::plan(a),
        Command::Stage(a) => cmd::run::remote::stage(a),
        Command::Rendezvous(a) => cmd::run::remote::rendezvous_cmd(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Copy(a) => cmd::copy::run(a),
        Command::BenchFlight(a) => cmd::bench::run(a),
        Command::Report(a) => cmd::report::run(a),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
