//! Each op against a naive loop written out here. Tolerances: f32 products of length
//! k are compared at 1e-5 relative to the largest magnitude involved (the naive loop
//! sums in f64; gemm sums in another order in f32).

use super::*;
use crate::Device;
use rand::{Rng, SeedableRng};

const DEV: Device = Device::Cpu;

fn rand_vec(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A tensor's values as bits, for comparisons that must be exact.
fn bits(v: &Tensor) -> Vec<u32> {
    v.to_vec().iter().map(|f| f.to_bits()).collect()
}

fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::from_vec(&DEV, shape, v).unwrap()
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{what}[{i}]: got {g}, want {w} (scale {scale})"
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn naive_matmul(
    a: &[f32],
    ta: bool,
    ar: usize,
    ac: usize,
    b: &[f32],
    tb: bool,
    br: usize,
    bc: usize,
) -> (usize, usize, Vec<f32>) {
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let n = if tb { br } else { bc };
    let at = |i: usize, p: usize| if ta { a[p * ac + i] } else { a[i * ac + p] };
    let bt = |p: usize, j: usize| if tb { b[j * bc + p] } else { b[p * bc + j] };
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k)
                .map(|p| at(i, p) as f64 * bt(p, j) as f64)
                .sum::<f64>() as f32;
        }
    }
    (m, n, out)
}

#[test]
fn matmul_all_transposes_and_accumulate() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let (m, k, n) = (37, 53, 29);
    for ta in [false, true] {
        for tb in [false, true] {
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let a = rand_vec(&mut rng, ar * ac);
            let b = rand_vec(&mut rng, br * bc);
            let c0 = rand_vec(&mut rng, m * n);
            let (_, _, ab) = naive_matmul(&a, ta, ar, ac, &b, tb, br, bc);
            let mut out = t(&[m, n], c0.clone());
            matmul(
                &mut out,
                &t(&[ar, ac], a),
                ta,
                &t(&[br, bc], b),
                tb,
                0.5,
                2.0,
            );
            let want: Vec<f32> = ab.iter().zip(&c0).map(|(p, c)| 0.5 * p + 2.0 * c).collect();
            assert_close(
                &out.to_vec(),
                &want,
                1e-5,
                &format!("matmul ta={ta} tb={tb}"),
            );
        }
    }
}

#[test]
fn matmul_beta_zero_ignores_garbage() {
    let a = t(&[1, 2], vec![1.0, 2.0]);
    let b = t(&[2, 1], vec![3.0, 4.0]);
    let mut out = t(&[1, 1], vec![f32::NAN]);
    matmul(&mut out, &a, false, &b, false, 1.0, 0.0);
    assert_eq!(out.to_vec(), vec![11.0]);
}

#[test]
fn matvec_both_orientations() {
    let a = t(&[2, 3], vec![1., 2., 3., 4., 5., 6.]);
    let mut y = t(&[2], vec![1.0, 1.0]);
    matvec(&mut y, &a, false, &t(&[3], vec![1., 0., -1.]), 1.0, 1.0);
    assert_eq!(y.to_vec(), vec![-1.0, -1.0]);
    let mut z = t(&[3], vec![0.0; 3]);
    matvec(&mut z, &a, true, &t(&[2], vec![1., 2.]), 2.0, 0.0);
    assert_eq!(z.to_vec(), vec![18.0, 24.0, 30.0]);
}

#[test]
fn broadcast_and_reductions() {
    let mut x = t(&[2, 3], vec![1., 2., 3., 4., 5., 6.]);
    add_row_vec(&mut x, &t(&[3], vec![1., 1., 1.]), -1.0);
    assert_eq!(x.to_vec(), vec![0., 1., 2., 3., 4., 5.]);
    mul_row_vec(&mut x, &t(&[3], vec![2., 0., 1.]));
    assert_eq!(x.to_vec(), vec![0., 0., 2., 6., 0., 5.]);
    let mut s = t(&[3], vec![10., 10., 10.]);
    col_sums(&x, &mut s, 1.0, 1.0);
    assert_eq!(s.to_vec(), vec![16., 10., 17.]);
    let mut n = t(&[2], vec![0.; 2]);
    row_norms(&t(&[2, 2], vec![3., 4., 0., 0.]), &mut n);
    assert_eq!(n.to_vec(), vec![5., 0.]);
    row_affine(&mut x, &t(&[2], vec![1., 2.]), &t(&[2], vec![0., 1.]));
    assert_eq!(x.to_vec(), vec![0., 0., 2., 13., 1., 11.]);
    assert_eq!(sum(&x), 27.0);
    assert_eq!(sum_squares(&t(&[2], vec![3., 4.])), 25.0);
    let (mut mu, mut sd) = (t(&[1], vec![0.]), t(&[1], vec![0.]));
    row_mean_std(&t(&[1, 4], vec![1., 2., 3., 4.]), &mut mu, &mut sd);
    assert_eq!(mu.to_vec(), vec![2.5]);
    // unbiased: sqrt(5/3)
    assert!((sd.to_vec()[0] - (5.0f32 / 3.0).sqrt()).abs() < 1e-6);
    let mut cn = t(&[2], vec![0.; 2]);
    centered_row_norms(&t(&[2, 1], vec![1., 3.]), &mut cn);
    assert_eq!(cn.to_vec(), vec![1., 1.]);
    let mut dots = t(&[2], vec![0.; 2]);
    row_dots(
        &t(&[2, 2], vec![1., 2., 3., 4.]),
        &t(&[2, 2], vec![1., 1., 0., 2.]),
        &mut dots,
    );
    assert_eq!(dots.to_vec(), vec![3., 8.]);
    let mut dst = t(&[2, 2], vec![1.; 4]);
    add_scaled_rows(
        &mut dst,
        &t(&[2, 2], vec![1., 2., 3., 4.]),
        &t(&[2], vec![2., 0.]),
    );
    assert_eq!(dst.to_vec(), vec![3., 5., 1., 1.]);
}

#[test]
fn activations_and_masks() {
    let h = t(&[2, 3], vec![-1., 0., 2., 0.5, 0.2, -3.]);
    let mut f = t(&[2, 3], vec![0.; 6]);
    relu(&h, &mut f);
    assert_eq!(f.to_vec(), vec![0., 0., 2., 0.5, 0.2, 0.]);
    let mut dh = t(&[2, 3], vec![9.; 6]);
    relu_backward(&h, &t(&[2, 3], vec![1.; 6]), &mut dh);
    assert_eq!(dh.to_vec(), vec![0., 0., 1., 1., 1., 0.]);
    let thr = t(&[3], vec![0.0, 0.1, 2.0]);
    jumprelu(&h, &thr, &mut f);
    assert_eq!(f.to_vec(), vec![0., 0., 0., 0.5, 0.2, 0.]);
    let mut cnt = t(&[2], vec![0.; 2]);
    step_count_rows(&h, &thr, &mut cnt);
    assert_eq!(cnt.to_vec(), vec![0., 2.]);
    let mut g = t(&[2, 3], vec![1.; 6]);
    mask_positive(&mut g, &h);
    assert_eq!(g.to_vec(), vec![0., 0., 1., 1., 1., 0.]);
}

#[test]
fn jumprelu_ste_matches_formula() {
    // h - t inside the window (|h - t| < bw/2) gets the estimator, outside does not.
    let bw = 0.1f32;
    let h = t(&[2, 2], vec![0.52, 0.9, 0.48, 0.1]);
    let thr = t(&[2], vec![0.5, 0.5]);
    let df = t(&[2, 2], vec![2.0, 3.0, 4.0, 5.0]);
    let mut dh = t(&[2, 2], vec![1.; 4]);
    let mut dt = t(&[2], vec![1.0, 1.0]);
    jumprelu_backward(&h, &thr, &df, bw, false, &mut dh, &mut dt);
    assert_eq!(dh.to_vec(), vec![3.0, 4.0, 1.0, 1.0]);
    // column 0: entries 0.52 and 0.48 are within 0.05 of 0.5: -(0.5/0.1)*(2+4) = -30
    let d = dt.to_vec();
    assert!((d[0] - (1.0 - 30.0)).abs() < 1e-4, "{d:?}");
    assert_eq!(d[1], 1.0);
    let mut dh2 = t(&[2, 2], vec![0.; 4]);
    let mut dt2 = t(&[2], vec![0.0, 0.0]);
    jumprelu_backward(&h, &thr, &df, bw, true, &mut dh2, &mut dt2);
    let v = dh2.to_vec();
    assert!(
        (v[0] - (2.0 + 10.0)).abs() < 1e-4 && (v[2] - 20.0).abs() < 1e-4,
        "{v:?}"
    );
    // step: g per row
    let mut dh3 = t(&[2, 2], vec![0.; 4]);
    let mut dt3 = t(&[2], vec![0.0, 0.0]);
    step_backward(
        &h,
        &thr,
        &t(&[2], vec![1.0, 2.0]),
        bw,
        true,
        &mut dh3,
        &mut dt3,
    );
    let d3 = dt3.to_vec();
    assert!((d3[0] + 10.0 * 3.0).abs() < 1e-4, "{d3:?}");
    assert!((dh3.to_vec()[2] - 20.0).abs() < 1e-4);
}

