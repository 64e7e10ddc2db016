//! `pipeline run sweep.yaml`: a whole SAELens training run, or a sweep of them, from one
//! command. Checks everything before starting anything (each stage binary checks its
//! own part), starts tokenizer → activation-producer ×P → shuffler → sae-trainer ×N on
//! loopback, supervises them (one failing stops the rest), then runs SAELens's evals
//! per SAE and writes `summary.json`.

mod cluster;
mod launch;
mod procs;
mod progress;
pub mod remote;

use anyhow::{anyhow, bail, Context, Result};
use launch::{Net, Role, StageSpec};
use procs::{find_bin, stop_all, Stage, GRACE};
use schemas::sweep::{ExcludeSpecialTokens, SpecialToken, Sweep};
use schemas::{NormalizeActivations, TrainConfig};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// The run file: a sweep.yaml (SAELens's LanguageModelSAERunnerConfig fields plus
    /// `sweep:`, `saes:`, `pipeline:`), or a SAELens `runner_cfg.json`. Relative paths
    /// in it are relative to its directory.
    #[arg(required_unless_present = "resume")]
    file: Option<PathBuf>,
    /// Continue the run in RUN_DIR from the last checkpoint every process holds (the
    /// trainers' planned checkpoints and the shuffler's snapshots at the same batch).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["file", "output", "overwrite"])]
    resume: Option<PathBuf>,
    /// The run directory (default: runs/<the file's name>).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Replace an existing run directory.
    #[arg(long)]
    overwrite: bool,
    /// Only check the run and print its plan; start nothing, write nothing.
    #[arg(long)]
    check: bool,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 10.0)]
    progress_every: f64,
    /// Where the stages run: `local` (processes of this one, on loopback), `slurm` (a
    /// heterogeneous job, submitted with sbatch and followed), or `manual` (each host
    /// runs the `pipeline stage` command printed; this process is the rendezvous).
    /// Cluster runs need the run directory on a file system every host shares.
    #[arg(long, value_enum, default_value_t = Launcher::Local)]
    launcher: Launcher,
    /// `--launcher manual`: the host name or address the other hosts reach this one at
    /// (default: this host's name).
    #[arg(long)]
    advertise: Option<String>,
    #[arg(skip)]
    plan: Option<PlanKind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Launcher {
    Local,
    Slurm,
    Manual,
}

/// `pipeline plan`: which job file to write besides the run directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanKind {
    pub slurm: bool,
    pub k8s: bool,
}

/// `pipeline plan FILE`: check the run, write its run directory (resolved sweep.yaml,
/// plan.json, stages.json, the run's CA and token under tls/), and with --slurm or
/// --k8s the job file to start its stages on a cluster. Starts nothing.
#[derive(clap::Args)]
pub struct PlanArgs {
    file: PathBuf,
    /// The run directory (default: runs/<the file's name>).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Replace an existing run directory.
    #[arg(long)]
    overwrite: bool,
    /// Write job.sbatch: a Slurm heterogeneous job, one component per role.
    #[arg(long)]
    slurm: bool,
    /// Write jobset.yaml: a Kubernetes JobSet, one replicated job per role.
    #[arg(long)]
    k8s: bool,
}

pub fn plan(p: PlanArgs) -> Result<()> {
    run(Args {
        file: Some(p.file),
        resume: None,
        output: p.output,
        overwrite: p.overwrite,
        check: false,
        progress_every: 10.0,
        launcher: Launcher::Manual,
        advertise: None,
        plan: Some(PlanKind {
            slurm: p.slurm,
            k8s: p.k8s,
        }),
    })
}

/// Shuffler buffer cap when `pipeline.max_buffer_bytes` is not set (the shuffler's).
const DEFAULT_MAX_BUFFER: usize = 4 << 30;
/// Sequences per `tokens` batch.
const TOKEN_BATCH: usize = 64;
/// Bytes of batches a serving stage holds when `pipeline.window_bytes` is not set: a
/// few batches of run-ahead; more only costs memory.
const DEFAULT_WINDOW: &str = "32MiB";

struct Bins {
    tokenizer: PathBuf,
    producer: PathBuf,
    shuffler: PathBuf,
    trainer: PathBuf,
}

impl Bins {
    fn path(&self, r: Role) -> &Path {
        match r {
            Role::Tokenizer => &self.tokenizer,
            Role::Producer => &self.producer,
            Role::Shuffler => &self.shuffler,
            Role::Trainer => &self.trainer,
        }
    }
}

/// Everything decided before a process starts.
struct Plan {
    model: PathBuf,
    dataset: Option<PathBuf>,
    /// Activation caches to replay, in merge order (use_cached_activations).
    replay: Vec<PathBuf>,
    hooks: Vec<(String, usize)>,
    /// Batches the shuffler serves: the most any SAE reads.
    batches: u64,
    /// LM batches each producer runs.
    lm_batches_per_producer: u64,
    buffer_bytes: usize,
    max_buffer_bytes: usize,
    memory_bytes: u64,
    /// Points per trainer process.
    trainers: Vec<Vec<usize>>,
}

