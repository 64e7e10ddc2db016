//! `sae-trainer train`: trains SAEs SAELens's way on activations read from files or from
//! an upstream `batches` stream, several SAEs in one process all fed from one read of the
//! stream, and writes a run directory per SAE: the inference SAE (SAELens format),
//! `sparsity.safetensors`, the metrics (`metrics.jsonl`), the resolved config
//! (`config.yaml`) and checkpoints.
//!
//! Every SAE sees the stream the same way, from a file or a stream: the first
//! `n_batches_for_norm_estimate` batches estimate the norm scaling factor (not trained
//! on); `b_dec` is initialised from the next `n_batches_in_buffer` batches, which are
//! then the first trained on. So the stream is read once and training from a file equals
//! training from the same batches served by the shuffler.
use crate::trainer::Trainer;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::{ops, Device, Tensor};
use pipeline::Batches;
use sae::{io, BDecInitMethod, Sae};
use schemas::files::{SAE_CFG, SAE_WEIGHTS, SPARSITY};
use schemas::{NormalizeActivations, TrainConfig};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Files of a run directory.
pub const METRICS: &str = schemas::run_files::METRICS;
pub const CONFIG: &str = "config.yaml";

pub struct TrainArgs {
    /// One config per SAE, with its run directory (and checkpoint to resume from).
    pub configs: Vec<PathBuf>,
    pub outputs: Vec<PathBuf>,
    pub resume: Vec<PathBuf>,
    pub input: Input,
    pub overwrite: bool,
}

/// Reads and checks a training config; errors name the file.
pub fn read_config(path: &Path) -> Result<TrainConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config {}", path.display()))?;
    TrainConfig::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Sets how `device` does its dense products: `f32` (everywhere), `tf32` or `bf16`
/// (CUDA builds and devices only).
pub fn set_matmul(device: &Device, mode: &str) -> Result<()> {
    if !["f32", "tf32", "bf16"].contains(&mode) {
        anyhow::bail!("matmul mode '{mode}': expected f32, tf32 or bf16");
    }
    #[cfg(feature = "cuda")]
    {
        use kernels::cuda::{set_matmul, Matmul};
        let m = match mode {
            "tf32" => Matmul::Tf32,
            "bf16" => Matmul::Bf16,
            _ => Matmul::F32,
        };
        set_matmul(device, m)?;
    }
    #[cfg(not(feature = "cuda"))]
    if mode != "f32" {
        anyhow::bail!("{mode} matrix products need a CUDA device; {device} does them in f32");
    }
    Ok(())
}

/// Where the batches come from.
pub enum Input {
    /// Activation files (mixed here by the config's buffer settings).
    Files(String),
    /// A `batches` stream (a shuffler's, or its shards): one record batch per step.
    Upstream {
        spec: String,
        client: pipeline::flight::ClientConfig,
        consumer: Option<String>,
    },
}

/// Runs every training to the end; returns one summary per SAE.
pub fn run(a: &TrainArgs) -> Result<Vec<Value>> {
    if a.configs.is_empty() {
        bail!("give at least one --config");
    }
    if a.outputs.len() != a.configs.len() {
        bail!(
            "{} --config but {} --output: give one run directory per config",
            a.configs.len(),
            a.outputs.len()
        );
    }
    if !a.resume.is_empty() && a.resume.len() != a.configs.len() {
        bail!(
            "{} --config but {} --resume: resume every run or none",
            a.configs.len(),
            a.resume.len()
        );
    }
    let mut dirs = a.outputs.clone();
    dirs.sort();
    dirs.dedup();
    if dirs.len() != a.outputs.len() {
        bail!("two runs would write the same --output directory");
    }
    let cfgs: Vec<TrainConfig> = a
        .configs
        .iter()
        .map(|p| read_config(p))
        .collect::<Result<_>>()?;
    // Everything is checked before any output directory is touched.
    for (out, _) in a.outputs.iter().zip(&cfgs) {
        check_output(out, a.overwrite, !a.resume.is_empty())?;
    }
    // Where the data starts: the earliest batch a resumed run still needs (0 if any run
    // is fresh). A stream is opened there; a resumed shuffler serves from there.
    let start = if a.resume.is_empty() {
        0
    } else {
        a.resume
            .iter()
            .map(|c| Trainer::checkpoint_batches(c))
            .collect::<Result<Vec<u64>>>()?
            .into_iter()
            .min()
            .unwrap_or(0)
    };
    let feed = Feed::open(&a.input, &cfgs, &a.configs, start)?;
    feed.check_context(&cfgs, &a.configs)?;
    if let Input::Files(spec) = &a.input {
        let hook = cfgs[0].hook_name.as_deref();
        if let Some(rows) = pipeline::stream::count_rows(spec, hook)? {
            for (cfg, path) in cfgs.iter().zip(&a.configs) {
                check_enough_rows(cfg, path, spec, rows)?;
            }
        }
    }
    // --overwrite of an earlier run builds the new one beside it, in OUT.new, and
    // replaces the earlier run's files only once the new run has finished.
    let staged: Vec<Option<PathBuf>> = a
        .outputs
        .iter()
        .map(|out| (a.overwrite && a.resume.is_empty() && has_run(out)).then(|| staging(out)))
        .collect();
    let note: Vec<String> = staged
        .iter()
        .zip(&a.outputs)
        .filter_map(|(s, out)| {
            s.as_ref().map(|s| {
                format!(
                    "the earlier run in {} is untouched; this run's files and checkpoints are in {} (continue it with --resume CHECKPOINT --output {})",
                    out.display(),
                    s.display(),
                    s.display()
                )
            })
        })
        .collect();
    let result = train_all(a, &cfgs, feed, start, &staged);
    match result {
        Err(e) if !note.is_empty() => Err(anyhow::anyhow!("{e:#}\n{}", note.join("\n"))),
        r => r,
    }
}