/// Central differences of a scalar function of one tensor, in f64 around f32 data.
fn numeric_grad(x: &[f32], f: impl Fn(&[f32]) -> f64, eps: f32) -> Vec<f32> {
    (0..x.len())
        .map(|i| {
            let mut a = x.to_vec();
            let mut b = x.to_vec();
            a[i] += eps;
            b[i] -= eps;
            ((f(&a) - f(&b)) / (2.0 * eps as f64)) as f32
        })
        .collect()
}

#[test]
fn sparsity_penalties_gradients_match_finite_differences() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (r, c) = (3, 5);
    let fv: Vec<f32> = (0..r * c).map(|_| rng.random_range(0.1f32..1.0)).collect();
    let nv: Vec<f32> = (0..c).map(|_| rng.random_range(0.5f32..1.5)).collect();
    for p in [1.0f32, 2.0, 1.5] {
        let f = t(&[r, c], fv.clone());
        let n = t(&[c], nv.clone());
        let mut df = t(&[r, c], vec![0.; r * c]);
        let mut dn = t(&[c], vec![0.; c]);
        let total = lp_sparsity(&f, Some(&n), p, 0.5, Some(&mut df), Some(&mut dn));
        // The L1 gradient's pass takes the norms itself: the same sum, to the bit.
        let plain = lp_sparsity(&f, Some(&n), p, 0.5, None, None);
        assert_eq!(total.to_bits(), plain.to_bits(), "lp p={p} sum");
        let lf =
            |x: &[f32]| 0.5 * lp_sparsity(&t(&[r, c], x.to_vec()), Some(&n), p, 0.0, None, None);
        assert_close(
            &df.to_vec(),
            &numeric_grad(&fv, lf, 1e-3),
            2e-3,
            &format!("lp p={p} df"),
        );
        let ln = |x: &[f32]| 0.5 * lp_sparsity(&f, Some(&t(&[c], x.to_vec())), p, 0.0, None, None);
        assert_close(
            &dn.to_vec(),
            &numeric_grad(&nv, ln, 1e-3),
            2e-3,
            &format!("lp p={p} dn"),
        );
    }
    let f = t(&[r, c], fv.clone());
    let n = t(&[c], nv.clone());
    let mut df = t(&[r, c], vec![0.; r * c]);
    let mut dn = t(&[c], vec![0.; c]);
    tanh_sparsity(&f, &n, 4.0, 0.25, &mut df, &mut dn);
    let tf = |x: &[f32]| {
        let (mut a, mut b) = (t(&[r, c], vec![0.; r * c]), t(&[c], vec![0.; c]));
        0.25 * tanh_sparsity(&t(&[r, c], x.to_vec()), &n, 4.0, 0.0, &mut a, &mut b)
    };
    assert_close(&df.to_vec(), &numeric_grad(&fv, tf, 1e-3), 2e-3, "tanh df");
    let tn = |x: &[f32]| {
        let (mut a, mut b) = (t(&[r, c], vec![0.; r * c]), t(&[c], vec![0.; c]));
        0.25 * tanh_sparsity(&f, &t(&[c], x.to_vec()), 4.0, 0.0, &mut a, &mut b)
    };
    assert_close(&dn.to_vec(), &numeric_grad(&nv, tn, 1e-3), 2e-3, "tanh dn");
}

#[test]
fn pre_act_loss_only_on_dead_latents_below_threshold() {
    let h = t(&[1, 3], vec![0.1, 0.1, 0.9]);
    let thr = t(&[3], vec![0.5, 0.5, 0.5]);
    let dead = t(&[3], vec![1., 0., 1.]);
    let n = t(&[3], vec![2., 2., 2.]);
    let (mut dh, mut dt, mut dn) = (
        t(&[1, 3], vec![0.; 3]),
        t(&[3], vec![0.; 3]),
        t(&[3], vec![0.; 3]),
    );
    let s = pre_act_loss(&h, &thr, &dead, &n, 1.0, &mut dh, &mut dt, &mut dn);
    assert!((s - 0.8).abs() < 1e-6, "{s}");
    assert_eq!(dh.to_vec(), vec![-2.0, 0.0, 0.0]);
    assert_eq!(dt.to_vec(), vec![2.0, 0.0, 0.0]);
    assert!((dn.to_vec()[0] - 0.4).abs() < 1e-6);
}

#[test]
fn mse_with_row_weights_and_gradient() {
    let p = t(&[2, 2], vec![1., 2., 3., 4.]);
    let q = t(&[2, 2], vec![0., 0., 1., 1.]);
    let w = t(&[2], vec![1., 0.5]);
    let mut g = t(&[2, 2], vec![0.; 4]);
    let s = mse(&p, &q, Some(&w), Some((&mut g, 0.5)));
    assert_eq!(s, 5.0 + 0.5 * 13.0);
    assert_eq!(g.to_vec(), vec![1.0, 2.0, 1.0, 1.5]);
    let s2 = weighted_sq_err(&p, &q, &t(&[2, 2], vec![1., 1., 0., 2.]), None);
    assert_eq!(s2, 1.0 + 4.0 + 18.0);
}

#[test]
fn adam_matches_hand_computed_torch_steps() {
    // Two steps of torch.optim.Adam(lr=0.1, betas=(0.9, 0.999), eps=1e-8) on one
    // element with gradients 1 then -2, written out from the update formula.
    let mut p = t(&[1], vec![1.0]);
    let (mut m, mut v) = (t(&[1], vec![0.]), t(&[1], vec![0.]));
    adam(
        &mut p,
        &t(&[1], vec![1.0]),
        &mut m,
        &mut v,
        0.1,
        0.9,
        0.999,
        1e-8,
        1,
    );
    // m=0.1, v=0.001, mhat=1, vhat=1 -> p = 1 - 0.1 * 1/(1+1e-8)
    assert!((p.to_vec()[0] - 0.9).abs() < 1e-6);
    adam(
        &mut p,
        &t(&[1], vec![-2.0]),
        &mut m,
        &mut v,
        0.1,
        0.9,
        0.999,
        1e-8,
        2,
    );
    let m2 = 0.9 * 0.1 - 0.1 * 2.0;
    let v2 = 0.999 * 0.001 + 0.001 * 4.0;
    let upd = 0.1 / (1.0 - 0.81) * m2 / ((v2 / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
    assert!(
        (p.to_vec()[0] as f64 - (0.9 - upd)).abs() < 1e-6,
        "{:?}",
        p.to_vec()
    );
    // beta1 = 0 (SAELens 5 default): m is just the gradient.
    let mut p = t(&[1], vec![0.0]);
    let (mut m, mut v) = (t(&[1], vec![0.5]), t(&[1], vec![0.]));
    adam(
        &mut p,
        &t(&[1], vec![3.0]),
        &mut m,
        &mut v,
        0.1,
        0.0,
        0.999,
        1e-8,
        1,
    );
    assert_eq!(m.to_vec(), vec![3.0]);
}

#[test]
fn grad_clipping_as_torch() {
    let mut a = t(&[2], vec![3.0, 0.0]);
    let mut b = t(&[1], vec![4.0]);
    let n = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
    assert_eq!(n, 5.0);
    let c = 1.0 / (5.0 + 1e-6);
    assert!((a.to_vec()[0] - 3.0 * c).abs() < 1e-7 && (b.to_vec()[0] - 4.0 * c).abs() < 1e-7);
    let mut small = t(&[1], vec![0.5]);
    clip_grad_norm(&mut [&mut small], 1.0);
    assert_eq!(small.to_vec(), vec![0.5]);
}

#[test]
fn topk_rows_matches_sorting() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (r, c, k) = (9, 50, 7);
    let xv = rand_vec(&mut rng, r * c);
    let mut out = Csr::empty(&DEV);
    topk_rows(&t(&[r, c], xv.clone()), k, None, &mut out);
    assert_eq!(out.nnz(), r * k);
    let (off, idx, val) = (
        out.offsets_to_vec(),
        out.indices_to_vec(),
        out.values().to_vec(),
    );
    for row in 0..r {
        let mut order: Vec<usize> = (0..c).collect();
        order.sort_by(|&a, &b| xv[row * c + b].total_cmp(&xv[row * c + a]));
        let mut want: Vec<usize> = order[..k].to_vec();
        want.sort();
        let got: Vec<usize> = idx[off[row] as usize..off[row + 1] as usize]
            .iter()
            .map(|&j| j as usize)
            .collect();
        assert_eq!(got, want, "row {row}");
        for (e, &j) in (off[row] as usize..).zip(&got) {
            assert_eq!(val[e], xv[row * c + j]);
        }
    }
    // masked: only columns with mask > 0 compete
    let mask: Vec<f32> = (0..c).map(|j| (j % 3 == 0) as u8 as f32).collect();
    topk_rows(&t(&[r, c], xv.clone()), 4, Some(&t(&[c], mask)), &mut out);
    assert!(out.indices_to_vec().iter().all(|j| j % 3 == 0));
}

#[test]
fn batch_topk_matches_sorting_and_drops_nonpositive() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let (r, c) = (16, 40);
    let xv: Vec<f32> = rand_vec(&mut rng, r * c)
        .into_iter()
        .map(|v| v.max(0.0))
        .collect();
    for total in [1, 37, 200] {
        let mut out = Csr::empty(&DEV);
        batch_topk(&t(&[r, c], xv.clone()), total, &mut out);
        let mut sorted = xv.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let cut = sorted[total - 1];
        let positives = xv.iter().filter(|&&v| v > 0.0).count();
        assert_eq!(out.nnz(), total.min(positives), "total={total}");
        assert!(out.values().to_vec().iter().all(|&v| v >= cut && v > 0.0));
    }
    // More requested than positive values: every positive value, nothing else.
    let mut out = Csr::empty(&DEV);
    batch_topk(&t(&[2, 2], vec![0.0, 1.0, -1.0, 0.0]), 3, &mut out);
    assert_eq!(
        (out.indices_to_vec(), out.offsets_to_vec()),
        (vec![1], vec![0, 1, 1])
    );
    // Ties at the cut are taken in row-major order.
    batch_topk(&t(&[2, 2], vec![1.0, 2.0, 1.0, 1.0]), 2, &mut out);
    assert_eq!(out.offsets_to_vec(), vec![0, 2, 2]);
}

