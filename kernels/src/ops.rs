//! The op API. Every function checks shapes, then runs on the tensors' device.
//!
//! Naming: `x` `[rows, cols]` is a batch (one row per token), `v` `[cols]` a vector
//! broadcast over rows, `s` `[rows]` a per-row value. Functions ending in `_backward`
//! take upstream gradients and write or accumulate input gradients as documented.
//! Nothing here allocates a `[rows, cols]` buffer unless its doc line says so.

use crate::{cpu, Csr, Device, Tensor};
use rayon::prelude::*;

/// When `$t` lives on a GPU, runs `$body` with its backend bound to `$g` and returns
/// its result; a CUDA failure (a launch, out of memory) panics with CUDA's message, as
/// ops have no error path.
macro_rules! on_cuda {
    ($t:expr, |$g:ident| $body:expr) => {
        #[cfg(feature = "cuda")]
        if let Some($g) = $t.gpu() {
            return crate::cuda::check($body);
        }
    };
}

mod lm;
pub use lm::*;

fn same_shape(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}: shape mismatch");
}

fn is_vec(v: &Tensor, n: usize, what: &str) {
    assert!(
        v.shape().len() == 1 && v.shape()[0] == n,
        "{what}: expected a vector of length {n}, got shape {:?}",
        v.shape()
    );
}

/// Checks that `block` fits rows `start..start + block.rows` of `whole` with the same
/// columns; returns the column count.
fn row_block(whole: &Tensor, start: usize, block: &Tensor, what: &str) -> usize {
    let (r, c) = dims2(whole);
    let (br, bc) = dims2(block);
    assert!(
        bc == c && start + br <= r,
        "{what}: rows {start}..{} of {:?} against a block {:?}",
        start + br,
        whole.shape(),
        block.shape()
    );
    c
}

fn dims2(t: &Tensor) -> (usize, usize) {
    (t.rows(), t.cols())
}

/// `out = beta*out + alpha * op(a) @ op(b)` where `op` transposes when asked.
/// Shapes: `op(a)` `[m, k]`, `op(b)` `[k, n]`, `out` `[m, n]`.
pub fn matmul(
    out: &mut Tensor,
    a: &Tensor,
    trans_a: bool,
    b: &Tensor,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) {
    let (ar, ac) = dims2(a);
    let (br, bc) = dims2(b);
    let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if trans_b { (bc, br) } else { (br, bc) };
    assert_eq!(
        k,
        k2,
        "matmul: inner dims differ ({:?}{} @ {:?}{})",
        a.shape(),
        if trans_a { "^T" } else { "" },
        b.shape(),
        if trans_b { "^T" } else { "" }
    );
    assert_eq!(
        (out.rows(), out.cols()),
        (m, n),
        "matmul: output shape {:?}, expected [{m}, {n}]",
        out.shape()
    );
    on_cuda!(out, |g| g.matmul(
        out.cu_mut(),
        a.cu(),
        trans_a,
        b.cu(),
        trans_b,
        (m, n, k),
        alpha,
        beta
    ));
    cpu::matmul(
        m,
        n,
        k,
        out.cpu_mut(),
        a.cpu(),
        trans_a,
        b.cpu(),
        trans_b,
        alpha,
        beta,
    );
}

/// `out = beta*out + alpha * op(a) @ x` for a matrix `a` and vectors `x`, `out`.
pub fn matvec(out: &mut Tensor, a: &Tensor, trans_a: bool, x: &Tensor, alpha: f32, beta: f32) {
    let (ar, ac) = dims2(a);
    let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    is_vec(x, k, "matvec input");
    is_vec(out, m, "matvec output");
    on_cuda!(out, |g| g.matmul(
        out.cu_mut(),
        a.cu(),
        trans_a,
        x.cu(),
        false,
        (m, 1, k),
        alpha,
        beta
    ));
    cpu::matmul(
        m,
        1,
        k,
        out.cpu_mut(),
        a.cpu(),
        trans_a,
        x.cpu(),
        false,
        alpha,
        beta,
    );
}

pub fn fill(t: &mut Tensor, v: f32) {
    on_cuda!(t, |g| g.fill(t.cu_mut(), v));
    cpu::fill(t.cpu_mut(), v);
}

pub fn copy(dst: &mut Tensor, src: &Tensor) {
    same_shape(dst, src, "copy");
    on_cuda!(dst, |g| g.copy(dst.cu_mut(), src.cu()));
    dst.cpu_mut().copy_from_slice(src.cpu());
}

/// `t *= s`
pub fn scale(t: &mut Tensor, s: f32) {
    on_cuda!(t, |g| g.scale(t.cu_mut(), s));
    cpu::scale(t.cpu_mut(), s);
}

/// `y += alpha * x`
pub fn axpy(y: &mut Tensor, alpha: f32, x: &Tensor) {
    same_shape(y, x, "axpy");
    on_cuda!(y, |g| g.axpy(y.cu_mut(), 0, alpha, x.cu()));
    cpu::axpy(y.cpu_mut(), alpha, x.cpu());
}

/// `y *= x` element-wise.
pub fn mul(y: &mut Tensor, x: &Tensor) {
    same_shape(y, x, "mul");
    on_cuda!(y, |g| g.mul(y.cu_mut(), x.cu()));
    cpu::mul(y.cpu_mut(), x.cpu());
}

/// `out = exp(x)` element-wise.
pub fn exp(x: &Tensor, out: &mut Tensor) {
    same_shape(x, out, "exp");
    on_cuda!(out, |g| g.exp(x.cu(), out.cu_mut()));
    cpu::exp(x.cpu(), out.cpu_mut());
}

/// `x[r, :] += alpha * v` (bias add).
pub fn add_row_vec(x: &mut Tensor, v: &Tensor, alpha: f32) {
    let c = x.cols();
    is_vec(v, c, "add_row_vec");
    on_cuda!(x, |g| g.add_row_vec(x.cu_mut(), v.cu(), alpha));
    cpu::add_row_vec(x.cpu_mut(), c, v.cpu(), alpha);
}

/// `x[r, j] *= v[j]` (scale each column).
pub fn mul_row_vec(x: &mut Tensor, v: &Tensor) {
    let c = x.cols();
    is_vec(v, c, "mul_row_vec");
    on_cuda!(x, |g| g.mul_row_vec(x.cu_mut(), v.cu()));
    cpu::mul_row_vec(x.cpu_mut(), c, v.cpu());
}

/// `x[r, j] = x[r, j] * scale[j] + shift[j]`, the bits of [`mul_row_vec`] then
/// [`add_row_vec`] in one pass (two on a GPU).
pub fn scale_shift_cols(x: &mut Tensor, scale: &Tensor, shift: &Tensor) {
    let c = x.cols();
    is_vec(scale, c, "scale_shift_cols scale");
    is_vec(shift, c, "scale_shift_cols shift");
    #[cfg(feature = "cuda")]
    if x.gpu().is_some() {
        mul_row_vec(x, scale);
        return add_row_vec(x, shift, 1.0);
    }
    cpu::scale_shift_cols(x.cpu_mut(), c, scale.cpu(), shift.cpu());
}

