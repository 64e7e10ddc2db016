//! CPU backend: `gemm` for matrix products, rayon for row-parallel loops.
//!
//! Every function here works on plain slices with explicit dimensions; `ops` checks
//! shapes and dispatches. Reductions accumulate in `f64` so that results do not depend
//! on how rows are split across threads beyond the last bit.

use rayon::prelude::*;

/// Rows per rayon task so that small matrices do not pay for splitting.
fn grain(cols: usize) -> usize {
    (8192 / cols.max(1)).max(1)
}

/// Elements per rayon task for flat elementwise loops.
pub(crate) const FLAT_GRAIN: usize = 16 * 1024;

/// `out = beta*out + alpha*op(a)@op(b)` for row-major storage.
/// `a` is `[m, k]` after the optional transpose, `b` is `[k, n]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    alpha: f32,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        scale(out, beta);
        return;
    }
    // Row-major [m, k]: row stride k, col stride 1. Transposed storage [k, m]: row
    // stride 1, col stride m.
    let (a_rs, a_cs) = if trans_a {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    // SAFETY: the slices hold m*k, k*n and m*n elements (checked by `ops`), and the
    // strides above address exactly those elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

pub fn fill(x: &mut [f32], v: f32) {
    x.par_chunks_mut(FLAT_GRAIN).for_each(|c| c.fill(v));
}

pub fn scale(x: &mut [f32], s: f32) {
    if s == 0.0 {
        return fill(x, 0.0);
    }
    x.par_chunks_mut(FLAT_GRAIN)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    y.par_chunks_mut(FLAT_GRAIN)
        .zip(x.par_chunks(FLAT_GRAIN))
        .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x));
}

pub fn mul(y: &mut [f32], x: &[f32]) {
    y.par_chunks_mut(FLAT_GRAIN)
        .zip(x.par_chunks(FLAT_GRAIN))
        .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, x)| *y *= x));
}

pub fn exp(x: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(FLAT_GRAIN)
        .zip(x.par_chunks(FLAT_GRAIN))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, x)| *o = x.exp()));
}

/// `x[r, :] += alpha * v`
pub fn add_row_vec(x: &mut [f32], cols: usize, v: &[f32], alpha: f32) {
    x.par_chunks_mut(cols)
        .with_min_len(grain(cols))
        .for_each(|row| {
            row.iter_mut().zip(v).for_each(|(x, v)| *x += alpha * v);
        });
}

/// `x[r, j] = x[r, j] * scale[j] + shift[j]`, rounded after each operation: the bits
/// of [`mul_row_vec`] then [`add_row_vec`] with `alpha` 1, in one pass.
pub fn scale_shift_cols(x: &mut [f32], cols: usize, scale: &[f32], shift: &[f32]) {
    #[inline(always)]
    fn body(row: &mut [f32], scale: &[f32], shift: &[f32]) {
        for ((x, s), b) in row.iter_mut().zip(scale).zip(shift) {
            *x = *x * s + b;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn body_avx512(row: &mut [f32], scale: &[f32], shift: &[f32]) {
        body(row, scale, shift)
    }
    x.par_chunks_mut(cols)
        .with_min_len(grain(cols))
        .for_each(|row| {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: the CPU has AVX-512F (checked above).
                return unsafe { body_avx512(row, scale, shift) };
            }
            body(row, scale, shift)
        });
}

/// `x[r, j] *= v[j]`
pub fn mul_row_vec(x: &mut [f32], cols: usize, v: &[f32]) {
    x.par_chunks_mut(cols)
        .with_min_len(grain(cols))
        .for_each(|row| {
            row.iter_mut().zip(v).for_each(|(x, v)| *x *= v);
        });
}

/// `x[r, :] = x[r, :] * scale[r] + shift[r]`
pub fn row_affine(x: &mut [f32], cols: usize, scale: &[f32], shift: &[f32]) {
    x.par_chunks_mut(cols)
        .with_min_len(grain(cols))
        .zip(scale.par_iter().zip(shift.par_iter()))
        .for_each(|(row, (s, b))| row.iter_mut().for_each(|x| *x = *x * s + b));
}

/// `out = beta*out + alpha * sum_r x[r, :]`
pub fn col_sums(x: &[f32], cols: usize, out: &mut [f32], alpha: f32, beta: f32) {
    let acc = col_sums_f64(x, cols);
    out.iter_mut().zip(acc).for_each(|(o, s)| {
        let base = if beta == 0.0 { 0.0 } else { beta * *o };
        *o = base + alpha * s as f32;
    });
}

fn col_sums_f64(x: &[f32], cols: usize) -> Vec<f64> {
    if cols == 0 {
        return Vec::new();
    }
    let parts = x
        .par_chunks(cols)
        .fold_chunks(
            BLOCK_ROWS,
            || vec![0f64; cols],
            |mut acc, row| {
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
                acc
            },
        )
        .collect::<Vec<_>>();
    sum_in_order(parts, cols)
}

/// `out[r] = ||x[r, :]||_2`
pub fn row_norms(x: &[f32], cols: usize, out: &mut [f32]) {
    out.par_iter_mut()
        .zip(x.par_chunks(cols))
        .with_min_len(grain(cols))
        .for_each(|(o, row)| {
            *o = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32;
        });
}

/// Per-row mean and unbiased standard deviation (torch's `x.std(dim=-1)`).
pub fn row_mean_std(x: &[f32], cols: usize, mean: &mut [f32], std: &mut [f32]) {
    mean.par_iter_mut()
        .zip(std.par_iter_mut())
        .zip(x.par_chunks(cols))
        .with_min_len(grain(cols))
        .for_each(|((m, s), row)| {
            let mu = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let ss: f64 = row.iter().map(|&v| (v as f64 - mu).powi(2)).sum();
            *m = mu as f32;
            *s = (ss / (cols as f64 - 1.0)).sqrt() as f32;
        });
}

/// `out[r] = ||x[r, :] - mean_r(x)||_2` (the row norms of the batch-centred matrix).
pub fn centered_row_norms(x: &[f32], cols: usize, out: &mut [f32]) {
    let rows = x.len() / cols.max(1);
    let mean: Vec<f32> = col_sums_f64(x, cols)
        .into_iter()
        .map(|s| (s / rows as f64) as f32)
        .collect();
    out.par_iter_mut()
        .zip(x.par_chunks(cols))
        .with_min_len(grain(cols))
        .for_each(|(o, row)| {
            *o = row
                .iter()
                .zip(&mean)
                .map(|(&v, &m)| ((v - m) as f64).powi(2))
                .sum::<f64>()
                .sqrt() as f32;
        });
}

/// `out[r] = a[r, :] . b[r, :]`
pub fn row_dots(a: &[f32], b: &[f32], cols: usize, out: &mut [f32]) {
    out.par_iter_mut()
        .zip(a.par_chunks(cols).zip(b.par_chunks(cols)))
        .with_min_len(grain(cols))
        .for_each(|(o, (a, b))| {
            *o = a
                .iter()
                .zip(b)
                .map(|(&x, &y)| x as f64 * y as f64)
                .sum::<f64>() as f32;
        });
}

/// `dst[j, :] += c[j] * src[j, :]`
pub fn add_scaled_rows(dst: &mut [f32], src: &[f32], cols: usize, c: &[f32]) {
    dst.par_chunks_mut(cols)
        .zip(src.par_chunks(cols))
        .zip(c.par_iter())
        .with_min_len(grain(cols))
        .for_each(|((d, s), &c)| {
            if c != 0.0 {
                d.iter_mut().zip(s).for_each(|(d, s)| *d += c * s);
            }
        });
}

/// Parallel sums below collect per-chunk partial sums and add them in order, for the
/// same reason as [`BLOCK_ROWS`].
pub fn sum(x: &[f32]) -> f64 {
    x.par_chunks(FLAT_GRAIN)
        .map(|c| c.iter().map(|&v| v as f64).sum::<f64>())
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}

pub fn sum_squares(x: &[f32]) -> f64 {
    x.par_chunks(FLAT_GRAIN)
        .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>())
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}

pub fn relu(h: &[f32], f: &mut [f32]) {
    f.par_chunks_mut(FLAT_GRAIN)
        .zip(h.par_chunks(FLAT_GRAIN))
        .for_each(|(f, h)| f.iter_mut().zip(h).for_each(|(f, &h)| *f = h.max(0.0)));
}

/// Gated latents from gate pre-activations: `f = ReLU(g * e[j] + shift[j])` where
/// `g > 0`, else 0 (the bits of `scale_shift_cols`, `relu` and `mask_positive`).
pub fn gated_latents(g: &[f32], cols: usize, e: &[f32], shift: &[f32], f: &mut [f32]) {
    f.par_chunks_mut(cols)
        .zip(g.par_chunks(cols))
        .with_min_len(grain(cols))
        .for_each(|(f, g)| {
            for (((f, &g), &e), &t) in f.iter_mut().zip(g).zip(e).zip(shift) {
                *f = if g > 0.0 { (g * e + t).max(0.0) } else { 0.0 };
            }
        });
}

/// `dh = df * (h > 0)`
pub fn relu_backward(h: &[f32], df: &[f32], dh: &mut [f32]) {
    dh.par_chunks_mut(FLAT_GRAIN)
        .zip(h.par_chunks(FLAT_GRAIN).zip(df.par_chunks(FLAT_GRAIN)))
        .for_each(|(dh, (h, df))| {
            for ((d, &h), &g) in dh.iter_mut().zip(h).zip(df) {
                *d = if h > 0.0 { g } else { 0.0 };
            }
        });
}

