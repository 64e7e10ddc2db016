//! CPU backend of the transformer ops: norms, activations, rotary embeddings,
//! causal attention, and the per-token losses on logits.
//!
//! Row statistics are accumulated in `f64` and rounded once, so results differ from
//! PyTorch's `f32` reductions by at most a few ulps.

use crate::cpu::{dot_lanes as dot, SharedMut};
use rayon::prelude::*;

/// Rows per rayon task so that small matrices do not pay for splitting.
fn grain(cols: usize) -> usize {
    (8192 / cols.max(1)).max(1)
}

const FLAT_GRAIN: usize = 16 * 1024;

/// `out[r] = (x[r] - mean) / sqrt(var + eps)` (biased variance, as `nn.LayerNorm`).
pub fn layer_norm(x: &[f32], cols: usize, eps: f32, out: &mut [f32]) {
    out.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .with_min_len(grain(cols))
        .for_each(|(o, row)| {
            let mean = (row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64) as f32;
            o.iter_mut().zip(row).for_each(|(o, &v)| *o = v - mean);
            let var = o.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
            let scale = (var as f32 + eps).sqrt();
            o.iter_mut().for_each(|v| *v /= scale);
        });
}

/// `x[r] = x[r] / sqrt(mean(x[r]^2) + eps)` in place.
pub fn rms_norm_in_place(x: &mut [f32], cols: usize, eps: f32) {
    x.par_chunks_mut(cols)
        .with_min_len(grain(cols))
        .for_each(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
            let scale = (ms as f32 + eps).sqrt();
            row.iter_mut().for_each(|v| *v /= scale);
        });
}

/// `out[r] = x[r] / sqrt(mean(x[r]^2) + eps)`
pub fn rms_norm(x: &[f32], cols: usize, eps: f32, out: &mut [f32]) {
    out.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .with_min_len(grain(cols))
        .for_each(|(o, row)| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
            let scale = (ms as f32 + eps).sqrt();
            o.iter_mut().zip(row).for_each(|(o, &v)| *o = v / scale);
        });
}

/// Element-wise activation functions of the supported MLPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `0.5 x (1 + erf(x / sqrt 2))` (`nn.GELU()`, HF `gelu`).
    Gelu,
    /// The tanh approximation (HF `gelu_new`, GPT-2).
    GeluNew,
    /// `x * sigmoid(x)` (HF `silu`, Llama).
    Silu,
    Relu,
}

pub fn activation(x: &mut [f32], act: Activation) {
    if act == Activation::GeluNew {
        // Monomorphised so the rational tanh vectorises.
        x.par_chunks_mut(FLAT_GRAIN)
            .for_each(|c| c.iter_mut().for_each(|v| *v = gelu_new(*v)));
        return;
    }
    let f: fn(f32) -> f32 = match act {
        Activation::Gelu => |v| 0.5 * v * (1.0 + libm::erff(v * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluNew => gelu_new,
        Activation::Silu => |v| v / (1.0 + (-v).exp()),
        Activation::Relu => |v| v.max(0.0),
    };
    x.par_chunks_mut(FLAT_GRAIN)
        .for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
}

/// GPT-2's GELU, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
#[inline]
fn gelu_new(v: f32) -> f32 {
    // sqrt(2/pi), as TransformerLens and HF spell it.
    const C: f32 = 0.797_884_6;
    0.5 * v * (1.0 + tanh_rational(C * (v + 0.044715 * v * v * v)))
}

/// `tanh` as a branch-free minimax rational function (odd degree-13 over even
/// degree-6 polynomial, the published coefficients Eigen also uses), within 5e-7 of
/// the exact value; unlike libm's `tanhf` the loop over it vectorises. Beyond
/// |x| = 7.9 tanh is 1 in f32.
// The coefficients are kept as published, a digit beyond f32.
#[allow(clippy::excessive_precision)]
#[inline]
pub(crate) fn tanh_rational(x: f32) -> f32 {
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let p = -2.760_768_5e-16f32;
    let p = p * x2 + 2.000_187_9e-13;
    let p = p * x2 - 8.604_671_5e-11;
    let p = p * x2 + 5.122_297e-8;
    let p = p * x2 + 1.485_722_4e-5;
    let p = p * x2 + 6.372_619_3e-4;
    let p = (p * x2 + 4.893_524_6e-3) * x;
    let q = 1.198_258_4e-6f32;
    let q = q * x2 + 1.185_347_1e-4;
    let q = q * x2 + 2.268_434_6e-3;
    let q = q * x2 + 4.893_525_2e-3;
    // Near 0 the ratio loses relative precision; tanh(x) = x to f32 accuracy there.
    if x.abs() < 4e-4 {
        x
    } else {
        p / q
    }
}

/// `out[r] = table[ids[r]]`
pub fn embedding(table: &[f32], cols: usize, ids: &[u32], out: &mut [f32]) {
    out.par_chunks_mut(cols)
        .zip(ids.par_iter())
        .with_min_len(grain(cols))
        .for_each(|(o, &id)| {
            let id = id as usize;
            o.copy_from_slice(&table[id * cols..(id + 1) * cols]);
        });
}

/// Rotary position embedding in the "rotate half" layout (GPT-NeoX, Llama): in each
/// head, the first `rot_dim` features are rotated, pairing `i` with `i + rot_dim/2`.
/// Row `r` is at position `r % seq_len`; `cos`/`sin` are `[n_ctx, rot_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn rotary(
    x: &mut [f32],
    n_heads: usize,
    d_head: usize,
    rot_dim: usize,
    seq_len: usize,
    cos: &[f32],
    sin: &[f32],
) {
    let cols = n_heads * d_head;
    let half = rot_dim / 2;
    x.par_chunks_mut(cols)
        .enumerate()
        .with_min_len(grain(cols))
        .for_each(|(r, row)| {
            let p = r % seq_len;
            let c = &cos[p * rot_dim..(p + 1) * rot_dim];
            let s = &sin[p * rot_dim..(p + 1) * rot_dim];
            for head in row.chunks_mut(d_head) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * c[i] - b * s[i];
                    head[i + half] = b * c[i + half] + a * s[i + half];
                }
            }
        });
}

