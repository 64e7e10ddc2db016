//! `pipeline report RUN_DIR`: the run report (`report.html`) from the run's files.

use anyhow::Result;
use schemas::run_files::REPORT;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A run directory of `pipeline run` (finished, running or stopped).
    run_dir: PathBuf,
    /// Write the page here instead of RUN_DIR/report.html.
    #[arg(long)]
    output: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let out = a.output.clone().unwrap_or_else(|| a.run_dir.join(REPORT));
    write(&a.run_dir, &out)?;
    println!("{}", serde_json::json!({ "report": out }));
    Ok(())
}

/// Renders the report of `run_dir` and writes it to `out` atomically.
pub fn write(run_dir: &Path, out: &Path) -> Result<()> {
    let html = report::run::render(run_dir)?;
    pipeline::shards::atomic_write(out, html.as_bytes())?;
    Ok(())
}
