//! `sae-trainer bench`: times full training steps (forward, losses, backward, clipping,
//! Adam) of the SAE a config describes, on random N(0, 1) activations.

use crate::trainer::Trainer;
use anyhow::{Context, Result};
use kernels::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use sae::Sae;
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
}

pub fn run(a: &BenchArgs) -> Result<Value> {
    let mut cfg = crate::train::read_config(&a.config)?;
    if let Some(d) = &a.device {
        cfg.device = d.clone();
    }
    let d_in = cfg.d_in.context("the bench needs d_in in the config")?;
    let device = Device::parse(&cfg.device)?;
    crate::train::set_matmul(&device, &a.matmul)?;
    let sae = Sae::new(cfg.sae_config(d_in)?, &device, cfg.seed)?;
    let (arch, d_sae, sparse, k) = (
        sae.cfg().architecture,
        sae.cfg().d_sae,
        sae.cfg().use_sparse_activations,
        sae.cfg().k,
    );
    let batch = cfg.train_batch_size_tokens;
    let mut trainer = Trainer::new(cfg.clone(), sae);
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
    for i in 0..a.warmup {
        trainer.step(&data[i % data.len()])?;
    }
    kernels::synchronize(&device)?;
    let mut times = Vec::with_capacity(a.steps);
    for i in 0..a.steps.max(1) {
        let t = Instant::now();
        trainer.step(&data[i % data.len()])?;
        // CUDA ops are queued: the step is done when the device is.
        kernels::synchronize(&device)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    // The FLOPs a step must do per token (issue 6's yardstick): the dense encode,
    // decode and their backwards (10 d m), or with sparse latents the encode GEMM plus
    // the k-row decode and backwards (2 d m + 8 k d).
    let (d, m) = (d_in as f64, d_sae as f64);
    let flops_per_token = if sparse {
        2.0 * d * m + 8.0 * k * d
    } else {
        10.0 * d * m
    };
    Ok(json!({
        "architecture": arch.as_str(),
        "d_in": d_in,
        "d_sae": d_sae,
        "batch": batch,
        "sparse": sparse,
        "threads": kernels::num_threads(),
        "steps": times.len(),
        "device": device.to_string(),
        "matmul": a.matmul,
        "tokens_per_second": batch as f64 / median,
        "tflops": flops_per_token * batch as f64 / median / 1e12,
        "step_seconds_median": median,
        "peak_rss_mib": pipeline::sys::peak_rss_mib(),
    }))
}
