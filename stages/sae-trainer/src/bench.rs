//! `sae-trainer bench`: times full training steps (forward, losses, backward, clipping,
//! Adam) of the SAE a config describes, on random N(0, 1) activations.

use crate::trainer::Trainer;
use anyhow::{Context, Result};
use kernels::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use sae::{Sae, StepPath};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

pub struct BenchArgs {
    pub config: PathBuf,
    pub steps: usize,
    pub warmup: usize,
    /// Overrides the config's `device`.
    pub device: Option<String>,
    /// How the dense products are done: `f32`, `tf32` or `bf16` (the last two CUDA only).
    pub matmul: String,
    /// `auto`, `dense` or `sparse` (see [`sae::StepPath`]).
    pub path: String,
    /// Encoder bias shifted so that this fraction of pre-activations fires at first.
    pub target_density: Option<f64>,
}

/// The encoder bias (`b_gate` for gated) that makes `density` of `x @ W_enc + b`'s
/// entries fire (exceed JumpReLU's threshold, or 0): the threshold minus the `1 - density` quantile of
/// `x @ W_enc`.
fn shift_b_enc(sae: &mut Sae, x: &Tensor, density: f64) -> Result<()> {
    anyhow::ensure!(
        density > 0.0 && density < 1.0,
        "--target-density must be in (0, 1), got {density}"
    );
    let w = sae.params.get(schemas::tensors::W_ENC);
    let mut h = Tensor::zeros(&x.device(), &[x.rows(), w.cols()]);
    kernels::ops::matmul(&mut h, x, false, w, false, 1.0, 0.0);
    let mut v = h.to_vec();
    let at = ((1.0 - density) * (v.len() - 1) as f64) as usize;
    let (_, q, _) = v.select_nth_unstable_by(at, f32::total_cmp);
    let q = *q;
    let threshold = match sae.params.try_get(schemas::tensors::THRESHOLD) {
        Some(t) => t.to_vec()[0],
        None => sae
            .params
            .try_get(schemas::tensors::LOG_THRESHOLD)
            .map_or(0.0, |t| t.to_vec()[0].exp()),
    };
    // the gated SAE's gate decides which latents fire
    let bias = match sae.params.contains(schemas::tensors::B_GATE) {
        true => schemas::tensors::B_GATE,
        false => schemas::tensors::B_ENC,
    };
    let b = sae.params.get_mut(bias);
    let shifted: Vec<f32> = vec![threshold - q; b.numel()];
    *b = Tensor::from_vec(&x.device(), &[shifted.len()], shifted)?;
    Ok(())
}

/// This machine's f32 GEMM rate in the encoder's shape, `[B, d] @ [d, m]`, GFLOP/s.
fn gemm_rate(device: &Device, b: usize, d: usize, m: usize) -> Result<f64> {
    let x = Tensor::from_vec(device, &[b, d], vec![0.5; b * d])?;
    let w = Tensor::from_vec(device, &[d, m], vec![0.25; d * m])?;
    let mut out = Tensor::zeros(device, &[b, m]);
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        kernels::ops::matmul(&mut out, &x, false, &w, false, 1.0, 0.0);
        kernels::synchronize(device)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (b * d * m) as f64 / best / 1e9)
}