/// Shape of one attention call: `n_seq` sequences of `seq_len` positions; q is
/// `[n_seq*seq_len, n_heads*d_head]`, k and v `[.., n_kv_heads*d_head]`.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_seq: usize,
    pub seq_len: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_head: usize,
    /// Sliding window: query `i` sees keys `i + 1 - w ..= i` only.
    pub window: Option<usize>,
    /// Gemma 2's soft-capping of the scaled scores: `c·tanh(s/c)`, before the mask.
    pub softcap: Option<f32>,
}

impl AttnShape {
    fn kv_head(&self, h: usize) -> usize {
        h / (self.n_heads / self.n_kv_heads)
    }
    /// First key position query `i` may attend to.
    fn first_key(&self, i: usize) -> usize {
        match self.window {
            Some(w) => (i + 1).saturating_sub(w),
            None => 0,
        }
    }
}

/// Scores `q·k * scale` (soft-capped if asked) for the key positions query `i` sees into
/// `s[..=i]`, `-inf` before the window.
#[allow(clippy::too_many_arguments)]
fn score_row(
    q: &[f32],
    k: &[f32],
    sh: &AttnShape,
    seq: usize,
    h: usize,
    i: usize,
    scale: f32,
    s: &mut [f32],
) {
    let (qc, kc, dh) = (sh.n_heads * sh.d_head, sh.n_kv_heads * sh.d_head, sh.d_head);
    let g = sh.kv_head(h);
    let qr = &q[(seq * sh.seq_len + i) * qc + h * dh..][..dh];
    let lo = sh.first_key(i);
    s[..lo].fill(f32::NEG_INFINITY);
    for (j, sj) in s[..=i].iter_mut().enumerate().skip(lo) {
        let kr = &k[(seq * sh.seq_len + j) * kc + g * dh..][..dh];
        let x = dot(qr, kr) * scale;
        *sj = match sh.softcap {
            // libm's tanhf: the scores are few next to the GEMMs, and exact matters here.
            Some(c) => c * libm::tanhf(x / c),
            None => x,
        };
    }
}

/// In-place softmax of `s[..n]`; entries past `n` are set to zero.
fn softmax_prefix(s: &mut [f32], n: usize) {
    let max = s[..n].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        // Every score masked: PyTorch gives NaN, which TransformerLens turns into 0.
        s.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for v in &mut s[..n] {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in &mut s[..n] {
        *v /= sum;
    }
    s[n..].fill(0.0);
}

/// `z_i += sum_j p_j v_j` for one query row of one head.
fn apply_row(p: &[f32], v: &[f32], sh: &AttnShape, seq: usize, h: usize, z: &mut [f32]) {
    let (kc, dh) = (sh.n_kv_heads * sh.d_head, sh.d_head);
    let g = sh.kv_head(h);
    z.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        if pj == 0.0 {
            continue;
        }
        let vr = &v[(seq * sh.seq_len + j) * kc + g * dh..][..dh];
        z.iter_mut().zip(vr).for_each(|(z, v)| *z += pj * v);
    }
}