#[test]
fn sparse_products_match_dense() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let (r, m, d, k) = (11, 30, 13, 4);
    let hv = rand_vec(&mut rng, r * m);
    let mut a = Csr::empty(&DEV);
    topk_rows(&t(&[r, m], hv), k, None, &mut a);
    let mut dense = t(&[r, m], vec![0.; r * m]);
    csr_to_dense(&a, &mut dense);
    let w = t(&[m, d], rand_vec(&mut rng, m * d));
    let x = t(&[r, d], rand_vec(&mut rng, r * d));

    let mut got = t(&[r, d], rand_vec(&mut rng, r * d));
    let mut want = got.clone();
    csr_matmul(&mut got, &a, &w, 1.5, 0.5);
    matmul(&mut want, &dense, false, &w, false, 1.5, 0.5);
    assert_close(&got.to_vec(), &want.to_vec(), 1e-5, "csr_matmul");

    let mut got = t(&[m, d], rand_vec(&mut rng, m * d));
    let mut want = got.clone();
    csr_t_matmul(&mut got, &a, &x, false, 2.0, 1.0);
    matmul(&mut want, &dense, true, &x, false, 2.0, 1.0);
    assert_close(&got.to_vec(), &want.to_vec(), 1e-5, "csr_t_matmul");

    let mut got = t(&[d, m], rand_vec(&mut rng, m * d));
    let mut want = got.clone();
    csr_t_matmul(&mut got, &a, &x, true, 1.0, 1.0);
    matmul(&mut want, &x, true, &dense, false, 1.0, 1.0);
    assert_close(
        &got.to_vec(),
        &want.to_vec(),
        1e-5,
        "csr_t_matmul transposed",
    );

    let mut sd = t(&[a.nnz()], vec![0.; a.nnz()]);
    csr_sampled_dot(&a, &x, &w.clone().reshape(&[m, d]), &mut sd);
    let mut full = t(&[r, m], vec![0.; r * m]);
    matmul(&mut full, &x, false, &w, true, 1.0, 0.0);
    let mut gathered = t(&[a.nnz()], vec![0.; a.nnz()]);
    csr_gather(&a, &full, &mut gathered);
    assert_close(&sd.to_vec(), &gathered.to_vec(), 1e-5, "csr_sampled_dot");

    let mut cs = t(&[m], vec![0.; m]);
    csr_col_dot(&a, None, &mut cs, 1.0, 0.0);
    let mut cs2 = t(&[m], vec![0.; m]);
    col_sums(&dense, &mut cs2, 1.0, 0.0);
    assert_close(&cs.to_vec(), &cs2.to_vec(), 1e-6, "csr_col_dot");

    let mut back = t(&[r, m], vec![0.; r * m]);
    csr_scatter_add(&a, &mut back);
    assert_eq!(back.to_vec(), dense.to_vec());
}

#[test]
fn elementwise_helpers_and_blocks() {
    let p = t(&[2, 2], vec![1., 2., 3., 4.]);
    let q = t(&[2, 2], vec![0., 0., 1., 1.]);
    let mut o = t(&[2, 2], vec![0.; 4]);
    sq_err(&p, &q, Some(&t(&[2], vec![1., 2.])), &mut o);
    assert_eq!(o.to_vec(), vec![1., 4., 8., 18.]);
    div_eps(&p, &q, 1.0, &mut o);
    assert_eq!(o.to_vec(), vec![1., 2., 1.5, 2.]);
    let mut th = t(&[2], vec![0.0, 1.0]);
    tanh(&mut th);
    assert_eq!(th.to_vec(), vec![0.0, 1.0f32.tanh()]);
    let mut dh = t(&[2], vec![9.; 2]);
    tanh_relu_backward(&t(&[2], vec![-1.0, 1.0]), &t(&[2], vec![2.0, 2.0]), &mut dh);
    let tt = 1.0f32.tanh();
    assert_eq!(dh.to_vec(), vec![0.0, 2.0 * (1.0 - tt * tt)]);
    let src = t(&[2, 3], vec![1., 2., 3., 4., 5., 6.]);
    let mut blk = t(&[2, 2], vec![0.; 4]);
    copy_cols(&src, 1, &mut blk);
    assert_eq!(blk.to_vec(), vec![2., 3., 5., 6.]);
    let mut dst = t(&[2, 3], vec![0.; 6]);
    add_cols(&mut dst, 1, &blk);
    assert_eq!(dst.to_vec(), vec![0., 2., 3., 0., 5., 6.]);
    let mut rows = t(&[1, 3], vec![0.; 3]);
    copy_rows(&src, 1, &mut rows);
    assert_eq!(rows.to_vec(), vec![4., 5., 6.]);
    add_rows(&mut dst, 0, &rows);
    assert_eq!(dst.to_vec(), vec![4., 7., 9., 0., 5., 6.]);
}

#[test]
fn noise_is_reproducible_and_roughly_normal() {
    let mut a = t(&[100_000], vec![0.; 100_000]);
    let mut b = a.clone();
    add_normal_noise(&mut a, 2.0, 9);
    add_normal_noise(&mut b, 2.0, 9);
    assert_eq!(a.to_vec(), b.to_vec());
    let n = a.numel() as f64;
    let mean = sum(&a) / n;
    let var = sum_squares(&a) / n - mean * mean;
    assert!(
        mean.abs() < 0.05 && (var - 4.0).abs() < 0.1,
        "mean {mean} var {var}"
    );
}

/// Every reduction gives the same bits whatever the number of threads (exact resume of
/// a training run relies on it), and so does the GEMM.
#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    let (r, c) = (300, 257);
    let x = t(&[r, c], rand_vec(&mut rng, r * c));
    let y = t(&[r, c], rand_vec(&mut rng, r * c));
    let th = t(&[c], rand_vec(&mut rng, c));
    let w = t(&[c, 33], rand_vec(&mut rng, c * 33));
    let run = || {
        let mut cs = t(&[c], vec![0.; c]);
        col_sums(&x, &mut cs, 1.0, 0.0);
        let mut g = t(&[r, c], vec![0.; r * c]);
        let m = mse(&x, &y, None, Some((&mut g, 0.5)));
        let (mut dh, mut dt) = (t(&[r, c], vec![0.; r * c]), t(&[c], vec![0.; c]));
        jumprelu_backward(&x, &th, &y, 0.5, true, &mut dh, &mut dt);
        let mut df = t(&[r, c], vec![0.; r * c]);
        let mut dn = t(&[c], vec![0.; c]);
        let l = lp_sparsity(&x, Some(&th), 1.0, 0.3, Some(&mut df), Some(&mut dn));
        let mut out = t(&[r, 33], vec![0.; r * 33]);
        matmul(&mut out, &x, false, &w, false, 1.0, 0.0);
        let mut wt = t(&[c, c], vec![0.; c * c]);
        matmul(&mut wt, &x, true, &y, false, 1.0, 0.0);
        (
            cs.to_vec(),
            m,
            g.to_vec(),
            dt.to_vec(),
            dn.to_vec(),
            l,
            sum(&x),
            sum_squares(&y),
            out.to_vec(),
            wt.to_vec(),
        )
    };
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let one = pool(1).install(run);
    let three = pool(3).install(run);
    assert!(one == three, "results differ between 1 and 3 threads");
}

