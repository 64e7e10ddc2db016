//! The sparse products of an SAE step on the CPU: the decode `csr @ w`, the gradient
//! at the active entries (`x @ w^T` sampled at them) and the weight gradients
//! `csr^T @ x` (plain or transposed).
//!
//! At `d_sae` 24576 a weight matrix is 75 MB, larger than the caches, and each active
//! entry touches one of its rows. Entry by entry over whole rows, those rows came from
//! memory and each entry's loop overhead bought little arithmetic. Here `d_in` is cut
//! into chunks of [`CHUNK`] floats and the latents into blocks (of 1024 at 2 %
//! density): a block's slice of the weights (or a tile of the weight gradient)
//! stays in L2 while every row's entries in that block use it, and the row's own chunk
//! (output or input) sits in registers across its entries. The next entries' weight
//! rows and the next rows' chunks are prefetched. Each task owns its part of the
//! output, and the work for one output element is in the same order whatever the
//! thread count. Measured at 768 × 24576, 2 % density, 2 cores: the four products took
//! 140 + 115 + 112 + 284 ms entry by entry, about 75 + 105 + 75 + 70 ms here.
//!
//! The decode and the weight gradients add their terms in the order of the plain loops
//! (ascending latent for a decoded row, ascending row for a weight-gradient element),
//! as the products did before these kernels. The sampled dot sums each chunk in 64
//! lanes, added as a fixed tree, and the chunks in order.

use crate::cpu::{avx512, SharedMut, FLAT_GRAIN};
use rayon::prelude::*;