pub fn run(a: Args) -> Result<()> {
    let started = Instant::now();
    let (file, run_dir) = match (&a.resume, &a.file) {
        (Some(rd), _) => (rd.join(RESOLVED), rd.clone()),
        (None, Some(f)) => {
            let run_dir = a.output.clone().unwrap_or_else(|| {
                let stem = f
                    .file_stem()
                    .map_or("run".into(), |s| s.to_string_lossy().to_string());
                PathBuf::from("runs").join(stem)
            });
            (f.clone(), run_dir)
        }
        (None, None) => bail!("give the run file, or --resume RUN_DIR"),
    };
    // Absolute, so that stages on other hosts (and resolved files) name the same place.
    let run_dir = std::path::absolute(&run_dir)
        .with_context(|| format!("cannot resolve {}", run_dir.display()))?;
    if a.resume.is_some() && !file.is_file() {
        bail!(
            "--resume {}: not a run directory of `pipeline run` (no {RESOLVED})",
            run_dir.display()
        );
    }
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let is_json = file.extension().is_some_and(|e| e == "json");
    let mut sweep = if is_json {
        Sweep::from_json(&text)
    } else {
        Sweep::from_yaml(&text)
    }
    .map_err(|e| anyhow!("{}: {e}", file.display()))?;
    for n in &sweep.notices {
        eprintln!("notice: {n}");
    }
    absolutize(&mut sweep, file.parent().unwrap_or(Path::new("")))?;
    if a.resume.is_none() && run_dir.exists() && !a.overwrite && !a.check {
        bail!(
            "the run directory {} already exists; pass --overwrite to replace it, or --output another",
            run_dir.display()
        );
    }
    let bins = Bins {
        tokenizer: find_bin("tokenizer")?,
        producer: find_bin("activation-producer")?,
        shuffler: find_bin("shuffler")?,
        trainer: find_bin("sae-trainer")?,
    };
    let plan = check_all(&sweep, &bins)?;
    let mut plan_json = plan_json(&sweep, &plan);
    if a.check {
        println!("{}", serde_json::to_string_pretty(&plan_json)?);
        return Ok(());
    }
    let mut earlier: Option<Earlier> = None;
    let start = if a.resume.is_some() {
        resume_point(&sweep, &run_dir)?
    } else {
        if run_dir.exists() {
            earlier = Some(Earlier::move_aside(&run_dir)?);
        }
        for d in ["logs", "saes", "configs"] {
            std::fs::create_dir_all(run_dir.join(d))
                .with_context(|| format!("cannot create {}", run_dir.join(d).display()))?;
        }
        write_atomic(
            &run_dir.join(RESOLVED),
            serde_norway::to_string(&sweep.resolved())?.as_bytes(),
        )?;
        Start::fresh(sweep.points.len())
    };
    if start.position > 0 {
        eprintln!(
            "resuming at batch {} of the training stream ({} SAEs already done)",
            start.position,
            start.done.iter().filter(|d| **d).count()
        );
    }
    write_atomic(
        &run_dir.join("plan.json"),
        serde_json::to_string_pretty(&plan_json)?.as_bytes(),
    )?;
    let cancel = pipeline::cli::interrupt_flag()?;
    let mut stages = Vec::new();
    let ctx = Ctx {
        sweep: &sweep,
        plan: &plan,
        start: &start,
        bins: &bins,
        run_dir: &run_dir,
        cancel: &cancel,
        every: a.progress_every,
    };
    if let Some(kind) = a.plan {
        return write_plan(&ctx, kind);
    }
    let res = if start.done.iter().all(|d| *d) {
        Ok(Vec::new())
    } else if a.launcher == Launcher::Local {
        train(&ctx, &mut stages).map(|_| {
            stages
                .iter()
                .filter(|s| s.name.starts_with("trainer"))
                .flat_map(|s| s.summaries())
                .collect()
        })
    } else {
        train_remote(&ctx, a.launcher, a.advertise.clone())
    };
    plan_json["stages"] = stages_json(&stages);
    write_atomic(
        &run_dir.join("plan.json"),
        serde_json::to_string_pretty(&plan_json)?.as_bytes(),
    )?;
    let trained = match res {
        Ok(t) => t,
        Err(e) => {
            if cancel.load(Ordering::SeqCst) {
                eprintln!("interrupted: every stage stopped (trainers write a checkpoint on SIGTERM); logs in {}", run_dir.join("logs").display());
                std::process::exit(130);
            }
            return Err(e);
        }
    };
    let trained: BTreeMap<String, Value> = trained
        .into_iter()
        .filter_map(|v| {
            let out = PathBuf::from(v["output"].as_str()?);
            Some((out.file_name()?.to_string_lossy().to_string(), v))
        })
        .collect();
    // (None when every SAE was already trained: a resume with nothing left to do)
    let train_seconds = (!start.done.iter().all(|d| *d)).then(|| started.elapsed().as_secs_f64());
    let t_eval = Instant::now();
    let evals = run_evals(&sweep, &plan, &bins, &run_dir, &cancel)?;
    let eval_seconds = t_eval.elapsed().as_secs_f64();
    let t_features = Instant::now();
    run_features(&sweep, &plan, &bins, &run_dir, &cancel)?;
    let features_seconds = t_features.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for (i, p) in sweep.points.iter().enumerate() {
        let dir = run_dir.join("saes").join(&p.name);
        let d_in = plan
            .hooks
            .iter()
            .find(|(h, _)| Some(h) == p.train.hook_name.as_ref())
            .map(|(_, d)| *d)
            .expect("planned");
        let rc = sweep.runner_cfg_json(p, d_in)?;
        write_atomic(
            &dir.join("runner_cfg.json"),
            serde_json::to_string_pretty(&rc)?.as_bytes(),
        )?;
        let t = trained.get(&p.name).cloned().unwrap_or(Value::Null);
        let last = last_metrics(&dir);
        let e = evals.get(i).cloned().unwrap_or(Value::Null);
        rows.push(json!({
            "point": p.name,
            "hook_name": p.train.hook_name,
            "architecture": p.train.architecture,
            "d_sae": t["d_sae"],
            "steps": t["steps"],
            "final_loss": t["final_loss"],
            "mse_loss": last["losses/mse_loss"],
            "l0": last["metrics/l0"],
            "explained_variance": last["metrics/explained_variance"],
            "dead_features": last["sparsity/dead_features"],
            "dead_fraction": last["sparsity/dead_features"].as_f64().zip(t["d_sae"].as_f64()).map(|(d, n)| d / n),
            "ce_loss_score": e["metrics"]["model_performance_preservation"]["ce_loss_score"],
            "kl_div_score": e["metrics"]["model_behavior_preservation"]["kl_div_score"],
            "eval_explained_variance": e["metrics"]["reconstruction_quality"]["explained_variance"],
            "eval_mse": e["metrics"]["reconstruction_quality"]["mse"],
            "eval_l0": e["metrics"]["sparsity"]["l0"],
            "eval_l1": e["metrics"]["sparsity"]["l1"],
            "tokens_per_second": t["tokens_per_second"],
            "train_seconds": t["seconds"],
        }));
    }
    let summary = json!({
        "run_dir": run_dir,
        "wall_seconds": train_seconds.unwrap_or(0.0) + eval_seconds,
        "train_wall_seconds": train_seconds,
        "eval_wall_seconds": eval_seconds,
        "features_wall_seconds": features_seconds,
        // the sum over processes of each one's peak (they run at the same time)
        // (null where the stages ran on other hosts)
        "peak_rss_mib": (!stages.is_empty())
            .then(|| stages.iter().map(|s| s.peak_rss_kb).sum::<u64>() as f64 / 1024.0),
        "stages": stages_json(&stages),
        "points": rows,
    });
    write_atomic(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    print_table(&summary);
    let report = run_dir.join(schemas::run_files::REPORT);
    super::report::write(&run_dir, &report)?;
    println!("report: {}", report.display());
    if let Some(e) = earlier.as_mut() {
        e.remove()?;
    }
    Ok(())
}

/// An earlier run that `--overwrite` replaces: moved aside (a rename) before the new
/// run starts in its place, removed once the new run has finished. If the new run
/// stops, the earlier one is kept and the message says where; the new run stays where
/// it ran, resumable with `--resume`.
struct Earlier {
    run_dir: PathBuf,
    aside: PathBuf,
    removed: bool,
}

impl Earlier {
    fn move_aside(run_dir: &Path) -> Result<Earlier> {
        let mut name = run_dir.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".replaced-{}", std::process::id()));
        let aside = run_dir.with_file_name(name);
        std::fs::rename(run_dir, &aside).with_context(|| {
            format!(
                "cannot move the earlier run {} aside to {} (--overwrite)",
                run_dir.display(),
                aside.display()
            )
        })?;
        Ok(Earlier {
            run_dir: run_dir.to_path_buf(),
            aside,
            removed: false,
        })
    }

    fn remove(&mut self) -> Result<()> {
        std::fs::remove_dir_all(&self.aside)
            .with_context(|| format!("cannot remove {}", self.aside.display()))?;
        self.removed = true;
        Ok(())
    }
}

