//! SAELens SAE directories and safetensors files, both ways.
//!
//! A directory holds `cfg.json`, `sae_weights.safetensors` and optionally
//! `sparsity.safetensors`. [`load`] reads what SAELens 6 and 5 write (training and
//! inference saves, f32/f16/bf16/f64 weights, `log_threshold`, old `scaling_factor`s);
//! [`save_training`] and [`save_inference`] write what SAELens 6's `save_model` and
//! `save_inference_model` write. Every file goes to a temporary name first and is
//! renamed into place, so a crash never leaves a half-written file.

use crate::arch::Buffers;
use crate::{Params, Result, Sae, SaeError};
use kernels::{Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors};
use schemas::files::{SAE_CFG, SAE_WEIGHTS, SPARSITY, SPARSITY_TENSOR};
use schemas::tensors::{
    FINETUNING_SCALING_FACTOR, LOG_THRESHOLD, SCALING_FACTOR, THRESHOLD, TOPK_THRESHOLD, W_DEC,
};
use schemas::{Architecture, Dtype, SaeConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One tensor read from a safetensors file, converted to f32.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    /// The dtype it was stored in.
    pub dtype: Dtype,
    /// The exact values of a scalar stored as F64 (BatchTopK's running threshold).
    pub scalar_f64: Option<f64>,
}

/// Reads every tensor of a safetensors file (F32, F16, BF16 or F64) as f32.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, HostTensor)>> {
    let bytes = std::fs::read(path).map_err(|e| SaeError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| SaeError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    let mut names: Vec<&str> = st.names();
    names.sort();
    for name in names {
        let view = st.tensor(name).map_err(|e| SaeError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        out.push((name.to_string(), to_host(name, &view)?));
    }
    Ok(out)
}

/// Refuses weights holding NaN or infinity (SAEs, LM checkpoints, trainer checkpoints
/// all load through here): the error names the file, the tensor, how many values are
/// bad and the index of the first.
pub fn check_finite_weights(path: &Path, name: &str, t: &HostTensor) -> Result<()> {
    let Some(first) = t.values.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let mut index = vec![0; t.shape.len()];
    let mut rest = first;
    for (i, &n) in t.shape.iter().enumerate().rev() {
        index[i] = rest % n.max(1);
        rest /= n.max(1);
    }
    Err(SaeError::NonFiniteWeights {
        path: path.to_path_buf(),
        name: name.to_string(),
        count: t.values.iter().filter(|v| !v.is_finite()).count(),
        index,
        value: t.values[first],
    })
}

/// Reads one tensor of a safetensors file as f32: the one called `name`, or the only
/// one in the file when `name` is `None`.
pub fn read_tensor(path: &Path, name: Option<&str>) -> Result<(String, HostTensor)> {
    let bytes = std::fs::read(path).map_err(|e| SaeError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| SaeError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut names: Vec<&str> = st.names();
    names.sort();
    let present = names.join(", ");
    let name = match name {
        Some(n) => n.to_string(),
        None if names.len() == 1 => names[0].to_string(),
        None => {
            return Err(SaeError::Safetensors {
                path: path.to_path_buf(),
                message: format!(
                    "it holds {} tensors ({present}); name one as FILE:TENSOR",
                    names.len()
                ),
            })
        }
    };
    let view = st.tensor(&name).map_err(|_| SaeError::MissingTensor {
        path: path.to_path_buf(),
        name: name.clone(),
        present,
    })?;
    let t = to_host(&name, &view)?;
    Ok((name, t))
}

fn to_host(name: &str, v: &TensorView) -> Result<HostTensor> {
    let data = v.data();
    let (values, dtype) = match v.dtype() {
        StDtype::F32 => (
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F32,
        ),
        StDtype::F64 => (
            data.chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            Dtype::F64,
        ),
        StDtype::F16 => (
            data.chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16,
        ),
        StDtype::BF16 => (
            data.chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16,
        ),
        other => {
            return Err(SaeError::Dtype {
                name: name.into(),
                dtype: format!("{other:?}"),
            })
        }
    };
    let scalar_f64 = (v.dtype() == StDtype::F64 && data.len() == 8)
        .then(|| f64::from_le_bytes(data.try_into().unwrap()));
    Ok(HostTensor {
        shape: v.shape().to_vec(),
        values,
        dtype,
        scalar_f64,
    })
}

/// A tensor to write: name, shape, f32 values, and the dtype to store them in.
pub struct OutTensor<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub dtype: Dtype,
}

fn encode_values(values: &[f32], dtype: Dtype) -> (StDtype, Vec<u8>) {
    match dtype {
        Dtype::F32 => (
            StDtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        Dtype::F64 => (
            StDtype::F64,
            values
                .iter()
                .flat_map(|&v| (v as f64).to_le_bytes())
                .collect(),
        ),
        Dtype::F16 => (
            StDtype::F16,
            values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        Dtype::BF16 => (
            StDtype::BF16,
            values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        ),
    }
}

/// Serialises tensors to safetensors bytes. `f64_scalars` are written as F64 `[]`.
fn safetensors_bytes(tensors: &[OutTensor], f64_scalars: &[(&str, f64)]) -> Result<Vec<u8>> {
    let mut bufs: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let (dt, b) = encode_values(&t.values, t.dtype);
            (t.name.to_string(), dt, t.shape.clone(), b)
        })
        .collect();
    for (name, v) in f64_scalars {
        bufs.push((
            name.to_string(),
            StDtype::F64,
            vec![],
            v.to_le_bytes().to_vec(),
        ));
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, dt, s, b)| {
            (
                n.clone(),
                TensorView::new(*dt, s.clone(), b).expect("sizes match"),
            )
        })
        .collect();
    safetensors::serialize(views, None).map_err(|e| SaeError::Safetensors {
        path: PathBuf::from("<memory>"),
        message: e.to_string(),
    })
}

