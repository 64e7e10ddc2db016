//! Shared helpers: fixture paths and reference tensors.
#![allow(dead_code)]

use kernels::Device;
use lm::{HookedTransformer, TokenBatch};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn load(dir: &Path) -> HookedTransformer {
    HookedTransformer::load(dir, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Every tensor of a reference file as (shape, f32 values); int64 tensors converted.
pub fn reference(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let vals: Vec<f32> = match v.dtype() {
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
                d => panic!("{name}: unexpected dtype {d:?}"),
            };
            (name, (v.shape().to_vec(), vals))
        })
        .collect()
}

pub fn batch(model: &HookedTransformer, ids: &[f32], shape: &[usize]) -> TokenBatch {
    let ids: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
    TokenBatch::new(&ids, shape[0], shape[1], model.cfg()).unwrap()
}

/// Largest |a - b|, treating equal infinities as equal; panics on NaN or a length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32], what: &str) -> f32 {
    assert_eq!(
        a.len(),
        b.len(),
        "{what}: {} values vs {}",
        a.len(),
        b.len()
    );
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            assert!(!x.is_nan() && !y.is_nan(), "{what}: NaN");
            if x == y {
                0.0
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}