/// `x *= (g > 0)`
pub fn mask_positive(x: &mut [f32], g: &[f32]) {
    x.par_chunks_mut(FLAT_GRAIN)
        .zip(g.par_chunks(FLAT_GRAIN))
        .for_each(|(x, g)| {
            for (x, &g) in x.iter_mut().zip(g) {
                if g <= 0.0 || g.is_nan() {
                    *x = 0.0;
                }
            }
        });
}

/// `f = h * (h > t[j])`
pub fn jumprelu(h: &[f32], cols: usize, t: &[f32], f: &mut [f32]) {
    f.par_chunks_mut(cols)
        .zip(h.par_chunks(cols))
        .with_min_len(grain(cols))
        .for_each(|(f, h)| {
            for ((f, &h), &t) in f.iter_mut().zip(h).zip(t) {
                *f = if h > t { h } else { 0.0 };
            }
        });
}

/// The rectangle kernel of the JumpReLU straight-through estimator.
#[inline]
fn rectangle(x: f32) -> f32 {
    if x > -0.5 && x < 0.5 {
        1.0
    } else {
        0.0
    }
}

/// One entry of [`jumprelu_backward`]: what it adds to `dh` and to `dt`.
#[inline(always)]
fn jumprelu_grad(h: f32, t: f32, df: f32, bandwidth: f32, ste_to_input: bool) -> (f32, f64) {
    let ste = (t / bandwidth) * rectangle((h - t) / bandwidth) * df;
    let mut d = if h > t { df } else { 0.0 };
    if ste_to_input {
        d += ste;
    }
    (d, -(ste as f64))
}

/// One entry of [`step_backward`]: what it adds to `dh` and to `dt`.
#[inline(always)]
fn step_grad(h: f32, t: f32, g: f32, bandwidth: f32, ste_to_input: bool) -> (f32, f64) {
    let ste = (1.0 / bandwidth) * rectangle((h - t) / bandwidth) * g;
    (if ste_to_input { ste } else { 0.0 }, -(ste as f64))
}

/// One entry of [`tanh_sparsity`]: its term, what it adds to `df` and to `dn`.
#[inline(always)]
fn tanh_grad(f: f32, n: f32, s: f32, c: f32) -> (f64, f32, f64) {
    let th = (s * f * n).tanh();
    let du = c * (1.0 - th * th);
    (th as f64, du * s * n, (du * s * f) as f64)
}

/// Backward of `f = h*(h>t)`: `dh += df*(h>t)` (+ the STE term when `ste_to_input`),
/// `dt[j] -= sum_r (t/bw) rect((h-t)/bw) df`.
#[allow(clippy::too_many_arguments)]
pub fn jumprelu_backward(
    h: &[f32],
    cols: usize,
    t: &[f32],
    df: &[f32],
    bandwidth: f32,
    ste_to_input: bool,
    dh: &mut [f32],
    dt: &mut [f32],
) {
    let rows = dh
        .par_chunks_mut(cols)
        .zip(h.par_chunks(cols).zip(df.par_chunks(cols)));
    add_col_folds(dt, rows, |(dh, (h, df)), acc| {
        for j in 0..acc.len() {
            let (d, a) = jumprelu_grad(h[j], t[j], df[j], bandwidth, ste_to_input);
            dh[j] += d;
            acc[j] += a;
        }
    });
}

/// [`jumprelu_backward`] into a zero `dh` that is `df`'s own buffer: `d` goes in as
/// `df` and comes out as `dh`, with the bits of `0 + dh`.
pub fn jumprelu_backward_in_place(
    h: &[f32],
    cols: usize,
    t: &[f32],
    d: &mut [f32],
    bandwidth: f32,
    ste_to_input: bool,
    dt: &mut [f32],
) {
    let rows = d.par_chunks_mut(cols).zip(h.par_chunks(cols));
    add_col_folds(dt, rows, |(d, h), acc| {
        for j in 0..acc.len() {
            let (g, a) = jumprelu_grad(h[j], t[j], d[j], bandwidth, ste_to_input);
            d[j] = 0.0 + g;
            acc[j] += a;
        }
    });
}

/// Rows per block of a reduction. Blocks are fixed and combined in order, so every
/// reduction gives the same bits whatever the thread count or scheduling (exact resume
/// of a training run depends on it).
const BLOCK_ROWS: usize = 64;

/// `out[j] += sum_r a[r, j]`, where `body(row, acc)` adds row `r`'s terms to `acc`
/// (`out.len()` of them): the rows in fixed blocks of [`BLOCK_ROWS`], each block
/// summed in f64 and the blocks added in order.
fn add_col_folds<I: IndexedParallelIterator>(
    out: &mut [f32],
    rows: I,
    body: impl Fn(I::Item, &mut [f64]) + Sync + Send,
) {
    let cols = out.len();
    let parts = rows
        .fold_chunks(
            BLOCK_ROWS,
            || vec![0f64; cols],
            |mut acc, row| {
                body(row, &mut acc);
                acc
            },
        )
        .collect::<Vec<_>>();
    let acc = sum_in_order(parts, cols);
    out.iter_mut().zip(acc).for_each(|(o, a)| *o += a as f32);
}

/// Adds per-block column accumulators in block order.
fn sum_in_order(parts: Vec<Vec<f64>>, cols: usize) -> Vec<f64> {
    let mut out = vec![0f64; cols];
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
    out
}

/// `out[r] = #{j : h[r,j] > t[j]}`
pub fn step_count_rows(h: &[f32], cols: usize, t: &[f32], out: &mut [f32]) {
    out.par_iter_mut()
        .zip(h.par_chunks(cols))
        .with_min_len(grain(cols))
        .for_each(|(o, h)| *o = h.iter().zip(t).filter(|(h, t)| h > t).count() as f32);
}

/// Backward of the Heaviside step `(h > t)` with upstream gradient `g[r]` per row:
/// `ste = (1/bw) rect((h-t)/bw) g[r]`; `dt[j] -= sum_r ste`; `dh += ste` if asked.
#[allow(clippy::too_many_arguments)]
pub fn step_backward(
    h: &[f32],
    cols: usize,
    t: &[f32],
    g: &[f32],
    bandwidth: f32,
    ste_to_input: bool,
    dh: &mut [f32],
    dt: &mut [f32],
) {
    let rows = dh
        .par_chunks_mut(cols)
        .zip(h.par_chunks(cols).zip(g.par_iter()));
    add_col_folds(dt, rows, |(dh, (h, &g)), acc| {
        for j in 0..acc.len() {
            let (d, a) = step_grad(h[j], t[j], g, bandwidth, ste_to_input);
            dh[j] += d;
            acc[j] += a;
        }
    });
}

/// [`step_backward`] without the input's gradient (`ste_to_input` false): `dt` only.
pub fn step_backward_threshold(
    h: &[f32],
    cols: usize,
    t: &[f32],
    g: &[f32],
    bandwidth: f32,
    dt: &mut [f32],
) {
    let rows = h.par_chunks(cols).zip(g.par_iter());
    add_col_folds(dt, rows, |(h, &g), acc| {
        for j in 0..acc.len() {
            acc[j] += step_grad(h[j], t[j], g, bandwidth, false).1;
        }
    });
}

/// `sum_r sum_j tanh(s f n_j)`; adds `c s n_j (1 - tanh^2)` to `df` and
/// `c s f (1 - tanh^2)` summed over rows to `dn`.
pub fn tanh_sparsity(
    f: &[f32],
    cols: usize,
    n: &[f32],
    s: f32,
    c: f32,
    df: &mut [f32],
    dn: &mut [f32],
) -> f64 {
    let parts = df
        .par_chunks_mut(cols)
        .zip(f.par_chunks(cols))
        .fold_chunks(
            BLOCK_ROWS,
            || (0f64, vec![0f64; cols]),
            |(mut tot, mut acc), (df, f)| {
                for j in 0..cols {
                    let (th, d, a) = tanh_grad(f[j], n[j], s, c);
                    tot += th;
                    df[j] += d;
                    acc[j] += a;
                }
                (tot, acc)
            },
        )
        .collect::<Vec<_>>();
    let total: f64 = parts.iter().map(|p| p.0).sum();
    let acc = sum_in_order(parts.into_iter().map(|p| p.1).collect(), cols);
    dn.iter_mut().zip(acc).for_each(|(d, a)| *d += a as f32);
    total
}