/// `x[r, :] = x[r, :] * scale[r] + shift[r]`
pub fn row_affine(x: &mut Tensor, scale: &Tensor, shift: &Tensor) {
    let (r, c) = dims2(x);
    is_vec(scale, r, "row_affine scale");
    is_vec(shift, r, "row_affine shift");
    on_cuda!(x, |g| g.row_affine(x.cu_mut(), c, scale.cu(), shift.cu()));
    cpu::row_affine(x.cpu_mut(), c, scale.cpu(), shift.cpu());
}

/// `out = beta*out + alpha * sum over rows of x`.
pub fn col_sums(x: &Tensor, out: &mut Tensor, alpha: f32, beta: f32) {
    let c = x.cols();
    is_vec(out, c, "col_sums");
    on_cuda!(out, |g| g.col_sums(
        x.cu(),
        x.rows(),
        out.cu_mut(),
        alpha,
        beta
    ));
    cpu::col_sums(x.cpu(), c, out.cpu_mut(), alpha, beta);
}

/// `out[r] = ||x[r, :]||_2`
pub fn row_norms(x: &Tensor, out: &mut Tensor) {
    let (r, c) = dims2(x);
    is_vec(out, r, "row_norms");
    on_cuda!(out, |g| g.row_reduce(x.cu(), None, c, 0, out.cu_mut()));
    cpu::row_norms(x.cpu(), c, out.cpu_mut());
}

/// Per-row mean and unbiased standard deviation.
pub fn row_mean_std(x: &Tensor, mean: &mut Tensor, std: &mut Tensor) {
    let (r, c) = dims2(x);
    is_vec(mean, r, "row_mean_std mean");
    is_vec(std, r, "row_mean_std std");
    on_cuda!(x, |g| g.row_mean_std(
        x.cu(),
        c,
        mean.cu_mut(),
        std.cu_mut()
    ));
    cpu::row_mean_std(x.cpu(), c, mean.cpu_mut(), std.cpu_mut());
}

/// `out[r] = ||x[r, :] - mean over rows of x||_2`
pub fn centered_row_norms(x: &Tensor, out: &mut Tensor) {
    let (r, c) = dims2(x);
    is_vec(out, r, "centered_row_norms");
    on_cuda!(out, |g| g.centered_row_norms(x.cu(), c, out.cu_mut()));
    cpu::centered_row_norms(x.cpu(), c, out.cpu_mut());
}

/// `out[r] = a[r, :] . b[r, :]`
pub fn row_dots(a: &Tensor, b: &Tensor, out: &mut Tensor) {
    same_shape(a, b, "row_dots");
    let (r, c) = dims2(a);
    is_vec(out, r, "row_dots");
    on_cuda!(out, |g| g.row_reduce(
        a.cu(),
        Some(b.cu()),
        c,
        1,
        out.cu_mut()
    ));
    cpu::row_dots(a.cpu(), b.cpu(), c, out.cpu_mut());
}

/// `dst[j, :] += c[j] * src[j, :]`
pub fn add_scaled_rows(dst: &mut Tensor, src: &Tensor, c: &Tensor) {
    same_shape(dst, src, "add_scaled_rows");
    let (r, cols) = dims2(src);
    is_vec(c, r, "add_scaled_rows coefficients");
    on_cuda!(dst, |g| g.add_scaled_rows(
        dst.cu_mut(),
        src.cu(),
        cols,
        c.cu()
    ));
    cpu::add_scaled_rows(dst.cpu_mut(), src.cpu(), cols, c.cpu());
}

/// Sum of all elements (accumulated in f64).
pub fn sum(t: &Tensor) -> f64 {
    on_cuda!(t, |g| g.sum(t.cu(), false));
    cpu::sum(t.cpu())
}

/// Sum of squares of all elements (accumulated in f64).
pub fn sum_squares(t: &Tensor) -> f64 {
    on_cuda!(t, |g| g.sum(t.cu(), true));
    cpu::sum_squares(t.cpu())
}

/// `f = max(h, 0)`
pub fn relu(h: &Tensor, f: &mut Tensor) {
    same_shape(h, f, "relu");
    on_cuda!(f, |g| g.relu(h.cu(), f.cu_mut()));
    cpu::relu(h.cpu(), f.cpu_mut());
}

/// `dh = df * (h > 0)`
pub fn relu_backward(h: &Tensor, df: &Tensor, dh: &mut Tensor) {
    same_shape(h, df, "relu_backward");
    same_shape(h, dh, "relu_backward");
    on_cuda!(dh, |g| g.relu_backward(h.cu(), df.cu(), dh.cu_mut()));
    cpu::relu_backward(h.cpu(), df.cpu(), dh.cpu_mut());
}

/// `x *= (g > 0)` element-wise (a gate).
pub fn mask_positive(x: &mut Tensor, g: &Tensor) {
    same_shape(x, g, "mask_positive");
    on_cuda!(x, |gpu| gpu.mask_positive(x.cu_mut(), g.cu()));
    cpu::mask_positive(x.cpu_mut(), g.cpu());
}

/// JumpReLU: `f = h * (h > t[j])`.
pub fn jumprelu(h: &Tensor, t: &Tensor, f: &mut Tensor) {
    same_shape(h, f, "jumprelu");
    let c = h.cols();
    is_vec(t, c, "jumprelu threshold");
    on_cuda!(f, |g| g.jumprelu(h.cu(), t.cu(), f.cu_mut()));
    cpu::jumprelu(h.cpu(), c, t.cpu(), f.cpu_mut());
}

/// [`jumprelu`] of a block of rows: `f = jumprelu(h[start..start + f.rows, :], t)`.
pub fn jumprelu_rows(h: &Tensor, start: usize, t: &Tensor, f: &mut Tensor) {
    let c = row_block(h, start, f, "jumprelu_rows");
    let fr = f.rows();
    is_vec(t, c, "jumprelu_rows threshold");
    #[cfg(feature = "cuda")]
    if h.gpu().is_some() {
        let mut block = Tensor::zeros(&h.device(), &[fr, c]);
        copy_rows(h, start, &mut block);
        return jumprelu(&block, t, f);
    }
    cpu::jumprelu(
        &h.cpu()[start * c..(start + fr) * c],
        c,
        t.cpu(),
        f.cpu_mut(),
    );
}

/// A gated SAE's latents for a block of rows of its gate pre-activations `g`:
/// `f = ReLU(g * e[j] + shift[j]) * (g > 0)` over `g[start..start + f.rows, :]`, the
/// bits of [`scale_shift_cols`], [`relu`] and [`mask_positive`] in one pass.
pub fn gated_latents_rows(g: &Tensor, start: usize, e: &Tensor, shift: &Tensor, f: &mut Tensor) {
    let c = row_block(g, start, f, "gated_latents_rows");
    let fr = f.rows();
    is_vec(e, c, "gated_latents_rows scale");
    is_vec(shift, c, "gated_latents_rows shift");
    #[cfg(feature = "cuda")]
    if g.gpu().is_some() {
        let mut gate = Tensor::zeros(&g.device(), &[fr, c]);
        copy_rows(g, start, &mut gate);
        let mut h = gate.clone();
        scale_shift_cols(&mut h, e, shift);
        relu(&h, f);
        return mask_positive(f, &gate);
    }
    let g = &g.cpu()[start * c..(start + fr) * c];
    cpu::gated_latents(g, c, e.cpu(), shift.cpu(), f.cpu_mut());
}