// ---- transformer ops, against loops written from the PyTorch definitions ----

#[test]
fn layer_and_rms_norm_match_their_definitions() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (r, c, eps) = (5, 37, 1e-5f32);
    let xv: Vec<f32> = rand_vec(&mut rng, r * c)
        .iter()
        .map(|v| 3.0 * v + 1.0)
        .collect();
    let x = t(&[r, c], xv.clone());
    let mut out = t(&[r, c], vec![0.; r * c]);
    layer_norm(&x, eps, &mut out);
    let mut want = Vec::new();
    for row in xv.chunks(c) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        want.extend(
            row.iter()
                .map(|&v| ((v as f64 - mean) / (var + eps as f64).sqrt()) as f32),
        );
    }
    assert_close(&out.to_vec(), &want, 1e-6, "layer_norm");
    rms_norm(&x, eps, &mut out);
    let mut want = Vec::new();
    for row in xv.chunks(c) {
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
        want.extend(
            row.iter()
                .map(|&v| (v as f64 / (ms + eps as f64).sqrt()) as f32),
        );
    }
    assert_close(&out.to_vec(), &want, 1e-6, "rms_norm");
}

#[test]
fn activations_match_known_values() {
    // Values printed by torch 2.15: F.gelu, TransformerLens's gelu_new, F.silu at -2, -0.5, 0, 1, 3.
    let xs = vec![-2.0f32, -0.5, 0.0, 1.0, 3.0];
    let cases = [
        (
            Activation::Gelu,
            [-0.045_500_28, -0.154_268_77, 0.0, 0.841_344_7, 2.995_949_7],
        ),
        (
            Activation::GeluNew,
            [-0.045_402_29, -0.154_286, 0.0, 0.841_192, 2.996_362_7],
        ),
        (
            Activation::Silu,
            [-0.238_405_84, -0.188_770_34, 0.0, 0.731_058_6, 2.857_722_5],
        ),
        (Activation::Relu, [0.0, 0.0, 0.0, 1.0, 3.0]),
    ];
    for (act, want) in cases {
        let mut x = t(&[5], xs.clone());
        activation(&mut x, act);
        assert_close(&x.to_vec(), &want, 2e-6, &format!("{act:?}"));
    }
}

#[test]
fn embedding_gathers_rows() {
    let table = t(&[3, 2], vec![0., 1., 10., 11., 20., 21.]);
    let mut out = t(&[4, 2], vec![0.; 8]);
    embedding(&table, &[2, 0, 2, 1], &mut out);
    assert_eq!(out.to_vec(), vec![20., 21., 0., 1., 20., 21., 10., 11.]);
}

#[test]
#[should_panic(expected = "id 3 out of range")]
fn embedding_refuses_out_of_range_ids() {
    let table = t(&[3, 2], vec![0.; 6]);
    let mut out = t(&[1, 2], vec![0.; 2]);
    embedding(&table, &[3], &mut out);
}

#[test]
fn rotary_rotates_pairs_by_position_angle() {
    // 2 sequences of 3 positions, 2 heads of 6 dims, rotating the first 4 of each head.
    let (n, tt, h, dh, rot) = (2, 3, 2, 6, 4);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    let xv = rand_vec(&mut rng, n * tt * h * dh);
    let angle = |p: usize, i: usize| p as f32 * (0.3 + i as f32);
    let (mut cos, mut sin) = (vec![], vec![]);
    for p in 0..5 {
        for i in 0..rot {
            cos.push(angle(p, i % 2).cos());
            sin.push(angle(p, i % 2).sin());
        }
    }
    let mut x = t(&[n * tt, h * dh], xv.clone());
    rotary(&mut x, h, dh, tt, &t(&[5, rot], cos), &t(&[5, rot], sin));
    let got = x.to_vec();
    for r in 0..n * tt {
        for head in 0..h {
            let o = r * h * dh + head * dh;
            for i in 0..2 {
                // (a + ib) * e^{i angle}: dims i and i + rot/2 form one complex number.
                let (a, b) = (xv[o + i], xv[o + i + 2]);
                let th = angle(r % tt, i);
                assert!((got[o + i] - (a * th.cos() - b * th.sin())).abs() < 1e-6);
                assert!((got[o + i + 2] - (b * th.cos() + a * th.sin())).abs() < 1e-6);
            }
            assert_eq!(
                &got[o + rot..o + dh],
                &xv[o + rot..o + dh],
                "unrotated tail"
            );
        }
    }
}

/// Causal attention with grouped-query heads, sliding window and soft-capping, in
/// f64, per (seq, head, query).
fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sh: AttnShape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (tt, hq, hk, dh) = (sh.seq_len, sh.n_heads, sh.n_kv_heads, sh.d_head);
    let mut z = vec![0f32; sh.n_seq * tt * hq * dh];
    let mut pat = vec![0f32; sh.n_seq * hq * tt * tt];
    for s in 0..sh.n_seq {
        for h in 0..hq {
            let g = h * hk / hq;
            for i in 0..tt {
                let seen = |j: usize| sh.window.is_none_or(|w| i - j < w);
                let sc: Vec<f64> = (0..=i)
                    .map(|j| {
                        let x = (0..dh)
                            .map(|e| {
                                q[(s * tt + i) * hq * dh + h * dh + e] as f64
                                    * k[(s * tt + j) * hk * dh + g * dh + e] as f64
                            })
                            .sum::<f64>()
                            * scale as f64;
                        let x = match sh.softcap {
                            Some(c) => c as f64 * (x / c as f64).tanh(),
                            None => x,
                        };
                        if seen(j) {
                            x
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let den: f64 = sc.iter().map(|v| (v - m).exp()).sum();
                for j in 0..=i {
                    let p = (sc[j] - m).exp() / den;
                    pat[((s * hq + h) * tt + i) * tt + j] = p as f32;
                    for e in 0..dh {
                        z[(s * tt + i) * hq * dh + h * dh + e] +=
                            (p * v[(s * tt + j) * hk * dh + g * dh + e] as f64) as f32;
                    }
                }
            }
        }
    }
    (z, pat)
}

#[test]
fn attention_fused_and_stepwise_match_a_naive_loop() {
    // Plain causal, a sliding window shorter than the sequence, soft-capping that
    // bites (scores reach ~±3 here), and both; then sequences longer than the fused
    // kernel's query block (64), with a window that starts inside an earlier block.
    for (tt, window, softcap) in [
        (7, None, None),
        (7, Some(3), None),
        (7, None, Some(0.8)),
        (7, Some(2), Some(0.5)),
        (150, None, None),
        (150, Some(70), Some(0.8)),
    ] {
        let sh = AttnShape {
            n_seq: 2,
            seq_len: tt,
            n_heads: 4,
            n_kv_heads: 2,
            d_head: 5,
            window,
            softcap,
        };
        let what = format!("seq_len {tt}, window {window:?}, softcap {softcap:?}");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        let rows = sh.n_seq * sh.seq_len;
        let (qv, kv, vv) = (
            rand_vec(&mut rng, rows * 20),
            rand_vec(&mut rng, rows * 10),
            rand_vec(&mut rng, rows * 10),
        );
        let (q, k, v) = (
            t(&[rows, 20], qv.clone()),
            t(&[rows, 10], kv.clone()),
            t(&[rows, 10], vv.clone()),
        );
        let scale = 0.7;
        let (want_z, want_p) = naive_attention(&qv, &kv, &vv, sh, scale);
        let mut z = t(&[rows, 20], vec![0.; rows * 20]);
        causal_attention(&q, &k, &v, sh, scale, &mut z);
        assert_close(&z.to_vec(), &want_z, 1e-5, &format!("fused z, {what}"));

        let n = sh.n_seq * sh.n_heads * sh.seq_len;
        let mut scores = t(&[n, tt], vec![0.; n * tt]);
        attention_scores(&q, &k, sh, scale, &mut scores);
        let s = scores.to_vec();
        for (r, row) in s.chunks(tt).enumerate() {
            let i = r % tt;
            let lo = window.map_or(0, |w: usize| (i + 1).saturating_sub(w));
            assert!(
                row[lo..=i].iter().all(|v| v.is_finite())
                    && row[..lo]
                        .iter()
                        .chain(&row[i + 1..])
                        .all(|&v| v == f32::NEG_INFINITY),
                "{what}: row {r}: {row:?}"
            );
            if let Some(c) = softcap {
                assert!(row[lo..=i].iter().all(|v| v.abs() < c), "{what}: {row:?}");
            }
        }
        let mut pattern = t(&[n, tt], vec![0.; n * tt]);
        causal_softmax(&scores, tt, &mut pattern);
        assert_close(
            &pattern.to_vec(),
            &want_p,
            1e-6,
            &format!("pattern, {what}"),
        );
        let mut z2 = t(&[rows, 20], vec![1.; rows * 20]);
        attention_apply(&pattern, &v, sh, &mut z2);
        assert_close(&z2.to_vec(), &want_z, 1e-5, &format!("stepwise z, {what}"));
    }
}

#[test]
fn head_rms_norm_normalises_each_head_then_weights_it() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
    let (rows, heads, dh) = (3, 4, 6);
    let xv = rand_vec(&mut rng, rows * heads * dh);
    let wv = rand_vec(&mut rng, dh);
    let mut x = t(&[rows, heads * dh], xv.clone());
    head_rms_norm(&mut x, dh, 1e-6);
    let normed = x.to_vec();
    mul_head_vec(&mut x, &t(&[dh], wv.clone()));
    for (c, chunk) in xv.chunks(dh).enumerate() {
        let ms = chunk.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dh as f64;
        for (e, &v) in chunk.iter().enumerate() {
            let n = v as f64 / (ms + 1e-6).sqrt();
            let i = c * dh + e;
            assert!((normed[i] as f64 - n).abs() < 1e-6, "normalised {i}");
            assert!(
                (x.to_vec()[i] as f64 - n * wv[e] as f64).abs() < 1e-6,
                "weighted {i}"
            );
        }
    }
}

#[test]
fn cross_entropy_and_kl_match_log_softmax() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(14);
    let (r, c) = (6, 50);
    let (pv, qv) = (rand_vec(&mut rng, r * c), rand_vec(&mut rng, r * c));
    let (p, q) = (
        t(&[r, c], pv.iter().map(|v| 8.0 * v).collect()),
        t(&[r, c], qv.iter().map(|v| 8.0 * v).collect()),
    );
    let logp = |x: &[f32]| -> Vec<f64> {
        let m = x.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        x.iter().map(|&v| v as f64 - lse).collect()
    };
    let targets: Vec<u32> = (0..r as u32).map(|i| i * 7 % c as u32).collect();
    let mut out = t(&[r], vec![0.; r]);
    cross_entropy(&p, &targets, &mut out);
    let (pv, qv) = (p.to_vec(), q.to_vec());
    let want: Vec<f32> = (0..r)
        .map(|i| -logp(&pv[i * c..(i + 1) * c])[targets[i] as usize] as f32)
        .collect();
    assert_close(&out.to_vec(), &want, 1e-6, "cross_entropy");
    kl_div(&p, &q, &mut out);
    let want: Vec<f32> = (0..r)
        .map(|i| {
            let (lp, lq) = (logp(&pv[i * c..(i + 1) * c]), logp(&qv[i * c..(i + 1) * c]));
            lp.iter()
                .zip(&lq)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>() as f32
        })
        .collect();
    assert_close(&out.to_vec(), &want, 1e-5, "kl_div");
    kl_div(&p, &p, &mut out);
    assert!(out.to_vec().iter().all(|v| v.abs() < 1e-6), "KL(p||p) = 0");
}