impl Drop for Earlier {
    fn drop(&mut self) {
        if !self.removed {
            eprintln!(
                "note: the earlier run in {} is kept, moved to {}; this run stays in {} (continue it with --resume {})",
                self.run_dir.display(),
                self.aside.display(),
                self.run_dir.display(),
                self.run_dir.display()
            );
        }
    }
}

/// Rewrites the run's report while it trains: whenever a `metrics.jsonl` grew (a log
/// step was written), at most once a second, and once more when training ends.
struct Refresh {
    sizes: Vec<u64>,
    checked: Option<Instant>,
}

impl Refresh {
    fn new() -> Refresh {
        Refresh {
            sizes: Vec::new(),
            checked: None,
        }
    }

    fn tick(&mut self, sweep: &Sweep, run_dir: &Path) {
        if self
            .checked
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.flush(sweep, run_dir);
    }

    /// Rewrites the report now if a `metrics.jsonl` grew since the last look (training
    /// may end within the second the ticks wait: a short run had no page until its end).
    fn flush(&mut self, sweep: &Sweep, run_dir: &Path) {
        self.checked = Some(Instant::now());
        let sizes: Vec<u64> = sweep
            .points
            .iter()
            .map(|p| {
                let f = run_dir
                    .join(schemas::run_files::SAES)
                    .join(&p.name)
                    .join(schemas::run_files::METRICS);
                std::fs::metadata(f).map_or(0, |m| m.len())
            })
            .collect();
        if sizes != self.sizes {
            self.sizes = sizes;
            let out = run_dir.join(schemas::run_files::REPORT);
            // the run goes on without a live page; the final write reports any error
            if let Err(e) = super::report::write(run_dir, &out) {
                tracing::warn!("report not refreshed: {e:#}");
            }
        }
    }
}

/// The resolved run file in a run directory (what `--resume` reads).
const RESOLVED: &str = "sweep.yaml";
/// Where the shuffler keeps its snapshots, one directory per batch position.
const SNAPSHOTS: &str = "snapshots";

/// The run file's paths made absolute (relative ones are relative to its directory), so
/// that the resolved file in the run directory names the same files.
fn absolutize(sweep: &mut Sweep, base: &Path) -> Result<()> {
    let abs = |p: &str| -> Result<String> {
        Ok(std::path::absolute(base.join(p))
            .with_context(|| format!("cannot resolve {p}"))?
            .display()
            .to_string())
    };
    // SAELens's `model_name: gpt2` / `dataset_path: org/name`: a hub repo id (when no
    // such path exists), read from the local HF cache.
    type Resolve = fn(&str) -> std::result::Result<std::path::PathBuf, String>;
    let local_or_hub = |field: &str, v: &str, hub: Resolve| -> Result<String> {
        if base.join(v).exists() || !pipeline::hub::is_repo_id(pipeline::hub::split_revision(v).0) {
            return abs(v);
        }
        Ok(hub(v)
            .map_err(|e| anyhow!("{field}: {e}"))?
            .display()
            .to_string())
    };
    for p in &mut sweep.points {
        if let Some(m) = &p.train.model_name {
            p.train.model_name = Some(local_or_hub("model_name", m, pipeline::hub::model_dir)?);
        }
        if let Some(d) = &p.train.dataset_path {
            p.train.dataset_path = Some(local_or_hub(
                "dataset_path",
                d,
                pipeline::hub::dataset_path,
            )?);
        }
    }
    if let Some(c) = &sweep.runner.cached_activations_path {
        sweep.runner.cached_activations_path = Some(abs(c)?);
    }
    Ok(())
}

fn stages_json(stages: &[Stage]) -> Value {
    json!(stages
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "pid": s.child.id(),
                "stream": s.url,
                "log": s.log,
                "peak_rss_mib": s.peak_rss_kb as f64 / 1024.0,
            })
        })
        .collect::<Vec<_>>())
}

/// Where the training stream starts and what each SAE starts from.
struct Start {
    /// The shuffler's output position (0: from the beginning).
    position: u64,
    /// The snapshot's merged upstream position.
    upstream_position: u64,
    /// Per point: the checkpoint to resume from.
    checkpoint: Vec<Option<PathBuf>>,
    /// Per point: already trained (its SAE is written).
    done: Vec<bool>,
}

impl Start {
    fn fresh(n: usize) -> Start {
        Start {
            position: 0,
            upstream_position: 0,
            checkpoint: vec![None; n],
            done: vec![false; n],
        }
    }
}

/// The last batch position at which the shuffler holds a snapshot and every unfinished
/// SAE a checkpoint (from the beginning if there is none).
fn resume_point(sweep: &Sweep, run_dir: &Path) -> Result<Start> {
    let mut start = Start::fresh(sweep.points.len());
    let mut ckpts: Vec<BTreeMap<u64, PathBuf>> = Vec::new();
    for (i, p) in sweep.points.iter().enumerate() {
        let dir = run_dir.join("saes").join(&p.name);
        start.done[i] = dir.join(schemas::files::SAE_WEIGHTS).is_file();
        let mut m = BTreeMap::new();
        let root = dir.join(&p.train.checkpoint_path);
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let state = e.path().join(schemas::files::TRAINER_STATE_JSON);
            let Ok(text) = std::fs::read_to_string(&state) else {
                continue;
            };
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", state.display()))?;
            if let Some(b) = v["counters"]["batches_consumed"].as_u64() {
                m.insert(b, e.path());
            }
        }
        ckpts.push(m);
    }
    let mut snaps: Vec<u64> = std::fs::read_dir(run_dir.join(SNAPSHOTS))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.path()
                .join(schemas::streams::SNAPSHOT_STATE_FILE)
                .is_file()
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    snaps.sort();
    let common = snaps
        .into_iter()
        .rev()
        .find(|&s| (0..sweep.points.len()).all(|i| start.done[i] || ckpts[i].contains_key(&s)));
    if let Some(s) = common {
        start.position = s;
        start.upstream_position =
            pipeline::mixer::read_snapshot_state(&run_dir.join(SNAPSHOTS).join(s.to_string()))?
                .upstream_position;
        for ((ck, done), c) in start.checkpoint.iter_mut().zip(&start.done).zip(&ckpts) {
            if !done {
                *ck = c.get(&s).cloned();
            }
        }
    } else if start.done.iter().any(|d| !d) {
        eprintln!("no checkpoint common to every unfinished SAE and the shuffler: those SAEs start again from the beginning");
    }
    Ok(start)
}