/// `sum_r ||f_r * n||_p` (n = 1 when absent). Adds `c * d/df` to `df` and, when `n`
/// is given, `c * d/dn` to `dn`. The gradient of a zero-norm row is zero (as torch).
#[allow(clippy::too_many_arguments)]
pub fn lp_sparsity(
    f: &[f32],
    cols: usize,
    n: Option<&[f32]>,
    p: f32,
    c: f32,
    df: Option<&mut [f32]>,
    dn: Option<&mut [f32]>,
) -> f64 {
    let nj = |j: usize| n.map_or(1.0, |n| n[j]);
    let norm_of = |row: &[f32]| -> f64 {
        if p == 1.0 {
            row.iter()
                .enumerate()
                .map(|(j, &v)| (v * nj(j)).abs() as f64)
                .sum()
        } else if p == 2.0 {
            row.iter()
                .enumerate()
                .map(|(j, &v)| ((v * nj(j)) as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        } else {
            row.iter()
                .enumerate()
                .map(|(j, &v)| ((v * nj(j)).abs() as f64).powf(p as f64))
                .sum::<f64>()
                .powf(1.0 / p as f64)
        }
    };
    // The L1 gradient needs no norms: with it, each row's norm is taken in the
    // gradient's pass (while the row is in cache), not in a pass of its own.
    let fused = p == 1.0 && df.is_some();
    let mut norms: Vec<f64> = match fused {
        true => vec![0.0; f.len() / cols.max(1)],
        false => f
            .par_chunks(cols)
            .with_min_len(grain(cols))
            .map(norm_of)
            .collect(),
    };
    let Some(df) = df else {
        return norms.iter().sum();
    };
    // d||w||_p / dw_j = sign(w_j) |w_j|^(p-1) / ||w||_p^(p-1)
    let acc = df
        .par_chunks_mut(cols)
        .zip(f.par_chunks(cols).zip(norms.par_iter_mut()))
        .fold_chunks(
            BLOCK_ROWS,
            || vec![0f64; cols],
            |mut acc, (df, (f, norm))| {
                if fused {
                    *norm = norm_of(f);
                }
                let norm = *norm;
                if norm == 0.0 && p != 1.0 {
                    return acc;
                }
                for j in 0..cols {
                    let w = f[j] * nj(j);
                    let dw = if p == 1.0 {
                        w.signum() * (w != 0.0) as i32 as f32
                    } else {
                        (w.signum() as f64 * (w.abs() as f64).powf(p as f64 - 1.0)
                            / norm.powf(p as f64 - 1.0)) as f32
                    };
                    let g = c * dw;
                    df[j] += g * nj(j);
                    acc[j] += (g * f[j]) as f64;
                }
                acc
            },
        )
        .collect::<Vec<_>>();
    let acc = sum_in_order(acc, cols);
    if let Some(dn) = dn {
        dn.iter_mut().zip(acc).for_each(|(d, a)| *d += a as f32);
    }
    norms.iter().sum()
}

/// Anthropic's pre-activation loss on dead latents:
/// `sum_r sum_j relu(t_j - h_rj) dead_j n_j`, with `c`-scaled gradients added to
/// `dh`, `dt` and `dn`.
#[allow(clippy::too_many_arguments)]
pub fn pre_act_loss(
    h: &[f32],
    cols: usize,
    t: &[f32],
    dead: &[f32],
    n: &[f32],
    c: f32,
    dh: &mut [f32],
    dt: &mut [f32],
    dn: &mut [f32],
) -> f64 {
    let parts = dh
        .par_chunks_mut(cols)
        .zip(h.par_chunks(cols))
        .fold_chunks(
            BLOCK_ROWS,
            || (0f64, vec![0f64; cols], vec![0f64; cols]),
            |(mut tot, mut at, mut an), (dh, h)| {
                for j in 0..cols {
                    if dead[j] == 0.0 {
                        continue;
                    }
                    let u = t[j] - h[j];
                    if u > 0.0 {
                        tot += (u * dead[j] * n[j]) as f64;
                        let g = c * dead[j] * n[j];
                        dh[j] -= g;
                        at[j] += g as f64;
                        an[j] += (c * u * dead[j]) as f64;
                    }
                }
                (tot, at, an)
            },
        )
        .collect::<Vec<_>>();
    let total: f64 = parts.iter().map(|p| p.0).sum();
    let (ts, ns): (Vec<_>, Vec<_>) = parts.into_iter().map(|p| (p.1, p.2)).unzip();
    let (acc_t, acc_n) = (sum_in_order(ts, cols), sum_in_order(ns, cols));
    dt.iter_mut().zip(acc_t).for_each(|(d, a)| *d += a as f32);
    dn.iter_mut().zip(acc_n).for_each(|(d, a)| *d += a as f32);
    total
}

/// `sum_r w_r sum_j (p - t)^2`; optionally writes `grad = gscale * 2 w_r (p - t)`.
pub fn mse(
    pred: &[f32],
    target: &[f32],
    cols: usize,
    row_w: Option<&[f32]>,
    grad: Option<(&mut [f32], f32)>,
) -> f64 {
    let w = |r: usize| row_w.map_or(1.0, |w| w[r]);
    match grad {
        None => pred
            .par_chunks(cols)
            .zip(target.par_chunks(cols))
            .enumerate()
            .with_min_len(grain(cols))
            .map(|(r, (p, t))| {
                let s: f64 = p.iter().zip(t).map(|(p, t)| ((p - t) as f64).powi(2)).sum();
                s * w(r) as f64
            })
            .collect::<Vec<f64>>()
            .iter()
            .sum(),
        Some((g, gscale)) => g
            .par_chunks_mut(cols)
            .zip(pred.par_chunks(cols).zip(target.par_chunks(cols)))
            .enumerate()
            .with_min_len(grain(cols))
            .map(|(r, (g, (p, t)))| {
                let wr = w(r);
                let mut s = 0f64;
                for ((g, p), t) in g.iter_mut().zip(p).zip(t) {
                    let d = p - t;
                    s += (d as f64).powi(2);
                    *g = gscale * 2.0 * wr * d;
                }
                s * wr as f64
            })
            .collect::<Vec<f64>>()
            .iter()
            .sum(),
    }
}

/// `sum w * (p - t)^2` element-wise; optionally writes `grad = gscale * 2 w (p - t)`.
pub fn weighted_sq_err(
    pred: &[f32],
    target: &[f32],
    weight: &[f32],
    grad: Option<(&mut [f32], f32)>,
) -> f64 {
    match grad {
        None => pred
            .par_chunks(FLAT_GRAIN)
            .zip(
                target
                    .par_chunks(FLAT_GRAIN)
                    .zip(weight.par_chunks(FLAT_GRAIN)),
            )
            .map(|(p, (t, w))| {
                p.iter()
                    .zip(t)
                    .zip(w)
                    .map(|((p, t), w)| (w * (p - t) * (p - t)) as f64)
                    .sum::<f64>()
            })
            .collect::<Vec<f64>>()
            .iter()
            .sum(),
        Some((g, gscale)) => g
            .par_chunks_mut(FLAT_GRAIN)
            .zip(
                pred.par_chunks(FLAT_GRAIN).zip(
                    target
                        .par_chunks(FLAT_GRAIN)
                        .zip(weight.par_chunks(FLAT_GRAIN)),
                ),
            )
            .map(|(g, (p, (t, w)))| {
                let mut s = 0f64;
                for (((g, p), t), w) in g.iter_mut().zip(p).zip(t).zip(w) {
                    let d = p - t;
                    s += (w * d * d) as f64;
                    *g = gscale * 2.0 * w * d;
                }
                s
            })
            .collect::<Vec<f64>>()
            .iter()
            .sum(),
    }
}

/// torch's single-tensor Adam update, element for element (same operation order).
#[allow(clippy::too_many_arguments)]
pub fn adam(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: u64,
) {
    let bc1 = 1.0 - beta1.powi(step as i32);
    let bc2 = 1.0 - beta2.powi(step as i32);
    let step_size = (lr / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let k = AdamConsts {
        w: (1.0 - beta1) as f32,
        b2: beta2 as f32,
        one_minus_b2: (1.0 - beta2) as f32,
        eps: eps as f32,
        step_size,
        bc2_sqrt,
    };
    param
        .par_chunks_mut(FLAT_GRAIN)
        .zip(grad.par_chunks(FLAT_GRAIN))
        .zip(
            m.par_chunks_mut(FLAT_GRAIN)
                .zip(v.par_chunks_mut(FLAT_GRAIN)),
        )
        .for_each(|((p, g), (m, v))| {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: the CPU has AVX-512F (checked above).
                return unsafe { adam_avx512(p, g, m, v, &k) };
            }
            adam_body(p, g, m, v, &k)
        });
}

/// Adam's per-step constants in f32.
struct AdamConsts {
    w: f32,
    b2: f32,
    one_minus_b2: f32,
    eps: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

// Adam is the step's largest element-wise pass (four reads and three writes per
// parameter, a square root and a division). Its operations are exact IEEE ones, so the
// AVX-512 build gives the same bits as the baseline one (measured 40 -> 14 ms for
// 768 x 24576 on 2 cores).
#[inline(always)]
fn adam_body(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamConsts) {
    let lerp_low = k.w.abs() < 0.5;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        // lerp(m, g, w): torch switches formula at |w| = 0.5
        *m = if lerp_low {
            *m + k.w * (g - *m)
        } else {
            g - (g - *m) * (1.0 - k.w)
        };
        *v = *v * k.b2 + k.one_minus_b2 * g * g;
        let denom = v.sqrt() / k.bc2_sqrt + k.eps;
        *p += -k.step_size * *m / denom;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn adam_avx512(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamConsts) {
    adam_body(p, g, m, v, k)
}

/// `out = (p - t)^2 * w[r]` element-wise (`w` = 1 when absent).
pub fn sq_err(p: &[f32], t: &[f32], cols: usize, row_w: Option<&[f32]>, out: &mut [f32]) {
    out.par_chunks_mut(cols)
        .zip(p.par_chunks(cols).zip(t.par_chunks(cols)))
        .enumerate()
        .with_min_len(grain(cols))
        .for_each(|(r, (o, (p, t)))| {
            let w = row_w.map_or(1.0, |w| w[r]);
            for ((o, p), t) in o.iter_mut().zip(p).zip(t) {
                *o = (p - t) * (p - t) * w;
            }
        });
}

/// `out = a / (b + eps)` element-wise.
pub fn div_eps(a: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    out.par_chunks_mut(FLAT_GRAIN)
        .zip(a.par_chunks(FLAT_GRAIN).zip(b.par_chunks(FLAT_GRAIN)))
        .for_each(|(o, (a, b))| {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = a / (b + eps);
            }
        });
}

/// `out = (1 - tanh(relu(h))^2) * (h > 0) * df`: backward of SAELens 5's `tanh-relu`.
pub fn tanh_relu_backward(h: &[f32], df: &[f32], dh: &mut [f32]) {
    dh.par_chunks_mut(FLAT_GRAIN)
        .zip(h.par_chunks(FLAT_GRAIN).zip(df.par_chunks(FLAT_GRAIN)))
        .for_each(|(dh, (h, df))| {
            for ((d, &h), &g) in dh.iter_mut().zip(h).zip(df) {
                *d = if h > 0.0 {
                    let t = h.tanh();
                    g * (1.0 - t * t)
                } else {
                    0.0
                };
            }
        });
}

pub fn tanh(x: &mut [f32]) {
    x.par_chunks_mut(FLAT_GRAIN)
        .for_each(|c| c.iter_mut().for_each(|v| *v = v.tanh()));
}

/// `dst = src[:, start..start + dst_cols]`
pub fn copy_cols(src: &[f32], src_cols: usize, start: usize, dst: &mut [f32], dst_cols: usize) {
    dst.par_chunks_mut(dst_cols)
        .zip(src.par_chunks(src_cols))
        .with_min_len(grain(src_cols))
        .for_each(|(d, s)| d.copy_from_slice(&s[start..start + dst_cols]));
}

/// `dst[:, start..start + src_cols] += src`
pub fn add_cols(dst: &mut [f32], dst_cols: usize, start: usize, src: &[f32], src_cols: usize) {
    dst.par_chunks_mut(dst_cols)
        .zip(src.par_chunks(src_cols))
        .with_min_len(grain(dst_cols))
        .for_each(|(d, s)| {
            d[start..start + src_cols]
                .iter_mut()
                .zip(s)
                .for_each(|(d, s)| *d += s);
        });
}

/// Smallest strictly positive value, if any.
pub fn min_positive(x: &[f32]) -> Option<f32> {
    x.par_chunks(FLAT_GRAIN)
        .filter_map(|c| c.iter().copied().filter(|&v| v > 0.0).reduce(f32::min))
        .reduce_with(f32::min)
}

/// `out[j]` = the number of rows `r` with `hit(x[r, j], j)`.
fn col_counts_where(
    x: &[f32],
    cols: usize,
    out: &mut [f32],
    hit: impl Fn(f32, usize) -> bool + Sync,
) {
    let acc = x
        .par_chunks(cols)
        .fold_chunks(
            BLOCK_ROWS,
            || vec![0f64; cols],
            |mut acc, row| {
                for (j, (a, &v)) in acc.iter_mut().zip(row).enumerate() {
                    *a += hit(v, j) as u8 as f64;
                }
                acc
            },
        )
        .collect::<Vec<_>>();
    let acc = sum_in_order(acc, cols);
    out.iter_mut().zip(acc).for_each(|(o, a)| *o = a as f32);
}

/// Number of nonzero entries in each column.
pub fn col_nonzero_counts(x: &[f32], cols: usize, out: &mut [f32]) {
    col_counts_where(x, cols, out, |v, _| v != 0.0)
}

/// `out[j] = number of r with h[r, j] > t[j]` (how often a JumpReLU latent fired).
pub fn step_count_cols(h: &[f32], cols: usize, t: &[f32], out: &mut [f32]) {
    col_counts_where(h, cols, out, |v, j| v > t[j])
}

/// Number of nonzero entries in each row.
pub fn row_nonzero_counts(x: &[f32], cols: usize, out: &mut [f32]) {
    out.par_iter_mut()
        .zip(x.par_chunks(cols))
        .with_min_len(grain(cols))
        .for_each(|(o, row)| *o = row.iter().filter(|&&v| v != 0.0).count() as f32);
}

pub fn add_normal_noise(x: &mut [f32], std: f32, seed: u64) {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    // One stream per chunk keeps the result independent of the thread count.
    x.par_chunks_mut(FLAT_GRAIN).enumerate().for_each(|(i, c)| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(i as u64);
        for v in c {
            let z: f32 = StandardNormal.sample(&mut rng);
            *v += std * z;
        }
    });
}

// ---------------------------------------------------------------------------------
// Selection

/// Order key of an f32 such that larger floats have larger keys (total order).
#[inline]
fn key(v: f32) -> u32 {
    let b = v.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Top-`k` of each row (optionally only among columns with `mask[j] > 0`), written as
/// CSR with `k` entries per row, columns ascending. Values are the raw inputs.
/// What [`topk_rows`] selects from: a matrix as it is, or one whose rows first get a
/// bias added in place (the bits of [`add_row_vec`] with `alpha` 1), in the same pass.
pub enum TopKRows<'a> {
    Plain(&'a [f32]),
    AddBias(&'a mut [f32], &'a [f32]),
}

fn add_bias_row<'a>(row: &'a mut [f32], bias: &[f32]) -> &'a [f32] {
    #[inline(always)]
    fn body(row: &mut [f32], bias: &[f32]) {
        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn body_avx512(row: &mut [f32], bias: &[f32]) {
        body(row, bias)
    }
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F (checked above).
        unsafe { body_avx512(row, bias) };
        return row;
    }
    body(row, bias);
    row
}

pub fn topk_rows(
    x: TopKRows,
    cols: usize,
    k: usize,
    mask: Option<&[f32]>,
    offsets: &mut Vec<u32>,
    indices: &mut Vec<u32>,
    values: &mut Vec<f32>,
) {
    let n = match &x {
        TopKRows::Plain(x) => x.len(),
        TopKRows::AddBias(x, _) => x.len(),
    };
    let rows = n / cols.max(1);
    offsets.clear();
    offsets.extend((0..=rows).map(|r| (r * k) as u32));
    indices.resize(rows * k, 0);
    values.resize(rows * k, 0.0);
    let x = match x {
        TopKRows::Plain(x) => rayon::iter::Either::Left(x.par_chunks(cols)),
        TopKRows::AddBias(x, b) => {
            assert_eq!(
                b.len(),
                cols,
                "topk_rows: a bias of {} for {cols} columns",
                b.len()
            );
            rayon::iter::Either::Right(x.par_chunks_mut(cols).map(move |r| add_bias_row(r, b)))
        }
    };
    if k == 0 {
        // Nothing to select, but a bias is still added.
        return x.for_each(|_| ());
    }
    let allowed: Option<Vec<u32>> = mask.map(|m| {
        m.iter()
            .enumerate()
            .filter(|(_, &v)| v > 0.0)
            .map(|(j, _)| j as u32)
            .collect()
    });
    indices
        .par_chunks_mut(k)
        .zip(values.par_chunks_mut(k))
        .zip(x)
        .with_min_len(grain(cols).max(4))
        .for_each_init(
            || TopKHeap::with_capacity(k),
            |heap: &mut TopKHeap, ((idx, val), row)| {
                heap.clear();
                match &allowed {
                    Some(a) => a.iter().for_each(|&j| topk_push(heap, k, row, j as usize)),
                    None => {
                        #[cfg(target_arch = "x86_64")]
                        if avx512() {
                            // SAFETY: the CPU has AVX-512F (checked above).
                            unsafe { topk_scan_avx512(heap, k, row) };
                        } else {
                            topk_scan(heap, k, row);
                        }
                        #[cfg(not(target_arch = "x86_64"))]
                        topk_scan(heap, k, row);
                    }
                }
                assert!(
                    heap.len() == k,
                    "top-k with k={k} of {} candidates",
                    heap.len()
                );
                let mut chosen: Vec<u32> = heap.drain().map(|r| u32::MAX - (r.0 as u32)).collect();
                chosen.sort_unstable();
                for (i, &j) in chosen.iter().enumerate() {
                    idx[i] = j;
                    val[i] = row[j as usize];
                }
            },
        );
}

/// The k best candidates of a row so far, the worst at the root.
type TopKHeap = std::collections::BinaryHeap<std::cmp::Reverse<u64>>;

/// Offers column `j` of `row` to the top-k heap.
#[inline(always)]
fn topk_push(heap: &mut TopKHeap, k: usize, row: &[f32], j: usize) {
    let r = std::cmp::Reverse(rank(row[j], j));
    if heap.len() < k {
        heap.push(r);
    } else if let Some(mut root) = heap.peek_mut() {
        // the root is the worst kept candidate; Reverse flips the order
        if r < *root {
            *root = r;
        }
    }
}

/// Offers every column of `row`, in ascending order. Once k are kept, a value below the
/// worst kept one cannot enter (nor can an equal one, whose column is higher), so most
/// values need only a compare, sixteen at a time; the rest get the exact rank test
/// (`!(v < t)` also lets NaN through to it).
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(v < t)`: NaN must pass, to be ranked
fn topk_scan_body(heap: &mut TopKHeap, k: usize, row: &[f32]) {
    if 4 * k <= TOPK_GROUPS && row.len() >= 4 * TOPK_GROUPS {
        return topk_scan_groups(heap, k, row);
    }
    let first = k.min(row.len());
    (0..first).for_each(|j| topk_push(heap, k, row, j));
    let worst = |heap: &TopKHeap| match heap.peek() {
        Some(r) if heap.len() == k => row[(u32::MAX - r.0 as u32) as usize],
        _ => f32::NEG_INFINITY,
    };
    let mut t = worst(heap);
    let offer = |heap: &mut TopKHeap, j: usize, t: &mut f32| {
        if !(row[j] < *t) {
            topk_push(heap, k, row, j);
            *t = worst(heap);
        }
    };
    let mut j = first;
    while j + 16 <= row.len() {
        let c = &row[j..j + 16];
        if c.iter().fold(false, |a, &v| a | !(v < t)) {
            (j..j + 16).for_each(|j| offer(heap, j, &mut t));
        }
        j += 16;
    }
    (j..row.len()).for_each(|j| offer(heap, j, &mut t));
}

/// Columns per group of [`topk_scan_groups`].
const TOPK_GROUPS: usize = 256;

/// [`topk_scan_body`] for long rows and small `k`. Column `j` of the first
/// `TOPK_GROUPS * n` belongs to group `j % TOPK_GROUPS`; the `k` groups whose largest
/// order key is highest hold at least `k` entries with a key at least the `k`-th
/// highest group maximum, so every entry of the top `k` has at least that key. One
/// pass takes the group maxima (a running maximum per lane, no horizontal sums), a
/// second offers only the entries reaching that bound (about `k` of them on random
/// data) in ascending column order; the last partial group's columns are all offered.
/// Exact in the total order (NaNs and signed zeros included): it compares keys.
#[inline(always)]
fn topk_scan_groups(heap: &mut TopKHeap, k: usize, row: &[f32]) {
    let full = row.len() / TOPK_GROUPS * TOPK_GROUPS;
    let mut maxima = [0u32; TOPK_GROUPS];
    for c in row[..full].chunks_exact(TOPK_GROUPS) {
        for (m, &v) in maxima.iter_mut().zip(c) {
            *m = (*m).max(key(v));
        }
    }
    let (_, &mut bound, _) = maxima.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    for (c0, c) in row[..full].chunks_exact(16).enumerate() {
        if c.iter().fold(false, |any, &v| any | (key(v) >= bound)) {
            (c0 * 16..c0 * 16 + 16)
                .filter(|&j| key(row[j]) >= bound)
                .for_each(|j| topk_push(heap, k, row, j));
        }
    }
    (full..row.len()).for_each(|j| topk_push(heap, k, row, j));
}

fn topk_scan(heap: &mut TopKHeap, k: usize, row: &[f32]) {
    topk_scan_body(heap, k, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn topk_scan_avx512(heap: &mut TopKHeap, k: usize, row: &[f32]) {
    topk_scan_body(heap, k, row)
}

/// Total order for top-k: larger values first, and among equal values the lower
/// column. A min-heap of these keeps the k best, with the worst at the root.
#[inline]
fn rank(v: f32, j: usize) -> u64 {
    ((key(v) as u64) << 32) | (u32::MAX - j as u32) as u64
}

/// The `total` largest entries of the whole matrix (ties at the cut broken by
/// row-major position), dropping entries `<= 0`: used on ReLU outputs, where a
/// selected zero contributes nothing to the decode or to any gradient.
pub fn batch_topk(
    x: &[f32],
    cols: usize,
    total: usize,
    out: (&mut Vec<u32>, &mut Vec<u32>, &mut Vec<f32>),
) {
    let t = select_threshold(x, cols, total);
    batch_topk_at(x, cols, total, t, out);
}

/// `x[r, j] += bias[j]` (the bits of [`add_row_vec`] with `alpha` 1), then
/// [`batch_topk`] of the result: the bias goes in with the selection's first full pass
/// over `x` where there is one (a sampled cut's), else in a pass of its own first.
pub fn add_bias_batch_topk(
    x: &mut [f32],
    cols: usize,
    bias: &[f32],
    total: usize,
    out: (&mut Vec<u32>, &mut Vec<u32>, &mut Vec<f32>),
) {
    let mut src = Src::AddBias(x, bias);
    let sample = 0 < total && total < src.len() && src.len() >= SAMPLED_SELECT_MIN;
    let sampled = match sample {
        true => select_from_sample(&mut src, cols, total, SAMPLE_SIZE),
        false => None,
    };
    let x = match src {
        Src::AddBias(x, b) => {
            add_row_vec(x, cols, b, 1.0);
            x
        }
        Src::Plain(x) => x,
    };
    let t = match (sampled, sample) {
        (Some(t), _) => t,
        // As `select_threshold` goes on when its sample gives way.
        (None, true) => radix_select(x, total),
        (None, false) => select_threshold(x, cols, total),
    };
    batch_topk_at(x, cols, total, t, out);
}

/// [`batch_topk`] given the key of the `total`-th largest value and how many lie
/// strictly above it.
fn batch_topk_at(
    x: &[f32],
    cols: usize,
    total: usize,
    (thr, n_above): (u32, usize),
    (offsets, indices, values): (&mut Vec<u32>, &mut Vec<u32>, &mut Vec<f32>),
) {
    let rows = x.len() / cols.max(1);
    // Entries with key > thr are in; `total - n_above` of those equal to thr join them
    // in row-major order. Zeros and negatives never do.
    let mut ties_left = total.saturating_sub(n_above);
    // The two tests as comparisons with cuts (both are monotone in the value), so that
    // the count and fill passes compare 16 columns at a time.
    let above_cut = monotone_cut(|v| v > 0.0 && key(v) > thr);
    let tie_cut = monotone_cut(|v| v > 0.0 && key(v) >= thr);
    let (hi, lo) = (vec![above_cut; cols], vec![tie_cut; cols]);
    let per_row = split_counts(x, cols, &hi, &lo);
    offsets.clear();
    offsets.push(0);
    let mut take_ties = Vec::with_capacity(rows);
    let mut acc = 0u32;
    for &[above, ties] in &per_row {
        let (above, ties) = (above as usize, ties as usize);
        let t = ties.min(ties_left);
        ties_left -= t;
        take_ties.push(t);
        acc += (above + t) as u32;
        offsets.push(acc);
    }
    let nnz = acc as usize;
    indices.resize(nnz, 0);
    values.resize(nnz, 0.0);
    // Split the outputs into per-row slices, then fill rows in parallel.
    let mut idx_parts: Vec<&mut [u32]> = Vec::with_capacity(rows);
    let mut val_parts: Vec<&mut [f32]> = Vec::with_capacity(rows);
    let (mut ir, mut vr) = (&mut indices[..], &mut values[..]);
    for r in 0..rows {
        let len = (offsets[r + 1] - offsets[r]) as usize;
        let (a, b) = std::mem::take(&mut ir).split_at_mut(len);
        let (c, d) = std::mem::take(&mut vr).split_at_mut(len);
        idx_parts.push(a);
        val_parts.push(c);
        ir = b;
        vr = d;
    }
    idx_parts
        .into_par_iter()
        .zip(val_parts.into_par_iter())
        .zip(x.par_chunks(cols).zip(take_ties.par_iter()))
        .for_each(|((idx, val), (row, &ties))| {
            if ties == 0 {
                // Only the entries above the threshold: `idx` is exactly their count.
                let none = (&mut [][..], &mut [][..]);
                #[cfg(target_arch = "x86_64")]
                if avx512() {
                    // SAFETY: the CPU has AVX-512F (checked above).
                    return unsafe { split_row_avx512(row, &hi, &[], (idx, val), none) };
                }
                return split_row(row, &hi, &[], 0, (idx, val), none);
            }
            let mut n = 0;
            let mut ties = ties;
            for (j, &v) in row.iter().enumerate() {
                // NaN is no positive value either (it was, once, and overran the row).
                if v.is_nan() || v <= 0.0 {
                    continue;
                }
                let kv = key(v);
                let take = kv > thr || (kv == thr && ties > 0);
                if take {
                    if kv == thr {
                        ties -= 1;
                    }
                    idx[n] = j as u32;
                    val[n] = v;
                    n += 1;
                }
            }
        });
}

/// Key of the `total`-th largest value and how many values lie strictly above it.
/// Large inputs first try a cut estimated from a sample: one vector pass then
/// collects the keys at or above it, and the answer is selected among those. When the
/// sample put the cut too high (fewer than `total` reach it), the exact radix select
/// answers instead. Either way the answer is exact and the same.
fn select_threshold(x: &[f32], cols: usize, total: usize) -> (u32, usize) {
    if total == 0 {
        return (u32::MAX, 0);
    }
    if total >= x.len() {
        return (0, 0);
    }
    if x.len() >= SAMPLED_SELECT_MIN {
        if let Some(t) = select_from_sample(&mut Src::Plain(x), cols, total, SAMPLE_SIZE) {
            return t;
        }
    }
    radix_select(x, total)
}

/// Below this many values the radix select's passes cost less than sampling.
const SAMPLED_SELECT_MIN: usize = 1 << 18;
/// Values in the sample (about: the stride is rounded).
const SAMPLE_SIZE: usize = 1 << 16;

/// The matrix a batch top-k selects from: `x` itself, or `x` plus a bias row (added
/// in the first full pass over it, which makes it `Plain`).
enum Src<'a> {
    Plain(&'a [f32]),
    AddBias(&'a mut [f32], &'a [f32]),
}

impl Src<'_> {
    fn len(&self) -> usize {
        match self {
            Src::Plain(x) => x.len(),
            Src::AddBias(x, _) => x.len(),
        }
    }

    /// [`keys_at_least`] of the matrix, adding the bias first where there is one
    /// (which leaves the source `Plain`).
    fn keys_at_least(&mut self, cols: usize, cut: u32) -> Vec<u32> {
        match std::mem::replace(self, Src::Plain(&[])) {
            Src::Plain(x) => {
                *self = Src::Plain(x);
                keys_at_least(x, cut)
            }
            Src::AddBias(x, b) => {
                let keys = add_bias_keys_at_least(x, cols, b, cut);
                *self = Src::Plain(x);
                keys
            }
        }
    }
}

/// [`select_threshold`] through a sample of about `sample` values, or `None` when the
/// cut taken from the sample is reached by fewer than `total` values. The pass that
/// collects the keys at or above the cut adds the bias of an `AddBias` source.
fn select_from_sample(
    src: &mut Src,
    cols: usize,
    total: usize,
    sample: usize,
) -> Option<(u32, usize)> {
    let len = src.len();
    let stride = sample_stride(len, cols, sample);
    let mut keys: Vec<u32> = match src {
        Src::Plain(x) => x.iter().step_by(stride).map(|&v| key(v)).collect(),
        // The values the bias pass will make (the same additions).
        Src::AddBias(x, b) => (0..len)
            .step_by(stride)
            .map(|i| key(x[i] + b[i % cols]))
            .collect(),
    };
    // The sample's rank matching `total`, raised by four standard deviations (and a
    // few) so that the cut falls below the true one nearly always.
    let expect = total as f64 * keys.len() as f64 / len as f64;
    let rank = (expect + 4.0 * expect.sqrt() + 8.0).ceil() as usize;
    if rank >= keys.len() {
        return None;
    }
    let (_, &mut cut, _) = keys.select_nth_unstable_by(rank, |a, b| b.cmp(a));
    let mut cand = src.keys_at_least(cols, cut);
    if cand.len() < total {
        return None;
    }
    let (above, &mut thr, _) = cand.select_nth_unstable_by(total - 1, |a, b| b.cmp(a));
    // Every value above `thr` is a candidate (`thr >= cut`); ties of `thr` may sit on
    // both sides of the selected one.
    let n_above = above.iter().filter(|&&k| k > thr).count();
    Some((thr, n_above))
}

/// About `len / sample`, and prime to the row length: so the sample visits every
/// column equally often, and latents that fire more than others are sampled as often
/// as they occur.
fn sample_stride(len: usize, cols: usize, sample: usize) -> usize {
    let mut stride = (len / sample.max(1)).max(1);
    while gcd(stride, cols.max(1)) != 1 {
        stride += 1;
    }
    stride
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The order keys of the values whose key is at least `cut`, in no particular order.
fn keys_at_least(x: &[f32], cut: u32) -> Vec<u32> {
    use keys_at_least_chunk as chunk;
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn chunk_avx512(c: &[f32], cut: u32, out: &mut Vec<u32>) {
        chunk(c, cut, out)
    }
    x.par_chunks(FLAT_GRAIN)
        .fold(Vec::new, |mut out, c| {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: the CPU has AVX-512F (checked above).
                unsafe { chunk_avx512(c, cut, &mut out) };
                return out;
            }
            chunk(c, cut, &mut out);
            out
        })
        .reduce(Vec::new, |mut a, mut b| {
            a.append(&mut b);
            a
        })
}

/// `x[r, j] += bias[j]` (the bits of [`add_row_vec`] with `alpha` 1), collecting the
/// order keys of the results at least `cut` ([`keys_at_least`]) while each row is in
/// cache.
fn add_bias_keys_at_least(x: &mut [f32], cols: usize, bias: &[f32], cut: u32) -> Vec<u32> {
    #[inline(always)]
    fn rows(x: &mut [f32], cols: usize, bias: &[f32], cut: u32, out: &mut Vec<u32>) {
        for row in x.chunks_exact_mut(cols) {
            row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
            keys_at_least_chunk(row, cut, out);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn rows_avx512(x: &mut [f32], cols: usize, bias: &[f32], cut: u32, out: &mut Vec<u32>) {
        rows(x, cols, bias, cut, out)
    }
    x.par_chunks_mut(cols * grain(cols))
        .fold(Vec::new, |mut out, x| {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: the CPU has AVX-512F (checked above).
                unsafe { rows_avx512(x, cols, bias, cut, &mut out) };
                return out;
            }
            rows(x, cols, bias, cut, &mut out);
            out
        })
        .reduce(Vec::new, |mut a, mut b| {
            a.append(&mut b);
            a
        })
}

/// [`keys_at_least`] of one run of values, pushed to `out`.
#[inline(always)]
fn keys_at_least_chunk(c: &[f32], cut: u32, out: &mut Vec<u32>) {
    // Sixteen at a time, so that the compare vectorises; the few that pass are
    // pushed one by one.
    let mut blocks = c.chunks_exact(16);
    for b in &mut blocks {
        let any = b.iter().fold(false, |a, &v| a | (key(v) >= cut));
        if any {
            out.extend(b.iter().map(|&v| key(v)).filter(|&k| k >= cut));
        }
    }
    let tail = blocks.remainder().iter().map(|&v| key(v));
    out.extend(tail.filter(|&k| k >= cut));
}

/// [`select_threshold`] by a two-pass radix select over the order keys (16 bits per
/// pass).
fn radix_select(x: &[f32], total: usize) -> (u32, usize) {
    let hist = |shift: u32, prefix: Option<u32>| -> Vec<usize> {
        x.par_chunks(FLAT_GRAIN)
            .fold(
                || vec![0usize; 1 << 16],
                |mut h, c| {
                    for &v in c {
                        let k = key(v);
                        if prefix.is_none_or(|p| k >> 16 == p) {
                            h[((k >> shift) & 0xffff) as usize] += 1;
                        }
                    }
                    h
                },
            )
            .reduce(
                || vec![0usize; 1 << 16],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            )
    };
    // Walk buckets from the top until `total` values are covered.
    let pick = |h: &[usize], need: usize| -> (u32, usize) {
        let mut above = 0;
        for b in (0..h.len()).rev() {
            if above + h[b] >= need {
                return (b as u32, above);
            }
            above += h[b];
        }
        (0, above)
    };
    let h1 = hist(16, None);
    let (hi, above_hi) = pick(&h1, total);
    let h2 = hist(0, Some(hi));
    let (lo, above_lo) = pick(&h2, total - above_hi);
    ((hi << 16) | lo, above_hi + above_lo)
}

// ---------------------------------------------------------------------------------
// Sparse (CSR) products

pub use crate::cpu_sparse::{csr_matmul, csr_sampled_dot, csr_t_matmul};

/// A pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: only used where every task writes its own elements.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    // A method, so that closures capture the Send wrapper and not its raw field.
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

// Loops over rows of floats built for the x86-64 baseline vectorise to 4 lanes; the
// versions here and in `cpu_sparse` are compiled for AVX-512 too and picked at run
// time. Both do the same operations in the same order: results are bit-identical
// whichever runs.

/// Whether this CPU runs the AVX-512 versions (checked once).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn avx512() -> bool {
    // std caches the CPUID answer: a relaxed load and a bit test.
    std::arch::is_x86_feature_detected!("avx512f")
}

/// `a . b` in eight independent partial sums (a sequential f32 sum does not
/// vectorise), added in a fixed order.
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, ra) = a.split_at(a.len() / 8 * 8);
    let (cb, rb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(8).zip(cb.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_body(a, b)
}

/// `a . b` (see [`dot_body`])
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { dot_avx512(a, b) };
    }
    dot_body(a, b)
}

/// `out[j] = beta*out[j] + alpha * sum over entries in column j of vals[e] * other[e]`
/// (`other = None` means 1).
pub fn csr_col_dot(
    indices: &[u32],
    values: &[f32],
    other: Option<&[f32]>,
    out: &mut [f32],
    alpha: f32,
    beta: f32,
) {
    let mut acc = vec![0f64; out.len()];
    match other {
        Some(o) => indices
            .iter()
            .zip(values)
            .zip(o)
            .for_each(|((&j, &v), &o)| acc[j as usize] += (v * o) as f64),
        None => indices
            .iter()
            .zip(values)
            .for_each(|(&j, &v)| acc[j as usize] += v as f64),
    }
    out.iter_mut().zip(acc).for_each(|(o, a)| {
        let base = if beta == 0.0 { 0.0 } else { beta * *o };
        *o = base + alpha * a as f32;
    });
}

// ---------------------------------------------------------------------------------
// ReLU latents as CSR (the sparse path of the L1-penalised SAEs)

/// How many entries are NaN or infinite and the index of the first (`None` if none).
pub fn non_finite(x: &[f32]) -> Option<(usize, usize)> {
    let parts: Vec<(usize, Option<usize>)> = x
        .par_chunks(FLAT_GRAIN)
        .enumerate()
        .map(|(i, c)| {
            let n = c.iter().filter(|v| !v.is_finite()).count();
            let first = (n > 0)
                .then(|| c.iter().position(|v| !v.is_finite()))
                .flatten();
            (n, first.map(|f| i * FLAT_GRAIN + f))
        })
        .collect();
    let count: usize = parts.iter().map(|p| p.0).sum();
    parts.iter().find_map(|p| p.1).map(|first| (count, first))
}

/// A CSR matrix's buffers, to be filled.
pub struct CsrBufs<'a> {
    pub offsets: &'a mut Vec<u32>,
    pub indices: &'a mut Vec<u32>,
    pub values: &'a mut Vec<f32>,
}

impl CsrBufs<'_> {
    /// Offsets from per-row counts; sizes indices and values.
    fn lay_out(&mut self, counts: impl Iterator<Item = u32>) {
        self.offsets.clear();
        self.offsets.push(0);
        let mut acc = 0u32;
        for c in counts {
            acc += c;
            self.offsets.push(acc);
        }
        self.indices.resize(acc as usize, 0);
        self.values.resize(acc as usize, 0.0);
    }
}

/// The smallest `v` (not NaN) for which the monotone test `keep` holds: then `keep(x)`
/// is `x >= cut` for every `x` that is not NaN. NaN when `keep` holds for none, -inf
/// when for all. A binary search over the floats in order, so that the passes over
/// `[batch, d_sae]` compare instead of evaluating `keep` (JumpReLU's rectangle test
/// divides).
pub fn monotone_cut(keep: impl Fn(f32) -> bool) -> f32 {
    // `key` orders floats as integers; this is its inverse.
    let unkey = |k: u32| match k >> 31 == 1 {
        true => f32::from_bits(k & 0x7fff_ffff),
        false => f32::from_bits(!k),
    };
    let (mut lo, mut hi) = (key(f32::NEG_INFINITY), key(f32::INFINITY));
    if !keep(f32::INFINITY) {
        return f32::NAN;
    }
    if keep(f32::NEG_INFINITY) {
        return f32::NEG_INFINITY;
    }
    // keep(unkey(lo)) is false, keep(unkey(hi)) true
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match keep(unkey(mid)) {
            true => hi = mid,
            false => lo = mid,
        }
    }
    unkey(hi)
}

/// `[entries >= hi, entries below hi but >= lo]` of one row (none of the second when
/// `lo` is empty).
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(v >= hi)`: NaN cuts and values are below
fn count_split(row: &[f32], hi: &[f32], lo: &[f32]) -> [u32; 2] {
    let a = row.iter().zip(hi).map(|(&v, &h)| (v >= h) as u32).sum();
    let b = match lo.is_empty() {
        true => 0,
        false => row
            .iter()
            .zip(hi)
            .zip(lo)
            .map(|((&v, &h), &l)| (!(v >= h) & (v >= l)) as u32)
            .sum(),
    };
    [a, b]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn count_split_avx512(row: &[f32], hi: &[f32], lo: &[f32]) -> [u32; 2] {
    count_split(row, hi, lo)
}

/// Per row of `x` `[rows, cols]`, `[entries >= hi[j], entries below that but >= lo[j]]`
/// (no second part when `lo` is empty).
pub fn split_counts(x: &[f32], cols: usize, hi: &[f32], lo: &[f32]) -> Vec<[u32; 2]> {
    x.par_chunks(cols)
        .with_min_len(grain(cols))
        .map(|row| {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: the CPU has AVX-512F (checked above).
                return unsafe { count_split_avx512(row, hi, lo) };
            }
            count_split(row, hi, lo)
        })
        .collect()
}

/// `x[r, j] += bias[j]` (as [`add_row_vec`] with `alpha` 1, the same bits), then
/// [`split_counts`] of the result: one pass over `x` instead of two.
pub fn add_bias_split_counts(
    x: &mut [f32],
    cols: usize,
    bias: &[f32],
    hi: &[f32],
    lo: &[f32],
) -> Vec<[u32; 2]> {
    #[inline(always)]
    fn row_body(row: &mut [f32], bias: &[f32], hi: &[f32], lo: &[f32]) -> [u32; 2] {
        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
        count_split(row, hi, lo)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn row_avx512(row: &mut [f32], bias: &[f32], hi: &[f32], lo: &[f32]) -> [u32; 2] {
        row_body(row, bias, hi, lo)
    }
    x.par_chunks_mut(cols)
        .with_min_len(grain(cols))
        .map(|row| {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: the CPU has AVX-512F (checked above).
                return unsafe { row_avx512(row, bias, hi, lo) };
            }
            row_body(row, bias, hi, lo)
        })
        .collect()
}

/// The entries of `x` `[rows, cols]` with `x[r, j] >= hi[j]` into `a`, and, when `b`
/// is given, those below that but `>= lo[j]` into `b`, as CSR with their values, laid
/// out by `counts` from [`split_counts`] on the same `x` and cuts.
pub fn split_at_least(
    x: &[f32],
    cols: usize,
    hi: &[f32],
    mut a: CsrBufs,
    lo_b: Option<(&[f32], CsrBufs)>,
    counts: &[[u32; 2]],
) {
    let lo = lo_b.as_ref().map_or(&[][..], |(lo, _)| lo);
    assert_eq!(
        counts.len() * cols,
        x.len(),
        "split_at_least: counts of another matrix"
    );
    a.lay_out(counts.iter().map(|c| c[0]));
    let (mut bo, mut bi, mut bv) = (Vec::new(), Vec::new(), Vec::new());
    let mut b = match lo_b {
        Some((_, b)) => b,
        None => CsrBufs {
            offsets: &mut bo,
            indices: &mut bi,
            values: &mut bv,
        },
    };
    b.lay_out(counts.iter().map(|c| c[1]));
    let rows_a = split_rows(a.offsets, a.indices)
        .into_par_iter()
        .zip(split_rows(a.offsets, a.values));
    let rows_b = split_rows(b.offsets, b.indices)
        .into_par_iter()
        .zip(split_rows(b.offsets, b.values));
    rows_a
        .zip(rows_b)
        .zip(x.par_chunks(cols))
        .with_min_len(grain(cols))
        .for_each(|(((ia, va), (ib, vb)), row)| {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: the CPU has AVX-512F (checked above).
                return unsafe { split_row_avx512(row, hi, lo, (ia, va), (ib, vb)) };
            }
            split_row(row, hi, lo, 0, (ia, va), (ib, vb));
        });
}