#[test]
fn set_and_select_rows_and_cols() {
    let mut dst = t(&[2, 4], vec![0.; 8]);
    set_cols(&mut dst, 1, &t(&[2, 2], vec![1., 2., 3., 4.]));
    assert_eq!(dst.to_vec(), vec![0., 1., 2., 0., 0., 3., 4., 0.]);
    select_rows(&mut dst, &t(&[2, 4], vec![9.; 8]), &[false, true]);
    assert_eq!(dst.to_vec(), vec![0., 1., 2., 0., 9., 9., 9., 9.]);
}

#[test]
fn relu_latents_as_csr_give_the_dense_lp_sparsity() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let (r, c) = (9, 37);
    // About a third positive, one all-negative row (a zero norm), an exact zero.
    let mut hv: Vec<f32> = rand_vec(&mut rng, r * c).iter().map(|v| v - 0.4).collect();
    hv[3 * c..4 * c]
        .iter_mut()
        .for_each(|v| *v = -v.abs() - 0.1);
    hv[5] = 0.0;
    let h = t(&[r, c], hv.clone());
    assert_eq!(count_positive(&h), hv.iter().filter(|&&v| v > 0.0).count());
    let mut csr = Csr::empty(&Device::Cpu);
    relu_to_csr(&h, &mut csr);
    let mut dense = t(&[r, c], vec![9.0; r * c]);
    csr_to_dense(&csr, &mut dense);
    let mut f = t(&[r, c], vec![0.0; r * c]);
    relu(&h, &mut f);
    assert_eq!(dense.to_vec(), f.to_vec(), "the CSR holds exactly ReLU(h)");
    assert_eq!(
        csr.offsets_to_vec()[4],
        csr.offsets_to_vec()[3],
        "row 3 is empty"
    );
    let n = t(
        &[c],
        rand_vec(&mut rng, c)
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect(),
    );
    for p in [1.0f32, 2.0, 1.5] {
        for weighted in [true, false] {
            let nw = weighted.then_some(&n);
            let (mut df, mut dn) = (t(&[r, c], vec![0.0; r * c]), t(&[c], vec![0.0; c]));
            let want = lp_sparsity(&f, nw, p, 0.7, Some(&mut df), Some(&mut dn));
            let (mut dv, mut dn2) = (t(&[csr.nnz()], vec![0.0; csr.nnz()]), t(&[c], vec![0.0; c]));
            let got = csr_lp_sparsity(&csr, nw, p, 0.7, Some(&mut dv), Some(&mut dn2));
            let what = format!("p {p}, weighted {weighted}");
            assert!(
                (got - want).abs() <= 1e-12 * want.abs(),
                "{what}: {got} vs {want}"
            );
            let mut df_at = t(&[csr.nnz()], vec![0.0; csr.nnz()]);
            csr_gather(&csr, &df, &mut df_at);
            assert_close(
                &dv.to_vec(),
                &df_at.to_vec(),
                1e-6,
                &format!("dvals, {what}"),
            );
            assert_close(&dn2.to_vec(), &dn.to_vec(), 1e-6, &format!("dn, {what}"));
            // Off the pattern the dense gradient is zero (ReLU's zeros have no sign).
            let on: f64 = df_at.to_vec().iter().map(|v| v.abs() as f64).sum();
            let all: f64 = df.to_vec().iter().map(|v| v.abs() as f64).sum();
            assert!((on - all).abs() <= 1e-6 * all, "{what}: {on} vs {all}");
        }
    }
}

