//! Full training steps of every architecture on CUDA against the same steps on the CPU
//! (feature `cuda`): forward, every loss term, backward, clipping, Adam and the
//! dead-latent bookkeeping, through the trainer the `train` command runs.
//!
//! Without a device the test prints that it was skipped and passes; on the device
//! machine `SAESTREAM_REQUIRE_CUDA=1` makes a missing device a failure.
#![cfg(feature = "cuda")]

use kernels::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use sae::Sae;
use sae_trainer::trainer::Trainer;
use schemas::train_cfg::TrainConfig;

fn gpu() -> Option<Device> {
    match Device::parse("cuda:0") {
        Ok(d) => Some(d),
        Err(e) if std::env::var("SAESTREAM_REQUIRE_CUDA").is_ok_and(|v| v == "1") => {
            panic!("SAESTREAM_REQUIRE_CUDA=1 but {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

const D_IN: usize = 64;
const BATCH: usize = 192;
const STEPS: usize = 4;
const LR: f64 = 1e-3;

/// Every architecture, and the variants that take other code paths (sparse latents,
/// AuxK on dead latents, JumpReLU's tanh and L0 modes, decoder-norm scaling).
const CONFIGS: &[&str] = &[
    "architecture: standard\nl1_coefficient: 5.0",
    "architecture: standard\nl1_coefficient: 5.0\nlp_norm: 2.0\nscale_sparsity_penalty_by_decoder_norm: true",
    "architecture: gated\nl1_coefficient: 2.0",
    "architecture: jumprelu\nl0_coefficient: 0.5\njumprelu_init_threshold: 0.01",
    "architecture: jumprelu\nl0_coefficient: 0.5\njumprelu_sparsity_loss_mode: tanh\npre_act_loss_coefficient: 0.1\njumprelu_init_threshold: 0.01",
    "architecture: topk\nk: 8",
    "architecture: topk\nk: 8\nuse_sparse_activations: true",
    "architecture: topk\nk: 8\nuse_sparse_activations: true\nrescale_acts_by_decoder_norm: true",
    "architecture: batchtopk\nk: 8",
    "architecture: matryoshka_batchtopk\nk: 8\nmatryoshka_widths: [32, 96, 256]",
];

fn config(arch: &str) -> TrainConfig {
    // A window of 1 step: latents that did not fire in the last step count as dead,
    // so the dead-latent losses (AuxK, pre-activation) run from the second step on.
    let yaml = format!(
        "{arch}\nd_in: {D_IN}\nd_sae: 256\ntrain_batch_size_tokens: {BATCH}\n\
         training_tokens: {}\nlr: {LR}\ndead_feature_window: 1\nfeature_sampling_window: 2\n\
         normalize_activations: none\nseed: 7\n",
        BATCH * STEPS
    );
    TrainConfig::from_yaml(&yaml).unwrap_or_else(|e| panic!("{arch}: {e}"))
}

fn batches(d: &Device) -> Vec<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    (0..STEPS)
        .map(|_| {
            let v: Vec<f32> = (0..BATCH * D_IN)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            Tensor::from_vec(d, &[BATCH, D_IN], v).unwrap()
        })
        .collect()
}

fn trainer(cfg: &TrainConfig, d: &Device) -> Trainer {
    let sae = Sae::new(cfg.sae_config(D_IN).unwrap(), d, cfg.seed).unwrap();
    Trainer::new(cfg.clone(), sae)
}

#[test]
fn cuda_training_steps_of_every_architecture_match_cpu() {
    let Some(g) = gpu() else { return };
    for arch in CONFIGS {
        let what = arch.replace('\n', ", ");
        let cfg = config(arch);
        let (mut cpu, mut cuda) = (trainer(&cfg, &Device::Cpu), trainer(&cfg, &g));
        for (step, (xc, xg)) in batches(&Device::Cpu).iter().zip(batches(&g)).enumerate() {
            let (a, b) = (cpu.step(xc).unwrap(), cuda.step(&xg).unwrap());
            // Every loss term and the gradient norm: sums in another order, 1e-4.
            let rel = |x: f64, y: f64| (x - y).abs() <= 1e-4 * y.abs().max(1e-3);
            assert!(
                rel(b.out.loss, a.out.loss),
                "{what} step {step}: loss {} vs {}",
                b.out.loss,
                a.out.loss
            );
            assert_eq!(a.out.losses.len(), b.out.losses.len());
            for ((n, x), (_, y)) in b.out.losses.iter().zip(&a.out.losses) {
                assert!(rel(*x, *y), "{what} step {step}: {n} cuda {x} vs cpu {y}");
            }
            assert!(
                rel(b.grad_norm as f64, a.grad_norm as f64),
                "{what} step {step}: grad norm {} vs {}",
                b.grad_norm,
                a.grad_norm
            );
        }
        // The parameters after the steps. Adam moves each element by about lr * sign(g),
        // so an element whose gradient is ~0 may move either way on the two devices, and
        // a near-tie at a top-k cut or a JumpReLU threshold (pre-activations differ by
        // GEMM rounding, ~1e-6) can pick another latent for one token, changing that
        // latent's rows: all elements must be within Adam's reach, and 95% within
        // rounding (a wrong gradient moves nearly all of them).
        for (name, p) in cpu.sae.params.iter() {
            let want = p.to_vec();
            let got = cuda.sae.params.get(name).to_vec();
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let tight = 1e-4 * scale;
            // Adam moves an element by a few lr per step at most.
            let loose = tight + 4.0 * LR as f32 * STEPS as f32;
            let mut off = 0;
            for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                let d = (x - y).abs();
                assert!(d <= loose, "{what}: {name}[{i}] cuda {x} vs cpu {y}");
                off += (d > tight) as usize;
            }
            assert!(
                off * 20 <= want.len(),
                "{what}: {name}: {off} of {} elements differ by more than {tight}",
                want.len()
            );
        }
        // The dead-latent bookkeeping saw the same firing, up to such near-ties (2 of
        // the 256 latents).
        let differ = cpu
            .dead_mask()
            .iter()
            .zip(cuda.dead_mask())
            .filter(|(a, b)| *a != b)
            .count();
        assert!(
            differ <= 2,
            "{what}: {differ} latents dead on one device only"
        );
    }
}