/// Backward of [`jumprelu`] with the rectangle-kernel straight-through estimator of
/// width `bandwidth`: adds `df*(h>t)` to `dh` (plus the estimator when
/// `ste_to_input`), adds `-sum_r (t/bw) rect((h-t)/bw) df` to `dt`.
#[allow(clippy::too_many_arguments)]
pub fn jumprelu_backward(
    h: &Tensor,
    t: &Tensor,
    df: &Tensor,
    bandwidth: f32,
    ste_to_input: bool,
    dh: &mut Tensor,
    dt: &mut Tensor,
) {
    same_shape(h, df, "jumprelu_backward");
    same_shape(h, dh, "jumprelu_backward");
    let c = h.cols();
    is_vec(t, c, "jumprelu_backward threshold");
    is_vec(dt, c, "jumprelu_backward dt");
    on_cuda!(dh, |g| g.jumprelu_backward(
        h.cu(),
        t.cu(),
        df.cu(),
        bandwidth,
        ste_to_input,
        dh.cu_mut(),
        dt.cu_mut()
    ));
    cpu::jumprelu_backward(
        h.cpu(),
        c,
        t.cpu(),
        df.cpu(),
        bandwidth,
        ste_to_input,
        dh.cpu_mut(),
        dt.cpu_mut(),
    );
}

/// [`jumprelu_backward`] into a zero `dh` that is `df`'s own buffer: `d` goes in as
/// `df` and comes out as `dh` (the bits of `0 + dh`), so that a dense step need not
/// hold both. A GPU runs the out-of-place kernel into a fresh buffer.
pub fn jumprelu_backward_in_place(
    h: &Tensor,
    t: &Tensor,
    d: &mut Tensor,
    bandwidth: f32,
    ste_to_input: bool,
    dt: &mut Tensor,
) {
    same_shape(h, d, "jumprelu_backward_in_place");
    let c = h.cols();
    is_vec(t, c, "jumprelu_backward_in_place threshold");
    is_vec(dt, c, "jumprelu_backward_in_place dt");
    if d.device() != Device::Cpu {
        let mut dh = Tensor::zeros(&d.device(), d.shape());
        jumprelu_backward(h, t, d, bandwidth, ste_to_input, &mut dh, dt);
        *d = dh;
        return;
    }
    cpu::jumprelu_backward_in_place(
        h.cpu(),
        c,
        t.cpu(),
        d.cpu_mut(),
        bandwidth,
        ste_to_input,
        dt.cpu_mut(),
    );
}

/// `out[r] = number of j with h[r, j] > t[j]` (the L0 of a JumpReLU row).
pub fn step_count_rows(h: &Tensor, t: &Tensor, out: &mut Tensor) {
    let (r, c) = dims2(h);
    is_vec(t, c, "step_count_rows threshold");
    is_vec(out, r, "step_count_rows out");
    on_cuda!(out, |g| g.row_reduce(
        h.cu(),
        Some(t.cu()),
        c,
        3,
        out.cu_mut()
    ));
    cpu::step_count_rows(h.cpu(), c, t.cpu(), out.cpu_mut());
}

/// `out[j] = number of r with h[r, j] > t[j]`: how many rows fire latent `j`.
pub fn step_count_cols(h: &Tensor, t: &Tensor, out: &mut Tensor) {
    let c = h.cols();
    is_vec(t, c, "step_count_cols threshold");
    is_vec(out, c, "step_count_cols out");
    #[cfg(feature = "cuda")]
    if h.gpu().is_some() {
        // No kernel of its own: the step of a block of rows at a time, counted.
        let r = h.rows();
        let rows = r.clamp(1, 256);
        let (mut hb, mut fb) = (
            Tensor::zeros(&h.device(), &[rows, c]),
            Tensor::zeros(&h.device(), &[rows, c]),
        );
        let mut part = Tensor::zeros(&h.device(), &[c]);
        fill(out, 0.0);
        for start in (0..r).step_by(rows) {
            let n = rows.min(r - start);
            hb.resize(&[n, c]);
            fb.resize(&[n, c]);
            copy_rows(h, start, &mut hb);
            jumprelu(&hb, t, &mut fb);
            col_nonzero_counts(&fb, &mut part);
            axpy(out, 1.0, &part);
        }
        return;
    }
    cpu::step_count_cols(h.cpu(), c, t.cpu(), out.cpu_mut());
}

/// Backward of the step `(h > t)` given `g[r]`, the gradient of each row's count:
/// adds `-sum_r (1/bw) rect((h-t)/bw) g[r]` to `dt`, and the same estimator to `dh`
/// when `ste_to_input`.
#[allow(clippy::too_many_arguments)]
pub fn step_backward(
    h: &Tensor,
    t: &Tensor,
    g: &Tensor,
    bandwidth: f32,
    ste_to_input: bool,
    dh: &mut Tensor,
    dt: &mut Tensor,
) {
    let (r, c) = dims2(h);
    same_shape(h, dh, "step_backward");
    is_vec(t, c, "step_backward threshold");
    is_vec(g, r, "step_backward g");
    is_vec(dt, c, "step_backward dt");
    on_cuda!(dh, |gpu| gpu.step_backward(
        h.cu(),
        t.cu(),
        g.cu(),
        bandwidth,
        ste_to_input,
        dh.cu_mut(),
        dt.cu_mut()
    ));
    cpu::step_backward(
        h.cpu(),
        c,
        t.cpu(),
        g.cpu(),
        bandwidth,
        ste_to_input,
        dh.cpu_mut(),
        dt.cpu_mut(),
    );
}

/// [`step_backward`] without the input's gradient (`ste_to_input` false): only `dt`,
/// so no `[rows, cols]` buffer for `dh`. A GPU runs the full kernel into a scratch one.
pub fn step_backward_threshold(
    h: &Tensor,
    t: &Tensor,
    g: &Tensor,
    bandwidth: f32,
    dt: &mut Tensor,
) {
    let (r, c) = dims2(h);
    is_vec(t, c, "step_backward_threshold threshold");
    is_vec(g, r, "step_backward_threshold g");
    is_vec(dt, c, "step_backward_threshold dt");
    if dt.device() != Device::Cpu {
        let mut scratch = Tensor::zeros(&dt.device(), h.shape());
        return step_backward(h, t, g, bandwidth, false, &mut scratch, dt);
    }
    cpu::step_backward_threshold(h.cpu(), c, t.cpu(), g.cpu(), bandwidth, dt.cpu_mut());
}

/// Anthropic's tanh sparsity penalty `sum_r sum_j tanh(s * f[r,j] * n[j])`.
/// Adds `c` times its gradient to `df` and `dn`; returns the unscaled sum.
pub fn tanh_sparsity(
    f: &Tensor,
    n: &Tensor,
    s: f32,
    c: f32,
    df: &mut Tensor,
    dn: &mut Tensor,
) -> f64 {
    same_shape(f, df, "tanh_sparsity");
    let cols = f.cols();
    is_vec(n, cols, "tanh_sparsity norms");
    is_vec(dn, cols, "tanh_sparsity dn");
    on_cuda!(f, |g| g.tanh_sparsity(
        f.cu(),
        n.cu(),
        s,
        c,
        df.cu_mut(),
        dn.cu_mut()
    ));
    cpu::tanh_sparsity(f.cpu(), cols, n.cpu(), s, c, df.cpu_mut(), dn.cpu_mut())
}

