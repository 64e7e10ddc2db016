//! `sae-trainer encode`: applies an SAE to activations from a safetensors file.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::{Device, Tensor};
use sae::io::{self, OutTensor};
use sae::SaeError;
use schemas::tensors::{FEATURE_ACTS, SAE_OUT};
use schemas::{Dtype, ReshapeActivations};
use serde_json::json;
use std::path::{Path, PathBuf};

pub struct EncodeArgs {
    pub sae_dir: PathBuf,
    /// `FILE` or `FILE:TENSOR`.
    pub input: String,
    pub output: PathBuf,
    pub overwrite: bool,
    pub batch_size: usize,
    pub device: String,
}

/// `FILE:TENSOR` → (file, Some(tensor)); a bare existing path (even with a `:` in it)
/// → (file, None).
pub fn split_input(spec: &str) -> (PathBuf, Option<String>) {
    if Path::new(spec).exists() {
        return (PathBuf::from(spec), None);
    }
    match spec.rsplit_once(':') {
        Some((f, t)) if !f.is_empty() && !t.is_empty() => (PathBuf::from(f), Some(t.to_string())),
        _ => (PathBuf::from(spec), None),
    }
}

/// Runs the command; returns the JSON summary it prints.
pub fn run(a: &EncodeArgs) -> Result<serde_json::Value> {
    let device = Device::parse(&a.device)?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.output.exists() && !a.overwrite {
        return Err(SaeError::AlreadyExists {
            path: a.output.clone(),
        }
        .into());
    }
    let loaded = sae::pretrained::load(&a.sae_dir, &device)
        .with_context(|| format!("cannot load the SAE in {}", a.sae_dir.display()))?;
    // Training-only forms (BatchTopK's batch selection) become their inference form.
    let sae = loaded.inference_form()?;
    let cfg = sae.cfg().clone();
    let (path, name) = split_input(&a.input);
    let (tensor_name, input) = io::read_tensor(&path, name.as_deref())
        .with_context(|| format!("cannot read the input {}", a.input))?;

    // [..., d_in], or [..., n_heads, d_head] for hook_z SAEs.
    let shape = input.shape.clone();
    let d = cfg.d_in;
    let lead: Vec<usize> = if shape.last() == Some(&d) && !shape.is_empty() {
        shape[..shape.len() - 1].to_vec()
    } else if cfg.reshape_activations == ReshapeActivations::HookZ
        && shape.len() >= 2
        && shape[shape.len() - 1] * shape[shape.len() - 2] == d
    {
        shape[..shape.len() - 2].to_vec()
    } else {
        let hint = if cfg.reshape_activations == ReshapeActivations::HookZ {
            format!(" or [..., n_heads, d_head] with n_heads * d_head = {d}")
        } else {
            String::new()
        };
        bail!(
            "input tensor '{tensor_name}' in {} has shape {shape:?}, but the SAE takes d_in = {d}: expected [..., {d}]{hint}",
            path.display()
        );
    };
    let n: usize = lead.iter().product();
    check_finite(&tensor_name, &input.values, d)?;

    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("encode {bar:30} {pos}/{len} tokens {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let m = cfg.d_sae;
    let mut acts_out = Vec::with_capacity(n * m);
    let mut sae_out = Vec::with_capacity(n * d);
    let (mut l0, mut sse) = (0f64, 0f64);
    for (i, chunk) in input.values.chunks(a.batch_size * d).enumerate() {
        let rows = chunk.len() / d;
        let x = Tensor::from_vec(&device, &[rows, d], chunk.to_vec())?;
        let (f, out) = sae
            .forward(&x)
            .with_context(|| format!("rows {}..{}", i * a.batch_size, i * a.batch_size + rows))?;
        let (f, out) = (f.to_vec(), out.to_vec());
        l0 += f.iter().filter(|&&v| v != 0.0).count() as f64;
        sse += out
            .iter()
            .zip(chunk)
            .map(|(o, x)| ((o - x) as f64).powi(2))
            .sum::<f64>();
        acts_out.extend_from_slice(&f);
        sae_out.extend_from_slice(&out);
        bar.inc(rows as u64);
    }
    bar.finish_and_clear();

    let mut f_shape = lead.clone();
    f_shape.push(m);
    let tensors = [
        OutTensor {
            name: FEATURE_ACTS,
            shape: f_shape,
            values: acts_out,
            dtype: Dtype::F32,
        },
        OutTensor {
            name: SAE_OUT,
            shape: shape.clone(),
            values: sae_out,
            dtype: Dtype::F32,
        },
    ];
    io::write_safetensors(&a.output, &tensors, a.overwrite)?;

    let total_var = total_variance(&input.values, d);
    Ok(json!({
        "n_tokens": n,
        "d_in": d,
        "d_sae": m,
        "architecture": cfg.architecture.as_str(),
        "l0": if n > 0 { l0 / n as f64 } else { 0.0 },
        "mse": if n > 0 { sse / n as f64 } else { 0.0 },
        "explained_variance": if total_var > 0.0 { 1.0 - sse / total_var } else { f64::NAN },
        "output": a.output.display().to_string(),
    }))
}

/// NaN or infinity in the input is an error (it would spread through every output).
fn check_finite(name: &str, values: &[f32], d: usize) -> Result<(), SaeError> {
    let bad: Vec<usize> = values
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_finite())
        .map(|(i, _)| i)
        .collect();
    match bad.first() {
        None => Ok(()),
        Some(&i) => Err(SaeError::NonFinite {
            what: format!("input tensor '{name}'"),
            count: bad.len(),
            row: i / d,
            col: i % d,
        }),
    }
}

/// `sum_r ||x_r - mean(x)||^2` (SAELens's explained-variance denominator, summed).
fn total_variance(x: &[f32], d: usize) -> f64 {
    let n = x.len() / d;
    let mut sum = vec![0f64; d];
    let mut sq = 0f64;
    for row in x.chunks(d) {
        for (s, &v) in sum.iter_mut().zip(row) {
            *s += v as f64;
            sq += v as f64 * v as f64;
        }
    }
    sq - sum.iter().map(|s| s * s).sum::<f64>() / n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_spec() {
        assert_eq!(
            split_input("a.safetensors:acts"),
            (PathBuf::from("a.safetensors"), Some("acts".into()))
        );
        assert_eq!(
            split_input("a.safetensors"),
            (PathBuf::from("a.safetensors"), None)
        );
        assert_eq!(
            split_input("dir/x:blocks.0.hook_z"),
            (PathBuf::from("dir/x"), Some("blocks.0.hook_z".into()))
        );
    }

    #[test]
    fn variance_and_finiteness() {
        // rows (0,0) and (2,2): mean (1,1), total variance 2 + 2
        assert!((total_variance(&[0.0, 0.0, 2.0, 2.0], 2) - 4.0).abs() < 1e-12);
        let e = check_finite("x", &[1.0, f32::NAN, 2.0, f32::INFINITY], 2).unwrap_err();
        assert!(
            matches!(
                e,
                SaeError::NonFinite {
                    count: 2,
                    row: 0,
                    col: 1,
                    ..
                }
            ),
            "{e}"
        );
    }
}