/// JumpReLU's two sparse sets hold exactly the active entries and the inactive ones
/// inside the rectangle, and the per-entry estimator kernels over them give the dense
/// kernels' gradients: `dh` at the stored entries bit for bit (zero elsewhere), the
/// column sums `dt`/`dn` at 1e-6 of their largest magnitude (each set's sum is
/// rounded to f32 before the two are added) and the tanh total at 1e-9 relative.
#[test]
fn jumprelu_sets_as_csr_give_the_dense_estimators() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(22);
    let (r, c, bw) = (70, 23, 0.3f32);
    let h = t(&[r, c], rand_vec(&mut rng, r * c));
    let tv: Vec<f32> = rand_vec(&mut rng, c)
        .iter()
        .map(|v| v.abs() * 0.5)
        .collect();
    let th = t(&[c], tv.clone());
    let (mut act, mut rect) = (Csr::empty(&Device::Cpu), Csr::empty(&Device::Cpu));
    jumprelu_to_csr(&h, &th, bw, &mut act, &mut rect);
    let hv = h.to_vec();
    let dense = |a: &Csr, vals: &Tensor| {
        let mut d = t(&[r, c], vec![0.0; r * c]);
        let mut b = a.clone();
        *b.values_mut() = vals.clone();
        csr_to_dense(&b, &mut d);
        d.to_vec()
    };
    let ones = |a: &Csr| t(&[a.nnz()], vec![1.0; a.nnz()]);
    let (ma, mr) = (dense(&act, &ones(&act)), dense(&rect, &ones(&rect)));
    for (i, &v) in hv.iter().enumerate() {
        let tj = tv[i % c];
        assert_eq!(ma[i] == 1.0, v > tj, "entry {i}: active");
        assert_eq!(
            mr[i] == 1.0,
            v <= tj && (v - tj) / bw > -0.5,
            "entry {i}: rectangle"
        );
    }
    assert!(act.nnz() > 0 && rect.nnz() > 0);
    assert_eq!(count_jumprelu_pattern(&h, &th, bw), act.nnz() + rect.nnz());
    let close = |what: &str, got: &[f32], want: &[f32]| {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * scale, "{what}[{j}]: {g} vs {w}");
        }
    };
    let df = t(&[r, c], rand_vec(&mut rng, r * c));
    let g = t(&[r], rand_vec(&mut rng, r));
    let n = t(
        &[c],
        rand_vec(&mut rng, c)
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect(),
    );
    for ste in [false, true] {
        // jumprelu_backward
        let (mut dh, mut dt) = (t(&[r, c], vec![0.0; r * c]), t(&[c], vec![0.0; c]));
        jumprelu_backward(&h, &th, &df, bw, ste, &mut dh, &mut dt);
        let mut dt2 = t(&[c], vec![0.0; c]);
        let mut got = vec![0.0; r * c];
        for a in [&act, &rect] {
            let mut dfe = t(&[a.nnz()], vec![0.0; a.nnz()]);
            csr_gather(a, &df, &mut dfe);
            let mut dhe = t(&[a.nnz()], vec![0.0; a.nnz()]);
            csr_jumprelu_backward(a, &th, &dfe, bw, ste, &mut dhe, &mut dt2);
            got.iter_mut()
                .zip(dense(a, &dhe))
                .for_each(|(o, v)| *o += v);
        }
        assert_eq!(got, dh.to_vec(), "jumprelu dh, ste {ste}");
        close("jumprelu dt", &dt2.to_vec(), &dt.to_vec());
        // In place: the bits of the op into a zero `dh`, also where `df` is -0.
        let neg0 = |v: &Tensor| {
            let v = v.to_vec().into_iter().enumerate();
            t(
                &[r, c],
                v.map(|(i, x)| if i % 7 == 0 { -0.0 } else { x }).collect(),
            )
        };
        let (mut dh, mut dt) = (t(&[r, c], vec![0.0; r * c]), t(&[c], vec![0.0; c]));
        jumprelu_backward(&h, &th, &neg0(&df), bw, ste, &mut dh, &mut dt);
        let (mut d, mut dt3) = (neg0(&df), t(&[c], vec![0.0; c]));
        jumprelu_backward_in_place(&h, &th, &mut d, bw, ste, &mut dt3);
        assert_eq!(bits(&d), bits(&dh), "in-place jumprelu dh, ste {ste}");
        assert_eq!(bits(&dt3), bits(&dt), "in-place jumprelu dt, ste {ste}");
        // step_backward
        let (mut dh, mut dt) = (t(&[r, c], vec![0.0; r * c]), t(&[c], vec![0.0; c]));
        step_backward(&h, &th, &g, bw, ste, &mut dh, &mut dt);
        let mut dt2 = t(&[c], vec![0.0; c]);
        let mut got = vec![0.0; r * c];
        for a in [&act, &rect] {
            let mut dhe = t(&[a.nnz()], vec![0.0; a.nnz()]);
            csr_step_backward(a, &th, &g, bw, ste, &mut dhe, &mut dt2);
            got.iter_mut()
                .zip(dense(a, &dhe))
                .for_each(|(o, v)| *o += v);
        }
        assert_eq!(got, dh.to_vec(), "step dh, ste {ste}");
        close("step dt", &dt2.to_vec(), &dt.to_vec());
        if !ste {
            // Without the input's gradient: the same `dt` bits, no `dh`.
            let mut dt3 = t(&[c], vec![0.0; c]);
            step_backward_threshold(&h, &th, &g, bw, &mut dt3);
            assert_eq!(bits(&dt3), bits(&dt), "step dt without dh");
        }
    }
    // tanh over the latents: the active set carries them (absent entries are zeros)
    let mut f = t(&[r, c], vec![0.0; r * c]);
    jumprelu(&h, &th, &mut f);
    let (mut df1, mut dn1) = (t(&[r, c], vec![0.0; r * c]), t(&[c], vec![0.0; c]));
    let want = tanh_sparsity(&f, &n, 4.0, 0.3, &mut df1, &mut dn1);
    let (mut dfe, mut dn2) = (t(&[act.nnz()], vec![0.0; act.nnz()]), t(&[c], vec![0.0; c]));
    let got = csr_tanh_sparsity(&act, &n, 4.0, 0.3, &mut dfe, &mut dn2);
    assert!(
        (got - want).abs() <= 1e-9 * want.abs(),
        "tanh total {got} vs {want}"
    );
    close("tanh dn", &dn2.to_vec(), &dn1.to_vec());
    let d1 = df1.to_vec();
    for (i, (&m, &v)) in ma.iter().zip(&dense(&act, &dfe)).enumerate() {
        if m == 1.0 {
            assert_eq!(v, d1[i], "tanh df at active entry {i}");
        }
    }
}

#[test]
fn non_finite_counts_and_finds_the_first_across_chunks() {
    let n = 3 * cpu::FLAT_GRAIN + 17;
    let mut v = vec![1.0f32; n];
    assert_eq!(non_finite(&t(&[n], v.clone())), None);
    v[2 * cpu::FLAT_GRAIN + 5] = f32::NEG_INFINITY;
    v[3 * cpu::FLAT_GRAIN + 1] = f32::NAN;
    v[cpu::FLAT_GRAIN + 9] = f32::INFINITY;
    assert_eq!(non_finite(&t(&[n], v)), Some((3, cpu::FLAT_GRAIN + 9)));
}

/// The blocked sparse products against plain loops, at shapes that cross every edge:
/// several latent blocks with a partial last one, full chunks of `d_in` and a narrower
/// one, empty rows; sparse enough for the weight gradient to add into the output in
/// place, and dense enough for its tiles. The decode and the weight gradients add the
/// same terms in the same order as these loops, so they must match bit for bit; the
/// sampled dot sums in another order and is held to 1e-5 of the largest value of an
/// f64 sum. All four must give the same bits on one thread as on two.
#[test]
fn blocked_sparse_products_match_plain_loops() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    for (r, m, d, p) in [
        (37, 2500, 300, 0.035f32),
        (300, 1100, 140, 0.1),
        (64, 5000, 140, 0.001),
    ] {
        let h: Vec<f32> = (0..r * m)
            .map(|i| match (i / m) % 9 == 4 {
                true => -1.0, // an empty row
                false => rng.random_range(-1.0f32..p),
            })
            .collect();
        let mut a = Csr::empty(&DEV);
        relu_to_csr(&t(&[r, m], h), &mut a);
        check_blocked_products(&a, d, &mut rng);
    }
}

fn check_blocked_products(a: &Csr, d: usize, rng: &mut impl Rng) {
    let (r, m) = (a.rows(), a.cols());
    let what = format!("{r}x{m}, d {d}, {} entries", a.nnz());
    let (off, idx, val) = (a.offsets_to_vec(), a.indices_to_vec(), a.values().to_vec());
    let entries = |row: usize| {
        (off[row] as usize..off[row + 1] as usize).map(|e| (idx[e] as usize, val[e], e))
    };
    let w = rand_vec(rng, m * d);
    let x = rand_vec(rng, r * d);
    let (alpha, beta) = (1.5f32, 0.5f32);

    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut dec = t(&[r, d], x.clone());
            csr_matmul(&mut dec, a, &t(&[m, d], w.clone()), alpha, beta);
            let mut g = t(&[m, d], w.clone());
            csr_t_matmul(&mut g, a, &t(&[r, d], x.clone()), false, alpha, beta);
            let mut gt = t(&[d, m], w.clone());
            csr_t_matmul(&mut gt, a, &t(&[r, d], x.clone()), true, alpha, beta);
            let mut sd = t(&[a.nnz()], vec![0.; a.nnz()]);
            csr_sampled_dot(a, &t(&[r, d], x.clone()), &t(&[m, d], w.clone()), &mut sd);
            [dec, g, gt, sd].map(|t| t.to_vec())
        })
    };
    let [dec, g, gt, sd] = run(2);
    let again = run(1);
    assert!(
        again == [dec.clone(), g.clone(), gt.clone(), sd.clone()],
        "{what}: 1 vs 2 threads"
    );

    let mut want = x.iter().map(|v| beta * v).collect::<Vec<_>>();
    for row in 0..r {
        for (j, v, _) in entries(row) {
            for c in 0..d {
                want[row * d + c] += (alpha * v) * w[j * d + c];
            }
        }
    }
    assert!(dec == want, "{what}: csr_matmul");

    let mut want = w.iter().map(|v| beta * v).collect::<Vec<_>>();
    let mut sums = vec![0f32; m * d];
    for row in 0..r {
        for (j, v, _) in entries(row) {
            for c in 0..d {
                want[j * d + c] += (alpha * v) * x[row * d + c];
                sums[j * d + c] += (alpha * v) * x[row * d + c];
            }
        }
    }
    assert!(g == want, "{what}: csr_t_matmul");
    let want: Vec<f32> = (0..d * m)
        .map(|i| beta * w[i] + sums[(i % m) * d + i / m])
        .collect();
    assert!(gt == want, "{what}: csr_t_matmul transposed");

    let mut want = vec![0f32; a.nnz()];
    for row in 0..r {
        for (j, _, e) in entries(row) {
            let s: f64 = (0..d)
                .map(|c| x[row * d + c] as f64 * w[j * d + c] as f64)
                .sum();
            want[e] = s as f32;
        }
    }
    assert_close(&sd, &want, 1e-5, &format!("{what}: csr_sampled_dot"));
}

