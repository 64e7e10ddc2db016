//! Parameter initialisation, as SAELens 6 (`decoder_init_norm` set) and SAELens 5
//! (`decoder_init_norm = None`, with its heuristic/orthogonal/transpose options) do it.
//!
//! The random draws come from a seeded ChaCha8 stream, not torch's generator, so the
//! numbers differ from SAELens's; the distributions and every deterministic rule are the
//! same, and the tests check those.

use crate::Params;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use schemas::tensors::{LOG_THRESHOLD, THRESHOLD, W_DEC, W_ENC};
use schemas::{Architecture, SaeConfig};

/// Host-side values for every parameter, by name; zeros unless a rule below says
/// otherwise.
pub(crate) fn init_values(
    cfg: &SaeConfig,
    shapes: &[(&'static str, Vec<usize>)],
    seed: u64,
) -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (d, m) = (cfg.d_in, cfg.d_sae);
    // torch's kaiming_uniform_ (a=0, fan_in): bound = sqrt(6 / fan_in), fan_in = size(1).
    let mut w_dec = kaiming_uniform(&mut rng, m, d);
    let w_enc = match cfg.decoder_init_norm {
        Some(norm) => {
            set_row_norms(&mut w_dec, d, norm as f32);
            transpose(&w_dec, m, d)
        }
        None => {
            // SAELens 5: independent encoder, then the decoder options in order.
            let mut w_enc = kaiming_uniform(&mut rng, d, m);
            if cfg.decoder_orthogonal_init {
                w_dec = orthogonal_columns(&mut rng, m, d);
            } else if cfg.decoder_heuristic_init {
                w_dec = (0..m * d)
                    .map(|_| StandardNormal.sample(&mut rng))
                    .collect();
                set_row_norms(&mut w_dec, d, cfg.decoder_heuristic_init_norm as f32);
            }
            if cfg.init_encoder_as_decoder_transpose {
                w_enc = transpose(&w_dec, m, d);
            }
            if cfg.normalize_sae_decoder {
                set_row_norms(&mut w_dec, d, 1.0);
            }
            w_enc
        }
    };
    shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v = match *name {
                W_DEC => w_dec.clone(),
                W_ENC => w_enc.clone(),
                THRESHOLD if cfg.architecture == Architecture::JumpRelu => {
                    vec![cfg.jumprelu_init_threshold as f32; n]
                }
                LOG_THRESHOLD => vec![(cfg.jumprelu_init_threshold as f32).ln(); n],
                _ => vec![0.0; n],
            };
            (*name, shape.clone(), v)
        })
        .collect()
}

fn kaiming_uniform(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<f32> {
    let bound = (6.0 / cols as f64).sqrt() as f32;
    (0..rows * cols)
        .map(|_| rng.random_range(-bound..bound))
        .collect()
}

/// Sets every row of a `[rows, cols]` matrix to L2 norm `norm`.
pub(crate) fn set_row_norms(w: &mut [f32], cols: usize, norm: f32) {
    for row in w.chunks_mut(cols) {
        let n = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
        row.iter_mut().for_each(|v| *v = *v / n * norm);
    }
}

pub(crate) fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// torch's `orthogonal_(W_dec.T).T` for `W_dec` `[m, d]`: a random matrix with
/// orthonormal columns when `m >= d` (orthonormal rows when `m < d`), from the QR
/// decomposition of a Gaussian matrix with the signs of R's diagonal folded in.
fn orthogonal_columns(rng: &mut ChaCha8Rng, m: usize, d: usize) -> Vec<f32> {
    // Work on the tall orientation [big, small] and transpose back if needed.
    let (big, small) = (m.max(d), m.min(d));
    let mut a: Vec<f64> = (0..big * small)
        .map(|_| StandardNormal.sample(rng))
        .collect();
    // Modified Gram-Schmidt on the columns of a [big, small] row-major matrix; the
    // positive column norms make R's diagonal positive, which is torch's sign rule.
    for j in 0..small {
        for k in 0..j {
            let dot: f64 = (0..big).map(|i| a[i * small + j] * a[i * small + k]).sum();
            for i in 0..big {
                a[i * small + j] -= dot * a[i * small + k];
            }
        }
        let norm = (0..big)
            .map(|i| a[i * small + j].powi(2))
            .sum::<f64>()
            .sqrt();
        for i in 0..big {
            a[i * small + j] /= norm;
        }
    }
    let q: Vec<f32> = a.into_iter().map(|v| v as f32).collect();
    if m >= d {
        q
    } else {
        transpose(&q, d, m)
    }
}

/// Copies `init_values` into a fresh parameter set.
pub(crate) fn into_params(
    device: &kernels::Device,
    vals: Vec<(&'static str, Vec<usize>, Vec<f32>)>,
) -> Params {
    let mut p = Params::new();
    for (name, shape, v) in vals {
        p.insert(
            name,
            kernels::Tensor::from_vec(device, &shape, v).expect("shape matches"),
        );
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norms(w: &[f32], cols: usize) -> Vec<f32> {
        w.chunks(cols)
            .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt())
            .collect()
    }

    #[test]
    fn orthogonal_init_has_orthonormal_columns() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (m, d) = (12, 5);
        let w = orthogonal_columns(&mut rng, m, d);
        for a in 0..d {
            for b in 0..d {
                let dot: f32 = (0..m).map(|i| w[i * d + a] * w[i * d + b]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5, "({a},{b}) {dot}");
            }
        }
        // wide case: rows orthonormal
        let w = orthogonal_columns(&mut rng, 3, 7);
        for a in 0..3 {
            for b in 0..3 {
                let dot: f32 = (0..7).map(|j| w[a * 7 + j] * w[b * 7 + j]).sum();
                assert!((dot - if a == b { 1.0 } else { 0.0 }).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn kaiming_bounds_and_row_norms() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let w = kaiming_uniform(&mut rng, 64, 24);
        let bound = (6.0f32 / 24.0).sqrt();
        assert!(w.iter().all(|v| v.abs() <= bound));
        // uniform on [-b, b] has variance b^2/3
        let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        assert!((var - bound * bound / 3.0).abs() < 0.02, "{var}");
        let mut w2 = w.clone();
        set_row_norms(&mut w2, 24, 0.1);
        assert!(norms(&w2, 24).iter().all(|n| (n - 0.1).abs() < 1e-6));
    }
}