/// `sum_r ||f[r, :] * n||_p` (`n` = 1 when `None`). With `df`, adds `c` times the
/// gradient to `df` (and to `dn` when both `n` and `dn` are given). A zero row has
/// zero gradient, as in torch.
pub fn lp_sparsity(
    f: &Tensor,
    n: Option<&Tensor>,
    p: f32,
    c: f32,
    df: Option<&mut Tensor>,
    dn: Option<&mut Tensor>,
) -> f64 {
    let cols = f.cols();
    if let Some(n) = n {
        is_vec(n, cols, "lp_sparsity norms");
    }
    if let Some(df) = &df {
        same_shape(f, df, "lp_sparsity");
    }
    if let Some(dn) = &dn {
        is_vec(dn, cols, "lp_sparsity dn");
    }
    assert!(p > 0.0, "lp_sparsity: p must be positive, got {p}");
    on_cuda!(f, |g| g.lp_sparsity(
        f.cu(),
        cols,
        n.map(|n| n.cu()),
        p,
        c,
        df.map(|d| d.cu_mut()),
        dn.map(|d| d.cu_mut())
    ));
    cpu::lp_sparsity(
        f.cpu(),
        cols,
        n.map(|n| n.cpu()),
        p,
        c,
        df.map(|d| d.cpu_mut()),
        dn.map(|d| d.cpu_mut()),
    )
}

/// Pre-activation loss on dead latents: `sum_r sum_j relu(t[j] - h[r,j]) dead[j] n[j]`.
/// Adds `c` times its gradient to `dh`, `dt` and `dn`; returns the unscaled sum.
#[allow(clippy::too_many_arguments)]
pub fn pre_act_loss(
    h: &Tensor,
    t: &Tensor,
    dead: &Tensor,
    n: &Tensor,
    c: f32,
    dh: &mut Tensor,
    dt: &mut Tensor,
    dn: &mut Tensor,
) -> f64 {
    same_shape(h, dh, "pre_act_loss");
    let cols = h.cols();
    for (v, w) in [(t, "threshold"), (dead, "dead mask"), (n, "norms")] {
        is_vec(v, cols, w);
    }
    is_vec(dt, cols, "pre_act_loss dt");
    is_vec(dn, cols, "pre_act_loss dn");
    on_cuda!(h, |g| g.pre_act_loss(
        h.cu(),
        t.cu(),
        dead.cu(),
        n.cu(),
        c,
        dh.cu_mut(),
        dt.cu_mut(),
        dn.cu_mut()
    ));
    cpu::pre_act_loss(
        h.cpu(),
        cols,
        t.cpu(),
        dead.cpu(),
        n.cpu(),
        c,
        dh.cpu_mut(),
        dt.cpu_mut(),
        dn.cpu_mut(),
    )
}

/// Squared error `sum_r w[r] sum_j (pred - target)^2` (`w` = 1 when `None`).
/// With `grad = Some((g, s))` also writes `g = s * 2 w[r] (pred - target)`.
pub fn mse(
    pred: &Tensor,
    target: &Tensor,
    row_w: Option<&Tensor>,
    grad: Option<(&mut Tensor, f32)>,
) -> f64 {
    same_shape(pred, target, "mse");
    let (r, c) = dims2(pred);
    if let Some(w) = row_w {
        is_vec(w, r, "mse row weights");
    }
    if let Some((g, _)) = &grad {
        same_shape(pred, g, "mse grad");
    }
    on_cuda!(pred, |g| g.mse(
        pred.cu(),
        target.cu(),
        c,
        row_w.map(|w| w.cu()),
        grad.map(|(t, s)| (t.cu_mut(), s))
    ));
    cpu::mse(
        pred.cpu(),
        target.cpu(),
        c,
        row_w.map(|w| w.cpu()),
        grad.map(|(g, s)| (g.cpu_mut(), s)),
    )
}

/// `sum w * (pred - target)^2` with an element-wise weight; with `grad = Some((g, s))`
/// also writes `g = s * 2 w (pred - target)`.
pub fn weighted_sq_err(
    pred: &Tensor,
    target: &Tensor,
    weight: &Tensor,
    grad: Option<(&mut Tensor, f32)>,
) -> f64 {
    same_shape(pred, target, "weighted_sq_err");
    same_shape(pred, weight, "weighted_sq_err");
    if let Some((g, _)) = &grad {
        same_shape(pred, g, "weighted_sq_err grad");
    }
    on_cuda!(pred, |g| g.weighted_sq_err(
        pred.cu(),
        target.cu(),
        weight.cu(),
        grad.map(|(t, s)| (t.cu_mut(), s))
    ));
    cpu::weighted_sq_err(
        pred.cpu(),
        target.cpu(),
        weight.cpu(),
        grad.map(|(g, s)| (g.cpu_mut(), s)),
    )
}

/// One Adam step for one parameter, exactly as torch's single-tensor Adam computes it
/// (bias corrections from `step`, which counts from 1).
#[allow(clippy::too_many_arguments)]
pub fn adam(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: u64,
) {
    same_shape(param, grad, "adam grad");
    same_shape(param, m, "adam m");
    same_shape(param, v, "adam v");
    assert!(step >= 1, "adam: step counts from 1");
    on_cuda!(param, |g| g.adam(
        param.cu_mut(),
        grad.cu(),
        m.cu_mut(),
        v.cu_mut(),
        lr,
        (beta1, beta2),
        eps,
        step,
        1.0
    ));
    cpu::adam(
        param.cpu_mut(),
        grad.cpu(),
        m.cpu_mut(),
        v.cpu_mut(),
        lr,
        beta1,
        beta2,
        eps,
        step,
    );
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (coefficient `max_norm / (norm + 1e-6)`,
/// capped at 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut Tensor], max_norm: f32) -> f32 {
    // torch: norm of the per-tensor norms, each computed in f32.
    let norms: Vec<f32> = grads.iter().map(|g| sum_squares(g).sqrt() as f32).collect();
    let total = norms
        .iter()
        .map(|&n| n as f64 * n as f64)
        .sum::<f64>()
        .sqrt() as f32;
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            scale(g, coef);
        }
    }
    total
}

/// `out = (pred - target)^2 * w[r]` element-wise (`w` = 1 when `None`).
pub fn sq_err(pred: &Tensor, target: &Tensor, row_w: Option<&Tensor>, out: &mut Tensor) {
    same_shape(pred, target, "sq_err");
    same_shape(pred, out, "sq_err out");
    let (r, c) = dims2(pred);
    if let Some(w) = row_w {
        is_vec(w, r, "sq_err row weights");
    }
    on_cuda!(out, |g| g.sq_err(
        pred.cu(),
        target.cu(),
        c,
        row_w.map(|w| w.cu()),
        out.cu_mut()
    ));
    cpu::sq_err(
        pred.cpu(),
        target.cpu(),
        c,
        row_w.map(|w| w.cpu()),
        out.cpu_mut(),
    );
}

/// `out = a / (b + eps)` element-wise.
pub fn div_eps(a: &Tensor, b: &Tensor, eps: f32, out: &mut Tensor) {
    same_shape(a, b, "div_eps");
    same_shape(a, out, "div_eps out");
    on_cuda!(out, |g| g.div_eps(a.cu(), b.cu(), eps, out.cu_mut()));
    cpu::div_eps(a.cpu(), b.cpu(), eps, out.cpu_mut());
}