/// Floats of `d_in` per chunk: eight AVX-512 registers.
const CHUNK: usize = 128;
/// The sampled dot's chunk, sixteen registers: each entry's chunk ends in a horizontal
/// sum, so wider chunks need fewer of them.
const DOT_CHUNK: usize = 256;
/// Latents per block: a block × chunk of a weight matrix is at most `BLOCK_BYTES`,
/// half an L2 (1024 latents at [`CHUNK`]). Rows with few entries (top-k's k = 32 of
/// 24576) get larger blocks, aiming at [`ENTRIES_PER_BLOCK`] entries per row and block
/// (each visit of a row costs), but small enough that a block's whole rows,
/// [`L3_BLOCK_BYTES`], stay in L3 while the chunks are worked through: there each
/// weight row is used by only a few entries, read from memory once per block rather
/// than once per entry and chunk.
const BLOCK_BYTES: usize = 512 * 1024;
const ENTRIES_PER_BLOCK: usize = 16;
const L3_BLOCK_BYTES: usize = 16 << 20;
/// Entries ahead whose weight (or gradient) slice is prefetched: they lie in random
/// rows of the block, which the hardware prefetcher cannot guess.
const AHEAD_ENTRIES: usize = 6;
/// Rows ahead whose entries and dense chunk are prefetched (a row's entries in a
/// block are a short run somewhere in the index and value arrays, and its chunk is a
/// page or so from the last row's).
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
        #[allow(clippy::too_many_arguments)]
        fn $avx<const W: usize>($($arg: $ty),*) {
            $body::<W>($($arg),*)
        }
        #[allow(clippy::too_many_arguments)]
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
        by_width!($f, CHUNK, $wd, ($($arg),*))
    };
    ($f:ident, $full:expr, $wd:expr, ($($arg:expr),*)) => {
        match $wd == $full {
            true => $f::<$full>($($arg),*),
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
    /// Latents per block, and the number of blocks.
    size: usize,
    nb: usize,
    starts: Vec<u32>,
}

impl BlockStarts {
    /// For a matrix of `cols` latents whose dense operand rows are `d` floats.
    fn new(a: CsrRef, cols: usize, d: usize, chunk: usize) -> BlockStarts {
        let rows = a.offsets.len() - 1;
        let per_row = a.indices.len() / rows.max(1);
        let nb = (per_row / ENTRIES_PER_BLOCK)
            .max((cols * d * 4).div_ceil(L3_BLOCK_BYTES))
            .min(cols.div_ceil((BLOCK_BYTES / (4 * chunk)).max(1)))
            .max(1);
        let size = cols.div_ceil(nb).max(1);
        let mut starts = vec![0u32; (a.offsets.len() - 1) * (nb + 1)];
        starts
            .par_chunks_mut(nb + 1)
            .enumerate()
            .with_min_len(64)
            .for_each(|(r, s)| {
                let (mut e, end) = (a.offsets[r] as usize, a.offsets[r + 1] as usize);
                for (b, s) in s.iter_mut().enumerate().take(nb) {
                    *s = e as u32;
                    while e < end && (a.indices[e] as usize) < (b + 1) * size {
                        e += 1;
                    }
                }
                s[nb] = end as u32;
            });
        BlockStarts { size, nb, starts }
    }

    /// Row `r`'s entries in latent block `b`, prefetching those of a later row and that
    /// row's `(chunk, wd)` (its chunk of a dense `[rows, d]` matrix lies at
    /// `chunk + row * d`).
    #[inline(always)]
    fn span(
        &self,
        a: CsrRef,
        (r, r1): (usize, usize),
        b: usize,
        (chunk, d, wd): (*const f32, usize, usize),
    ) -> std::ops::Range<usize> {
        prefetch(chunk.wrapping_add((r + AHEAD_ROWS) * d), wd);
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

/// A matrix whose rows the entries pick: latent `j`'s `wd` floats start at
/// `m + (j - j0) * stride`.
#[derive(Clone, Copy)]
struct MatRows {
    m: *const f32,
    j0: usize,
    stride: usize,
    wd: usize,
}

impl MatRows {
    /// The rows of a `[.., d]` matrix from `m`'s first float (a column chunk's start).
    fn chunk_of(m: &[f32], d: usize, wd: usize) -> MatRows {
        MatRows {
            m: m.as_ptr(),
            j0: 0,
            stride: d,
            wd,
        }
    }

    #[inline(always)]
    fn at(self, j: usize) -> usize {
        (j - self.j0) * self.stride
    }
    #[inline(always)]
    fn prefetch(self, j: usize) {
        prefetch(
            self.m
                .wrapping_add(j.wrapping_sub(self.j0).wrapping_mul(self.stride)),
            self.wd,
        );
    }
}

impl BlockStarts {
    /// The first latent of block `b` and how many it holds (of `cols`).
    fn block(&self, b: usize, cols: usize) -> (usize, usize) {
        let j0 = b * self.size;
        (j0, self.size.min(cols - j0))
    }
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

/// Where entry `e`'s row starts in `m`, prefetching that of entry `e + AHEAD_ENTRIES`.
#[inline(always)]
fn entry_row(a: CsrRef, e: usize, end: usize, m: MatRows) -> usize {
    if e + AHEAD_ENTRIES < end {
        m.prefetch(a.indices[e + AHEAD_ENTRIES] as usize);
    }
    m.at(a.indices[e] as usize)
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
    let m = MatRows::chunk_of(wc, d, wd);
    for b in 0..bs.nb {
        for r in r0..r1 {
            let span = bs.span(a, (r, r1), b, (out.at(c0), d, wd));
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
                let wr = &wc[entry_row(a, e, end, m)..][..wd];
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
    out.par_chunks_mut(FLAT_GRAIN).for_each(|o| scale(o, beta));
    let a = CsrRef {
        offsets,
        indices,
        values,
    };
    let bs = BlockStarts::new(a, w.len() / d, d, CHUNK);
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
    let mut xa = [0f32; DOT_CHUNK];
    let xa = &mut xa[..wd];
    let wc = &w[c0..];
    let m = MatRows::chunk_of(wc, d, wd);
    for b in 0..bs.nb {
        for r in r0..r1 {
            let span = bs.span(a, (r, r1), b, (x[c0..].as_ptr(), d, wd));
            if span.is_empty() {
                continue;
            }
            xa.copy_from_slice(&x[r * d + c0..][..wd]);
            let end = span.end;
            for e in span {
                let wr = &wc[entry_row(a, e, end, m)..][..wd];
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
    let bs = BlockStarts::new(a, w.len() / d, d, DOT_CHUNK);
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
        for c0 in (0..d).step_by(DOT_CHUNK) {
            let wd = DOT_CHUNK.min(d - c0);
            by_width!(sampled, DOT_CHUNK, wd, (a, &bs, rr, x, w, d, c0, wd, o));
        }
    });
}

/// Columns `c0..c0+wd` of the weight gradient `csr^T @ x`, a latent block at a time:
/// each row's chunk of `x`, in registers, is added times each entry's value into its
/// latent's row of `g`. That is `direct`, the output's rows (`d` apart, from column
/// `c0`), or else a `[block, wd]` tile that `load(b, tile)` fills first and
/// `store(b, tile)` takes after.
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
    direct: Option<SharedMut>,
    load: &dyn Fn(usize, &mut Vec<f32>),
    store: &dyn Fn(usize, &[f32]),
) {
    let wd = if W > 0 { W } else { wd };
    let mut xa = [0f32; CHUNK];
    let xa = &mut xa[..wd];
    let mut tile = Vec::new();
    for b in 0..bs.nb {
        let g = match direct {
            Some(g) => MatRows {
                m: g.at(0),
                j0: 0,
                stride: d,
                wd,
            },
            None => {
                load(b, &mut tile);
                MatRows {
                    m: tile.as_mut_ptr(),
                    j0: b * bs.size,
                    stride: wd,
                    wd,
                }
            }
        };
        for r in 0..rows {
            let span = bs.span(a, (r, rows), b, (x[c0..].as_ptr(), d, wd));
            if span.is_empty() {
                continue;
            }
            xa.copy_from_slice(&x[r * d + c0..][..wd]);
            let end = span.end;
            for e in span {
                let v = a.values[e];
                // SAFETY: the row lies in this task's tile, or in columns c0..c0+wd of
                // the output, which this task alone writes (alive for the product).
                let grow = unsafe {
                    std::slice::from_raw_parts_mut(
                        (g.m as *mut f32).add(entry_row(a, e, end, g)),
                        wd,
                    )
                };
                grow.iter_mut()
                    .zip(xa.iter())
                    .for_each(|(g, x)| *g += v * x);
            }
        }
        if direct.is_none() {
            store(b, &tile);
        }
    }
}
with_avx512!(grad, grad_avx512, grad_body, (a: CsrRef, bs: &BlockStarts, rows: usize, x: &[f32], d: usize, c0: usize, wd: usize, direct: Option<SharedMut>, load: &dyn Fn(usize, &mut Vec<f32>), store: &dyn Fn(usize, &[f32])));

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
    let bs = BlockStarts::new(a, cols, d, CHUNK);
    // With few entries per latent, copying each block of the output to a tile and
    // back costs more than adding into its rows where they lie (same sums either way).
    let direct = !out_transposed && a.indices.len() < 8 * cols;
    if direct {
        out.par_chunks_mut(FLAT_GRAIN).for_each(|o| scale(o, beta));
    }
    let o = SharedMut(out.as_mut_ptr());
    let chunks: Vec<usize> = (0..d).step_by(CHUNK).collect();
    chunks.into_par_iter().for_each(|c0| {
        let wd = CHUNK.min(d - c0);
        // SAFETY (both closures): this task alone reads and writes columns c0..c0+wd of
        // `out` `[cols, d]`, or rows c0..c0+wd of `out` `[d, cols]`; `out` outlives the
        // product.
        if direct {
            let none = |_: usize, _: &mut Vec<f32>| {};
            let none2 = |_: usize, _: &[f32]| {};
            by_width!(
                grad,
                wd,
                (
                    a,
                    &bs,
                    rows,
                    x,
                    d,
                    c0,
                    wd,
                    Some(SharedMut(o.at(c0))),
                    &none,
                    &none2
                )
            );
        } else if !out_transposed {
            // The tile starts from beta * out: each element then gets its terms in
            // ascending row order, as the plain loop adds them.
            let load = |b: usize, tile: &mut Vec<f32>| {
                let (j0, n) = bs.block(b, cols);
                tile.clear();
                for j in j0..j0 + n {
                    let row = unsafe { std::slice::from_raw_parts(o.at(j * d + c0), wd) };
                    tile.extend_from_slice(row);
                }
                scale(tile, beta);
            };
            let store = |b: usize, tile: &[f32]| {
                let (j0, n) = bs.block(b, cols);
                for (j, t) in (j0..j0 + n).zip(tile.chunks_exact(wd)) {
                    unsafe { std::slice::from_raw_parts_mut(o.at(j * d + c0), wd) }
                        .copy_from_slice(t);
                }
            };
            by_width!(grad, wd, (a, &bs, rows, x, d, c0, wd, None, &load, &store));
        } else {
            // The tile starts from zero and is added across into out[c, j] = beta *
            // out[c, j] + sum.
            let load = |b: usize, tile: &mut Vec<f32>| {
                tile.clear();
                tile.resize(bs.block(b, cols).1 * wd, 0.0);
            };
            let store = |b: usize, tile: &[f32]| {
                let (j0, n) = bs.block(b, cols);
                for c in 0..wd {
                    let orow =
                        unsafe { std::slice::from_raw_parts_mut(o.at((c0 + c) * cols + j0), n) };
                    for (jj, o) in orow.iter_mut().enumerate() {
                        let base = if beta == 0.0 { 0.0 } else { beta * *o };
                        *o = base + tile[jj * wd + c];
                    }
                }
            };
            by_width!(grad, wd, (a, &bs, rows, x, d, c0, wd, None, &load, &store));
        }
    });
}