/// One row's part of [`split_at_least`] from column `j0` on: its entries `>= hi` into
/// `a`, those below that but `>= lo` into `b` (each exactly as long as counted).
#[allow(clippy::type_complexity)]
fn split_row(
    row: &[f32],
    hi: &[f32],
    lo: &[f32],
    j0: usize,
    (ia, va): (&mut [u32], &mut [f32]),
    (ib, vb): (&mut [u32], &mut [f32]),
) {
    let (mut na, mut nb) = (0, 0);
    for (j, &v) in row.iter().enumerate().skip(j0) {
        if v >= hi[j] {
            (ia[na], va[na]) = (j as u32, v);
            na += 1;
        } else if !lo.is_empty() && v >= lo[j] {
            (ib[nb], vb[nb]) = (j as u32, v);
            nb += 1;
        }
    }
}

/// [`split_row`] 16 columns at a time: compare, compress the kept lanes (values and
/// column numbers) within a register and store them with a mask. (A compressing store
/// straight to memory is microcoded and slow on AMD's AVX-512.) The same comparisons
/// as the scalar form and as the count pass, so the counts it was laid out by hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::type_complexity)]
fn split_row_avx512(
    row: &[f32],
    hi: &[f32],
    lo: &[f32],
    (ia, va): (&mut [u32], &mut [f32]),
    (ib, vb): (&mut [u32], &mut [f32]),
) {
    use std::arch::x86_64::*;
    let n = row.len() / 16 * 16;
    assert!(hi.len() >= n && (lo.is_empty() || lo.len() >= n));
    // Stores `lanes` of `v` and `col` compressed at `at` of `(idx, val)`, which must
    // have room for them (checked: the counts come from another pass).
    #[inline(always)]
    fn put(
        lanes: u16,
        col: __m512i,
        v: __m512,
        (idx, val): (&mut [u32], &mut [f32]),
        at: &mut usize,
    ) {
        let c = lanes.count_ones() as usize;
        assert!(
            *at + c <= idx.len() && *at + c <= val.len(),
            "split_at_least: counts changed"
        );
        let keep = ((1u32 << c) - 1) as u16;
        // SAFETY: the `c` stored lanes lie within both slices (asserted); masked-off
        // lanes are not touched.
        unsafe {
            _mm512_mask_storeu_epi32(
                idx.as_mut_ptr().add(*at) as *mut i32,
                keep,
                _mm512_maskz_compress_epi32(lanes, col),
            );
            _mm512_mask_storeu_ps(
                val.as_mut_ptr().add(*at),
                keep,
                _mm512_maskz_compress_ps(lanes, v),
            );
        }
        *at += c;
    }
    let (mut na, mut nb) = (0, 0);
    let mut col = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for j in (0..n).step_by(16) {
        // SAFETY: j + 16 <= n, within `row`, `hi` and a non-empty `lo` (asserted).
        let v = unsafe { _mm512_loadu_ps(row.as_ptr().add(j)) };
        let a = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, unsafe { _mm512_loadu_ps(hi.as_ptr().add(j)) });
        // Skips blocks with nothing kept. At 2 % density (a quarter of the blocks
        // keep something) the branch costs nothing measurable; at a trained SAE's
        // 0.2-0.3 % the split takes 2.7-2.9 ms instead of 4.0-4.9 at 4096 x 4096,
        // 16.5-17.8 instead of 23.3-24.1 at 4096 x 24576.
        if a != 0 {
            put(a, col, v, (&mut *ia, &mut *va), &mut na);
        }
        if !lo.is_empty() {
            let l = unsafe { _mm512_loadu_ps(lo.as_ptr().add(j)) };
            let b = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, l) & !a;
            if b != 0 {
                put(b, col, v, (&mut *ib, &mut *vb), &mut nb);
            }
        }
        col = _mm512_add_epi32(col, _mm512_set1_epi32(16));
    }
    split_row(
        row,
        hi,
        lo,
        n,
        (&mut ia[na..], &mut va[na..]),
        (&mut ib[nb..], &mut vb[nb..]),
    );
}