/// Writes a safetensors file atomically; refuses to replace one unless `overwrite`.
pub fn write_safetensors(path: &Path, tensors: &[OutTensor], overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        return Err(SaeError::AlreadyExists {
            path: path.to_path_buf(),
        });
    }
    atomic_write(path, &safetensors_bytes(tensors, &[])?)
}

/// Writes `bytes` to `path.tmp-<pid>`, syncs it, then renames it over `path`.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!("{file_name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        SaeError::io(path, e)
    })
}

/// Reads an SAE directory (any SAELens version, training or inference save).
pub fn load(dir: &Path, device: &Device) -> Result<Sae> {
    load_with_overrides(dir, device, &serde_json::Map::new())
}

/// [`load`] with `cfg.json`'s fields replaced by `overrides` first (SAELens's
/// `cfg_overrides`: a registry's `config_overrides`, `neuronpedia_id`).
pub fn load_with_overrides(
    dir: &Path,
    device: &Device,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<Sae> {
    if !dir.is_dir() {
        return Err(SaeError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such SAE directory"),
        ));
    }
    let cfg_path = dir.join(SAE_CFG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| SaeError::io(&cfg_path, e))?;
    let bad = |err| SaeError::Config {
        path: cfg_path.clone(),
        err,
    };
    let cfg = if overrides.is_empty() {
        SaeConfig::from_json_str(&text).map_err(bad)?
    } else {
        let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            bad(schemas::CfgError::new(
                "<json>",
                format!("not valid JSON: {e}"),
            ))
        })?;
        if let Some(obj) = v.as_object_mut() {
            obj.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        SaeConfig::from_json(&v).map_err(bad)?
    };
    let w_path = dir.join(SAE_WEIGHTS);
    let tensors = read_safetensors(&w_path)?;
    from_tensors(cfg, tensors, &w_path, device)
}

/// Builds an SAE from a config and the tensors of its weights file, applying
/// SAELens's conversions (`log_threshold`, `scaling_factor`).
fn from_tensors(
    cfg: SaeConfig,
    tensors: Vec<(String, HostTensor)>,
    path: &Path,
    device: &Device,
) -> Result<Sae> {
    for (name, t) in &tensors {
        check_finite_weights(path, name, t)?;
    }
    let mut file: HashMap<String, HostTensor> = tensors.into_iter().collect();
    let present = {
        let mut v: Vec<_> = file_names(&file);
        v.sort();
        v.join(", ")
    };
    // JumpReLU thresholds: SAELens 5 stores exp(log_threshold) as `threshold`; some
    // SAELens 6 checkpoints still carry `log_threshold`.
    if cfg.architecture == Architecture::JumpRelu {
        if cfg.jumprelu_log_threshold {
            if let Some(mut t) = file.remove(THRESHOLD) {
                t.values.iter_mut().for_each(|v| *v = v.ln());
                file.insert(LOG_THRESHOLD.into(), t);
            }
        } else if let Some(mut t) = file.remove(LOG_THRESHOLD) {
            t.values.iter_mut().for_each(|v| *v = v.exp());
            file.insert(THRESHOLD.into(), t);
        }
    }
    // SAELens 5's finetuning scale multiplies the latents before the decoder; it is
    // folded into W_dec rows (all ones means it was never trained).
    let scale = file
        .remove(SCALING_FACTOR)
        .or_else(|| file.remove(FINETUNING_SCALING_FACTOR));
    let mut buffers = Buffers::default();
    let batch_family = matches!(
        cfg.architecture,
        Architecture::BatchTopK | Architecture::MatryoshkaBatchTopK
    );
    if batch_family {
        let t = file
            .remove(TOPK_THRESHOLD)
            .ok_or_else(|| SaeError::MissingTensor {
                path: path.to_path_buf(),
                name: TOPK_THRESHOLD.into(),
                present: present.clone(),
            })?;
        // f64 precision matters for the running threshold (SAELens keeps it in f64)
        buffers.topk_threshold = t
            .scalar_f64
            .unwrap_or_else(|| t.values.first().copied().unwrap_or(0.0) as f64);
    }
    let shapes = crate::param_shapes(&cfg);
    let expected: Vec<&str> = shapes.iter().map(|(n, _)| *n).collect();
    let mut params = Params::new();
    for (name, shape) in &shapes {
        let t = file.remove(*name).ok_or_else(|| SaeError::MissingTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            present: present.clone(),
        })?;
        if &t.shape != shape {
            return Err(SaeError::Shape {
                name: name.to_string(),
                got: t.shape,
                want: shape.clone(),
                d_in: cfg.d_in,
                d_sae: cfg.d_sae,
            });
        }
        params.insert(name, Tensor::from_vec(device, shape, t.values)?);
    }
    if let Some(extra) = file_names(&file).into_iter().next() {
        return Err(SaeError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: extra,
            arch: cfg.architecture.to_string(),
            expected: expected.join(", "),
        });
    }
    if let Some(s) = scale {
        if s.values.len() != cfg.d_sae {
            return Err(SaeError::Shape {
                name: SCALING_FACTOR.into(),
                got: s.shape,
                want: vec![cfg.d_sae],
                d_in: cfg.d_in,
                d_sae: cfg.d_sae,
            });
        }
        if s.values.iter().any(|&v| v != 1.0) {
            let w = params.get_mut(W_DEC);
            let scale = Tensor::from_vec(device, &[cfg.d_sae], s.values)?;
            let zero = Tensor::zeros(device, &[cfg.d_sae]);
            kernels::ops::row_affine(w, &scale, &zero);
        }
    }
    Sae::from_parts(cfg, params, buffers, device)
}

