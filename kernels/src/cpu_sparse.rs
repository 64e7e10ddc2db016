//! The sparse products of an SAE step on the CPU: the decode `csr @ w`, the gradient
//! at the active entries (`x @ w^T` sampled at them) and the weight gradients
//! `csr^T @ x` (plain or transposed).
//!
//! At `d_sae` 24576 a weight matrix is 75 MB, larger than the caches, and each active
//! entry touches one of its rows. Entry by entry over whole rows, those rows came from
//! memory and each entry's loop overhead bought little arithmetic. Here `d_in` is cut
//! into chunks of [`CHUNK`] floats and the latents into blocks of [`LATENT_BLOCK`]: a
//! block's slice of the weights (or of the weight gradient) stays in L2 while every
//! row's entries in that block use it, and the row's own chunk (output, input or
//! gradient) sits in registers across its entries. Each task owns its part of the
//! output; the splits are fixed, and the work a task does for one output element is in
//! the same order whatever the thread count.
//!
//! The decode and the weight gradients add their terms in the order of the plain loops
//! (ascending latent for a decoded row, ascending row for a weight-gradient element),
//! as the products did before these kernels. The sampled dot sums each chunk in 64
//! lanes, added as a fixed tree, and the chunks in order.

use crate::cpu::{avx512, SharedMut};
use rayon::prelude::*;

/// Floats of `d_in` per chunk: eight AVX-512 registers.
const CHUNK: usize = 128;
/// Latents per block: a block × chunk of a weight matrix is 512 KB, half an L2.
const LATENT_BLOCK: usize = 1024;
/// Entries ahead whose weight (or gradient) slice is prefetched: they lie in random
/// rows of the block, which the hardware prefetcher cannot guess.
const AHEAD_ENTRIES: usize = 6;
/// Rows ahead whose entries are prefetched (each row's entries in a block are a short
/// run somewhere in the index and value arrays).
const AHEAD_ROWS: usize = 4;

/// Asks for the cache lines of `len` floats at `p`. A hint: it never faults.
#[inline(always)]
fn prefetch(p: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for i in (0..len).step_by(16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is a hint; it never faults, whatever the address.
        unsafe { _mm_prefetch(p.wrapping_add(i) as *const i8, _MM_HINT_T0) };
    }
}

/// `o = beta * o`, as the products start (0 and 1 exactly).
fn scale(o: &mut [f32], beta: f32) {
    if beta == 0.0 {
        o.fill(0.0);
    } else if beta != 1.0 {
        o.iter_mut().for_each(|v| *v *= beta);
    }
}

/// Defines `$name::<W>(args)`: `$body::<W>`, also compiled for AVX-512 and picked at
/// run time. `W` is the chunk width, fixed so that the compiler keeps a chunk in
/// registers; `W = 0` takes the width from the `wd` argument (a last, narrower chunk).
macro_rules! with_avx512 {
    ($name:ident, $avx:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        fn $avx<const W: usize>($($arg: $ty),*) {
            $body::<W>($($arg),*)
        }
        fn $name<const W: usize>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: this CPU has AVX-512F (checked above).
                return unsafe { $avx::<W>($($arg),*) };
            }
            $body::<W>($($arg),*)
        }
    };
}

/// Runs `f::<CHUNK>` on full chunks and `f::<0>` on the last, narrower one.
macro_rules! by_width {
    ($f:ident, $wd:expr, ($($arg:expr),*)) => {
        match $wd == CHUNK {
            true => $f::<CHUNK>($($arg),*),
            false => $f::<0>($($arg),*),
        }
    };
}

/// A CSR matrix's parts (`values` may be empty where only the pattern is used).
#[derive(Clone, Copy)]
struct CsrRef<'a> {
    offsets: &'a [u32],
    indices: &'a [u32],
    values: &'a [f32],
}

/// Where each row's entries of each latent block start: `starts[r * (nb + 1) + b]`,
/// with the row's end last. One pass over the indices, so the products need not search
/// them.
struct BlockStarts {
    nb: usize,
    starts: Vec<u32>,
}

impl BlockStarts {
    fn new(a: CsrRef, cols: usize) -> BlockStarts {
        let nb = cols.div_ceil(LATENT_BLOCK).max(1);
        let mut starts = vec![0u32; (a.offsets.len() - 1) * (nb + 1)];
        starts
            .par_chunks_mut(nb + 1)
            .enumerate()
            .with_min_len(64)
            .for_each(|(r, s)| {
                let (mut e, end) = (a.offsets[r] as usize, a.offsets[r + 1] as usize);
                for (b, s) in s.iter_mut().enumerate().take(nb) {
                    *s = e as u32;
                    while e < end && (a.indices[e] as usize) < (b + 1) * LATENT_BLOCK {
                        e += 1;
                    }
                }
                s[nb] = end as u32;
            });
        BlockStarts { nb, starts }
    }