/// The runs of [`run`], from building their trainers to their summaries.
fn train_all(
    a: &TrainArgs,
    cfgs: &[TrainConfig],
    mut feed: Feed,
    start: u64,
    staged: &[Option<PathBuf>],
) -> Result<Vec<Value>> {
    let mut runs = Vec::new();
    for (i, cfg) in cfgs.iter().enumerate() {
        let d_in = feed.d_in(i);
        let out = a.outputs[i].clone();
        let mut run = Run::new(
            cfg,
            &a.configs[i],
            d_in,
            staged[i].clone().unwrap_or_else(|| out.clone()),
            a.resume.get(i),
            a.overwrite,
        )?;
        run.replaces = staged[i].is_some().then_some(out);
        if run.done {
            run.replace_earlier()?;
        }
        runs.push(run);
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&interrupted))?;
    }
    feed.seek(start)?;
    let total: u64 = runs.iter().map(|r| r.total_tokens()).max().unwrap_or(0);
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} tokens {per_sec} eta {eta}")
            .expect("template"),
    );
    let mut position = start;
    while runs.iter().any(|r| !r.done) {
        let Some(batch) = feed.next(position)? else {
            for r in runs.iter_mut().filter(|r| !r.done) {
                r.end_of_stream()?;
                r.ran_out(position)?;
            }
            break;
        };
        for (i, r) in runs.iter_mut().enumerate() {
            if !r.done && position >= r.consumed() {
                r.origin = feed.origin();
                r.feed(feed.rows(&batch, i)?)?;
            }
        }
        position += 1;
        let r0 = &runs[0];
        bar.set_position(r0.tokens());
        if let Some(l) = r0.last_loss {
            if r0.steps_done().is_multiple_of(100) {
                bar.set_message(format!("loss {l:.4}"));
            }
        }
        if interrupted.load(Ordering::Relaxed) {
            let mut saved = Vec::new();
            for r in runs.iter_mut().filter(|r| !r.done) {
                saved.push(r.interrupt()?);
            }
            bail!("interrupted at {} (resume with --resume)", saved.join("; "));
        }
    }
    bar.finish_and_clear();
    // An upstream is read to its end, so its server knows this consumer is done.
    let extra = feed.drain()?;
    if extra > 0 {
        eprintln!("note: the upstream had {extra} batches more than these runs needed; the shuffler's --max-batches can stop it at {position}");
    }
    runs.into_iter().map(|r| r.summary()).collect()
}

/// The batches of a position, as the runs need them.
enum Feed {
    Files(Box<Batches>),
    Stream {
        src: Box<dyn pipeline::BatchSource>,
        /// Per run: the column index and width.
        cols: Vec<(usize, usize)>,
        batch: usize,
    },
}

/// What one position delivers.
enum Delivered {
    Rows(Vec<f32>),
    Batch(pipeline::RecordBatch),
}