fn file_names(file: &HashMap<String, HostTensor>) -> Vec<String> {
    file.keys().cloned().collect()
}

fn prepare_dir(dir: &Path, overwrite: bool) -> Result<()> {
    for f in [SAE_CFG, SAE_WEIGHTS] {
        let p = dir.join(f);
        if p.exists() && !overwrite {
            return Err(SaeError::AlreadyExists { path: p });
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| SaeError::io(dir, e))
}

fn write_sae_files(
    dir: &Path,
    cfg_json: &serde_json::Value,
    params: &Params,
    dtype: Dtype,
    f64_scalars: &[(&str, f64)],
) -> Result<()> {
    let tensors: Vec<OutTensor> = params
        .iter()
        .map(|(name, t)| OutTensor {
            name,
            shape: t.shape().to_vec(),
            values: t.to_vec(),
            dtype,
        })
        .collect();
    atomic_write(
        &dir.join(SAE_WEIGHTS),
        &safetensors_bytes(&tensors, f64_scalars)?,
    )?;
    let text = serde_json::to_string(cfg_json).expect("JSON values serialise");
    atomic_write(&dir.join(SAE_CFG), text.as_bytes())
}

/// Writes the training form of the SAE (SAELens's `save_model`): the training config
/// and every parameter and buffer, `log_threshold` stored as `threshold`.
pub fn save_training(sae: &Sae, dir: &Path, overwrite: bool) -> Result<()> {
    prepare_dir(dir, overwrite)?;
    let cfg = sae.cfg();
    let mut params = sae.params.clone();
    if let Some(lt) = params.remove(LOG_THRESHOLD) {
        let v: Vec<f32> = lt.to_vec().iter().map(|x| x.exp()).collect();
        params.insert(THRESHOLD, Tensor::from_vec(sae.device(), lt.shape(), v)?);
    }
    let scalars: Vec<(&str, f64)> = match cfg.architecture {
        Architecture::BatchTopK | Architecture::MatryoshkaBatchTopK => {
            vec![(TOPK_THRESHOLD, sae.buffers.topk_threshold)]
        }
        _ => vec![],
    };
    write_sae_files(dir, &cfg.to_training_json(), &params, cfg.dtype, &scalars)
}

/// Writes the inference form (SAELens's `save_inference_model`); see
/// [`Sae::inference_form`].
pub fn save_inference(sae: &Sae, dir: &Path, overwrite: bool) -> Result<()> {
    prepare_dir(dir, overwrite)?;
    let inf = sae.inference_form()?;
    // The inference config is written from the training config so that the metadata
    // records the training architecture and its details.
    write_sae_files(
        dir,
        &sae.cfg().to_inference_json(),
        &inf.params,
        sae.cfg().dtype,
        &[],
    )
}

/// Writes `sparsity.safetensors` (log10 feature densities, `[d_sae]`, f32).
pub fn save_sparsity(dir: &Path, log_sparsity: &[f32], overwrite: bool) -> Result<()> {
    let t = OutTensor {
        name: SPARSITY_TENSOR,
        shape: vec![log_sparsity.len()],
        values: log_sparsity.to_vec(),
        dtype: Dtype::F32,
    };
    write_safetensors(&dir.join(SPARSITY), &[t], overwrite)
}

/// Reads `sparsity.safetensors` if the directory has one.
pub fn load_sparsity(dir: &Path) -> Result<Option<Vec<f32>>> {
    let p = dir.join(SPARSITY);
    if !p.exists() {
        return Ok(None);
    }
    let t = read_safetensors(&p)?;
    t.into_iter()
        .find(|(n, _)| n == SPARSITY_TENSOR)
        .map(|(_, t)| Some(t.values))
        .ok_or_else(|| SaeError::MissingTensor {
            path: p.clone(),
            name: SPARSITY_TENSOR.into(),
            present: String::new(),
        })
}