    /// Row `r`'s entries in latent block `b`, prefetching those of a later row.
    #[inline(always)]
    fn span(&self, a: CsrRef, r: usize, b: usize, r1: usize) -> std::ops::Range<usize> {
        let at = r * (self.nb + 1) + b;
        if r + AHEAD_ROWS < r1 {
            let next = self.starts[at + AHEAD_ROWS * (self.nb + 1)] as usize;
            prefetch(a.indices.as_ptr().wrapping_add(next) as *const f32, 32);
            if !a.values.is_empty() {
                prefetch(a.values.as_ptr().wrapping_add(next), 32);
            }
        }
        self.starts[at] as usize..self.starts[at + 1] as usize
    }
}

/// Latents `j0..j0 + LATENT_BLOCK` (at most `cols`) of block `b`.
fn block(b: usize, cols: usize) -> (usize, usize) {
    let j0 = b * LATENT_BLOCK;
    (j0, LATENT_BLOCK.min(cols - j0))
}

/// Row ranges so that, with `tasks_per_range` tasks each, every thread has work; how
/// the rows are split changes no sum.
fn row_ranges(rows: usize, tasks_per_range: usize) -> Vec<(usize, usize)> {
    let want = (2 * crate::num_threads()).div_ceil(tasks_per_range.max(1));
    let len = rows.div_ceil(want.max(1)).max(1);
    (0..rows)
        .step_by(len)
        .map(|r0| (r0, (r0 + len).min(rows)))
        .collect()
}

/// Where entry `e`'s row starts in a matrix at `m` with rows `stride` apart and
/// latent `j0` first, prefetching the `wd` floats of entry `e + AHEAD_ENTRIES`'s row.
#[inline(always)]
fn entry_row(
    a: CsrRef,
    e: usize,
    end: usize,
    (m, j0, stride, wd): (*const f32, usize, usize, usize),
) -> usize {
    if e + AHEAD_ENTRIES < end {
        let j = a.indices[e + AHEAD_ENTRIES] as usize - j0;
        prefetch(m.wrapping_add(j * stride), wd);
    }
    (a.indices[e] as usize - j0) * stride
}

/// Rows `r0..r1` of `out` `[rows, d]`, columns `c0..c0+wd`: `+= alpha * val * w[j, c0..]`
/// over their entries, summed in registers a latent block at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_body<const W: usize>(
    a: CsrRef,
    bs: &BlockStarts,
    (r0, r1): (usize, usize),
    w: &[f32],
    d: usize,
    c0: usize,
    wd: usize,
    alpha: f32,
    out: SharedMut,
) {
    let wd = if W > 0 { W } else { wd };
    let mut acc = [0f32; CHUNK];
    let acc = &mut acc[..wd];
    let wc = &w[c0..];
    for b in 0..bs.nb {
        for r in r0..r1 {
            let span = bs.span(a, r, b, r1);
            if span.is_empty() {
                continue;
            }
            // SAFETY: this task alone writes columns c0..c0+wd of rows r0..r1 of `out`
            // ([rows, d], alive for the whole product).
            let orow = unsafe { std::slice::from_raw_parts_mut(out.at(r * d + c0), wd) };
            acc.copy_from_slice(orow);
            let end = span.end;
            for e in span {
                let v = alpha * a.values[e];
                let wr = &wc[entry_row(a, e, end, (wc.as_ptr(), 0, d, wd))..][..wd];
                acc.iter_mut().zip(wr).for_each(|(o, w)| *o += v * w);
            }
            orow.copy_from_slice(acc);
        }
    }
}
with_avx512!(decode, decode_avx512, decode_body, (a: CsrRef, bs: &BlockStarts, rows: (usize, usize), w: &[f32], d: usize, c0: usize, wd: usize, alpha: f32, out: SharedMut));