pub fn run(a: &BenchArgs) -> Result<Value> {
    let mut cfg = crate::train::read_config(&a.config)?;
    if let Some(d) = &a.device {
        cfg.device = d.clone();
    }
    let d_in = cfg.d_in.context("the bench needs d_in in the config")?;
    let device = Device::parse(&cfg.device)?;
    crate::train::set_matmul(&device, &a.matmul)?;
    // First, so that its buffers are gone before the steps whose peak memory we report.
    let peak = gemm_rate(
        &device,
        cfg.train_batch_size_tokens,
        d_in,
        cfg.sae_config(d_in)?.d_sae,
    )?;
    let mut sae = Sae::new(cfg.sae_config(d_in)?, &device, cfg.seed)?;
    sae.force_path(match a.path.as_str() {
        "dense" => Some(sae::StepPath::Dense),
        "sparse" => Some(sae::StepPath::Sparse),
        _ => None,
    });
    let (arch, d_sae, use_sparse_activations, k) = (
        sae.cfg().architecture,
        sae.cfg().d_sae,
        sae.cfg().use_sparse_activations,
        sae.cfg().k,
    );
    let batch = cfg.train_batch_size_tokens;
    // a few distinct batches, cycled
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let data: Vec<Tensor> = (0..4)
        .map(|_| {
            let v: Vec<f32> = (0..batch * d_in)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            Tensor::from_vec(&device, &[batch, d_in], v)
        })
        .collect::<Result<_, _>>()?;
    if let Some(density) = a.target_density {
        shift_b_enc(&mut sae, &data[0], density)?;
    }
    let mut trainer = Trainer::new(cfg.clone(), sae);
    let mut densities = Vec::new();
    let mut paths = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..a.warmup {
        trainer.step(&data[i % data.len()])?;
    }
    kernels::synchronize(&device)?;
    let mut times = Vec::with_capacity(a.steps);
    for i in 0..a.steps.max(1) {
        let t = Instant::now();
        let rec = trainer.step(&data[i % data.len()])?;
        // CUDA ops are queued: the step is done when the device is.
        kernels::synchronize(&device)?;
        times.push(t.elapsed().as_secs_f64());
        *paths.entry(rec.path.as_str()).or_default() += 1;
        densities.push(active_fraction(&trainer.sae));
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let density = densities.iter().sum::<f64>() / densities.len() as f64;
    // The FLOPs a step must do per token: the dense encode, decode and their
    // backwards (10 d m); with sparse latents the encode GEMM plus the decode and the
    // three backward products over the L0 active latents (2 d m + 8 L0 d).
    let (d, m) = (d_in as f64, d_sae as f64);
    let l0 = density * m;
    let needed = |sparse: bool| match sparse {
        true => 2.0 * d * m + 8.0 * l0 * d,
        false => 10.0 * d * m,
    };
    let sparse_path = 2 * paths.get("sparse").copied().unwrap_or(0) > times.len();
    let flops_per_token = needed(sparse_path);
    let gflops = flops_per_token * batch as f64 / median / 1e9;
    Ok(json!({
        "architecture": arch.as_str(),
        "d_in": d_in,
        "d_sae": d_sae,
        "batch": batch,
        "use_sparse_activations": use_sparse_activations,
        "k": (arch.as_str().contains("topk")).then_some(k),
        "threads": kernels::num_threads(),
        "steps": times.len(),
        "device": device.to_string(),
        "matmul": a.matmul,
        "paths": paths,
        "density": density,
        "l0": l0,
        "tokens_per_second": batch as f64 / median,
        "gflops_needed_per_second": gflops,
        "tflops": gflops / 1e3,
        "gemm_peak_gflops": peak,
        "fraction_of_gemm_peak": gflops / peak,
        "step_seconds_median": median,
        "peak_rss_mib": pipeline::sys::peak_rss_mib(),
        // What the step holds by the formula (see `Sae::step_memory_formula`).
        "step_memory_formula_mib": trainer.sae.step_memory_formula(
            batch,
            if sparse_path { StepPath::Sparse } else { StepPath::Dense },
            (l0 * batch as f64) as usize,
        ) as f64 / (1 << 20) as f64,
    }))
}

/// Active latents of the last step over `B × d_sae`.
fn active_fraction(sae: &Sae) -> f64 {
    // JumpReLU's sparse pattern also holds the estimator's inactive entries: the row
    // counts count values.
    let acts = sae.last_acts();
    let (rows, cols) = acts.shape();
    let mut per_row = Tensor::zeros(sae.device(), &[rows]);
    acts.row_counts(&mut per_row);
    let (n, total) = (kernels::ops::sum(&per_row) as usize, rows * cols);
    n as f64 / total.max(1) as f64
}