/// `x = tanh(x)` element-wise.
pub fn tanh(x: &mut Tensor) {
    on_cuda!(x, |g| g.tanh(x.cu_mut()));
    cpu::tanh(x.cpu_mut());
}

/// `dh = df * (1 - tanh(h)^2) * (h > 0)`: the backward of `tanh(relu(h))`.
pub fn tanh_relu_backward(h: &Tensor, df: &Tensor, dh: &mut Tensor) {
    same_shape(h, df, "tanh_relu_backward");
    same_shape(h, dh, "tanh_relu_backward");
    on_cuda!(dh, |g| g.tanh_relu_backward(h.cu(), df.cu(), dh.cu_mut()));
    cpu::tanh_relu_backward(h.cpu(), df.cpu(), dh.cpu_mut());
}

/// `dst = src[:, start..start + dst.cols]` (a column block of a batch).
pub fn copy_cols(src: &Tensor, start: usize, dst: &mut Tensor) {
    let (r, c) = dims2(src);
    let (dr, dc) = dims2(dst);
    assert!(
        dr == r && start + dc <= c,
        "copy_cols: {:?}[.., {start}..{}] into {:?}",
        src.shape(),
        start + dc,
        dst.shape()
    );
    on_cuda!(dst, |g| g.copy_cols(src.cu(), c, start, dst.cu_mut(), dc));
    cpu::copy_cols(src.cpu(), c, start, dst.cpu_mut(), dc);
}

/// `dst[:, start..start + src.cols] += src`.
pub fn add_cols(dst: &mut Tensor, start: usize, src: &Tensor) {
    let (r, c) = dims2(dst);
    let (sr, sc) = dims2(src);
    assert!(
        sr == r && start + sc <= c,
        "add_cols: {:?} into {:?} at column {start}",
        src.shape(),
        dst.shape()
    );
    on_cuda!(dst, |g| g.add_cols(dst.cu_mut(), c, start, src.cu(), sc));
    cpu::add_cols(dst.cpu_mut(), c, start, src.cpu(), sc);
}

/// `dst = src[start..start + dst.rows, :]` (a block of rows).
pub fn copy_rows(src: &Tensor, start: usize, dst: &mut Tensor) {
    let c = row_block(src, start, dst, "copy_rows");
    let dr = dst.rows();
    on_cuda!(dst, |g| g.copy_range(dst.cu_mut(), src.cu(), start * c));
    dst.cpu_mut()
        .copy_from_slice(&src.cpu()[start * c..(start + dr) * c]);
}

/// `dst[start..start + src.rows, :] = src`.
pub fn copy_into_rows(dst: &mut Tensor, start: usize, src: &Tensor) {
    let c = row_block(dst, start, src, "copy_into_rows");
    let sr = src.rows();
    on_cuda!(dst, |g| g.copy_range_into(
        dst.cu_mut(),
        start * c,
        src.cu()
    ));
    dst.cpu_mut()[start * c..(start + sr) * c].copy_from_slice(src.cpu());
}

/// `dst[start..start + src.rows, :] += src`.
pub fn add_rows(dst: &mut Tensor, start: usize, src: &Tensor) {
    let c = row_block(dst, start, src, "add_rows");
    let sr = src.rows();
    on_cuda!(dst, |g| g.axpy(dst.cu_mut(), start * c, 1.0, src.cu()));
    cpu::axpy(
        &mut dst.cpu_mut()[start * c..(start + sr) * c],
        1.0,
        src.cpu(),
    );
}

/// Smallest strictly positive element, if any.
pub fn min_positive(t: &Tensor) -> Option<f32> {
    on_cuda!(t, |g| g.min_positive(t.cu()));
    cpu::min_positive(t.cpu())
}

/// `out[j] = number of nonzero x[r, j]`.
pub fn col_nonzero_counts(x: &Tensor, out: &mut Tensor) {
    let c = x.cols();
    is_vec(out, c, "col_nonzero_counts");
    on_cuda!(out, |g| g.col_nonzero_counts(
        x.cu(),
        x.rows(),
        out.cu_mut()
    ));
    cpu::col_nonzero_counts(x.cpu(), c, out.cpu_mut());
}

/// `out[r] = number of nonzero x[r, j]`.
pub fn row_nonzero_counts(x: &Tensor, out: &mut Tensor) {
    let (r, c) = dims2(x);
    is_vec(out, r, "row_nonzero_counts");
    on_cuda!(out, |g| g.row_reduce(x.cu(), None, c, 2, out.cu_mut()));
    cpu::row_nonzero_counts(x.cpu(), c, out.cpu_mut());
}

/// `x += std * N(0, 1)`, reproducible for a given `seed` whatever the thread count.
pub fn add_normal_noise(x: &mut Tensor, std: f32, seed: u64) {
    // On a GPU the noise is drawn on the host by the same generator and uploaded, so
    // both backends add the same values.
    on_cuda!(x, |g| {
        let mut z = vec![0.0; x.numel()];
        cpu::add_normal_noise(&mut z, std, seed);
        g.upload(&z).and_then(|z| g.axpy(x.cu_mut(), 0, 1.0, &z))
    });
    cpu::add_normal_noise(x.cpu_mut(), std, seed);
}

// ---------------------------------------------------------------------------------
// Selection and sparse products

/// Top-`k` entries of each row of `x` `[rows, cols]` into `out` (k per row, columns
/// ascending, raw values). With `mask`, only columns where `mask[j] > 0` compete.
pub fn topk_rows(x: &Tensor, k: usize, mask: Option<&Tensor>, out: &mut Csr) {
    let (r, c) = dims2(x);
    if let Some(m) = mask {
        is_vec(m, c, "topk_rows mask");
    }
    assert!(k <= c, "topk_rows: k={k} exceeds the {c} columns");
    on_cuda!(x, |g| g
        .topk_rows(x.cu(), r, c, k, mask.map(|m| m.cu()))
        .map(|parts| out.set_cu(g, (r, c), parts)));
    topk_rows_cpu(cpu::TopKRows::Plain(x.cpu()), (r, c), k, mask, out);
}

/// `x += bias` row by row, then [`topk_rows`] of the result (`x` becomes what it
/// selected from). On the CPU in one pass over `x`: each row is still in cache when
/// its top `k` are taken.
pub fn add_bias_topk_rows(x: &mut Tensor, bias: &Tensor, k: usize, out: &mut Csr) {
    if x.device() != crate::Device::Cpu {
        add_row_vec(x, bias, 1.0);
        return topk_rows(x, k, None, out);
    }
    let (r, c) = dims2(x);
    is_vec(bias, c, "add_bias_topk_rows bias");
    assert!(k <= c, "topk_rows: k={k} exceeds the {c} columns");
    let rows = cpu::TopKRows::AddBias(x.cpu_mut(), bias.cpu());
    topk_rows_cpu(rows, (r, c), k, None, out);
}

fn topk_rows_cpu(
    x: cpu::TopKRows,
    (r, c): (usize, usize),
    k: usize,
    mask: Option<&Tensor>,
    out: &mut Csr,
) {
    out.rows = r;
    out.cols = c;
    let nnz = r * k;
    out.values.resize(&[nnz]);
    cpu::topk_rows(
        x,
        c,
        k,
        mask.map(|m| m.cpu()),
        out.offsets.cpu_mut(),
        out.indices.cpu_mut(),
        out.values.data.cpu_mut(),
    );
}