/// The stream positions at which this SAE's trainer checkpoints (SAELens's
/// `n_checkpoints`, evenly spaced in tokens): the shuffler snapshots at the same batches.
fn checkpoint_positions(t: &TrainConfig) -> Vec<u64> {
    if t.n_checkpoints == 0 {
        return Vec::new();
    }
    let b = t.train_batch_size_tokens as u64;
    let total = t.total_training_steps() * b;
    let every = total.div_ceil(t.n_checkpoints + 1).max(1);
    let norm = norm_batches(t);
    (1..)
        .map(|i| i * every)
        .take_while(|&x| x < total)
        // the checkpoint follows the first step whose token count passes x
        .map(|x| norm + x / b + 1)
        .collect()
}

/// Every check, before anything starts: each SAE's config, the model and hooks (by the
/// producer binary, config only), d_in against the hook, the dataset (by the tokenizer
/// binary), the buffer cap, the machine's memory.
fn check_all(sweep: &Sweep, bins: &Bins) -> Result<Plan> {
    let st = sweep.stream();
    let r = &sweep.runner;
    let model = PathBuf::from(st.model_name.as_deref().expect("validated"));
    if !model.join("config.json").is_file() {
        bail!(
            "model_name: {} is not an HF checkpoint directory (no config.json; a model is a local directory or a hub repo id in the local HF cache)",
            model.display()
        );
    }
    let slice = sweep.seqpos_slice()?;
    let ctx = st.context_size as usize;
    let hook_names = sweep.hooks();
    let mut args = vec![
        "check".to_string(),
        "--model".into(),
        s(&model),
        "--hooks".into(),
        hook_names.join(","),
        "--context-size".into(),
        ctx.to_string(),
        "--seqpos-slice".into(),
        slice.to_arg(),
    ];
    if let Some(h) = st.hook_head_index {
        args.extend(["--hook-head-index".into(), h.to_string()]);
    }
    let mc = procs::run_to_end(&bins.producer, &args, "hook_name")?;
    let hooks: Vec<(String, usize)> = mc["hooks"]
        .as_array()
        .ok_or_else(|| anyhow!("the model check printed no hooks"))?
        .iter()
        .map(|h| {
            (
                h["hook"].as_str().unwrap_or_default().to_string(),
                h["d"].as_u64().unwrap_or(0) as usize,
            )
        })
        .collect();
    let positions = mc["positions"].as_u64().unwrap_or(ctx as u64) as usize;
    let width = |h: &str| {
        hooks
            .iter()
            .find(|(n, _)| n == h)
            .map(|(_, d)| *d)
            .expect("checked")
    };
    let mut sae_bytes = 0u64;
    for p in &sweep.points {
        let d_in = width(p.train.hook_name.as_deref().expect("validated"));
        let c = p
            .train
            .sae_config(d_in)
            .map_err(|e| anyhow!("{e} (SAE '{}', hook width {d_in})", p.name))?;
        // Weights, gradients and Adam's two moments, f32.
        sae_bytes += 4 * 4 * (2 * c.d_in * c.d_sae + c.d_in + c.d_sae) as u64
            + 4 * (st.train_batch_size_tokens * (c.d_sae + 2 * c.d_in)) as u64;
    }
    let (dataset, replay) = if r.use_cached_activations {
        let c = PathBuf::from(r.cached_activations_path.as_deref().expect("validated"));
        (None, replay_sources(&c)?)
    } else {
        let d = PathBuf::from(st.dataset_path.as_deref().expect("validated"));
        let mut targs = tokenizer_args(sweep, &d, &model);
        targs.push("--check".into());
        procs::run_to_end(&bins.tokenizer, &targs, "dataset_path")?;
        (Some(d), Vec::new())
    };
    let batches = sweep.points.iter().map(batches_read).max().unwrap_or(0);
    let t = st.train_batch_size_tokens;
    let rows_per_lm_batch = (r.store_batch_size_prompts * positions) as u64;
    let mut lm_batches = (batches * t as u64).div_ceil(rows_per_lm_batch);
    if r.exclude_special_tokens != ExcludeSpecialTokens::Flag(false) {
        // Excluded tokens leave fewer rows per LM batch: run half again as many (the
        // shuffler stops at its count; the producers' surplus is drained unused).
        lm_batches += lm_batches / 2 + 1;
    }
    let p = sweep.pipeline.producers as u64;
    let row_bytes: usize = hooks.iter().map(|(_, d)| 4 * d).sum::<usize>() + 16;
    let buffer_bytes = st.n_batches_in_buffer * t * row_bytes;
    let max_buffer_bytes = match &sweep.pipeline.max_buffer_bytes {
        Some(b) => {
            crate::cmd::parse_bytes(b).map_err(|e| anyhow!("pipeline.max_buffer_bytes: {e}"))?
        }
        None => DEFAULT_MAX_BUFFER,
    };
    for (name, v) in [
        ("pipeline.window_bytes", &sweep.pipeline.window_bytes),
        ("pipeline.shard_bytes", &sweep.pipeline.shard_bytes),
    ] {
        if let Some(v) = v {
            crate::cmd::parse_bytes(v).map_err(|e| anyhow!("{name}: {e}"))?;
        }
    }
    if buffer_bytes > max_buffer_bytes {
        bail!(
            "n_batches_in_buffer: {} batches of {t} tokens × {row_bytes} bytes = {buffer_bytes} bytes, over the buffer cap of {max_buffer_bytes} bytes (pipeline.max_buffer_bytes)",
            st.n_batches_in_buffer
        );
    }
    let weights = mc["weights_bytes"].as_u64().unwrap_or(0);
    // Per producer: the weights and a few LM batches of activations; the shuffler's
    // buffer; the trainers' SAEs; the Flight windows between stages.
    let memory_bytes = p * (weights + 8 * rows_per_lm_batch * row_bytes as u64)
        + 2 * buffer_bytes as u64
        + sae_bytes
        + (3 + p) * 64 * 1024 * 1024;
    let total = memory_total()?;
    if memory_bytes > total {
        bail!(
            "the run needs about {:.1} GiB ({p} producers × {:.1} GiB of weights, a {:.1} GiB buffer, {:.1} GiB of SAEs and optimizer state), more than this machine's {:.1} GiB",
            gib(memory_bytes),
            gib(weights),
            gib(buffer_bytes as u64),
            gib(sae_bytes),
            gib(total)
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let k = sweep
        .pipeline
        .trainers
        .unwrap_or(sweep.points.len().min(cores).max(1));
    let mut trainers = vec![Vec::new(); k];
    for i in 0..sweep.points.len() {
        trainers[i % k].push(i);
    }
    Ok(Plan {
        model,
        dataset,
        replay,
        hooks,
        batches,
        lm_batches_per_producer: lm_batches.div_ceil(p),
        buffer_bytes,
        max_buffer_bytes,
        memory_bytes,
        trainers,
    })
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn memory_total() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow!("no MemTotal in /proc/meminfo"))
}

/// Batches a trainer reads for this SAE: the norm estimate's, then one per step.
fn batches_read(p: &schemas::sweep::Point) -> u64 {
    norm_batches(&p.train) + p.train.total_training_steps()
}

/// Batches the norm estimate reads first (`expected_average_only_in`).
fn norm_batches(t: &TrainConfig) -> u64 {
    let norm = NormalizeActivations::parse(&t.normalize_activations)
        .is_ok_and(|n| n == NormalizeActivations::ExpectedAverageOnlyIn);
    if norm {
        t.n_batches_for_norm_estimate as u64
    } else {
        0
    }
}

/// The caches to replay: a shard directory or SAELens cache, or a run's `cache/` of
/// `producer-I` shard directories (merged in that order, as the producers were).
fn replay_sources(c: &Path) -> Result<Vec<PathBuf>> {
    if !c.is_dir() {
        bail!(
            "cached_activations_path: {} is not a directory",
            c.display()
        );
    }
    let mut parts: Vec<(usize, PathBuf)> = std::fs::read_dir(c)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            let i = n.strip_prefix("producer-")?.parse().ok()?;
            Some((i, e.path()))
        })
        .collect();
    parts.sort();
    if parts.is_empty() {
        return Ok(vec![c.to_path_buf()]);
    }
    Ok(parts.into_iter().map(|(_, p)| p).collect())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn tokenizer_args(sweep: &Sweep, dataset: &Path, model: &Path) -> Vec<String> {
    let st = sweep.stream();
    let r = &sweep.runner;
    let mut v = vec![
        "stream".to_string(),
        "--dataset".into(),
        s(dataset),
        "--tokenizer".into(),
        s(model),
        "--context-size".into(),
        st.context_size.to_string(),
        // SAELens's ActivationsStore: BOS first in each batch when prepend_bos, the
        // separator between documents, nothing at each document's start.
        "--begin-batch-token".into(),
        if st.prepend_bos { "bos" } else { "none" }.into(),
        "--begin-sequence-token".into(),
        "none".into(),
        "--sequence-separator-token".into(),
        SpecialToken::to_arg(&r.sequence_separator_token),
    ];
    if r.disable_concat_sequences {
        v.push("--disable-concat-sequences".into());
    }
    v
}

