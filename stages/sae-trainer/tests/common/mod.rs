//! Helpers the CLI tests share.

use sae::io::{self, OutTensor};
use std::path::Path;

/// `src`'s tensors written to `dst` with `tensor`'s value at flat index `at` set to `v`.
pub fn with_value(src: &Path, dst: &Path, tensor: &str, at: usize, v: f32) {
    let all = io::read_safetensors(src).unwrap();
    let outs: Vec<OutTensor> = all
        .iter()
        .map(|(name, t)| {
            let mut values = t.values.clone();
            if name == tensor {
                values[at] = v;
            }
            OutTensor {
                name,
                shape: t.shape.clone(),
                values,
                dtype: t.dtype,
            }
        })
        .collect();
    io::write_safetensors(dst, &outs, true).unwrap();
}