/// Runs `body(row, its first entry, its entries of out, acc)` over the rows of a CSR
/// matrix in fixed blocks of [`BLOCK_ROWS`] rows, each block with its own `[len]` f64
/// accumulator; returns their sum in block order (the same bits whatever the thread
/// count, as the dense reductions).
fn csr_rows_fold(
    offsets: &[u32],
    out: &mut [f32],
    len: usize,
    body: impl Fn(usize, usize, &mut [f32], &mut [f64]) + Sync,
) -> Vec<f64> {
    let parts = split_rows(offsets, out)
        .into_par_iter()
        .enumerate()
        .fold_chunks(
            BLOCK_ROWS,
            || vec![0f64; len],
            |mut acc, (r, o)| {
                body(r, offsets[r] as usize, o, &mut acc);
                acc
            },
        )
        .collect::<Vec<_>>();
    sum_in_order(parts, len)
}

/// [`jumprelu_backward`] at the entries of a CSR matrix whose values are `h`, `df` and
/// `dh` `[nnz]` (absent entries get nothing: outside the rectangle and inactive).
#[allow(clippy::too_many_arguments)]
pub fn csr_jumprelu_backward(
    offsets: &[u32],
    indices: &[u32],
    h: &[f32],
    t: &[f32],
    df: &[f32],
    bandwidth: f32,
    ste_to_input: bool,
    dh: &mut [f32],
    dt: &mut [f32],
) {
    csr_entry_grads(offsets, indices, dh, dt, |_, e, j| {
        jumprelu_grad(h[e], t[j], df[e], bandwidth, ste_to_input)
    });
}

