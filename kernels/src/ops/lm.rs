//! Transformer ops: what a hooked language model's forward pass is written in.
//! Tensors follow the `ops` conventions (one row per token); attention tensors carry
//! heads side by side in the columns, `[tokens, n_heads*d_head]`.

use super::{dims2, is_vec, same_shape};
use crate::cpu_lm;
use crate::Tensor;

pub use crate::cpu_lm::{Activation, AttnShape};

/// `out = (x - mean_r) / sqrt(var_r + eps)` per row (LayerNorm before its affine part).
pub fn layer_norm(x: &Tensor, eps: f32, out: &mut Tensor) {
    same_shape(x, out, "layer_norm");
    cpu_lm::layer_norm(x.cpu(), x.cols(), eps, out.cpu_mut());
}

/// `out = x / sqrt(mean_r(x^2) + eps)` per row (RMSNorm before its weight).
pub fn rms_norm(x: &Tensor, eps: f32, out: &mut Tensor) {
    same_shape(x, out, "rms_norm");
    cpu_lm::rms_norm(x.cpu(), x.cols(), eps, out.cpu_mut());
}

/// RMSNorm of every `d_head`-wide head of `x` `[rows, n_heads*d_head]`, in place
/// (Qwen3's and Gemma 3's q/k norms, before their weight: see [`mul_head_vec`]).
pub fn head_rms_norm(x: &mut Tensor, d_head: usize, eps: f32) {
    assert!(
        d_head > 0 && x.cols().is_multiple_of(d_head),
        "head_rms_norm: x {:?} with heads of {d_head}",
        x.shape()
    );
    cpu_lm::rms_norm_in_place(x.cpu_mut(), d_head, eps);
}

/// Multiplies every `w.len()`-wide head of `x` by `w`.
pub fn mul_head_vec(x: &mut Tensor, w: &Tensor) {
    let d = w.numel();
    assert!(
        d > 0 && x.cols().is_multiple_of(d),
        "mul_head_vec: x {:?} with heads of {d}",
        x.shape()
    );
    crate::cpu::mul_row_vec(x.cpu_mut(), d, w.cpu());
}

/// Applies `act` element-wise in place.
pub fn activation(x: &mut Tensor, act: Activation) {
    cpu_lm::activation(x.cpu_mut(), act);
}

/// `out[r, :] = table[ids[r], :]` (token or position embedding lookup).
/// Panics if an id is out of range: callers validate ids coming from outside.
pub fn embedding(table: &Tensor, ids: &[u32], out: &mut Tensor) {
    let (rows, cols) = dims2(table);
    assert_eq!(
        (out.rows(), out.cols()),
        (ids.len(), cols),
        "embedding: output {:?} for {} ids of width {cols}",
        out.shape(),
        ids.len()
    );
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
        panic!("embedding: id {bad} out of range for a table of {rows} rows");
    }
    cpu_lm::embedding(table.cpu(), cols, ids, out.cpu_mut());
}

/// Rotates the first `rot_dim` features of every head of `x` `[n_seq*seq_len, n_heads*d_head]`
/// by position (rotate-half layout). `cos`/`sin` are `[n_ctx, rot_dim]`, n_ctx ≥ seq_len.
pub fn rotary(
    x: &mut Tensor,
    n_heads: usize,
    d_head: usize,
    seq_len: usize,
    cos: &Tensor,
    sin: &Tensor,
) {
    let rot_dim = cos.cols();
    same_shape(cos, sin, "rotary tables");
    assert!(
        x.cols() == n_heads * d_head && rot_dim <= d_head && rot_dim.is_multiple_of(2),
        "rotary: x {:?} with {n_heads} heads of {d_head}, rot_dim {rot_dim}",
        x.shape()
    );
    assert!(
        seq_len > 0 && x.rows().is_multiple_of(seq_len) && cos.rows() >= seq_len,
        "rotary: seq_len {seq_len}, x {:?}, tables {:?}",
        x.shape(),
        cos.shape()
    );
    cpu_lm::rotary(
        x.cpu_mut(),
        n_heads,
        d_head,
        rot_dim,
        seq_len,
        cos.cpu(),
        sin.cpu(),
    );
}

fn check_attn(q: &Tensor, kv: &Tensor, sh: &AttnShape, what: &str) {
    let rows = sh.n_seq * sh.seq_len;
    assert!(
        sh.n_kv_heads > 0 && sh.n_heads.is_multiple_of(sh.n_kv_heads),
        "{what}: {} heads cannot share {} kv heads",
        sh.n_heads,
        sh.n_kv_heads
    );
    assert_eq!(
        (q.rows(), q.cols()),
        (rows, sh.n_heads * sh.d_head),
        "{what}: q/z shape for {sh:?}"
    );
    assert_eq!(
        (kv.rows(), kv.cols()),
        (rows, sh.n_kv_heads * sh.d_head),
        "{what}: k/v shape for {sh:?}"
    );
}

