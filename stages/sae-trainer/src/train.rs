//! `sae-trainer train`: trains one SAE on activation files, SAELens's way, and writes a
//! run directory: the inference SAE (SAELens format), `sparsity.safetensors`, the
//! metrics (`metrics.jsonl`), the resolved config (`config.yaml`) and checkpoints.

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
pub const METRICS: &str = "metrics.jsonl";
pub const CONFIG: &str = "config.yaml";

pub struct TrainArgs {
    pub config: PathBuf,
    /// A file, `FILE:TENSOR`, or a directory of shards.
    pub activations: String,
    pub output: PathBuf,
    pub resume: Option<PathBuf>,
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

/// Runs a training to the end; returns the summary it prints.
pub fn run(a: &TrainArgs) -> Result<Value> {
    let cfg = read_config(&a.config)?;
    let device = Device::parse(&cfg.device)?;
    if cfg.autocast {
        set_matmul(&device, "bf16").context("autocast: true")?;
    }
    // Everything is checked before the output directory is touched.
    check_output(&a.output, a.overwrite, a.resume.is_some())?;

    let source = pipeline::open(&a.activations, cfg.hook_name.as_deref())?;
    let d_in = source.d_in();
    let mut batches = Batches::new(
        source,
        cfg.train_batch_size_tokens,
        cfg.shuffle,
        cfg.n_batches_in_buffer,
        cfg.seed,
    );

    let (mut trainer, yaml) = match &a.resume {
        Some(ckpt) => {
            let (t, yaml) = Trainer::load_checkpoint(ckpt, &device)?;
            if t.sae.cfg().d_in != d_in {
                bail!(
                    "the checkpoint's SAE has d_in = {}, the activations have {d_in}",
                    t.sae.cfg().d_in
                );
            }
            batches.skip(t.counters.batches_consumed)?;
            (t, yaml)
        }
        None => start(&cfg, &a.activations, d_in, &device, &mut batches)?,
    };
    if a.overwrite && a.resume.is_none() {
        clear_output(&a.output)?;
    }
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("cannot create {}", a.output.display()))?;
    io::atomic_write(&a.output.join(CONFIG), yaml.as_bytes())?;
    let cfg = trainer.cfg.clone();
    let steps = cfg.total_training_steps();
    let batch = cfg.train_batch_size_tokens;
    let ckpt_root = checkpoint_root(&a.output, &cfg);
    let mut metrics = open_metrics(&a.output, trainer.counters.n_training_steps)?;
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&interrupted))?;
    }
    // SAELens: checkpoints after passing each of n evenly spaced token counts.
    let total_tokens = steps * batch as u64;
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

    let bar = ProgressBar::new(total_tokens);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} tokens {per_sec} eta {eta}")
            .expect("template"),
    );
    bar.set_position(trainer.counters.n_training_tokens);
    let started = Instant::now();
    let first_step = trainer.counters.n_training_steps;
    let mut last = None;
    while trainer.counters.n_training_steps < steps {
        let step = trainer.counters.n_training_steps;
        let Some(rows) = batches.next_batch()? else {
            bail!(
                "the activations ran out after {} batches of {batch} tokens; this config needs {} batches{}",
                batches.served,
                steps + n_norm_batches(&cfg, trainer.sae.cfg()),
                last_checkpoint_hint(&ckpt_root)
            );
        };
        trainer.counters.batches_consumed += 1;
        check_finite(&rows, d_in, step, &ckpt_root)?;
        let mut x = Tensor::from_vec(&device, &[batch, d_in], rows)?;
        if let Some(f) = trainer.counters.scaling_factor {
            ops::scale(&mut x, f as f32);
        }
        let rec = trainer.step(&x)?;
        if !rec.out.loss.is_finite() {
            bail!(
                "the loss is {} at step {step}; stopping{}",
                rec.out.loss,
                last_checkpoint_hint(&ckpt_root)
            );
        }
        if let Some(log) = &rec.sparsity_log {
            let mut line = log.clone();
            line.insert("step".into(), json!(step));
            writeln!(metrics, "{}", Value::Object(line))?;
        }
        if (step + 1).is_multiple_of(cfg.log_frequency) || step + 1 == steps {
            writeln!(metrics, "{}", Value::Object(trainer.log_line(&x, &rec)))?;
            metrics.flush()?;
        }
        if thresholds
            .first()
            .is_some_and(|&t| trainer.counters.n_training_tokens > t)
        {
            thresholds.remove(0);
            // every metrics line up to a checkpoint is on disk before the checkpoint
            metrics.flush()?;
            trainer.save_checkpoint(
                &ckpt_root.join(trainer.counters.n_training_tokens.to_string()),
                &yaml,
            )?;
        }
        bar.set_position(trainer.counters.n_training_tokens);
        if step % 100 == 0 {
            bar.set_message(format!("loss {:.4}", rec.out.loss));
        }
        last = Some(rec.out);
        if interrupted.load(Ordering::Relaxed) {
            let dir = ckpt_root.join(trainer.counters.n_training_tokens.to_string());
            metrics.flush()?;
            trainer.save_checkpoint(&dir, &yaml)?;
            bail!(
                "interrupted at step {}; checkpoint saved to {} (resume with --resume)",
                step + 1,
                dir.display()
            );
        }
    }
    bar.finish_and_clear();
    metrics.flush()?;
    let secs = started.elapsed().as_secs_f64();

    // The last density window is logged even if incomplete.
    writeln!(metrics, "{}", {
        let mut line = trainer.sparsity_log();
        line.insert("step".into(), json!(steps));
        Value::Object(line)
    })?;
    if let Some(f) = trainer.counters.scaling_factor {
        trainer.sae.fold_activation_norm_scaling_factor(f);
    }
    for f in [SAE_CFG, SAE_WEIGHTS, SPARSITY] {
        let p = a.output.join(f);
        if p.exists() {
            std::fs::remove_file(&p)?;
        }
    }
    io::save_inference(&trainer.sae, &a.output, false)?;
    io::save_sparsity(&a.output, &trainer.log_feature_sparsity(), false)?;
    let trained = steps - first_step;
    Ok(json!({
        "output": a.output.display().to_string(),
        "run_name": cfg.run_name_for(trainer.sae.cfg().d_sae),
        "architecture": trainer.sae.cfg().architecture.as_str(),
        "d_in": d_in,
        "d_sae": trainer.sae.cfg().d_sae,
        "steps": steps,
        "tokens": trainer.counters.n_training_tokens,
        "final_loss": last.as_ref().map(|o| o.loss),
        "seconds": secs,
        "tokens_per_second": trained as f64 * batch as f64 / secs,
    }))
}

