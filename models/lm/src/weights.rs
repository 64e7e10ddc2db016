//! Reading an HF checkpoint's weights: `model.safetensors`, or the shards named by
//! `model.safetensors.index.json`; f32, f16 and bf16 all become f32.

use crate::{LmError, Result};
use kernels::{Device, Tensor};
use sae::io::{check_finite_weights, read_safetensors, HostTensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Every tensor of a checkpoint, by name, waiting to be taken by the model builder.
pub(crate) struct Checkpoint {
    dir: PathBuf,
    tensors: HashMap<String, HostTensor>,
    /// The file each tensor came from.
    origin: HashMap<String, PathBuf>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| LmError::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LmError::Config {
                    path: index.clone(),
                    message: format!("not valid JSON: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LmError::Config {
                    path: index.clone(),
                    message: "no 'weight_map' object".into(),
                })?;
            let names: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(LmError::Invalid(format!(
                "{}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are read)",
                dir.display()
            )));
        };
        let (mut tensors, mut origin) = (HashMap::new(), HashMap::new());
        // One shard in memory at a time, next to the f32 copies already taken.
        for f in files {
            if !f.exists() {
                return Err(LmError::Invalid(format!(
                    "{}: shard {} named by the index is missing",
                    dir.display(),
                    f.display()
                )));
            }
            for (name, t) in read_safetensors(&f)? {
                origin.insert(name.clone(), f.clone());
                tensors.insert(name, t);
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            tensors,
            origin,
        })
    }

    /// Removes and returns the first of `names` present, checking its shape and that
    /// its values are finite (only the tensors the model uses: checkpoints may carry
    /// buffers such as masks that it ignores).
    pub fn take(&mut self, names: &[String], shape: &[usize]) -> Result<(String, HostTensor)> {
        for n in names {
            if let Some(t) = self.tensors.remove(n) {
                if t.shape != shape {
                    return Err(LmError::WeightShape {
                        name: n.clone(),
                        got: t.shape,
                        want: shape.to_vec(),
                    });
                }
                check_finite_weights(&self.origin[n], n, &t)?;
                return Ok((n.clone(), t));
            }
        }
        Err(LmError::MissingWeight {
            dir: self.dir.display().to_string(),
            name: names[0].clone(),
            tried: names.join(", "),
        })
    }

    /// [`Checkpoint::take`] straight onto `device`.
    pub fn tensor(&mut self, device: &Device, names: &[String], shape: &[usize]) -> Result<Tensor> {
        let (_, t) = self.take(names, shape)?;
        to_device(device, t.values, shape)
    }
}

pub(crate) fn to_device(device: &Device, values: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(device, shape, values).map_err(sae::SaeError::from)?)
}

/// `[rows, cols]` row-major → the columns `start..start + n` as `[rows, n]`.
pub(crate) fn cols(values: &[f32], cols: usize, start: usize, n: usize) -> Vec<f32> {
    values
        .chunks(cols)
        .flat_map(|r| r[start..start + n].iter().copied())
        .collect()
}
