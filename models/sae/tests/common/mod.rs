//! Reading the SAELens reference fixtures (`tests/fixtures/`, see its README).
#![allow(dead_code)]

use kernels::{Device, Tensor};
use sae::{Params, Sae, StepInput, StepOutput};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const DEV: Device = Device::Cpu;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Every tensor of a safetensors file as f64 values (any dtype, bools as 0/1).
pub fn read_all(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let d = v.data();
            let vals: Vec<f64> = match v.dtype() {
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::BOOL | Dtype::U8 => d.iter().map(|&b| b as f64).collect(),
                other => panic!("{name}: dtype {other:?}"),
            };
            (name, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// A reference file with SAELens's alias table: keys that are not stored resolve to
/// another key of the same file or to `<file>:<tensor>` under `alias_root`.
pub struct Reference {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
    pub aliases: HashMap<String, String>,
    pub alias_root: PathBuf,
}

impl Reference {
    pub fn load(path: &Path, aliases: &Value, alias_root: &Path) -> Reference {
        Reference {
            tensors: read_all(path),
            aliases: aliases
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            alias_root: alias_root.to_path_buf(),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key) || self.aliases.contains_key(key)
    }

    pub fn get(&self, key: &str) -> Vec<f64> {
        if let Some((_, v)) = self.tensors.get(key) {
            return v.clone();
        }
        let target = self
            .aliases
            .get(key)
            .unwrap_or_else(|| panic!("reference has no '{key}'"));
        match target.split_once(':') {
            Some((file, tensor)) => {
                let all = read_all(&self.alias_root.join(file));
                all.get(tensor)
                    .unwrap_or_else(|| panic!("{file} has no {tensor}"))
                    .1
                    .clone()
            }
            None => self.get(target),
        }
    }

    pub fn scalar(&self, key: &str) -> f64 {
        let v = self.get(key);
        assert_eq!(v.len(), 1, "{key} is not a scalar");
        v[0]
    }
}

pub struct Inputs {
    pub batches: Vec<Tensor>,
    pub batches_raw: Vec<Tensor>,
    pub dead_mask: Tensor,
}

pub fn inputs() -> Inputs {
    let all = read_all(&fixtures().join("saes/inputs.safetensors"));
    let split = |key: &str| -> Vec<Tensor> {
        let (shape, v) = &all[key];
        assert_eq!(shape, &vec![5, 128, 128]);
        v.chunks(128 * 128)
            .map(|c| {
                Tensor::from_vec(&DEV, &[128, 128], c.iter().map(|&x| x as f32).collect()).unwrap()
            })
            .collect()
    };
    let mask: Vec<f32> = all["dead_neuron_mask"]
        .1
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert_eq!(mask.iter().filter(|&&m| m > 0.0).count(), 68);
    Inputs {
        batches: split("batches"),
        batches_raw: split("batches_raw"),
        dead_mask: Tensor::from_vec(&DEV, &[128], mask).unwrap(),
    }
}

pub fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `|got - want| <= tol * max|want|` element-wise; returns the worst ratio for reports.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} values, reference has {}",
        got.len(),
        want.len()
    );
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let (mut worst, mut at) = (0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs() / scale;
        if e > worst {
            (worst, at) = (e, i);
        }
    }
    assert!(
        worst <= tol,
        "{what}: max error {worst:.3e} of max |ref| {scale:.3e} at {at} (got {}, want {}), tolerance {tol:.0e}",
        got[at],
        want[at]
    );
}

/// Scalar comparison, relative.
#[track_caller]
pub fn assert_rel(what: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(
        err <= tol || (got - want).abs() < 1e-9,
        "{what}: got {got}, want {want} (rel err {err:.2e} > {tol:.0e})"
    );
}

/// First `rows` rows of a `[n, cols]` tensor.
pub fn head_rows(t: &Tensor, rows: usize) -> Vec<f32> {
    t.to_vec()[..rows * t.cols()].to_vec()
}

/// Every SAELens 6 architecture in the fixtures (folder names).
pub const ARCHS: [&str; 7] = [
    "standard",
    "gated",
    "jumprelu",
    "jumprelu_tanh",
    "topk",
    "batchtopk",
    "matryoshka_batchtopk",
];

/// Tolerances of a comparison: forward tensors and gradients relative to the largest
/// reference magnitude, losses relative to themselves.
pub struct Tol {
    pub fwd: f64,
    pub loss: f64,
    pub grad: f64,
}

/// One training forward and backward on `x`, compared with `<case>.*` of a reference:
/// rows 0..15 of the latents, pre-activations and reconstruction, every loss term the
/// reference has (a term it lacks must be zero here), the total loss, and the gradient
/// of every parameter. Returns the step's output and gradients.
#[allow(clippy::too_many_arguments)]
pub fn check_step(
    label: &str,
    sae: &mut Sae,
    r: &Reference,
    case: &str,
    x: &Tensor,
    mask: Option<&Tensor>,
    coefficient: f64,
    tol: &Tol,
) -> (StepOutput, Params) {
    let out = sae
        .training_forward(&StepInput {
            sae_in: x,
            coefficient,
            dead_neuron_mask: mask,
            noise_seed: 0,
        })
        .unwrap();
    let what = |k: &str| format!("{label}/{case}.{k}");
    assert_close(
        &what("feature_acts"),
        &head_rows(&sae.last_feature_acts(), 16),
        &r.get(&format!("{case}.feature_acts")),
        tol.fwd,
    );
    assert_close(
        &what("hidden_pre"),
        &head_rows(&sae.last_hidden_pre(), 16),
        &r.get(&format!("{case}.hidden_pre")),
        tol.fwd,
    );
    assert_close(
        &what("sae_out"),
        &head_rows(sae.last_sae_out(), 16),
        &r.get(&format!("{case}.sae_out")),
        tol.fwd,
    );
    let prefix = format!("{case}.losses.");
    let ref_losses: Vec<String> = r
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
        .collect();
    for l in &ref_losses {
        let got = out
            .get(l)
            .unwrap_or_else(|| panic!("{label}: no loss term {l} in {:?}", out.losses));
        assert_rel(&what(l), got, r.scalar(&format!("{prefix}{l}")), tol.loss);
    }
    for (l, v) in &out.losses {
        assert!(
            ref_losses.contains(l) || *v == 0.0,
            "{label}: extra non-zero loss {l} = {v}"
        );
    }
    assert_rel(
        &what("loss"),
        out.loss,
        r.scalar(&format!("{case}.loss")),
        tol.loss,
    );
    let mut g = sae.zero_grads();
    sae.backward(&mut g);
    for (p, t) in g.iter() {
        let key = format!("{case}.grad.{p}");
        assert!(r.has(&key), "{label}: reference has no gradient for {p}");
        assert_close(
            &what(&format!("grad.{p}")),
            &t.to_vec(),
            &r.get(&key),
            tol.grad,
        );
    }
    (out, g)
}