/// Top-k's fast scan (a compare against the worst kept value, sixteen at a time) keeps
/// exactly what the total order keeps: larger values first (-0.0 below +0.0), among
/// equal values the lower column; rows of many ties, of signed zeros, shorter than 16
/// and with k equal to the row length.
#[test]
fn topk_rows_keeps_the_total_order_on_ties() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    // Rows of at least 1024 columns with k <= 64 take the group-maxima scan, the
    // others the running-threshold one.
    for (r, c, k, zeros, nans) in [
        (6, 203, 9, false, false),
        (3, 10, 4, false, false),
        (2, 33, 33, false, false),
        (4, 64, 1, false, false),
        (4, 1100, 31, false, true),
        (2, 1024, 64, false, true),
        (3, 4099, 32, false, false),
        // the cut among zeros: a later +0.0 must displace a kept -0.0
        (5, 203, 9, true, false),
        (5, 1300, 20, true, false),
    ] {
        let xv: Vec<f32> = (0..r * c)
            .map(|i| match (zeros, i % 5) {
                (true, _) => {
                    [-0.0, -0.0, -0.0, -0.0, -0.0, -1.0, -1.0, 0.0][rng.random_range(0..8)]
                }
                (false, 0) => 0.0,
                (false, 1) => -0.0,
                // NaNs of both signs rank above and below every number
                (false, 2) if nans && i % 3 == 0 => [f32::NAN, -f32::NAN][i % 2],
                _ => (rng.random_range(-4i32..4) as f32) * 0.5,
            })
            .collect();
        let mut out = Csr::empty(&DEV);
        topk_rows(&t(&[r, c], xv.clone()), k, None, &mut out);
        let (off, idx) = (out.offsets_to_vec(), out.indices_to_vec());
        for row in 0..r {
            let x = &xv[row * c..][..c];
            let mut order: Vec<usize> = (0..c).collect();
            order.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
            let mut want = order[..k].to_vec();
            want.sort();
            let got: Vec<usize> = idx[off[row] as usize..off[row + 1] as usize]
                .iter()
                .map(|&j| j as usize)
                .collect();
            assert_eq!(got, want, "{r}x{c} k={k} row {row}");
        }
    }
}

/// The [batch, d_sae] passes decide by comparing with per-column cuts; they must
/// decide exactly as the tests they replace (`h > t`, the rectangle test with its
/// division, `v > 0`), also at the last float either side of each boundary, at signed
/// zeros, subnormals, infinities and NaN. The six thresholds repeat over 39 columns,
/// so that every case lands in 16-wide vector lanes and in the scalar tail.
#[test]
fn cut_comparisons_decide_as_the_tests_they_replace() {
    let bw = 0.001f32;
    let thr: Vec<f32> = [0.0f32, 0.3, -0.25, 1e-30, 7.0, 0.0005]
        .into_iter()
        .cycle()
        .take(39)
        .collect();
    let c = thr.len();
    let step = |v: f32, n: i32| -> f32 {
        let mut v = v;
        for _ in 0..n.abs() {
            v = if n > 0 { v.next_up() } else { v.next_down() };
        }
        v
    };
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for n in -3..=3 {
        rows.push(thr.iter().map(|&t| step(t, n)).collect());
        rows.push(thr.iter().map(|&t| step(t - bw / 2.0, n)).collect());
    }
    let special = [
        -0.0,
        0.0,
        f32::from_bits(1),
        -f32::from_bits(1),
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -f32::NAN,
        1e-45,
    ];
    for shift in 0..special.len() {
        rows.push(
            (0..c)
                .map(|j| special[(j + shift) % special.len()])
                .collect(),
        );
    }
    let r = rows.len();
    let hv: Vec<f32> = rows.concat();
    let h = t(&[r, c], hv.clone());
    let th = t(&[c], thr.to_vec());
    let (mut act, mut rect) = (Csr::empty(&DEV), Csr::empty(&DEV));
    jumprelu_to_csr(&h, &th, bw, &mut act, &mut rect);
    let mut dense = t(&[r, c], vec![0.; r * c]);
    csr_to_dense(&act, &mut dense);
    let (mut want_a, mut want_r, mut reach, mut pos) = (vec![], vec![], 0, 0);
    for (i, &v) in hv.iter().enumerate() {
        let tj = thr[i % c];
        want_a.push(v > tj);
        let in_rect = !want_a[i] && (v - tj) / bw > -0.5;
        want_r.push(in_rect);
        reach += (v > tj || in_rect) as usize;
        pos += (v > 0.0) as usize;
    }
    let got_a: Vec<bool> = (0..r * c).map(|i| membership(&act, i / c, i % c)).collect();
    let got_r: Vec<bool> = (0..r * c)
        .map(|i| membership(&rect, i / c, i % c))
        .collect();
    assert_eq!(got_a, want_a, "active");
    assert_eq!(got_r, want_r, "rectangle");
    // The stored values are the entries themselves.
    let mut rdense = t(&[r, c], vec![0.; r * c]);
    csr_to_dense(&rect, &mut rdense);
    let (dv, rv) = (dense.to_vec(), rdense.to_vec());
    for (i, &v) in hv.iter().enumerate() {
        let want = |on: bool| if on { v.to_bits() } else { 0f32.to_bits() };
        assert_eq!(dv[i].to_bits(), want(want_a[i]), "active value {i}");
        assert_eq!(rv[i].to_bits(), want(want_r[i]), "rectangle value {i}");
    }
    assert_eq!(count_jumprelu_pattern(&h, &th, bw), reach);
    assert_eq!(count_positive(&h), pos);
    let mut relu = Csr::empty(&DEV);
    relu_to_csr(&h, &mut relu);
    assert_eq!(relu.nnz(), pos);
    assert!(relu.values().to_vec().iter().all(|&v| v > 0.0));
}

fn membership(a: &Csr, r: usize, j: usize) -> bool {
    let (off, idx) = (a.offsets_to_vec(), a.indices_to_vec());
    idx[off[r] as usize..off[r + 1] as usize].contains(&(j as u32))
}

/// The fused bias pass of [`Split::add_bias_and_count`] leaves the bits of
/// `add_row_vec` and the counts (and CSR matrices) of counting the result afterwards,
/// for ReLU's split and a JumpReLU's, over widths with and without a vector tail.
#[test]
fn split_counted_in_the_bias_pass_is_the_split_counted_after() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(31);
    for (r, c) in [(5, 16), (7, 45), (3, 200)] {
        let x = rand_vec(&mut rng, r * c);
        let bias = t(
            &[c],
            rand_vec(&mut rng, c).iter().map(|v| v - 0.4).collect(),
        );
        let th = t(
            &[c],
            rand_vec(&mut rng, c).iter().map(|v| v * 0.3).collect(),
        );
        let mut want = t(&[r, c], x.clone());
        add_row_vec(&mut want, &bias, 1.0);
        for jump in [false, true] {
            let split = || match jump {
                true => Split::jumprelu(&th, 0.2),
                false => Split::relu(c),
            };
            let (fused, after) = (split(), split());
            let mut h = t(&[r, c], x.clone());
            fused.add_bias_and_count(&mut h, &bias);
            assert_eq!(bits(&h), bits(&want), "{r}x{c}: bias bits");
            assert_eq!(
                fused.nnz(&h),
                after.nnz(&want),
                "{r}x{c} jump={jump}: count"
            );
            assert!(fused.nnz(&h) > 0 && fused.nnz(&h) < r * c);
            let csrs = |s: &Split, h: &Tensor| {
                let (mut a, mut b) = (Csr::empty(&DEV), Csr::empty(&DEV));
                s.to_csr(h, &mut a, jump.then_some(&mut b));
                [a, b].map(|m| (m.offsets.to_vec(), m.indices.to_vec(), bits(m.values())))
            };
            assert_eq!(
                csrs(&fused, &h),
                csrs(&after, &want),
                "{r}x{c} jump={jump}: CSR"
            );
        }
    }
}