/// [`step_backward`] at the entries of a CSR matrix whose values are `h`; `g` per row.
#[allow(clippy::too_many_arguments)]
pub fn csr_step_backward(
    offsets: &[u32],
    indices: &[u32],
    h: &[f32],
    t: &[f32],
    g: &[f32],
    bandwidth: f32,
    ste_to_input: bool,
    dh: &mut [f32],
    dt: &mut [f32],
) {
    csr_entry_grads(offsets, indices, dh, dt, |r, e, j| {
        step_grad(h[e], t[j], g[r], bandwidth, ste_to_input)
    });
}

/// For each stored entry `e` (row `r`, column `j`), `grad(r, e, j)` gives `(d, a)`:
/// `dh[e] += d`, and `a` is summed per column (in [`csr_rows_fold`]'s fixed order)
/// into `dt[j]`.
fn csr_entry_grads(
    offsets: &[u32],
    indices: &[u32],
    dh: &mut [f32],
    dt: &mut [f32],
    grad: impl Fn(usize, usize, usize) -> (f32, f64) + Sync,
) {
    let acc = csr_rows_fold(offsets, dh, dt.len(), |r, e0, dh, acc| {
        for (e, dh) in (e0..).zip(dh) {
            let j = indices[e] as usize;
            let (d, a) = grad(r, e, j);
            *dh += d;
            acc[j] += a;
        }
    });
    dt.iter_mut().zip(acc).for_each(|(d, a)| *d += a as f32);
}