/// A fresh trainer: the SAE (new or `from_pretrained_path`), the norm-scaling
/// estimate and the `b_dec` initialisation. Returns it with the resolved config.
fn start(
    cfg: &TrainConfig,
    activations: &str,
    d_in: usize,
    device: &Device,
    batches: &mut Batches,
) -> Result<(Trainer, String)> {
    let sae = match &cfg.from_pretrained_path {
        Some(p) => {
            let mut sae = io::load(Path::new(p), device)
                .with_context(|| format!("from_pretrained_path {p}"))?;
            if sae.cfg().d_in != d_in {
                bail!(
                    "from_pretrained_path {p} has d_in = {}, the activations have {d_in}",
                    sae.cfg().d_in
                );
            }
            // The SAE keeps its architecture; the run decides its sparsity schedule
            // (as SAELens 5's trainer does with the runner config).
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
    let yaml = resolved.to_yaml();
    let mut t = Trainer::new(resolved, sae);
    let batch = cfg.train_batch_size_tokens;
    if t.sae.cfg().normalize_activations == NormalizeActivations::ExpectedAverageOnlyIn {
        // SAELens estimates the mean norm on batches it then does not train on.
        let (mut sum, mut count) = (0f64, 0usize);
        for _ in 0..cfg.n_batches_for_norm_estimate {
            let Some(rows) = batches.next_batch()? else {
                break;
            };
            t.counters.batches_consumed += 1;
            check_finite(&rows, d_in, 0, Path::new(""))?;
            for r in rows.chunks(d_in) {
                sum += r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            }
            count += rows.len() / d_in;
        }
        if count == 0 {
            bail!("no activations to estimate the norm scaling factor from");
        }
        t.counters.scaling_factor = Some(sae::norm_scaling_factor(d_in, sum / count as f64));
    }
    let method = cfg.b_dec_init()?;
    if cfg.from_pretrained_path.is_none() && method != BDecInitMethod::Zeros {
        // From a separate read of the first buffer, so the training stream is untouched.
        let mut first = Batches::new(
            pipeline::open(activations, cfg.hook_name.as_deref())?,
            batch,
            false,
            1,
            0,
        );
        let mut rows = Vec::new();
        for _ in 0..cfg.n_batches_in_buffer.max(1) {
            match first.next_batch()? {
                Some(b) => rows.extend(b),
                None => break,
            }
        }
        if rows.is_empty() {
            bail!("no activations to initialise b_dec from");
        }
        let n = rows.len() / d_in;
        let mut x = Tensor::from_vec(device, &[n, d_in], rows)?;
        if let Some(f) = t.counters.scaling_factor {
            ops::scale(&mut x, f as f32);
        }
        t.sae.initialize_b_dec(method, &x)?;
    }
    Ok((t, yaml))
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

/// Removes the outputs of an earlier run (and nothing else) from `out`.
fn clear_output(out: &Path) -> Result<()> {
    for f in [SAE_CFG, SAE_WEIGHTS, SPARSITY, METRICS, CONFIG] {
        let p = out.join(f);
        if p.exists() {
            std::fs::remove_file(&p)?;
        }
    }
    let ck = out.join("checkpoints");
    if ck.is_dir() {
        std::fs::remove_dir_all(&ck)?;
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
fn check_finite(rows: &[f32], d: usize, step: u64, ckpt_root: &Path) -> Result<()> {
    let bad = rows.iter().filter(|v| !v.is_finite()).count();
    if bad == 0 {
        return Ok(());
    }
    let i = rows.iter().position(|v| !v.is_finite()).unwrap();
    bail!(
        "the batch for step {step} has {bad} non-finite activation(s) (NaN or infinity), the first at row {} column {}; stopping{}",
        i / d,
        i % d,
        if ckpt_root.as_os_str().is_empty() { String::new() } else { last_checkpoint_hint(ckpt_root) }
    )
}