impl Feed {
    fn open(input: &Input, cfgs: &[TrainConfig], paths: &[PathBuf], start: u64) -> Result<Feed> {
        match input {
            Input::Files(spec) => {
                // One mixing buffer feeds every run: what shapes the stream must agree.
                let c0 = &cfgs[0];
                for (c, p) in cfgs.iter().zip(paths).skip(1) {
                    for (field, same) in [
                        ("hook_name", c.hook_name == c0.hook_name),
                        (
                            "train_batch_size_tokens",
                            c.train_batch_size_tokens == c0.train_batch_size_tokens,
                        ),
                        ("shuffle", c.shuffle == c0.shuffle),
                        (
                            "n_batches_in_buffer",
                            c.n_batches_in_buffer == c0.n_batches_in_buffer,
                        ),
                        ("seed", c.seed == c0.seed),
                    ] {
                        if !same {
                            bail!(
                                "{} and {}: '{field}' differs; runs reading --activations share one stream, so they must agree (read a shuffler's stream with --upstream to vary it)",
                                paths[0].display(),
                                p.display()
                            );
                        }
                    }
                }
                let source = pipeline::open(spec, c0.hook_name.as_deref())?;
                Ok(Feed::Files(Box::new(Batches::new(
                    source,
                    c0.train_batch_size_tokens,
                    c0.shuffle,
                    c0.n_batches_in_buffer,
                    c0.seed,
                ))))
            }
            Input::Upstream {
                spec,
                client,
                consumer,
            } => {
                let c0 = &cfgs[0];
                if let Some((c, p)) = cfgs
                    .iter()
                    .zip(paths)
                    .find(|(c, _)| c.train_batch_size_tokens != c0.train_batch_size_tokens)
                {
                    bail!(
                        "{} has train_batch_size_tokens {} and {} has {}: runs on one stream step on the same batches",
                        paths[0].display(),
                        c0.train_batch_size_tokens,
                        p.display(),
                        c.train_batch_size_tokens
                    );
                }
                let mut names: Vec<String> = Vec::new();
                for (c, p) in cfgs.iter().zip(paths) {
                    let Some(h) = &c.hook_name else {
                        bail!(
                            "{}: hook_name is needed to read a stream (it names the column)",
                            p.display()
                        );
                    };
                    if !names.contains(h) {
                        names.push(h.clone());
                    }
                }
                // Only the columns these runs train on cross the wire.
                let opts = pipeline::OpenOptions {
                    position: start,
                    columns: Some(names.clone()),
                    consumer: consumer.clone(),
                    column_hint: None,
                    client: client.clone(),
                };
                let src = pipeline::open_source(spec, &opts)?;
                let schema = src.schema();
                let mut cols = Vec::new();
                for (c, p) in cfgs.iter().zip(paths) {
                    let h = c.hook_name.as_deref().expect("checked");
                    cols.push(
                        pipeline::source::activation_column(spec, &schema, h)
                            .with_context(|| format!("{} (hook_name {h})", p.display()))?,
                    );
                }
                Ok(Feed::Stream {
                    src,
                    cols,
                    batch: c0.train_batch_size_tokens,
                })
            }
        }
    }

    /// A source that knows its sequences' length (a SAELens cache) must agree with each
    /// config's `context_size`, as SAELens checks `cached_activations_path`.
    fn check_context(&self, cfgs: &[TrainConfig], paths: &[PathBuf]) -> Result<()> {
        let (what, ctx) = match self {
            Feed::Files(b) => (b.describe(), b.context_size()),
            Feed::Stream { src, .. } => (
                src.describe(),
                src.schema()
                    .metadata()
                    .get(schemas::streams::meta::CONTEXT_SIZE)
                    .and_then(|c| c.parse::<i64>().ok()),
            ),
        };
        if let Some(ctx) = ctx {
            for (c, p) in cfgs.iter().zip(paths) {
                if c.context_size != ctx {
                    bail!(
                        "{}: context_size is {}, but {what} holds sequences of {ctx} tokens",
                        p.display(),
                        c.context_size
                    );
                }
            }
        }
        Ok(())
    }