/// `out[r, :] = beta*out[r, :] + alpha * sum_e val[e] * w[idx[e], :]`
#[allow(clippy::too_many_arguments)]
pub fn csr_matmul(
    offsets: &[u32],
    indices: &[u32],
    values: &[f32],
    w: &[f32],
    d: usize,
    out: &mut [f32],
    alpha: f32,
    beta: f32,
) {
    let rows = offsets.len() - 1;
    if rows == 0 || d == 0 {
        return;
    }
    out.par_chunks_mut(d).for_each(|o| scale(o, beta));
    let a = CsrRef {
        offsets,
        indices,
        values,
    };
    let bs = BlockStarts::new(a, w.len() / d);
    let chunks: Vec<usize> = (0..d).step_by(CHUNK).collect();
    let tasks: Vec<((usize, usize), usize)> = row_ranges(rows, chunks.len())
        .into_iter()
        .flat_map(|rr| chunks.iter().map(move |&c0| (rr, c0)))
        .collect();
    let o = SharedMut(out.as_mut_ptr());
    tasks.into_par_iter().for_each(|(rr, c0)| {
        let wd = CHUNK.min(d - c0);
        by_width!(decode, wd, (a, &bs, rr, w, d, c0, wd, alpha, o));
    });
}

/// `a . b` in 64 lanes (four registers), added as a fixed tree.
#[inline(always)]
fn dot64(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 64];
    let n = a.len() / 64 * 64;
    for (x, y) in a[..n].chunks_exact(64).zip(b[..n].chunks_exact(64)) {
        for l in 0..64 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in a[n..].iter().zip(&b[n..]).enumerate() {
        acc[l] += x * y;
    }
    let mut half = 32;
    while half > 0 {
        for l in 0..half {
            acc[l] += acc[l + half];
        }
        half /= 2;
    }
    acc[0]
}

/// `out[e] += x[r, c0..c0+wd] . w[j, c0..c0+wd]` for the entries of rows `r0..r1`
/// (`out` indexed from the first of them), a latent block at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dot_body<const W: usize>(
    a: CsrRef,
    bs: &BlockStarts,
    (r0, r1): (usize, usize),
    x: &[f32],
    w: &[f32],
    d: usize,
    c0: usize,
    wd: usize,
    out: &mut [f32],
) {
    let wd = if W > 0 { W } else { wd };
    let base = a.offsets[r0] as usize;
    let mut xa = [0f32; CHUNK];
    let xa = &mut xa[..wd];
    let wc = &w[c0..];
    for b in 0..bs.nb {
        for r in r0..r1 {
            let span = bs.span(a, r, b, r1);
            if span.is_empty() {
                continue;
            }
            xa.copy_from_slice(&x[r * d + c0..][..wd]);
            let end = span.end;
            for e in span {
                let wr = &wc[entry_row(a, e, end, (wc.as_ptr(), 0, d, wd))..][..wd];
                out[e - base] += dot64(xa, wr);
            }
        }
    }
}
with_avx512!(sampled, sampled_avx512, dot_body, (a: CsrRef, bs: &BlockStarts, rows: (usize, usize), x: &[f32], w: &[f32], d: usize, c0: usize, wd: usize, out: &mut [f32]));

/// `out[e] = x[r, :] . w[idx[e], :]` for every stored entry `e` of row `r`.
pub fn csr_sampled_dot(
    offsets: &[u32],
    indices: &[u32],
    x: &[f32],
    w: &[f32],
    d: usize,
    out: &mut [f32],
) {
    let rows = offsets.len() - 1;
    if rows == 0 || d == 0 {
        return;
    }
    let a = CsrRef {
        offsets,
        indices,
        values: &[],
    };
    let bs = BlockStarts::new(a, w.len() / d);
    // A range's entries are the contiguous run of `out` from its first row's offset.
    let mut parts = Vec::new();
    let mut rest = out;
    for (r0, r1) in row_ranges(rows, 1) {
        let (p, q) = rest.split_at_mut((offsets[r1] - offsets[r0]) as usize);
        parts.push(((r0, r1), p));
        rest = q;
    }
    parts.into_par_iter().for_each(|(rr, o)| {
        o.fill(0.0);
        for c0 in (0..d).step_by(CHUNK) {
            let wd = CHUNK.min(d - c0);
            by_width!(sampled, wd, (a, &bs, rr, x, w, d, c0, wd, o));
        }
    });
}