/// Adding the bias inside batch top-k's selection leaves the bits of `add_row_vec` in
/// `x` and selects what `batch_topk` selects from the result: small matrices (the
/// radix select), large ones (the sampled cut), one whose sample gives way (its
/// largest values only where the sample looks), and totals of 0 and of everything.
#[test]
fn bias_added_in_batch_topk_is_the_bias_added_before() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(43);
    // Above the sampled select's 2^18 values. Its stride at this size is 7 (about
    // len / 2^16, prime to 1000): large values only there make its cut too high for
    // 9000 (checked: the select gives way).
    let (big_r, big_c) = (300, 1000);
    let stride_like = |i: usize| i.is_multiple_of(7) as u8 as f32 * 100.0;
    let cases: Vec<(usize, usize, Vec<f32>, usize)> = vec![
        (7, 40, rand_vec(&mut rng, 280), 30),
        (big_r, big_c, rand_vec(&mut rng, big_r * big_c), 32 * big_r),
        (big_r, big_c, rand_vec(&mut rng, big_r * big_c), 0),
        (7, 40, rand_vec(&mut rng, 280), 280),
        (
            big_r,
            big_c,
            (0..big_r * big_c)
                .map(|i| stride_like(i) + (i % 7) as f32 * 0.01)
                .collect(),
            9000,
        ),
    ];
    for (r, c, x, total) in cases {
        let bias = t(&[c], rand_vec(&mut rng, c));
        let mut want = t(&[r, c], x.clone());
        add_row_vec(&mut want, &bias, 1.0);
        let mut want_sel = Csr::empty(&DEV);
        batch_topk(&want, total, &mut want_sel);
        let mut got = t(&[r, c], x);
        let mut got_sel = Csr::empty(&DEV);
        add_bias_batch_topk(&mut got, &bias, total, &mut got_sel);
        let what = format!("{r}x{c} total={total}");
        assert_eq!(bits(&got), bits(&want), "{what}: x");
        assert_eq!(
            got_sel.offsets_to_vec(),
            want_sel.offsets_to_vec(),
            "{what}"
        );
        assert_eq!(
            got_sel.indices_to_vec(),
            want_sel.indices_to_vec(),
            "{what}"
        );
        assert_eq!(bits(got_sel.values()), bits(want_sel.values()), "{what}");
        assert!(
            total == 0 || got_sel.nnz() > 0,
            "{what}: something selected"
        );
    }
}

/// Adding the bias inside the top-k pass leaves the bits of `add_row_vec` in `x` and
/// selects what `topk_rows` selects from the result, on both scans (short and long
/// rows) and with `k` = 0.
#[test]
fn bias_added_in_the_topk_pass_is_the_bias_added_before() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(41);
    for (r, c, k) in [(5, 40, 7), (3, 2050, 32), (2, 1024, 0)] {
        let x = rand_vec(&mut rng, r * c);
        let bias = t(&[c], rand_vec(&mut rng, c));
        let mut want = t(&[r, c], x.clone());
        add_row_vec(&mut want, &bias, 1.0);
        let mut want_sel = Csr::empty(&DEV);
        topk_rows(&want, k, None, &mut want_sel);
        let mut got = t(&[r, c], x);
        let mut got_sel = Csr::empty(&DEV);
        add_bias_topk_rows(&mut got, &bias, k, &mut got_sel);
        assert_eq!(bits(&got), bits(&want), "{r}x{c} k={k}: x");
        assert_eq!(got_sel.offsets_to_vec(), want_sel.offsets_to_vec());
        assert_eq!(
            got_sel.indices_to_vec(),
            want_sel.indices_to_vec(),
            "{r}x{c} k={k}"
        );
        assert_eq!(
            bits(got_sel.values()),
            bits(want_sel.values()),
            "{r}x{c} k={k}"
        );
    }
}

/// One pass of `scale_shift_cols` gives the bits of `mul_row_vec` then `add_row_vec`
/// (no fused multiply-add), over widths with and without a vector tail.
#[test]
fn scale_shift_cols_is_mul_then_add() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(43);
    for (r, c) in [(3, 16), (4, 37), (2, 300)] {
        let x = rand_vec(&mut rng, r * c);
        let scale = t(
            &[c],
            rand_vec(&mut rng, c).iter().map(|v| v * 3.7).collect(),
        );
        let shift = t(
            &[c],
            rand_vec(&mut rng, c).iter().map(|v| v - 0.3).collect(),
        );
        let mut want = t(&[r, c], x.clone());
        mul_row_vec(&mut want, &scale);
        add_row_vec(&mut want, &shift, 1.0);
        let mut got = t(&[r, c], x);
        scale_shift_cols(&mut got, &scale, &shift);
        assert_eq!(bits(&got), bits(&want), "{r}x{c}");
    }
}

/// Batch top-k is the first `total` entries in the order (value descending by
/// `total_cmp`, then row-major position), keeping the positive ones: checked exactly
/// on quantised data with many ties, zeros of both signs, negatives and NaNs of both
/// signs, over widths with and without a vector tail, for rows with and without ties
/// taken.
#[test]
fn batch_topk_takes_the_largest_with_ties_in_row_major_order() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(47);
    // The last shape is large enough for the sampled threshold select.
    for (r, c) in [(7, 16), (9, 45), (4, 300), (600, 450)] {
        let xv: Vec<f32> = (0..r * c)
            .map(|i| match i % 23 {
                0 => f32::NAN,
                1 => -f32::NAN,
                2 => -0.0,
                3 => 0.0,
                _ => (rng.random_range(-6i32..10) as f32) * 0.25,
            })
            .collect();
        let mut order: Vec<usize> = (0..r * c).collect();
        order.sort_by(|&a, &b| xv[b].total_cmp(&xv[a]).then(a.cmp(&b)));
        for total in [1, 5, r * c / 7, r * c / 2, r * c] {
            let mut want: Vec<usize> = order[..total]
                .iter()
                .copied()
                .filter(|&i| xv[i] > 0.0)
                .collect();
            want.sort();
            let mut out = Csr::empty(&DEV);
            batch_topk(&t(&[r, c], xv.clone()), total, &mut out);
            let (off, idx, val) = (
                out.offsets_to_vec(),
                out.indices_to_vec(),
                out.values().to_vec(),
            );
            let mut got = Vec::new();
            for row in 0..r {
                for e in off[row] as usize..off[row + 1] as usize {
                    let i = row * c + idx[e] as usize;
                    assert_eq!(val[e].to_bits(), xv[i].to_bits(), "{r}x{c} total={total}");
                    got.push(i);
                }
            }
            assert_eq!(got, want, "{r}x{c} total={total}");
        }
    }
}

/// A gated block's latents in one pass are the bits of copying the rows, then
/// `scale_shift_cols`, `relu` and `mask_positive`; zeros and NaN gates included; and the
/// same rows of `jumprelu_rows` are `jumprelu`'s.
#[test]
fn block_latents_in_one_pass_are_the_composed_ops() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(44);
    let (r, c) = (7, 37);
    let mut g = rand_vec(&mut rng, r * c);
    g[3] = 0.0;
    g[4] = -0.0;
    g[5] = f32::NAN;
    let g = t(&[r, c], g);
    let e = t(
        &[c],
        rand_vec(&mut rng, c)
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect(),
    );
    let shift = t(&[c], rand_vec(&mut rng, c));
    let cut = t(
        &[c],
        rand_vec(&mut rng, c).iter().map(|v| v.abs()).collect(),
    );
    for (start, rows) in [(0, 7), (2, 3), (6, 1)] {
        let mut gate = t(&[rows, c], vec![0.; rows * c]);
        copy_rows(&g, start, &mut gate);
        let mut h = gate.clone();
        scale_shift_cols(&mut h, &e, &shift);
        let mut want = t(&[rows, c], vec![0.; rows * c]);
        relu(&h, &mut want);
        mask_positive(&mut want, &gate);
        let mut got = t(&[rows, c], vec![1.; rows * c]);
        gated_latents_rows(&g, start, &e, &shift, &mut got);
        let canon = |x: &Tensor| {
            let z = |v: &f32| if *v == 0.0 { 0 } else { v.to_bits() };
            x.to_vec().iter().map(z).collect::<Vec<_>>()
        };
        // Signs of zero aside (relu may keep -0), the same bits.
        assert_eq!(canon(&got), canon(&want), "gated rows {start}+{rows}");
        let mut want = t(&[rows, c], vec![0.; rows * c]);
        jumprelu(&gate, &cut, &mut want);
        let mut got = t(&[rows, c], vec![1.; rows * c]);
        jumprelu_rows(&g, start, &cut, &mut got);
        assert_eq!(bits(&got), bits(&want), "jumprelu rows {start}+{rows}");
    }
}