fn check_scores(s: &Tensor, sh: &AttnShape, what: &str) {
    assert_eq!(
        (s.rows(), s.cols()),
        (sh.n_seq * sh.n_heads * sh.seq_len, sh.seq_len),
        "{what}: scores/pattern shape for {sh:?}"
    );
}

/// Causal self-attention in one pass, never materialising the score matrix:
/// `z = softmax(mask(q k^T * scale)) v`, query head `h` reading kv head `h / (H / H_kv)`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sh: AttnShape,
    scale: f32,
    z: &mut Tensor,
) {
    check_attn(q, k, &sh, "causal_attention");
    same_shape(k, v, "causal_attention k/v");
    check_attn(z, v, &sh, "causal_attention");
    cpu_lm::causal_attention(q.cpu(), k.cpu(), v.cpu(), sh, scale, z.cpu_mut());
}

/// Masked scores `q k^T * scale` (soft-capped when `sh.softcap`) as rows
/// `[n_seq*n_heads*seq_len, seq_len]` (TransformerLens's `[batch, head, q_pos, k_pos]`),
/// `-inf` where `k_pos > q_pos` or `k_pos` is before the sliding window.
pub fn attention_scores(q: &Tensor, k: &Tensor, sh: AttnShape, scale: f32, out: &mut Tensor) {
    check_attn(q, k, &sh, "attention_scores");
    check_scores(out, &sh, "attention_scores");
    cpu_lm::attention_scores(q.cpu(), k.cpu(), sh, scale, out.cpu_mut());
}

/// Causal softmax of score rows (row `r` attends to `0..=r % seq_len`); all-masked rows
/// become zeros, as TransformerLens does.
pub fn causal_softmax(scores: &Tensor, seq_len: usize, out: &mut Tensor) {
    same_shape(scores, out, "causal_softmax");
    assert_eq!(
        scores.cols(),
        seq_len,
        "causal_softmax: rows of {seq_len} expected"
    );
    cpu_lm::causal_softmax(scores.cpu(), seq_len, out.cpu_mut());
}

/// `z = pattern @ v` per sequence and head.
pub fn attention_apply(pattern: &Tensor, v: &Tensor, sh: AttnShape, z: &mut Tensor) {
    check_scores(pattern, &sh, "attention_apply");
    check_attn(z, v, &sh, "attention_apply");
    cpu_lm::attention_apply(pattern.cpu(), v.cpu(), sh, z.cpu_mut());
}

/// `out[r] = -log softmax(logits[r])[targets[r]]`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32], out: &mut Tensor) {
    let (rows, cols) = dims2(logits);
    assert_eq!(targets.len(), rows, "cross_entropy: one target per row");
    is_vec(out, rows, "cross_entropy output");
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= cols) {
        panic!("cross_entropy: target {bad} out of range for {cols} classes");
    }
    cpu_lm::cross_entropy(logits.cpu(), cols, targets, out.cpu_mut());
}

/// `out[r] = KL(softmax(p[r]) || softmax(q[r]))`, the divergence of `q` from the reference `p`.
pub fn kl_div(p: &Tensor, q: &Tensor, out: &mut Tensor) {
    same_shape(p, q, "kl_div");
    is_vec(out, p.rows(), "kl_div output");
    cpu_lm::kl_div(p.cpu(), q.cpu(), p.cols(), out.cpu_mut());
}

/// `dst[:, start..start + src.cols] = src` (write back a column block).
pub fn set_cols(dst: &mut Tensor, start: usize, src: &Tensor) {
    let (r, c) = dims2(dst);
    let (sr, sc) = dims2(src);
    assert!(
        sr == r && start + sc <= c,
        "set_cols: {:?} into {:?} at column {start}",
        src.shape(),
        dst.shape()
    );
    cpu_lm::set_cols(dst.cpu_mut(), c, start, src.cpu(), sc);
}

/// `dst[r, :] = src[r, :]` for the rows where `take[r]` (a row-masked `torch.where`).
pub fn select_rows(dst: &mut Tensor, src: &Tensor, take: &[bool]) {
    same_shape(dst, src, "select_rows");
    assert_eq!(take.len(), dst.rows(), "select_rows: one flag per row");
    let c = dst.cols();
    cpu_lm::select_rows(dst.cpu_mut(), src.cpu(), c, take);
}