fn threads(v: Option<usize>) -> Vec<String> {
    v.map_or(Vec::new(), |t| vec!["--threads".into(), t.to_string()])
}

/// What the training phase works from.
struct Ctx<'a> {
    sweep: &'a Sweep,
    plan: &'a Plan,
    start: &'a Start,
    bins: &'a Bins,
    run_dir: &'a Path,
    cancel: &'a std::sync::atomic::AtomicBool,
    every: f64,
}

/// `pipeline plan`: the stage list, the run's TLS material and the job files.
fn write_plan(c: &Ctx, kind: PlanKind) -> Result<()> {
    let specs = stage_specs(c)?;
    remote::prepare(c.run_dir, &specs)?;
    let mut wrote = vec![c.run_dir.join(launch::STAGES_FILE)];
    if kind.slurm {
        wrote.push(write_sbatch(c, &specs)?);
    }
    if kind.k8s {
        let f = c.run_dir.join("jobset.yaml");
        write_atomic(&f, cluster::jobset(c.sweep, c.run_dir, &specs).as_bytes())?;
        wrote.push(f);
    }
    for f in wrote {
        println!("{}", f.display());
    }
    Ok(())
}

/// The Slurm job script in a run directory.
const SBATCH_FILE: &str = "job.sbatch";

/// Writes the run's Slurm job script (its nodes run this `pipeline`); returns its path.
fn write_sbatch(c: &Ctx, specs: &[StageSpec]) -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this executable")?;
    let f = c.run_dir.join(SBATCH_FILE);
    write_atomic(
        &f,
        cluster::sbatch(c.sweep, c.run_dir, specs, &me).as_bytes(),
    )?;
    Ok(f)
}