/// `x += bias` row by row, then [`batch_topk`] of the result (`x` becomes what it
/// selected from). On the CPU the bias goes in with the selection's first pass over
/// `x`, not a pass of its own.
pub fn add_bias_batch_topk(x: &mut Tensor, bias: &Tensor, total: usize, out: &mut Csr) {
    if x.device() != crate::Device::Cpu {
        add_row_vec(x, bias, 1.0);
        return batch_topk(x, total, out);
    }
    let (r, c) = dims2(x);
    is_vec(bias, c, "add_bias_batch_topk bias");
    batch_topk_into(out, (r, c), |o| {
        cpu::add_bias_batch_topk(x.cpu_mut(), c, bias.cpu(), total, o)
    });
}

/// The `total` largest positive entries of the whole matrix `x` (batch top-k on ReLU
/// outputs) into `out`. Non-positive entries are never stored.
pub fn batch_topk(x: &Tensor, total: usize, out: &mut Csr) {
    let (r, c) = dims2(x);
    on_cuda!(x, |g| g
        .batch_topk(x.cu(), r, c, total)
        .map(|parts| out.set_cu(g, (r, c), parts)));
    batch_topk_into(out, (r, c), |o| cpu::batch_topk(x.cpu(), c, total, o));
}

/// `out` as an `[r, c]` CSR matrix whose buffers `fill` (a CPU batch top-k) fills.
fn batch_topk_into(
    out: &mut Csr,
    (r, c): (usize, usize),
    fill: impl FnOnce((&mut Vec<u32>, &mut Vec<u32>, &mut Vec<f32>)),
) {
    out.rows = r;
    out.cols = c;
    fill((
        out.offsets.cpu_mut(),
        out.indices.cpu_mut(),
        out.values.data.cpu_mut(),
    ));
    let nnz = out.indices.cpu().len();
    out.values.resize(&[nnz]);
}

/// Dense copy of a CSR matrix into `out` `[rows, cols]` (zeros elsewhere).
pub fn csr_to_dense(a: &Csr, out: &mut Tensor) {
    assert_eq!(
        (out.rows(), out.cols()),
        (a.rows, a.cols),
        "csr_to_dense: output shape {:?}",
        out.shape()
    );
    on_cuda!(out, |g| g.csr_to_dense(a.cu(), a.cols, out.cu_mut()));
    let cols = a.cols;
    let (off, idx, val) = (a.offsets.cpu(), a.indices.cpu(), a.values.cpu());
    let o = out.cpu_mut();
    o.fill(0.0);
    for r in 0..a.rows {
        for e in off[r] as usize..off[r + 1] as usize {
            o[r * cols + idx[e] as usize] = val[e];
        }
    }
}

/// Values of `dense` at the stored positions of `pattern`, into `out` `[nnz]`.
pub fn csr_gather(pattern: &Csr, dense: &Tensor, out: &mut Tensor) {
    assert_eq!(
        (dense.rows(), dense.cols()),
        (pattern.rows, pattern.cols),
        "csr_gather: shape"
    );
    is_vec(out, pattern.nnz(), "csr_gather out");
    on_cuda!(out, |g| g.csr_gather(
        (pattern.offsets.cu(), pattern.indices.cu()),
        dense.cu(),
        pattern.cols,
        out.cu_mut()
    ));
    let cols = pattern.cols;
    let (off, idx) = (pattern.offsets.cpu(), pattern.indices.cpu());
    let d = dense.cpu();
    let o = out.cpu_mut();
    for r in 0..pattern.rows {
        for e in off[r] as usize..off[r + 1] as usize {
            o[e] = d[r * cols + idx[e] as usize];
        }
    }
}

/// `dense[r, j] += a[r, j]` for the stored entries of `a`.
pub fn csr_scatter_add(a: &Csr, dense: &mut Tensor) {
    assert_eq!(
        (dense.rows(), dense.cols()),
        (a.rows, a.cols),
        "csr_scatter_add: shape"
    );
    on_cuda!(dense, |g| g.csr_scatter_add(a.cu(), a.cols, dense.cu_mut()));
    let cols = a.cols;
    let (off, idx, val) = (a.offsets.cpu(), a.indices.cpu(), a.values.cpu());
    let o = dense.cpu_mut();
    for r in 0..a.rows {
        for e in off[r] as usize..off[r + 1] as usize {
            o[r * cols + idx[e] as usize] += val[e];
        }
    }
}

/// `out = beta*out + alpha * a @ w` with `a` `[rows, m]` sparse, `w` `[m, d]`.
pub fn csr_matmul(out: &mut Tensor, a: &Csr, w: &Tensor, alpha: f32, beta: f32) {
    let (wr, d) = dims2(w);
    assert_eq!(
        a.cols, wr,
        "csr_matmul: sparse has {} columns, dense has {wr} rows",
        a.cols
    );
    assert_eq!(
        (out.rows(), out.cols()),
        (a.rows, d),
        "csr_matmul: output shape {:?}",
        out.shape()
    );
    on_cuda!(out, |g| g.csr_matmul(
        out.cu_mut(),
        a.cu(),
        w.cu(),
        d,
        alpha,
        beta
    ));
    cpu::csr_matmul(
        a.offsets.cpu(),
        a.indices.cpu(),
        a.values.cpu(),
        w.cpu(),
        d,
        out.cpu_mut(),
        alpha,
        beta,
    );
}

/// `out = beta*out + alpha * a^T @ x` with `a` `[rows, m]` sparse and `x` `[rows, d]`:
/// `out` is `[m, d]`, or `[d, m]` when `out_transposed` (then a temporary `[m, d]` is
/// allocated). This is the weight gradient of a sparse layer.
pub fn csr_t_matmul(
    out: &mut Tensor,
    a: &Csr,
    x: &Tensor,
    out_transposed: bool,
    alpha: f32,
    beta: f32,
) {
    let (xr, d) = dims2(x);
    assert_eq!(
        xr, a.rows,
        "csr_t_matmul: sparse has {} rows, dense has {xr}",
        a.rows
    );
    let want = if out_transposed {
        (d, a.cols)
    } else {
        (a.cols, d)
    };
    assert_eq!(
        (out.rows(), out.cols()),
        want,
        "csr_t_matmul: output shape {:?}",
        out.shape()
    );
    on_cuda!(out, |g| g.csr_t_matmul(
        out.cu_mut(),
        a.cu(),
        a.cols,
        x.cu(),
        d,
        out_transposed,
        alpha,
        beta
    ));
    cpu::csr_t_matmul(
        a.offsets.cpu(),
        a.indices.cpu(),
        a.values.cpu(),
        a.cols,
        x.cpu(),
        d,
        out.cpu_mut(),
        out_transposed,
        alpha,
        beta,
    );
}