/// Query rows per block of the fused attention: the block's scores, `[QB, keys]`, stay
/// in cache, and each block is two small GEMMs.
const QB: usize = 64;

/// `dst = lhs @ rhs` on strided views, on the calling thread. Shapes `[m, k] @ [k, n]`;
/// each operand is given as (pointer, row stride, column stride).
///
/// # Safety
/// Every address the shapes and strides name must be valid, and `dst`'s must not
/// be written by anyone else meanwhile.
unsafe fn gemm_view(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        1,
        dst.1,
        false,
        lhs.0,
        lhs.2,
        lhs.1,
        rhs.0,
        rhs.2,
        rhs.1,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Fused causal attention: `z = softmax(mask(cap(q k^T * scale))) v` per sequence and
/// head. Sequence-heads run in parallel; each takes its queries `QB` at a time, the
/// scores of a block against the keys it may see as one GEMM and `p @ v` as another,
/// so no `[seq_len, seq_len]` matrix is held and one long sequence uses every core.
pub fn causal_attention(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape, scale: f32, z: &mut [f32]) {
    let (t, dh) = (sh.seq_len, sh.d_head);
    let (qc, kc) = (sh.n_heads * dh, sh.n_kv_heads * dh);
    assert!(q.len() == sh.n_seq * t * qc && z.len() == q.len());
    assert!(k.len() == sh.n_seq * t * kc && v.len() == k.len());
    let zp = SharedMut(z.as_mut_ptr());
    (0..sh.n_seq * sh.n_heads).into_par_iter().for_each_init(
        || (vec![0f32; QB * t], vec![0f32; dh * t]),
        |(s, kt), task| {
            let (seq, h) = (task / sh.n_heads, task % sh.n_heads);
            let g = sh.kv_head(h);
            let q0 = seq * t * qc + h * dh;
            let k0 = seq * t * kc + g * dh;
            // This head's keys as `[d_head, seq_len]`: the GEMM packs a right operand
            // read along its rows several times faster than one read across them.
            for (j, row) in k[k0..].chunks(kc).take(t).enumerate() {
                for (e, &x) in row[..dh].iter().enumerate() {
                    kt[e * t + j] = x;
                }
            }
            for i0 in (0..t).step_by(QB) {
                let i1 = (i0 + QB).min(t);
                let lo = sh.first_key(i0);
                let nk = i1 - lo;
                let sb = &mut s[..(i1 - i0) * nk];
                // SAFETY: q rows i0..i1 of this sequence and head lie inside q
                // (asserted length), columns lo..i1 of kt inside kt; sb holds
                // (i1-i0) x nk.
                unsafe {
                    gemm_view(
                        i1 - i0,
                        nk,
                        dh,
                        (sb.as_mut_ptr(), nk as isize),
                        (q.as_ptr().add(q0 + i0 * qc), qc as isize, 1),
                        (kt.as_ptr().add(lo), t as isize, 1),
                    );
                }
                for (r, row) in sb.chunks_mut(nk).enumerate() {
                    let i = i0 + r;
                    let (first, last) = (sh.first_key(i) - lo, i - lo);
                    for x in &mut row[first..=last] {
                        let y = *x * scale;
                        *x = match sh.softcap {
                            // libm's tanhf: exact matters here, and the GEMMs dominate.
                            Some(c) => c * libm::tanhf(y / c),
                            None => y,
                        };
                    }
                    row[..first].fill(f32::NEG_INFINITY);
                    softmax_prefix(row, last + 1);
                }
                // SAFETY: this task alone writes z's rows i0..i1 of its sequence in
                // columns h*dh..(h+1)*dh; v rows lo..i1 lie inside v.
                unsafe {
                    gemm_view(
                        i1 - i0,
                        dh,
                        nk,
                        (zp.at(q0 + i0 * qc), qc as isize),
                        (sb.as_ptr(), nk as isize, 1),
                        (v.as_ptr().add(k0 + lo * kc), kc as isize, 1),
                    );
                }
            }
        },
    );
}

/// Attention scores in TransformerLens's layout `[n_seq, n_heads, q_pos, k_pos]`
/// (as rows `[n_seq*n_heads*seq_len, seq_len]`), `-inf` above the diagonal and before
/// the sliding window.
pub fn attention_scores(q: &[f32], k: &[f32], sh: AttnShape, scale: f32, out: &mut [f32]) {
    let t = sh.seq_len;
    out.par_chunks_mut(t * t)
        .enumerate()
        .for_each(|(sh_idx, block)| {
            let (seq, h) = (sh_idx / sh.n_heads, sh_idx % sh.n_heads);
            for (i, row) in block.chunks_mut(t).enumerate() {
                score_row(q, k, &sh, seq, h, i, scale, row);
                row[i + 1..].fill(f32::NEG_INFINITY);
            }
        });
}

/// Row-wise softmax of scores where row `r` may attend to columns `0..=r % seq_len`.
pub fn causal_softmax(scores: &[f32], seq_len: usize, out: &mut [f32]) {
    out.par_chunks_mut(seq_len)
        .zip(scores.par_chunks(seq_len))
        .enumerate()
        .with_min_len(grain(seq_len))
        .for_each(|(r, (o, s))| {
            o.copy_from_slice(s);
            softmax_prefix(o, r % seq_len + 1);
        });
}

/// `z = pattern @ v` per sequence and head; pattern in the layout of `attention_scores`.
pub fn attention_apply(pattern: &[f32], v: &[f32], sh: AttnShape, z: &mut [f32]) {
    let (t, qc, dh) = (sh.seq_len, sh.n_heads * sh.d_head, sh.d_head);
    z.par_chunks_mut(t * qc).enumerate().for_each(|(seq, zs)| {
        for h in 0..sh.n_heads {
            let block = &pattern[(seq * sh.n_heads + h) * t * t..][..t * t];
            for i in 0..t {
                let p = &block[i * t..(i + 1) * t];
                apply_row(p, v, &sh, seq, h, &mut zs[i * qc + h * dh..][..dh]);
            }
        }
    });
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// `out[r] = logsumexp(logits[r]) - logits[r, targets[r]]` (next-token cross-entropy).
pub fn cross_entropy(logits: &[f32], cols: usize, targets: &[u32], out: &mut [f32]) {
    out.par_iter_mut()
        .zip(logits.par_chunks(cols))
        .zip(targets.par_iter())
        .for_each(|((o, row), &t)| *o = (log_sum_exp(row) - row[t as usize] as f64) as f32);
}

/// `out[r] = KL(softmax(p[r]) || softmax(q[r]))` (`F.kl_div(log_softmax(q), softmax(p))` summed).
pub fn kl_div(p: &[f32], q: &[f32], cols: usize, out: &mut [f32]) {
    out.par_iter_mut()
        .zip(p.par_chunks(cols).zip(q.par_chunks(cols)))
        .for_each(|(o, (p, q))| {
            let (lp, lq) = (log_sum_exp(p), log_sum_exp(q));
            let kl: f64 = p
                .iter()
                .zip(q)
                .map(|(&a, &b)| {
                    let log_pa = a as f64 - lp;
                    let pa = log_pa.exp();
                    if pa == 0.0 {
                        0.0
                    } else {
                        pa * (log_pa - (b as f64 - lq))
                    }
                })
                .sum();
            *o = kl as f32;
        });
}

/// `dst[:, start..start + src_cols] = src`
pub fn set_cols(dst: &mut [f32], dst_cols: usize, start: usize, src: &[f32], src_cols: usize) {
    dst.par_chunks_mut(dst_cols)
        .zip(src.par_chunks(src_cols))
        .with_min_len(grain(dst_cols))
        .for_each(|(d, s)| d[start..start + src_cols].copy_from_slice(s));
}

/// `dst[r, :] = src[r, :]` where `take[r]`
pub fn select_rows(dst: &mut [f32], src: &[f32], cols: usize, take: &[bool]) {
    dst.par_chunks_mut(cols)
        .zip(src.par_chunks(cols))
        .zip(take.par_iter())
        .with_min_len(grain(cols))
        .for_each(|((d, s), &t)| {
            if t {
                d.copy_from_slice(s)
            }
        });
}

#[cfg(test)]
mod tests {
    #[test]
    fn rational_tanh_is_within_5e7_of_exact() {
        let mut worst = 0f64;
        for i in -2_000_000..=2_000_000 {
            let x = i as f32 * 6e-6;
            let err = (super::tanh_rational(x) as f64 - (x as f64).tanh()).abs();
            worst = worst.max(err);
        }
        for x in [-50.0f32, -9.0, -7.9, 7.9, 9.0, 50.0, 1e-30, -1e-30, 0.0] {
            let err = (super::tanh_rational(x) as f64 - (x as f64).tanh()).abs();
            worst = worst.max(err);
        }
        assert!(worst < 5e-7, "max |tanh error| {worst:e}");
    }
}