/// [`tanh_sparsity`] at the entries of a CSR matrix whose values are `f`.
#[allow(clippy::too_many_arguments)]
pub fn csr_tanh_sparsity(
    offsets: &[u32],
    indices: &[u32],
    f: &[f32],
    n: &[f32],
    s: f32,
    c: f32,
    df: &mut [f32],
    dn: &mut [f32],
) -> f64 {
    let cols = n.len();
    // the total rides in one more slot of the column accumulator
    let acc = csr_rows_fold(offsets, df, cols + 1, |_, e0, df, acc| {
        for (e, df) in (e0..).zip(df) {
            let j = indices[e] as usize;
            let (th, d, a) = tanh_grad(f[e], n[j], s, c);
            acc[cols] += th;
            *df += d;
            acc[j] += a;
        }
    });
    dn.iter_mut().zip(&acc).for_each(|(d, a)| *d += *a as f32);
    acc[cols]
}

/// `data` (`[nnz]`, in row order) cut into one slice per CSR row, so rows can be
/// filled in parallel.
fn split_rows<'a, T>(offsets: &[u32], data: &'a mut [T]) -> Vec<&'a mut [T]> {
    let rows = offsets.len() - 1;
    let mut parts = Vec::with_capacity(rows);
    let mut rest = data;
    for r in 0..rows {
        let len = (offsets[r + 1] - offsets[r]) as usize;
        let (a, b) = std::mem::take(&mut rest).split_at_mut(len);
        parts.push(a);
        rest = b;
    }
    parts
}

