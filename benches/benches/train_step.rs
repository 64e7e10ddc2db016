//! One full SAE training step (forward, every loss, backward, clipping, Adam) per
//! architecture at d_in = 512, d_sae = 8192, 4096 tokens, on N(0, 1) inputs; TopK and
//! BatchTopK (k = 32) on both the dense path (full `[B, d_sae]` products, as SAELens)
//! and the sparse path (only the k active latents per token in the decoder and every
//! weight gradient). Criterion reports the throughput in tokens (elements) per second.
//!
//! `cargo bench -p benches --bench train_step` (add `-- topk` to run a subset). The
//! sizes can be changed with SAE_BENCH_D_IN, SAE_BENCH_D_SAE, SAE_BENCH_BATCH.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kernels::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use sae::optim::{clip_grad_norm, Adam};
use sae::{Architecture, Sae, SaeConfig, StepInput, StepPath};
use std::time::Duration;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench(c: &mut Criterion) {
    let (d_in, d_sae, batch) = (
        env("SAE_BENCH_D_IN", 512),
        env("SAE_BENCH_D_SAE", 8192),
        env("SAE_BENCH_BATCH", 4096),
    );
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let x: Vec<f32> = (0..batch * d_in)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let x = Tensor::from_vec(&dev, &[batch, d_in], x).unwrap();
    let mut group = c.benchmark_group(format!(
        "train_step d_in={d_in} d_sae={d_sae} batch={batch}"
    ));
    group.throughput(Throughput::Elements(batch as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(10));
    // The path each step takes: by density (None; random SAEs fire about half their
    // latents, TopK's k of d_sae), or forced.
    let (dense, sparse) = (Some(StepPath::Dense), Some(StepPath::Sparse));
    let cases: Vec<(&str, Architecture, Option<StepPath>)> = vec![
        ("standard", Architecture::Standard, None),
        ("gated", Architecture::Gated, None),
        ("jumprelu", Architecture::JumpRelu, None),
        ("topk/dense", Architecture::TopK, dense),
        ("topk/sparse", Architecture::TopK, sparse),
        ("batchtopk/dense", Architecture::BatchTopK, dense),
        ("batchtopk/sparse", Architecture::BatchTopK, sparse),
        (
            "matryoshka_batchtopk",
            Architecture::MatryoshkaBatchTopK,
            None,
        ),
    ];
    for (name, arch, path) in cases {
        let mut cfg = SaeConfig::new(arch, d_in, d_sae);
        cfg.k = 32.0;
        cfg.use_sparse_activations = path == sparse;
        cfg.matryoshka_widths = vec![d_sae / 8, d_sae / 2, d_sae];
        let mut sae = Sae::new(cfg, &dev, 1).unwrap();
        sae.force_path(path);
        let mut adam = Adam::new(&sae.params, 3e-4, 0.9, 0.999);
        let mut grads = sae.zero_grads();
        group.bench_function(name, |b| {
            b.iter(|| {
                sae.training_forward(&StepInput {
                    sae_in: &x,
                    coefficient: 1.0,
                    dead_neuron_mask: None,
                    noise_seed: 0,
                })
                .unwrap();
                grads.zero();
                sae.backward(&mut grads);
                clip_grad_norm(&mut grads, 1.0);
                adam.update(&mut sae.params, &grads);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
