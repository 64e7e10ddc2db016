//! A small end-to-end training run with the SAE library, offline, in seconds: a TopK SAE
//! on the 640 GPT-2 residual-stream activations shipped in `tests/fixtures` (real
//! TransformerLens activations of a tiny model), the way SAELens trains one:
//! `expected_average_only_in` input scaling, `b_dec` at the geometric median, Adam,
//! gradient clipping, dead-latent tracking with AuxK, and at the end the scaling factor
//! folded into the weights and the inference SAE saved in SAELens's format.
//!
//! ```text
//! cargo run --release -p sae --example train_tiny -- [--output DIR] [--overwrite] [--epochs N]
//! ```
//! Then apply the result: `sae-trainer encode --sae DIR --input FILE:TENSOR --output OUT`.

use kernels::{ops, Device, Tensor};
use sae::optim::{clip_grad_norm, Adam};
use sae::{io, Architecture, BDecInitMethod, Sae, SaeConfig, StepInput};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut output = PathBuf::from("out/tiny-topk-sae");
    let (mut overwrite, mut epochs) = (false, 40usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--output" => output = args.next().ok_or("--output needs a directory")?.into(),
            "--overwrite" => overwrite = true,
            "--epochs" => epochs = args.next().ok_or("--epochs needs a number")?.parse()?,
            other => {
                return Err(format!(
                    "unknown argument {other} (use --output DIR, --overwrite, --epochs N)"
                )
                .into())
            }
        }
    }
    if output.join(schemas::files::SAE_CFG).exists() && !overwrite {
        return Err(format!(
            "{} already holds an SAE; pass --overwrite to replace it",
            output.display()
        )
        .into());
    }

    let dev = Device::Cpu;
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/saes/inputs.safetensors");
    let (_, acts) = io::read_tensor(&data, Some("batches_raw"))?;
    let d_in = *acts.shape.last().unwrap();
    let n = acts.values.len() / d_in;
    let mut x = Tensor::from_vec(&dev, &[n, d_in], acts.values)?;

    // SAELens's expected_average_only_in: scale inputs so their mean norm is sqrt(d_in).
    let mut norms = Tensor::zeros(&dev, &[n]);
    ops::row_norms(&x, &mut norms);
    let factor = sae::norm_scaling_factor(d_in, ops::sum(&norms) / n as f64);
    ops::scale(&mut x, factor as f32);

    let mut cfg = SaeConfig::new(Architecture::TopK, d_in, 512);
    cfg.k = 16.0;
    cfg.use_sparse_activations = true;
    cfg.normalize_activations = schemas::NormalizeActivations::ExpectedAverageOnlyIn;
    cfg.metadata
        .insert("hook_name".into(), "blocks.0.hook_resid_pre".into());
    cfg.metadata.insert("model_name".into(), "tiny-gpt2".into());
    let mut sae = Sae::new(cfg, &dev, 42)?;
    sae.initialize_b_dec(BDecInitMethod::GeometricMedian, &x)?;
    let mut adam = Adam::new(&sae.params, 4e-4, 0.9, 0.999);
    let mut grads = sae.zero_grads();

    let batch = 128;
    let d_sae = sae.cfg().d_sae;
    let mut since_fired = vec![0f32; d_sae];
    let window = 200.0; // steps without firing before a latent counts as dead
    let start = std::time::Instant::now();
    let mut step = 0;
    for epoch in 0..epochs {
        for b in 0..n / batch {
            let mut xb = Tensor::zeros(&dev, &[batch, d_in]);
            ops::copy_rows(&x, b * batch, &mut xb);
            let dead: Vec<f32> = since_fired
                .iter()
                .map(|&s| (s > window) as u8 as f32)
                .collect();
            let dead = Tensor::from_vec(&dev, &[d_sae], dead)?;
            let out = sae.training_forward(&StepInput {
                sae_in: &xb,
                coefficient: 0.0,
                dead_neuron_mask: Some(&dead),
                noise_seed: 0,
            })?;
            let mut fired = Tensor::zeros(&dev, &[d_sae]);
            ops::col_nonzero_counts(&sae.last_feature_acts(), &mut fired);
            for (s, f) in since_fired.iter_mut().zip(fired.to_vec()) {
                *s = if f > 0.0 { 0.0 } else { *s + 1.0 };
            }
            grads.zero();
            sae.backward(&mut grads);
            clip_grad_norm(&mut grads, 1.0);
            adam.update(&mut sae.params, &grads);
            if step % 50 == 0 || (epoch + 1 == epochs && b + 1 == n / batch) {
                let ev = explained_variance(&xb, sae.last_sae_out());
                let n_dead = since_fired.iter().filter(|&&s| s > window).count();
                println!(
                    "step {step:4}  epoch {epoch:2}  loss {:8.3}  mse {:8.3}  aux {:7.3}  explained variance {ev:6.3}  dead {n_dead}",
                    out.loss,
                    out.get("mse_loss").unwrap_or(0.0),
                    out.get("auxiliary_reconstruction_loss").unwrap_or(0.0)
                );
            }
            step += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{step} steps, {} tokens in {secs:.2} s ({:.0} tokens/s)",
        step * batch,
        (step * batch) as f64 / secs
    );

    // Fold the input scaling into the weights: the saved SAE takes raw activations.
    sae.fold_activation_norm_scaling_factor(factor);
    io::save_inference(&sae, &output, overwrite)?;
    println!(
        "saved the inference SAE (SAELens format) to {}",
        output.display()
    );
    Ok(())
}

/// SAELens's `metrics/explained_variance`: 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2.
fn explained_variance(x: &Tensor, out: &Tensor) -> f64 {
    let (xv, ov) = (x.to_vec(), out.to_vec());
    let d = x.cols();
    let n = x.rows();
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|r| xv[r * d + j] as f64).sum::<f64>() / n as f64)
        .collect();
    let (mut res, mut tot) = (0f64, 0f64);
    for r in 0..n {
        for j in 0..d {
            res += ((xv[r * d + j] - ov[r * d + j]) as f64).powi(2);
            tot += (xv[r * d + j] as f64 - mean[j]).powi(2);
        }
    }
    1.0 - res / tot
}