    /// Reads a stream to its end; returns the batches left unused.
    fn drain(&mut self) -> Result<u64> {
        let mut n = 0;
        if let Feed::Stream { src, .. } = self {
            while src.next_batch()?.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }

    fn d_in(&self, run: usize) -> usize {
        match self {
            Feed::Files(b) => b.d_in(),
            Feed::Stream { cols, .. } => cols[run].1,
        }
    }

    /// Starts at batch `position`.
    fn seek(&mut self, position: u64) -> Result<()> {
        match self {
            Feed::Files(b) => b.skip(position)?,
            Feed::Stream { src, .. } => {
                while src.position() < position {
                    if src.next_batch()?.is_none() {
                        bail!(
                            "{} ended at batch {} before the resume position {position}",
                            src.describe(),
                            src.position()
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn next(&mut self, position: u64) -> Result<Option<Delivered>> {
        match self {
            Feed::Files(b) => Ok(b.next_batch()?.map(Delivered::Rows)),
            Feed::Stream { src, batch, .. } => {
                let Some(b) = src.next_batch()? else {
                    return Ok(None);
                };
                if b.num_rows() != *batch {
                    bail!(
                        "{}: batch {position} has {} rows; train_batch_size_tokens is {batch} (the shuffler's batches must be the trainer's)",
                        src.describe(),
                        b.num_rows()
                    );
                }
                Ok(Some(Delivered::Batch(b)))
            }
        }
    }

    /// Where the last batch's rows are stored: the file (or directory) and each row's
    /// index there, when the rows come from files.
    fn origin(&self) -> Option<(String, Vec<u64>)> {
        match self {
            Feed::Files(b) => Some((b.describe(), b.last_rows().to_vec())),
            Feed::Stream { .. } => None,
        }
    }

    fn rows(&self, d: &Delivered, run: usize) -> Result<Vec<f32>> {
        match (self, d) {
            (_, Delivered::Rows(r)) => Ok(r.clone()),
            (Feed::Stream { src, cols, .. }, Delivered::Batch(b)) => {
                let (i, w) = cols[run];
                Ok(pipeline::source::batch_rows(&src.describe(), b, i, w)?)
            }
            (Feed::Files(_), Delivered::Batch(_)) => unreachable!("files deliver rows"),
        }
    }
}

/// What a run is doing with the batches it is given.
enum Phase {
    /// Estimating the norm scaling factor: sum of row norms, rows, batches left.
    Norm(f64, usize, usize),
    /// Holding the first buffer's batches to initialise `b_dec` from.
    Peek(Vec<Vec<f32>>),
    Train,
}

/// One SAE being trained.
struct Run {
    out: PathBuf,
    /// Where the batch being fed is stored (files only), for messages.
    origin: Option<(String, Vec<u64>)>,
    /// The run directory whose earlier run this one replaces when it finishes (`out`
    /// is then its staging directory).
    replaces: Option<PathBuf>,
    trainer: Trainer,
    yaml: String,
    phase: Phase,
    device: Device,
    d_in: usize,
    steps: u64,
    ckpt_root: PathBuf,
    metrics: std::io::BufWriter<std::fs::File>,
    thresholds: Vec<u64>,
    first_step: u64,
    started: Instant,
    last_loss: Option<f64>,
    done: bool,
}

impl Run {
    fn new(
        cfg: &TrainConfig,
        path: &Path,
        d_in: usize,
        out: PathBuf,
        resume: Option<&PathBuf>,
        overwrite: bool,
    ) -> Result<Run> {
        let device = Device::parse(&cfg.device)?;
        if cfg.autocast {
            set_matmul(&device, "bf16").context("autocast: true")?;
        }
        if let Some(d) = cfg.d_in {
            if d != d_in {
                bail!(
                    "{}: d_in is {d}, but the activations ({}) have {d_in}",
                    path.display(),
                    cfg.hook_name.as_deref().unwrap_or("the activation column")
                );
            }
        }
        let (trainer, yaml, phase) = match resume {
            Some(ckpt) => {
                let (mut t, _) = Trainer::load_checkpoint(ckpt, &device)?;
                t.cfg = resume_config(cfg, &t.cfg, d_in).map_err(|differ| {
                    anyhow::anyhow!(
                        "{}: the config differs from the checkpoint {} in {}; a resume continues the same run, so only {} may change (use the checkpoint's values, or start a new run)",
                        path.display(),
                        ckpt.display(),
                        differ.join("; "),
                        RESUME_MAY_CHANGE.join(", ")
                    )
                })?;
                let yaml = t.cfg.to_yaml();
                if t.sae.cfg().d_in != d_in {
                    bail!(
                        "the checkpoint's SAE has d_in = {}, the activations have {d_in}",
                        t.sae.cfg().d_in
                    );
                }
                (t, yaml, Phase::Train)
            }
            None => {
                let (t, yaml) = start(cfg, d_in, &device)?;
                let phase = if t.sae.cfg().normalize_activations
                    == NormalizeActivations::ExpectedAverageOnlyIn
                {
                    Phase::Norm(0.0, 0, cfg.n_batches_for_norm_estimate)
                } else {
                    after_norm(&t)?
                };
                (t, yaml, phase)
            }
        };
        if overwrite && resume.is_none() {
            clear_output(&out)?;
        }
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        io::atomic_write(&out.join(CONFIG), yaml.as_bytes())?;
        let cfg = trainer.cfg.clone();
        let steps = cfg.total_training_steps();
        let ckpt_root = checkpoint_root(&out, &cfg);
        let metrics = open_metrics(&out, trainer.counters.n_training_steps)?;
        // SAELens: checkpoints after passing each of n evenly spaced token counts.
        let total_tokens = steps * cfg.train_batch_size_tokens as u64;
        let mut thresholds: Vec<u64> = if cfg.n_checkpoints > 0 {
            let every = total_tokens.div_ceil(cfg.n_checkpoints + 1).max(1);
            (1..)
                .map(|i| i * every)
                .take_while(|&t| t < total_tokens)
                .collect()
        } else {
            Vec::new()
        };
        thresholds.retain(|&t| t >= trainer.counters.n_training_tokens);
        let first_step = trainer.counters.n_training_steps;
        let mut r = Run {
            out,
            origin: None,
            replaces: None,
            trainer,
            yaml,
            phase,
            device,
            d_in,
            steps,
            ckpt_root,
            metrics,
            thresholds,
            first_step,
            started: Instant::now(),
            last_loss: None,
            done: false,
        };
        if r.trainer.counters.n_training_steps >= r.steps {
            r.finish()?;
        }
        Ok(r)
    }

    /// Stream batches this run is done with (norm estimate and trained).
    fn consumed(&self) -> u64 {
        self.trainer.counters.batches_consumed
    }

    fn tokens(&self) -> u64 {
        self.trainer.counters.n_training_tokens
    }

    fn steps_done(&self) -> u64 {
        self.trainer.counters.n_training_steps
    }

    fn total_tokens(&self) -> u64 {
        self.steps * self.trainer.cfg.train_batch_size_tokens as u64
    }

    /// Takes the stream's next batch.
    fn feed(&mut self, rows: Vec<f32>) -> Result<()> {
        match &mut self.phase {
            Phase::Norm(sum, count, left) => {
                check_finite(&rows, self.d_in, 0, Path::new(""), self.origin.as_ref())?;
                for r in rows.chunks(self.d_in) {
                    *sum += r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                }
                *count += rows.len() / self.d_in;
                *left -= 1;
                self.trainer.counters.batches_consumed += 1;
                if *left == 0 {
                    self.end_norm()?;
                }
                Ok(())
            }
            Phase::Peek(held) => {
                held.push(rows);
                if held.len() >= self.trainer.cfg.n_batches_in_buffer.max(1) {
                    self.end_peek()?;
                }
                Ok(())
            }
            Phase::Train => self.step(rows),
        }
    }

    fn end_norm(&mut self) -> Result<()> {
        let Phase::Norm(sum, count, _) = self.phase else {
            return Ok(());
        };
        if count == 0 {
            bail!("no activations to estimate the norm scaling factor from");
        }
        self.trainer.counters.scaling_factor =
            Some(sae::norm_scaling_factor(self.d_in, sum / count as f64));
        self.phase = after_norm(&self.trainer)?;
        Ok(())
    }

    /// The stream has ended: a run still estimating or holding batches uses what it has.
    fn end_of_stream(&mut self) -> Result<()> {
        if matches!(self.phase, Phase::Norm(..)) {
            self.end_norm()?;
        }
        if matches!(self.phase, Phase::Peek(_)) {
            self.end_peek()?;
        }
        Ok(())
    }

    /// Initialises `b_dec` from the batches held, then trains on them.
    fn end_peek(&mut self) -> Result<()> {
        let Phase::Peek(held) = std::mem::replace(&mut self.phase, Phase::Train) else {
            return Ok(());
        };
        let method = self.trainer.cfg.b_dec_init()?;
        // the held batches' own origins are not kept
        self.origin = None;
        {
            let rows: Vec<f32> = held.concat();
            if rows.is_empty() {
                bail!("no activations to initialise b_dec from");
            }
            check_finite(&rows, self.d_in, 0, Path::new(""), None)?;
            let n = rows.len() / self.d_in;
            let mut x = Tensor::from_vec(&self.device, &[n, self.d_in], rows)?;
            if let Some(f) = self.trainer.counters.scaling_factor {
                ops::scale(&mut x, f as f32);
            }
            self.trainer.sae.initialize_b_dec(method, &x)?;
        }
        for rows in held {
            if self.done {
                break;
            }
            self.step(rows)?;
        }
        Ok(())
    }

    fn step(&mut self, rows: Vec<f32>) -> Result<()> {
        let step = self.trainer.counters.n_training_steps;
        let cfg = &self.trainer.cfg;
        let batch = cfg.train_batch_size_tokens;
        let log_frequency = cfg.log_frequency;
        self.trainer.counters.batches_consumed += 1;
        check_finite(
            &rows,
            self.d_in,
            step,
            &self.ckpt_root,
            self.origin.as_ref(),
        )?;
        let mut x = Tensor::from_vec(&self.device, &[batch, self.d_in], rows)?;
        if let Some(f) = self.trainer.counters.scaling_factor {
            ops::scale(&mut x, f as f32);
        }
        let rec = self.trainer.step(&x)?;
        if !rec.out.loss.is_finite() {
            bail!(
                "{}: the loss is {} at step {step}; stopping{}",
                self.out.display(),
                rec.out.loss,
                last_checkpoint_hint(&self.ckpt_root)
            );
        }
        if let Some(log) = &rec.sparsity_log {
            let mut line = log.clone();
            line.insert("step".into(), json!(step));
            writeln!(self.metrics, "{}", Value::Object(line))?;
        }
        if (step + 1).is_multiple_of(log_frequency) || step + 1 == self.steps {
            writeln!(
                self.metrics,
                "{}",
                Value::Object(self.trainer.log_line(&x, &rec))
            )?;
            self.metrics.flush()?;
        }
        if self
            .thresholds
            .first()
            .is_some_and(|&t| self.trainer.counters.n_training_tokens > t)
        {
            self.thresholds.remove(0);
            // every metrics line up to a checkpoint is on disk before the checkpoint
            self.metrics.flush()?;
            self.trainer.save_checkpoint(
                &self
                    .ckpt_root
                    .join(self.trainer.counters.n_training_tokens.to_string()),
                &self.yaml,
            )?;
        }
        self.last_loss = Some(rec.out.loss);
        if self.trainer.counters.n_training_steps >= self.steps {
            self.finish()?;
        }
        Ok(())
    }

    /// The stream ended at `position`: a run still short of its steps is an error.
    fn ran_out(&self, position: u64) -> Result<()> {
        if self.done {
            return Ok(());
        }
        let cfg = &self.trainer.cfg;
        bail!(
            "{}: the activations ran out after {position} batches of {} tokens; this config needs {} batches{}",
            self.out.display(),
            cfg.train_batch_size_tokens,
            self.steps + n_norm_batches(cfg, self.trainer.sae.cfg()),
            last_checkpoint_hint(&self.ckpt_root)
        )
    }

    /// Saves a checkpoint at an interrupt; says where.
    fn interrupt(&mut self) -> Result<String> {
        let dir = self
            .ckpt_root
            .join(self.trainer.counters.n_training_tokens.to_string());
        self.metrics.flush()?;
        self.trainer.save_checkpoint(&dir, &self.yaml)?;
        Ok(format!(
            "step {}; checkpoint saved to {}",
            self.trainer.counters.n_training_steps,
            dir.display()
        ))
    }

    /// Writes the trained SAE and its sparsity.
    fn finish(&mut self) -> Result<()> {
        self.done = true;
        self.metrics.flush()?;
        // The last density window is logged even if incomplete.
        writeln!(self.metrics, "{}", {
            let mut line = self.trainer.sparsity_log();
            line.insert("step".into(), json!(self.steps));
            Value::Object(line)
        })?;
        self.metrics.flush()?;
        if let Some(f) = self.trainer.counters.scaling_factor {
            self.trainer.sae.fold_activation_norm_scaling_factor(f);
        }
        for f in [SAE_CFG, SAE_WEIGHTS, SPARSITY] {
            let p = self.out.join(f);
            if p.exists() {
                std::fs::remove_file(&p)?;
            }
        }
        io::save_inference(&self.trainer.sae, &self.out, false)?;
        io::save_sparsity(&self.out, &self.trainer.log_feature_sparsity(), false)?;
        self.replace_earlier()
    }

    /// A finished run built beside an earlier one takes its place: the earlier run's
    /// files go aside first (renames, so a crash in between loses neither run), then
    /// this run's move in.
    fn replace_earlier(&mut self) -> Result<()> {
        let Some(fin) = self.replaces.take() else {
            return Ok(());
        };
        let aside = fin.join(format!(".replaced-{}", std::process::id()));
        std::fs::create_dir_all(&aside)?;
        for f in RUN_FILES {
            if fin.join(f).exists() {
                std::fs::rename(fin.join(f), aside.join(f))?;
            }
        }
        for f in RUN_FILES {
            if self.out.join(f).exists() {
                std::fs::rename(self.out.join(f), fin.join(f))
                    .with_context(|| format!("cannot move {f} into {}", fin.display()))?;
            }
        }
        std::fs::remove_dir_all(&aside)?;
        std::fs::remove_dir_all(&self.out)?;
        self.out = fin;
        Ok(())
    }

    fn summary(self) -> Result<Value> {
        let secs = self.started.elapsed().as_secs_f64();
        let cfg = &self.trainer.cfg;
        let trained = self.steps - self.first_step;
        Ok(json!({
            "output": self.out.display().to_string(),
            "run_name": cfg.run_name_for(self.trainer.sae.cfg().d_sae),
            "architecture": self.trainer.sae.cfg().architecture.as_str(),
            "d_in": self.d_in,
            "d_sae": self.trainer.sae.cfg().d_sae,
            "steps": self.steps,
            "tokens": self.trainer.counters.n_training_tokens,
            "final_loss": self.last_loss,
            "seconds": secs,
            "tokens_per_second": trained as f64 * cfg.train_batch_size_tokens as f64 / secs,
        }))
    }
}

/// What a fresh run does after the norm estimate: hold the first buffer if `b_dec` is
/// initialised from data, else train.
fn after_norm(t: &Trainer) -> Result<Phase> {
    let method = t.cfg.b_dec_init()?;
    Ok(
        if t.cfg.from_pretrained_path.is_none() && method != BDecInitMethod::Zeros {
            Phase::Peek(Vec::new())
        } else {
            Phase::Train
        },
    )
}

/// A fresh trainer: the SAE (new or `from_pretrained_path`). Returns it with the
/// resolved config.
fn start(cfg: &TrainConfig, d_in: usize, device: &Device) -> Result<(Trainer, String)> {
    let sae = match &cfg.from_pretrained_path {
        Some(p) => {
            let mut sae = sae::pretrained::load(Path::new(p), device)
                .with_context(|| format!("from_pretrained_path {p}"))?;
            if sae.cfg().d_in != d_in {
                bail!(
                    "from_pretrained_path {p} has d_in = {}, the activations have {d_in}",
                    sae.cfg().d_in
                );
            }
            // The SAE keeps its architecture, width and k, as SAELens loads it; what
            // the config said otherwise is printed, and config.yaml records what is
            // used. The run decides its sparsity schedule (as SAELens 5's trainer does
            // with the runner config).
            let differ = pretrained_differences(cfg, sae.cfg(), d_in);
            if !differ.is_empty() {
                eprintln!(
                    "note: from_pretrained_path {p}: the SAE's own settings are used, as SAELens does: {}; config.yaml records them",
                    differ.join("; ")
                );
            }
            let mut c = sae.cfg().clone();
            c.l1_coefficient = cfg.l1_coefficient;
            c.l1_warm_up_steps = cfg.l1_warm_up_steps;
            c.l0_coefficient = cfg.l0_coefficient;
            c.l0_warm_up_steps = cfg.l0_warm_up_steps;
            sae.set_cfg(c)?;
            sae
        }
        None => Sae::new(cfg.sae_config(d_in)?, device, cfg.seed)?,
    };
    let mut resolved = cfg.clone();
    resolved.d_in = Some(d_in);
    resolved.d_sae = Some(sae.cfg().d_sae);
    resolved.expansion_factor = None;
    if cfg.from_pretrained_path.is_some() {
        let sc = sae.cfg();
        resolved.architecture = sc.architecture.as_str().to_string();
        resolved.k = has_k(sc.architecture).then_some(sc.k);
        resolved.activation_fn = None;
    }
    let yaml = resolved.to_yaml();
    Ok((Trainer::new(resolved, sae), yaml))
}

/// What a resume may change: where it runs and how often it logs and checkpoints.
/// Everything else decides the run's numbers or its data.
const RESUME_MAY_CHANGE: [&str; 5] = [
    "device",
    "log_frequency",
    "n_checkpoints",
    "checkpoint_path",
    "run_name",
];

/// The checkpoint's config with the changes a resume may make from `asked`, or each
/// other difference (fields `asked` leaves out are the checkpoint's).
fn resume_config(
    asked: &TrainConfig,
    ckpt: &TrainConfig,
    d_in: usize,
) -> Result<TrainConfig, Vec<String>> {
    let to_map = |c: &TrainConfig| match serde_json::to_value(c) {
        Ok(Value::Object(m)) => m,
        _ => unreachable!("a config serialises to a map"),
    };
    let (asked_map, mut merged) = (to_map(asked), to_map(ckpt));
    let mut differ = Vec::new();
    for (k, want) in &asked_map {
        let have = merged.get(k).cloned().unwrap_or(Value::Null);
        if want.is_null() || *want == have {
            continue;
        }
        if RESUME_MAY_CHANGE.contains(&k.as_str()) {
            merged.insert(k.clone(), want.clone());
            continue;
        }
        // A width asked as expansion_factor is stored resolved, as d_sae.
        let resolved_width = k == "expansion_factor"
            && have.is_null()
            && want.as_u64().map(|e| e as usize * d_in) == ckpt.d_sae;
        if !resolved_width {
            differ.push(format!(
                "{k} ({have} in the checkpoint, {want} in the config)"
            ));
        }
    }
    if !differ.is_empty() {
        return Err(differ);
    }
    serde_json::from_value(Value::Object(merged)).map_err(|e| vec![e.to_string()])
}

/// Refuses, before anything is written, a run that needs more batches than the
/// activations hold (norm estimate, training and finetuning), with both counts.
fn check_enough_rows(cfg: &TrainConfig, path: &Path, spec: &str, rows: u64) -> Result<()> {
    let batch = cfg.train_batch_size_tokens.max(1) as u64;
    let norm = match cfg.normalize_activations.as_str() {
        "expected_average_only_in" => cfg.n_batches_for_norm_estimate as u64,
        _ => 0,
    };
    let (train, tune) = (cfg.training_tokens / batch, cfg.finetuning_tokens / batch);
    let needed = norm + cfg.total_training_steps();
    if rows / batch >= needed {
        return Ok(());
    }
    bail!(
        "{spec} holds {rows} activation rows, {} batches of train_batch_size_tokens {batch}, but {} needs {needed} batches ({} rows): {norm} for the norm estimate, {train} for training_tokens {}{}",
        rows / batch,
        path.display(),
        needed * batch,
        cfg.training_tokens,
        if tune > 0 { format!(", {tune} for finetuning_tokens {}", cfg.finetuning_tokens) } else { String::new() }
    )
}

/// Whether an architecture selects `k` latents.
fn has_k(a: sae::Architecture) -> bool {
    use sae::Architecture::*;
    matches!(a, TopK | BatchTopK | MatryoshkaBatchTopK)
}

/// The settings a `from_pretrained_path` SAE has that the run's config asks otherwise.
fn pretrained_differences(cfg: &TrainConfig, sc: &schemas::SaeConfig, d_in: usize) -> Vec<String> {
    let mut out = Vec::new();
    if cfg.architecture != sc.architecture.as_str() {
        out.push(format!(
            "architecture '{}' (the config says '{}')",
            sc.architecture.as_str(),
            cfg.architecture
        ));
    }
    let asked = cfg.d_sae.or(cfg.expansion_factor.map(|e| e * d_in));
    if let Some(d) = asked.filter(|&d| d != sc.d_sae) {
        out.push(format!("d_sae {} (the config asks {d})", sc.d_sae));
    }
    if let Some(k) = cfg.k.filter(|&k| has_k(sc.architecture) && k != sc.k) {
        out.push(format!("k {} (the config says {k})", sc.k));
    }
    out
}

fn n_norm_batches(cfg: &TrainConfig, sae: &schemas::SaeConfig) -> u64 {
    match sae.normalize_activations {
        NormalizeActivations::ExpectedAverageOnlyIn => cfg.n_batches_for_norm_estimate as u64,
        _ => 0,
    }
}

/// The run directory must be new or empty, unless `--overwrite` (which replaces this
/// tool's outputs in it) or `--resume` (which continues the run in it).
fn check_output(out: &Path, overwrite: bool, resume: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("{} exists and is not a directory", out.display());
    }
    if std::fs::read_dir(out)?.next().is_some() && !overwrite && !resume {
        bail!(
            "{} is not empty; pass --overwrite to replace its run, or --resume CHECKPOINT to continue it",
            out.display()
        );
    }
    Ok(())
}

/// What a run writes in its directory.
const RUN_FILES: [&str; 6] = [
    SAE_CFG,
    SAE_WEIGHTS,
    SPARSITY,
    METRICS,
    CONFIG,
    "checkpoints",
];

/// Whether `out` holds (part of) an earlier run.
fn has_run(out: &Path) -> bool {
    RUN_FILES.iter().any(|f| out.join(f).exists())
}

/// Where `--overwrite` builds a new run beside the earlier one in `out`.
fn staging(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    out.with_file_name(name)
}

/// Removes the outputs of an earlier run (and nothing else) from `out`.
fn clear_output(out: &Path) -> Result<()> {
    for f in RUN_FILES {
        let p = out.join(f);
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else if p.exists() {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

fn checkpoint_root(out: &Path, cfg: &TrainConfig) -> PathBuf {
    let p = Path::new(&cfg.checkpoint_path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        out.join(p)
    }
}

/// `metrics.jsonl`, keeping only the lines of steps before `from_step` (a resumed run
/// rewrites what came after its checkpoint).
fn open_metrics(out: &Path, from_step: u64) -> Result<std::io::BufWriter<std::fs::File>> {
    let path = out.join(METRICS);
    let kept: Vec<String> = if from_step > 0 && path.exists() {
        std::fs::read_to_string(&path)?
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s < from_step)
            })
            .map(str::to_string)
            .collect()
    } else {
        Vec::new()
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for l in kept {
        writeln!(f, "{l}")?;
    }
    Ok(f)
}

fn last_checkpoint_hint(root: &Path) -> String {
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(crate::trainer::TRAINER_STATE_JSON).exists())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .map(|n| (n, e.path()))
        })
        .max_by_key(|(n, _)| *n);
    match newest {
        Some((_, p)) => format!("; the last checkpoint is {}", p.display()),
        None => "; no checkpoint was written".into(),
    }
}

/// A NaN or infinity in a batch stops the run, naming the step and where it is.
fn check_finite(
    rows: &[f32],
    d: usize,
    step: u64,
    ckpt_root: &Path,
    origin: Option<&(String, Vec<u64>)>,
) -> Result<()> {
    let Some(i) = rows.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let bad = rows.iter().filter(|v| !v.is_finite()).count();
    // where it is stored: the source's row (counted from 0 across its files)
    let stored = origin
        .and_then(|(src, at)| at.get(i / d).map(|r| format!(" (row {r} of {src})")))
        .unwrap_or_default();
    bail!(
        "the batch for step {step} has {bad} non-finite activation(s) (NaN or infinity), the first at row {} column {} of the batch{stored}; stopping{}",
        i / d,
        i % d,
        if ckpt_root.as_os_str().is_empty() { String::new() } else { last_checkpoint_hint(ckpt_root) }
    )
}