/// `out[e] = x[r, :] . w[j, :]` for every stored entry `(r, j)` of `pattern`: the
/// entries of `x @ w^T` that a sparse layer needs.
pub fn csr_sampled_dot(pattern: &Csr, x: &Tensor, w: &Tensor, out: &mut Tensor) {
    let (xr, d) = dims2(x);
    assert_eq!(xr, pattern.rows, "csr_sampled_dot: rows");
    assert_eq!(
        (w.rows(), w.cols()),
        (pattern.cols, d),
        "csr_sampled_dot: weight shape {:?}",
        w.shape()
    );
    is_vec(out, pattern.nnz(), "csr_sampled_dot out");
    on_cuda!(out, |g| g.csr_sampled_dot(
        (pattern.offsets.cu(), pattern.indices.cu()),
        x.cu(),
        w.cu(),
        d,
        out.cu_mut()
    ));
    cpu::csr_sampled_dot(
        pattern.offsets.cpu(),
        pattern.indices.cpu(),
        x.cpu(),
        w.cpu(),
        d,
        out.cpu_mut(),
    );
}

/// `out[j] = beta*out[j] + alpha * sum of a's values in column j` (times `other`'s
/// matching values when given: a per-column dot product of two same-pattern matrices).
pub fn csr_col_dot(a: &Csr, other: Option<&Tensor>, out: &mut Tensor, alpha: f32, beta: f32) {
    is_vec(out, a.cols, "csr_col_dot out");
    if let Some(o) = other {
        is_vec(o, a.nnz(), "csr_col_dot other");
    }
    on_cuda!(out, |g| g.csr_col_dot(
        (a.indices.cu(), a.values.cu()),
        other.map(|o| o.cu()),
        out.cu_mut(),
        alpha,
        beta
    ));
    cpu::csr_col_dot(
        a.indices.cpu(),
        a.values.cpu(),
        other.map(|o| o.cpu()),
        out.cpu_mut(),
        alpha,
        beta,
    );
}

/// How many entries of `x` are NaN or infinite and the flat index of the first; `None`
/// when all are finite. (On CUDA through a host copy.)
pub fn non_finite(x: &Tensor) -> Option<(usize, usize)> {
    if x.device() != crate::Device::Cpu {
        return cpu::non_finite(&x.to_vec());
    }
    cpu::non_finite(x.cpu())
}

/// The entries of a `[rows, cols]` matrix split at per-column cuts: those `>= hi[j]`
/// (the active latents), and with a second cut those below that but `>= lo[j]`
/// (JumpReLU's estimator rectangle). The per-row counts are kept once taken, so that
/// choosing the path from the count and then building the CSR matrices costs two
/// passes over the matrix, not three (CPU only).
pub struct Split {
    hi: Vec<f32>,
    lo: Vec<f32>,
    counts: std::cell::OnceCell<Vec<[u32; 2]>>,
}

impl Split {
    /// ReLU's active entries, `x > 0`.
    pub fn relu(cols: usize) -> Split {
        Split::new(positive_cut(cols), vec![])
    }

    /// A JumpReLU's with threshold `t` `[cols]` and bandwidth `bw`: the active entries
    /// (`h > t`, where the latent is `h`) and the inactive ones inside the estimator's
    /// rectangle.
    pub fn jumprelu(t: &Tensor, bw: f32) -> Split {
        let (act, reach) = jumprelu_cuts(t.cpu(), bw);
        Split::new(act, reach)
    }

    fn new(hi: Vec<f32>, lo: Vec<f32>) -> Split {
        Split {
            hi,
            lo,
            counts: std::cell::OnceCell::new(),
        }
    }

    fn counts(&self, x: &Tensor) -> &[[u32; 2]] {
        let (r, c) = dims2(x);
        assert_eq!(
            self.hi.len(),
            c,
            "Split: cuts for {} columns, matrix has {c}",
            self.hi.len()
        );
        let counts = self
            .counts
            .get_or_init(|| cpu::split_counts(x.cpu(), c, &self.hi, &self.lo));
        assert_eq!(
            counts.len(),
            r,
            "Split: counted on a matrix of another shape"
        );
        counts
    }

    /// Adds `bias` `[cols]` to the rows of `x` and counts this split's entries of the
    /// result in the same pass (the bits of [`add_row_vec`] with `alpha` 1).
    pub fn add_bias_and_count(&self, x: &mut Tensor, bias: &Tensor) {
        let c = x.cols();
        is_vec(bias, c, "Split::add_bias_and_count bias");
        assert_eq!(
            self.hi.len(),
            c,
            "Split: cuts for {} columns, matrix has {c}",
            self.hi.len()
        );
        let counts = cpu::add_bias_split_counts(x.cpu_mut(), c, bias.cpu(), &self.hi, &self.lo);
        assert!(self.counts.set(counts).is_ok(), "Split: counted twice");
    }

    /// Entries of `x` in either part (one pass the first time).
    pub fn nnz(&self, x: &Tensor) -> usize {
        self.counts(x).iter().map(|c| (c[0] + c[1]) as usize).sum()
    }

    /// The parts as CSR matrices with values `x`: the first into `a`, the second into
    /// `b` (needed exactly when this split has a second cut).
    pub fn to_csr(&self, x: &Tensor, a: &mut Csr, mut b: Option<&mut Csr>) {
        assert_eq!(
            b.is_some(),
            !self.lo.is_empty(),
            "Split::to_csr: one CSR per part"
        );
        let counts = self.counts(x);
        let (r, c) = dims2(x);
        let lo_b = b.as_deref_mut().map(|b| (&self.lo[..], b.fill_cpu(r, c)));
        cpu::split_at_least(x.cpu(), c, &self.hi, a.fill_cpu(r, c), lo_b, counts);
        a.fit_values();
        if let Some(b) = b {
            b.fit_values();
        }
    }
}

/// The number of entries `> 0` of `x` (CPU only: the sparse path of the L1 SAEs is
/// chosen on the CPU).
pub fn count_positive(x: &Tensor) -> usize {
    Split::relu(x.cols()).nnz(x)
}

/// `v > 0` as `v >= cut`, for each of `cols` columns.
fn positive_cut(cols: usize) -> Vec<f32> {
    vec![cpu::monotone_cut(|v| v > 0.0); cols]
}

/// ReLU's active latents: the entries `> 0` of `x` `[rows, cols]` into `out`, values
/// `x` (CPU only). Allocates `[nnz]` indices and values.
pub fn relu_to_csr(x: &Tensor, out: &mut Csr) {
    Split::relu(x.cols()).to_csr(x, out, None);
}

/// Whether a JumpReLU with threshold `t` and estimator bandwidth `bw` can pass a
/// gradient through pre-activation `h`: it is active (`h > t`) or inside the
/// straight-through estimator's rectangle (`(h - t)/bw > -0.5`, as its kernel tests).
fn jumprelu_reaches(h: f32, t: f32, bw: f32) -> bool {
    h > t || (h - t) / bw > -0.5
}

/// Per column, `h > t` and [`jumprelu_reaches`] as `h >= cut` (both are monotone in
/// `h`): the passes over `[batch, d_sae]` then compare, as the dense kernels decide.
fn jumprelu_cuts(t: &[f32], bw: f32) -> (Vec<f32>, Vec<f32>) {
    t.iter()
        .map(|&t| {
            (
                cpu::monotone_cut(|h| h > t),
                cpu::monotone_cut(|h| jumprelu_reaches(h, t, bw)),
            )
        })
        .unzip()
}