/// Runs the stages on other hosts (by hand or through Slurm) and follows them.
fn train_remote(c: &Ctx, launcher: Launcher, advertise: Option<String>) -> Result<Vec<Value>> {
    let specs = stage_specs(c)?;
    remote::prepare(c.run_dir, &specs)?;
    let _ = std::fs::remove_file(c.run_dir.join(launch::RENDEZVOUS_FILE));
    match launcher {
        Launcher::Manual => {
            let host = advertise.unwrap_or_else(pipeline::rendezvous::hostname);
            let port = c.sweep.pipeline.rendezvous_port.unwrap_or(0);
            let (server, registry, url) =
                remote::serve_rendezvous(c.run_dir, &format!("0.0.0.0:{port}"), &host)?;
            eprintln!("rendezvous at {url}; start each stage on its host:");
            for cmd in remote::manual_commands(c.run_dir, &specs) {
                eprintln!("  {cmd}");
            }
            let res = remote::follow(c, &specs, &|| Some(url.clone()), None);
            if let Err(e) = &res {
                registry.stop(&format!("{e:#}"));
            }
            // Let every stage hear how the run ended before the rendezvous goes.
            let t0 = Instant::now();
            while t0.elapsed() < pipeline::rendezvous::HEARTBEAT * 2
                && registry
                    .listing()
                    .members
                    .iter()
                    .any(|m| m.report.state == "running")
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = server.shutdown();
            res
        }
        Launcher::Slurm => {
            let f = write_sbatch(c, &specs)?;
            let out = std::process::Command::new("sbatch")
                .arg("--parsable")
                .arg(&f)
                .output()
                .context("cannot run sbatch (is this a Slurm login node?)")?;
            if !out.status.success() {
                bail!(
                    "sbatch {} failed: {}",
                    f.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let job = text.trim().split(';').next().unwrap_or("").to_string();
            if job.is_empty() {
                bail!("sbatch printed no job id");
            }
            eprintln!("submitted Slurm job {job} ({})", f.display());
            write_atomic(&c.run_dir.join("slurm_job"), format!("{job}\n").as_bytes())?;
            let run_dir = c.run_dir.to_path_buf();
            let res = remote::follow(c, &specs, &|| remote::rendezvous_url(&run_dir), Some(&job));
            if res.is_err() {
                let _ = std::process::Command::new("scancel").arg(&job).status();
            } else {
                remote::wait_job_end(&job);
            }
            res
        }
        Launcher::Local => unreachable!("local runs start their stages here"),
    }
}

/// Starts the stages and supervises them until the trainers are done.
fn train(c: &Ctx, stages: &mut Vec<Stage>) -> Result<()> {
    let specs = stage_specs(c)?;
    // The rendezvous, on loopback: the stages report to it and find their upstreams
    // through it, as they do on a cluster.
    let (server, registry) = pipeline::rendezvous::serve(&pipeline::flight::ServerConfig {
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    })?;
    let net = Net {
        rendezvous: format!("grpc://{}", server.addr()),
        listen: "127.0.0.1:0".into(),
        tls: None,
    };
    let res = start_and_wait(c, &specs, &net, stages);
    if let Err(e) = &res {
        registry.stop(&format!("{e:#}"));
        stop_all(stages, GRACE);
    }
    let _ = server.shutdown();
    res
}

fn start_and_wait(c: &Ctx, specs: &[StageSpec], net: &Net, stages: &mut Vec<Stage>) -> Result<()> {
    let logs = c.run_dir.join("logs");
    for spec in specs {
        let bin = c.bins.path(spec.role);
        let mut stage = Stage::start(&spec.name, bin, &net.args(spec), &logs)?;
        stage.points = spec.points.clone();
        stages.push(stage);
    }
    let plan_file = c.run_dir.join("plan.json");
    if let Ok(text) = std::fs::read_to_string(&plan_file) {
        if let Ok(mut v) = serde_json::from_str::<Value>(&text) {
            v["stages"] = stages_json(stages);
            write_atomic(&plan_file, serde_json::to_string_pretty(&v)?.as_bytes())?;
        }
    }
    let mut rdv = pipeline::rendezvous::Client::new(
        &net.rendezvous,
        &launch::client_config(net.tls.as_deref())?,
    )?;
    supervise(c.sweep, c.run_dir, stages, &mut rdv, c.cancel, c.every)
}

/// Every stage process of the run, in start order: what to run, with upstreams named by
/// role (`@tokenizer`), to be found through the rendezvous. Writes what they read (the
/// SAE configs) and cuts a cache being continued back to where the run resumes.
fn stage_specs(c: &Ctx) -> Result<Vec<StageSpec>> {
    let mut specs = Vec::new();
    let (sweep, plan, start, run_dir) = (c.sweep, c.plan, c.start, c.run_dir);
    let st = sweep.stream();
    let r = &sweep.runner;
    let th = &sweep.pipeline.threads;
    let n_prod = sweep.pipeline.producers;
    let mut upstreams: Vec<String> = plan.replay.iter().map(|p| s(p)).collect();
    let window_bytes = sweep
        .pipeline
        .window_bytes
        .clone()
        .unwrap_or(DEFAULT_WINDOW.into());
    let window = ["--window-bytes".to_string(), window_bytes.clone()];
    // A reading stage holds no more than a window of its upstream's batches ahead of
    // use either (queue and HTTP/2 window): the bounded run-ahead of DESIGN.md.
    let queue = ["--queue-bytes".to_string(), window_bytes];
    // Threads, unless the run file sets them: the trainers may take every core (the
    // producers often finish first or wait on a full queue), the producers share half.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let producer_threads = th.producer.unwrap_or((cores / (2 * n_prod)).max(1));
    let trainer_threads = th.trainer.unwrap_or((cores / plan.trainers.len()).max(1));
    if let Some(dataset) = &plan.dataset {
        let names: Vec<String> = (0..n_prod).map(|i| format!("p{i}")).collect();
        // Resuming: each producer continues at its share of the snapshot's upstream
        // position, and the tokenizer at the batch holding the first sequence they need.
        let mut first: Vec<u64> = (0..n_prod)
            .map(|i| pipeline::merge::upstream_start(start.upstream_position, i, n_prod))
            .collect();
        // A cache being written continues where its complete shards end: cut back to
        // the resume position, the producer starts there (recomputing up to its share;
        // the shuffler reads from its share on).
        if let Some(c) = &sweep.pipeline.cache {
            for (i, f) in first.iter_mut().enumerate() {
                let dir = run_dir.join(c).join(format!("producer-{i}"));
                if pipeline::shards::is_shard_dir(&dir)? {
                    *f = pipeline::shards::truncate(&dir, *f)?;
                    if *f == 0 {
                        std::fs::remove_dir_all(&dir)
                            .with_context(|| format!("cannot remove {}", dir.display()))?;
                    }
                } else if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("cannot remove {}", dir.display()))?;
                }
            }
        }
        let first_seq = (0..n_prod)
            .map(|i| (first[i] * n_prod as u64 + i as u64) * r.store_batch_size_prompts as u64)
            .min()
            .unwrap_or(0);
        let mut args = tokenizer_args(sweep, dataset, &plan.model);
        // Only the sequences the producers will run: the rest would be tokenized for
        // nothing (the producers read their upstream to its end).
        let token_batches = (plan.lm_batches_per_producer
            * (n_prod * r.store_batch_size_prompts) as u64)
            .div_ceil(TOKEN_BATCH as u64);
        let token_start = first_seq / TOKEN_BATCH as u64;
        args.extend([
            "--position".into(),
            token_start.to_string(),
            "--max-batches".into(),
            token_batches.saturating_sub(token_start).max(1).to_string(),
            "--batch-sequences".into(),
            TOKEN_BATCH.to_string(),
            "--consumers".into(),
            names.join(","),
        ]);
        args.extend(threads(th.tokenizer));
        args.extend(window.iter().cloned());
        specs.push(StageSpec::new("tokenizer", Role::Tokenizer, args));
        let tokens = "@tokenizer".to_string();
        let hooks: Vec<&str> = plan.hooks.iter().map(|(h, _)| h.as_str()).collect();
        for (i, name) in names.iter().enumerate() {
            let mut args = vec![
                "run".to_string(),
                "--tokens".into(),
                tokens.clone(),
                "--consumer".into(),
                name.clone(),
                "--model".into(),
                s(&plan.model),
                "--hooks".into(),
                hooks.join(","),
                "--store-batch-size-prompts".into(),
                r.store_batch_size_prompts.to_string(),
                "--seqpos-slice".into(),
                sweep.seqpos_slice()?.to_arg(),
                "--producer".into(),
                format!("{i}/{n_prod}"),
                "--position".into(),
                first[i].to_string(),
                "--max-batches".into(),
                plan.lm_batches_per_producer
                    .saturating_sub(first[i])
                    .to_string(),
            ];
            if let Some(h) = st.hook_head_index {
                args.extend(["--hook-head-index".into(), h.to_string()]);
            }
            match &r.exclude_special_tokens {
                ExcludeSpecialTokens::Flag(false) => {}
                ExcludeSpecialTokens::Flag(true) => args.push("--exclude-special-tokens".into()),
                ExcludeSpecialTokens::Ids(ids) => args.push(format!(
                    "--exclude-special-tokens={}",
                    ids.iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )),
            }
            if let Some(c) = &sweep.pipeline.cache {
                args.extend([
                    "--output".into(),
                    s(&run_dir.join(c).join(format!("producer-{i}"))),
                ]);
                if let Some(b) = &sweep.pipeline.shard_bytes {
                    args.extend(["--shard-bytes".into(), b.clone()]);
                }
            }
            args.extend(threads(Some(producer_threads)));
            args.extend(window.iter().chain(&queue).cloned());
            let role = format!("producer-{i}");
            upstreams.push(format!("@{role}"));
            specs.push(StageSpec::new(&role, Role::Producer, args));
        }
    }
    // The trainer processes still to run: the points not yet done.
    let trainers: Vec<Vec<usize>> = plan
        .trainers
        .iter()
        .map(|ps| {
            ps.iter()
                .copied()
                .filter(|&i| !start.done[i])
                .collect::<Vec<_>>()
        })
        .filter(|ps| !ps.is_empty())
        .collect();
    let consumers: Vec<String> = (0..trainers.len()).map(|i| format!("t{i}")).collect();
    let mut snapshot_at: Vec<u64> = trainers
        .iter()
        .flatten()
        .flat_map(|&i| checkpoint_positions(&sweep.points[i].train))
        .filter(|&p| p > start.position)
        .collect();
    snapshot_at.sort();
    snapshot_at.dedup();
    let mut args = vec!["run".to_string(), "--upstream".into()];
    args.extend(upstreams);
    args.extend([
        "--train-batch-size-tokens".into(),
        st.train_batch_size_tokens.to_string(),
        "--n-batches-in-buffer".into(),
        st.n_batches_in_buffer.to_string(),
        "--seed".into(),
        st.seed.to_string(),
        "--max-batches".into(),
        plan.batches.to_string(),
        "--max-buffer-bytes".into(),
        plan.max_buffer_bytes.to_string(),
        "--consumers".into(),
        consumers.join(","),
    ]);
    if !st.shuffle {
        args.push("--no-shuffle".into());
    }
    let snapshots = run_dir.join(SNAPSHOTS);
    if !snapshot_at.is_empty() {
        args.extend([
            "--snapshots".into(),
            s(&snapshots),
            format!(
                "--snapshot-at={}",
                snapshot_at
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ]);
    }
    if start.position > 0 {
        args.extend([
            "--resume".into(),
            s(&snapshots.join(start.position.to_string())),
        ]);
    }
    args.extend(threads(th.shuffler));
    args.extend(window.iter().chain(&queue).cloned());
    specs.push(StageSpec::new("shuffler", Role::Shuffler, args));
    let batches = "@shuffler".to_string();
    for (k, points) in trainers.iter().enumerate() {
        let mut args = vec![
            "train".to_string(),
            "--upstream".into(),
            batches.clone(),
            "--consumer".into(),
            consumers[k].clone(),
        ];
        for &i in points {
            let p = &sweep.points[i];
            let cfg = run_dir.join("configs").join(format!("{}.yaml", p.name));
            write_atomic(&cfg, p.train.to_yaml().as_bytes())?;
            args.extend([
                "--config".into(),
                s(&cfg),
                "--output".into(),
                s(&run_dir.join("saes").join(&p.name)),
            ]);
            if let Some(ck) = &start.checkpoint[i] {
                args.extend(["--resume".into(), s(ck)]);
            }
        }
        // Every SAE of a process resumes, or none does: a fresh start in a run
        // directory that may hold a partial run replaces what is there.
        if points.iter().all(|&i| start.checkpoint[i].is_none()) {
            args.push("--overwrite".into());
        }
        args.extend(threads(Some(trainer_threads)));
        args.extend(queue.iter().cloned());
        let mut spec = StageSpec::new(&format!("trainer-{k}"), Role::Trainer, args);
        spec.points = points
            .iter()
            .map(|&i| sweep.points[i].name.clone())
            .collect();
        specs.push(spec);
    }
    Ok(specs)
}

/// Waits for every stage; the first to fail stops the rest. Shows progress.
fn supervise(
    sweep: &Sweep,
    run_dir: &Path,
    stages: &mut [Stage],
    rdv: &mut pipeline::rendezvous::Client,
    cancel: &std::sync::atomic::AtomicBool,
    every: f64,
) -> Result<()> {
    let t0 = Instant::now();
    let mut display = progress::Display::new(sweep);
    let interval = display.interval(every);
    let mut last = Instant::now();
    let mut listed = Instant::now() - Duration::from_secs(1);
    let mut refresh = Refresh::new();
    loop {
        // Where each stage serves, as it told the rendezvous.
        if stages
            .iter()
            .any(|s| s.url.is_none() && !s.name.starts_with("trainer"))
            && listed.elapsed() >= Duration::from_millis(500)
        {
            listed = Instant::now();
            if let Ok(l) = rdv.list() {
                for m in l.members {
                    if let Some(s) = stages.iter_mut().find(|s| s.name == m.report.role) {
                        s.url = s.url.take().or(m.report.url);
                    }
                }
            }
        }
        if cancel.load(Ordering::SeqCst) {
            stop_all(stages, GRACE);
            bail!("interrupted");
        }
        let mut done = true;
        for i in 0..stages.len() {
            done &= stages[i].poll()?;
            if stages[i].failed() {
                let j = cause(stages, rdv).unwrap_or(i);
                let msg = stages[j].failure();
                stop_all(stages, GRACE);
                bail!("{msg}");
            }
        }
        if done {
            // the last sample: what each stage made (progress.json, for the report)
            display.draw(sweep, run_dir, stages, t0.elapsed());
            refresh.flush(sweep, run_dir);
            return Ok(());
        }
        if last.elapsed() >= interval {
            last = Instant::now();
            display.draw(sweep, run_dir, stages, t0.elapsed());
        }
        refresh.tick(sweep, run_dir);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The stage whose failure stopped the run. One killed by a signal (other than the
/// SIGTERM a stage sends itself when told to stop) could tell nobody: it is the cause. Else the first failure the rendezvous heard of (a stage that failed
/// after it, told the run is stopping, is not the cause). Waits briefly for that stage to
/// exit, so that its status and log are complete.
fn cause(stages: &mut [Stage], rdv: &mut pipeline::rendezvous::Client) -> Option<usize> {
    use std::os::unix::process::ExitStatusExt;
    if let Some(k) = stages.iter().position(|s| {
        s.status
            .and_then(|st| st.signal())
            .is_some_and(|g| g != libc::SIGTERM && g != libc::SIGINT)
    }) {
        return Some(k);
    }
    let why = rdv.list().ok()?.stop?;
    let j = stages
        .iter()
        .position(|s| why.starts_with(&format!("stage `{}` ", s.name)))?;
    let t0 = Instant::now();
    while stages[j].running() && t0.elapsed() < Duration::from_secs(5) {
        stages[j].poll().ok()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(j)
}

/// The last training-step line of `DIR/metrics.jsonl` (Null when there is none yet).
fn last_metrics(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .ok()
        .and_then(|t| {
            t.lines().rev().find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(|v| v.get("metrics/explained_variance").is_some())
            })
        })
        .unwrap_or(Value::Null)
}

/// SAELens's `run_evals` for every SAE: `n_eval_batches` batches of
/// `eval_batch_size_prompts` sequences, from the start of the dataset.
fn run_evals(
    sweep: &Sweep,
    plan: &Plan,
    bins: &Bins,
    run_dir: &Path,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<Vec<Value>> {
    let r = &sweep.runner;
    let Some(dataset) = &plan.dataset else {
        eprintln!("notice: no evals: the run replayed cached activations and names no dataset");
        return Ok(Vec::new());
    };
    if r.n_eval_batches == 0 {
        return Ok(Vec::new());
    }
    let e = sweep.eval_batch_size_prompts();
    let tokens = run_dir.join("eval_tokens.arrow");
    first_sequences(sweep, plan, dataset, bins, &tokens, e, r.n_eval_batches)?;
    let mut out = Vec::new();
    for p in &sweep.points {
        if cancel.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let dir = run_dir.join("saes").join(&p.name);
        eprintln!("evals: {}", p.name);
        let args = vec![
            "eval".to_string(),
            "--model".into(),
            s(&plan.model),
            "--sae".into(),
            s(&dir),
            "--tokens".into(),
            s(&tokens),
            "--batch-size-prompts".into(),
            e.to_string(),
            "--n-eval-reconstruction-batches".into(),
            r.n_eval_batches.to_string(),
            "--n-eval-sparsity-variance-batches".into(),
            r.n_eval_batches.to_string(),
            "--output".into(),
            s(&dir.join("evals.json")),
            "--overwrite".into(),
        ];
        let v = procs::run_to_end(&bins.producer, &args, &format!("evals of {}", p.name))?;
        out.push(v);
    }
    Ok(out)
}

/// The dataset's first `batches × batch` sequences, tokenized as the run's stream, to
/// the Arrow file `out` (what the evals and the feature pages read).
fn first_sequences(
    sweep: &Sweep,
    plan: &Plan,
    dataset: &Path,
    bins: &Bins,
    out: &Path,
    batch: usize,
    batches: usize,
) -> Result<()> {
    let mut args = tokenizer_args(sweep, dataset, &plan.model);
    args.extend([
        "--batch-sequences".into(),
        batch.to_string(),
        "--max-batches".into(),
        batches.to_string(),
        "--output".into(),
        s(out),
        "--overwrite".into(),
    ]);
    let what = format!("the tokens of {}", out.display());
    procs::run_to_end(&bins.tokenizer, &args, &what)?;
    Ok(())
}

/// Each SAE's feature browser (`saes/<point>/features.html` + `.json`): one pass of the
/// model over the first `pipeline.features.n_sequences` sequences of the dataset for
/// every SAE.
fn run_features(
    sweep: &Sweep,
    plan: &Plan,
    bins: &Bins,
    run_dir: &Path,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let f = &sweep.pipeline.features;
    if !f.enabled {
        return Ok(());
    }
    let Some(dataset) = &plan.dataset else {
        eprintln!(
            "notice: no feature pages: the run replayed cached activations and names no dataset"
        );
        return Ok(());
    };
    if cancel.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    let tokens = run_dir.join("features_tokens.arrow");
    let batches = f.n_sequences.div_ceil(TOKEN_BATCH);
    first_sequences(sweep, plan, dataset, bins, &tokens, TOKEN_BATCH, batches)?;
    eprintln!(
        "feature pages: {} SAEs on {} sequences",
        sweep.points.len(),
        f.n_sequences
    );
    let mut args = vec![
        "features".to_string(),
        "--model".into(),
        s(&plan.model),
        "--tokens".into(),
        s(&tokens),
        "--max-sequences".into(),
        f.n_sequences.to_string(),
        "--top-k".into(),
        f.top_k.to_string(),
        "--overwrite".into(),
    ];
    for p in &sweep.points {
        let dir = run_dir.join(schemas::run_files::SAES).join(&p.name);
        args.extend([
            "--sae".into(),
            s(&dir),
            "--output".into(),
            s(&dir.join(schemas::run_files::FEATURES_HTML)),
        ]);
    }
    procs::run_to_end(&bins.producer, &args, "feature pages")?;
    Ok(())
}

fn plan_json(sweep: &Sweep, plan: &Plan) -> Value {
    json!({
        "model": plan.model,
        "dataset": plan.dataset,
        "replay": plan.replay,
        "hooks": plan.hooks.iter().map(|(h, d)| json!({"hook": h, "d_in": d})).collect::<Vec<_>>(),
        "shuffler_batches": plan.batches,
        "producers": sweep.pipeline.producers,
        "lm_batches_per_producer": plan.lm_batches_per_producer,
        "buffer_bytes": plan.buffer_bytes,
        "max_buffer_bytes": plan.max_buffer_bytes,
        "memory_estimate_bytes": plan.memory_bytes,
        "points": sweep.points.iter().map(|p| json!({
            "name": p.name,
            "hook_name": p.train.hook_name,
            "steps": p.train.total_training_steps(),
            "overrides": p.overrides,
        })).collect::<Vec<_>>(),
        "trainers": plan.trainers.iter().map(|ps| ps.iter().map(|&i| sweep.points[i].name.clone()).collect::<Vec<_>>()).collect::<Vec<_>>(),
    })
}

/// The points, best first: by CE loss score when evals ran, else explained variance.
fn print_table(summary: &Value) {
    let mut rows: Vec<&Value> = summary["points"]
        .as_array()
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    let by_ce = rows.iter().all(|r| r["ce_loss_score"].is_number());
    let key = |r: &Value| {
        if by_ce {
            r["ce_loss_score"].as_f64()
        } else {
            r["explained_variance"].as_f64()
        }
        .unwrap_or(f64::NEG_INFINITY)
    };
    rows.sort_by(|a, b| key(b).total_cmp(&key(a)));
    println!(
        "best first by {}:",
        if by_ce {
            "CE loss score (evals)"
        } else {
            "explained variance (last training step)"
        }
    );
    println!(
        "{:<34} {:>10} {:>8} {:>8} {:>8} {:>7} {:>10}",
        "point", "mse", "L0", "EV", "CE score", "dead %", "tokens/s"
    );
    let f = |v: &Value, prec: usize| {
        v.as_f64()
            .map_or("-".to_string(), |x| format!("{x:.prec$}"))
    };
    for r in rows {
        println!(
            "{:<34} {:>10} {:>8} {:>8} {:>8} {:>7} {:>10}",
            r["point"].as_str().unwrap_or("?"),
            f(&r["mse_loss"], 4),
            f(&r["l0"], 2),
            f(&r["explained_variance"], 3),
            f(&r["ce_loss_score"], 3),
            r["dead_fraction"]
                .as_f64()
                .map_or("-".into(), |x| format!("{:.1}", 100.0 * x)),
            f(&r["tokens_per_second"], 0),
        );
    }
    println!(
        "summary: {}",
        summary["run_dir"]
            .as_str()
            .map_or(String::new(), |d| format!("{d}/summary.json"))
    );
}

/// Writes through a temporary name, then renames (the runtime's shard-manifest write).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(pipeline::shards::atomic_write(path, bytes)?)
}