/// Columns `c0..c0+wd` of the weight gradient `csr^T @ x`, a latent block at a time:
/// each row's chunk of `x`, in registers, is added times each entry's value into its
/// latent's row of a `[LATENT_BLOCK, wd]` tile. `load(b, tile)` fills the tile first
/// and `store(b, tile)` takes it after.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_body<const W: usize>(
    a: CsrRef,
    bs: &BlockStarts,
    rows: usize,
    x: &[f32],
    d: usize,
    c0: usize,
    wd: usize,
    load: &dyn Fn(usize, &mut Vec<f32>),
    store: &dyn Fn(usize, &[f32]),
) {
    let wd = if W > 0 { W } else { wd };
    let mut xa = [0f32; CHUNK];
    let xa = &mut xa[..wd];
    let mut tile = Vec::with_capacity(LATENT_BLOCK * wd);
    for b in 0..bs.nb {
        load(b, &mut tile);
        let j0 = b * LATENT_BLOCK;
        for r in 0..rows {
            let span = bs.span(a, r, b, rows);
            if span.is_empty() {
                continue;
            }
            xa.copy_from_slice(&x[r * d + c0..][..wd]);
            let end = span.end;
            for e in span {
                let v = a.values[e];
                let at = entry_row(a, e, end, (tile.as_ptr(), j0, wd, wd));
                let grow = &mut tile[at..][..wd];
                grow.iter_mut()
                    .zip(xa.iter())
                    .for_each(|(g, x)| *g += v * x);
            }
        }
        store(b, &tile);
    }
}
with_avx512!(grad, grad_avx512, grad_body, (a: CsrRef, bs: &BlockStarts, rows: usize, x: &[f32], d: usize, c0: usize, wd: usize, load: &dyn Fn(usize, &mut Vec<f32>), store: &dyn Fn(usize, &[f32])));

/// `out = beta*out + alpha * csr^T @ x`, with `csr` `[rows, cols]`, `x` `[rows, d]`,
/// `out` `[cols, d]` (or `[d, cols]` when `out_transposed`).
#[allow(clippy::too_many_arguments)]
pub fn csr_t_matmul(
    offsets: &[u32],
    indices: &[u32],
    values: &[f32],
    cols: usize,
    x: &[f32],
    d: usize,
    out: &mut [f32],
    out_transposed: bool,
    alpha: f32,
    beta: f32,
) {
    let rows = offsets.len() - 1;
    if rows == 0 || d == 0 || cols == 0 {
        scale(out, beta);
        return;
    }
    let scaled: Vec<f32>;
    let values = match alpha == 1.0 {
        true => values,
        false => {
            scaled = values.iter().map(|v| alpha * v).collect();
            &scaled
        }
    };
    let a = CsrRef {
        offsets,
        indices,
        values,
    };
    let bs = BlockStarts::new(a, cols);
    let o = SharedMut(out.as_mut_ptr());
    let chunks: Vec<usize> = (0..d).step_by(CHUNK).collect();
    chunks.into_par_iter().for_each(|c0| {
        let wd = CHUNK.min(d - c0);
        // SAFETY (both closures): this task alone reads and writes columns c0..c0+wd of
        // `out` `[cols, d]`, or rows c0..c0+wd of `out` `[d, cols]`; `out` outlives the
        // product.
        if !out_transposed {
            // The tile starts from beta * out: each element then gets its terms in
            // ascending row order, as the plain loop adds them.
            let load = |b: usize, tile: &mut Vec<f32>| {
                let (j0, n) = block(b, cols);
                tile.clear();
                for j in j0..j0 + n {
                    let row = unsafe { std::slice::from_raw_parts(o.at(j * d + c0), wd) };
                    tile.extend(row.iter().map(|&v| {
                        if beta == 0.0 {
                            0.0
                        } else if beta == 1.0 {
                            v
                        } else {
                            beta * v
                        }
                    }));
                }
            };
            let store = |b: usize, tile: &[f32]| {
                let (j0, n) = block(b, cols);
                for (j, t) in (j0..j0 + n).zip(tile.chunks_exact(wd)) {
                    unsafe { std::slice::from_raw_parts_mut(o.at(j * d + c0), wd) }
                        .copy_from_slice(t);
                }
            };
            by_width!(grad, wd, (a, &bs, rows, x, d, c0, wd, &load, &store));
        } else {
            // The tile starts from zero and is added across into out[c, j] = beta *
            // out[c, j] + sum.
            let load = |b: usize, tile: &mut Vec<f32>| {
                tile.clear();
                tile.resize(block(b, cols).1 * wd, 0.0);
            };
            let store = |b: usize, tile: &[f32]| {
                let (j0, n) = block(b, cols);
                for c in 0..wd {
                    let orow =
                        unsafe { std::slice::from_raw_parts_mut(o.at((c0 + c) * cols + j0), n) };
                    for (jj, o) in orow.iter_mut().enumerate() {
                        let base = if beta == 0.0 { 0.0 } else { beta * *o };
                        *o = base + tile[jj * wd + c];
                    }
                }
            };
            by_width!(grad, wd, (a, &bs, rows, x, d, c0, wd, &load, &store));
        }
    });
}