/// [`lp_sparsity`] of a CSR matrix (its absent entries are zeros): the same sums in
/// the same order, the gradient only at stored entries (`dvals`, `[nnz]`).
#[allow(clippy::too_many_arguments)]
pub fn csr_lp_sparsity(
    offsets: &[u32],
    indices: &[u32],
    values: &[f32],
    n: Option<&[f32]>,
    p: f32,
    c: f32,
    dvals: Option<&mut [f32]>,
    dn: Option<&mut [f32]>,
) -> f64 {
    let nj = |j: u32| n.map_or(1.0, |n| n[j as usize]);
    let rows = offsets.len() - 1;
    let row = |r: usize| offsets[r] as usize..offsets[r + 1] as usize;
    let norms: Vec<f64> = (0..rows)
        .into_par_iter()
        .with_min_len(64)
        .map(|r| {
            let w = row(r).map(|e| values[e] * nj(indices[e]));
            if p == 1.0 {
                w.map(|v| v.abs() as f64).sum()
            } else if p == 2.0 {
                w.map(|v| (v as f64).powi(2)).sum::<f64>().sqrt()
            } else {
                w.map(|v| (v.abs() as f64).powf(p as f64))
                    .sum::<f64>()
                    .powf(1.0 / p as f64)
            }
        })
        .collect();
    let total: f64 = norms.iter().sum();
    let Some(dvals) = dvals else { return total };
    let grad = |e: usize, norm: f64| -> f32 {
        let w = values[e] * nj(indices[e]);
        let dw = if p == 1.0 {
            w.signum() * (w != 0.0) as i32 as f32
        } else if norm == 0.0 {
            0.0
        } else {
            (w.signum() as f64 * (w.abs() as f64).powf(p as f64 - 1.0) / norm.powf(p as f64 - 1.0))
                as f32
        };
        c * dw
    };
    split_rows(offsets, dvals)
        .into_par_iter()
        .enumerate()
        .with_min_len(64)
        .for_each(|(r, d)| {
            for (i, e) in row(r).enumerate() {
                d[i] += grad(e, norms[r]) * nj(indices[e]);
            }
        });
    if let Some(dn) = dn {
        // d/dn_j = sum_r g_rj f_rj, in row order for a fixed result.
        let mut acc = vec![0f64; dn.len()];
        for (r, &norm) in norms.iter().enumerate() {
            for e in row(r) {
                acc[indices[e] as usize] += (grad(e, norm) * values[e]) as f64;
            }
        }
        dn.iter_mut().zip(acc).for_each(|(d, a)| *d += a as f32);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The sampled select answers exactly as the radix select, or not at all; and it
    /// does answer on data without structure. Data: quantised (many ties), with zeros
    /// of both signs and NaNs of both signs.
    #[test]
    fn sampled_select_is_the_radix_select_or_gives_way() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (rows, cols) = (70, 300);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| match i % 31 {
                0 => f32::NAN,
                1 => -f32::NAN,
                2 => -0.0,
                3 => 0.0,
                _ => rng.random_range(-200i32..50) as f32 * 0.5,
            })
            .collect();
        for total in [1, 2, 17, 300, 2000, 10_000] {
            let want = radix_select(&x, total);
            let got = select_from_sample(&mut Src::Plain(&x), cols, total, 1000);
            assert_eq!(got, Some(want), "total {total}");
            // With a bias row: the sample sees the sums, the keys pass makes them.
            let bias: Vec<f32> = (0..cols).map(|j| (j % 5) as f32 - 2.0).collect();
            let biased: Vec<f32> = (0..x.len()).map(|i| x[i] + bias[i % cols]).collect();
            let mut xb = x.clone();
            let mut src = Src::AddBias(&mut xb, &bias);
            let got = select_from_sample(&mut src, cols, total, 1000);
            assert!(matches!(src, Src::Plain(_)), "total {total}: bias added");
            assert_eq!(
                got,
                Some(radix_select(&biased, total)),
                "total {total}, bias"
            );
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&xb), bits(&biased), "total {total}: the sums' bits");
        }
        // Nearly all of them: the sample's rank runs out, and the exact select answers.
        let all_but_one = rows * cols - 1;
        assert_eq!(
            select_from_sample(&mut Src::Plain(&x), cols, all_but_one, 1000),
            None
        );
        assert_eq!(
            select_threshold(&x, cols, all_but_one),
            radix_select(&x, all_but_one)
        );
        // The largest values only where the sample looks: its cut is then too high
        // for any total above their count, and it must give way.
        let stride = sample_stride(x.len(), cols, 1000);
        let y: Vec<f32> = (0..rows * cols)
            .map(|i| match i % stride {
                0 => 100.0,
                _ => (i % 7) as f32,
            })
            .collect();
        let mut gave_way = 0;
        for total in [1, 50, 3000, 9000] {
            let got = select_from_sample(&mut Src::Plain(&y), cols, total, 1000);
            if let Some(g) = got {
                assert_eq!(g, radix_select(&y, total), "total {total}");
            } else {
                gave_way += 1;
                // Giving way after its pass over `y`, the sample has added a bias.
                let (mut yb, zero) = (y.clone(), vec![0.0; cols]);
                let mut src = Src::AddBias(&mut yb, &zero);
                assert_eq!(select_from_sample(&mut src, cols, total, 1000), None);
                assert!(matches!(src, Src::Plain(_)), "total {total}: bias added");
            }
        }
        assert!(gave_way > 0, "the cut was never too high");
    }
}