/// The number of entries of `h` `[rows, cols]` that a JumpReLU with thresholds `t`
/// `[cols]` and bandwidth `bw` passes a gradient through (CPU only).
pub fn count_jumprelu_pattern(h: &Tensor, t: &Tensor, bw: f32) -> usize {
    is_vec(t, h.cols(), "count_jumprelu_pattern threshold");
    Split::jumprelu(t, bw).nnz(h)
}

/// Those entries of `h`, values `h`, in two CSR matrices: the active ones (`h > t`,
/// where the latent is `h`) in `active`, the inactive ones inside the estimator's
/// rectangle in `rect` (CPU only).
pub fn jumprelu_to_csr(h: &Tensor, t: &Tensor, bw: f32, active: &mut Csr, rect: &mut Csr) {
    is_vec(t, h.cols(), "jumprelu_to_csr threshold");
    Split::jumprelu(t, bw).to_csr(h, active, Some(rect));
}

/// `out[e] = v[column of e]` `[nnz]` (CPU only).
pub fn csr_col_expand(a: &Csr, v: &Tensor, out: &mut Tensor) {
    is_vec(v, a.cols, "csr_col_expand");
    is_vec(out, a.nnz(), "csr_col_expand out");
    let v = v.cpu();
    out.cpu_mut()
        .par_iter_mut()
        .zip(a.indices.cpu().par_iter())
        .with_min_len(cpu::FLAT_GRAIN)
        .for_each(|(o, &j)| *o = v[j as usize]);
}

/// [`jumprelu_backward`] at the entries of `a` (values `h`): `df` and `dh` `[nnz]`,
/// `dt` `[cols]` (CPU only).
#[allow(clippy::too_many_arguments)]
pub fn csr_jumprelu_backward(
    a: &Csr,
    t: &Tensor,
    df: &Tensor,
    bandwidth: f32,
    ste_to_input: bool,
    dh: &mut Tensor,
    dt: &mut Tensor,
) {
    is_vec(t, a.cols, "csr_jumprelu_backward threshold");
    is_vec(df, a.nnz(), "csr_jumprelu_backward df");
    is_vec(dh, a.nnz(), "csr_jumprelu_backward dh");
    is_vec(dt, a.cols, "csr_jumprelu_backward dt");
    cpu::csr_jumprelu_backward(
        a.offsets.cpu(),
        a.indices.cpu(),
        a.values.cpu(),
        t.cpu(),
        df.cpu(),
        bandwidth,
        ste_to_input,
        dh.cpu_mut(),
        dt.cpu_mut(),
    );
}

/// [`step_backward`] at the entries of `a` (values `h`): `g` `[rows]`, `dh` `[nnz]`,
/// `dt` `[cols]` (CPU only).
#[allow(clippy::too_many_arguments)]
pub fn csr_step_backward(
    a: &Csr,
    t: &Tensor,
    g: &Tensor,
    bandwidth: f32,
    ste_to_input: bool,
    dh: &mut Tensor,
    dt: &mut Tensor,
) {
    is_vec(t, a.cols, "csr_step_backward threshold");
    is_vec(g, a.rows, "csr_step_backward g");
    is_vec(dh, a.nnz(), "csr_step_backward dh");
    is_vec(dt, a.cols, "csr_step_backward dt");
    cpu::csr_step_backward(
        a.offsets.cpu(),
        a.indices.cpu(),
        a.values.cpu(),
        t.cpu(),
        g.cpu(),
        bandwidth,
        ste_to_input,
        dh.cpu_mut(),
        dt.cpu_mut(),
    );
}

/// [`tanh_sparsity`] of CSR latents (values `f`; absent entries are zeros and add
/// nothing): `df` `[nnz]` (CPU only).
pub fn csr_tanh_sparsity(
    a: &Csr,
    n: &Tensor,
    s: f32,
    c: f32,
    df: &mut Tensor,
    dn: &mut Tensor,
) -> f64 {
    is_vec(n, a.cols, "csr_tanh_sparsity norms");
    is_vec(df, a.nnz(), "csr_tanh_sparsity df");
    is_vec(dn, a.cols, "csr_tanh_sparsity dn");
    cpu::csr_tanh_sparsity(
        a.offsets.cpu(),
        a.indices.cpu(),
        a.values.cpu(),
        n.cpu(),
        s,
        c,
        df.cpu_mut(),
        dn.cpu_mut(),
    )
}

/// [`lp_sparsity`] of CSR latents (absent entries are zeros): returns the same sum and
/// adds `c` times the gradient at the stored entries to `dvals` `[nnz]` (CPU only).
pub fn csr_lp_sparsity(
    a: &Csr,
    n: Option<&Tensor>,
    p: f32,
    c: f32,
    dvals: Option<&mut Tensor>,
    dn: Option<&mut Tensor>,
) -> f64 {
    if let Some(n) = n {
        is_vec(n, a.cols, "csr_lp_sparsity norms");
    }
    if let Some(d) = &dvals {
        is_vec(d, a.nnz(), "csr_lp_sparsity dvals");
    }
    if let Some(d) = &dn {
        is_vec(d, a.cols, "csr_lp_sparsity dn");
    }
    assert!(p > 0.0, "csr_lp_sparsity: p must be positive, got {p}");
    cpu::csr_lp_sparsity(
        a.offsets.cpu(),
        a.indices.cpu(),
        a.values.cpu(),
        n.map(|n| n.cpu()),
        p,
        c,
        dvals.map(|d| d.cpu_mut()),
        dn.map(|d| d.cpu_mut()),
    )
}

/// `a.values[e] *= v[column of e]`.
pub fn csr_scale_cols(a: &mut Csr, v: &Tensor) {
    is_vec(v, a.cols, "csr_scale_cols");
    on_cuda!(v, |g| g.csr_scale_cols(
        a.indices.cu(),
        a.values.cu_mut(),
        v.cu()
    ));
    let idx = a.indices.cpu();
    let vv = v.cpu();
    let vals = a.values.data.cpu_mut();
    vals.iter_mut()
        .zip(idx)
        .for_each(|(x, &j)| *x *= vv[j as usize]);
}

/// Number of stored nonzero values per column into `out` `[cols]`.
pub fn csr_col_nonzero_counts(a: &Csr, out: &mut Tensor) {
    is_vec(out, a.cols, "csr_col_nonzero_counts");
    on_cuda!(out, |g| g.csr_col_nonzero_counts(
        (a.indices.cu(), a.values.cu()),
        out.cu_mut()
    ));
    let o = out.cpu_mut();
    o.fill(0.0);
    for (&j, &v) in a.indices.cpu().iter().zip(a.values.cpu()) {
        if v != 0.0 {
            o[j as usize] += 1.0;
        }
    }
}

/// Number of stored nonzero values per row into `out` `[rows]`.
pub fn csr_row_nonzero_counts(a: &Csr, out: &mut Tensor) {
    is_vec(out, a.rows, "csr_row_nonzero_counts");
    on_cuda!(out, |g| g.csr_row_nonzero_counts(
        (a.offsets.cu(), a.values.cu()),
        out.cu_mut()
    ));
    let (off, val) = (a.offsets.cpu(), a.values.cpu());
    let o = out.cpu_mut();
    for r in 0..a.rows {
        o[r] = val[off[r] as usize..off[r + 1] as usize]
            .iter()
            .filter(|&&v| v != 0.0)
            .count() as f32;
    }
}

#[cfg(test)]
mod tests;
