//! Every op on CUDA against the same op on the CPU (feature `cuda`).
//!
//! `nvrtc_compiles_every_kernel` needs only NVRTC (no GPU): it runs wherever libnvrtc
//! loads, and fails instead of skipping when `SAESTREAM_REQUIRE_NVRTC=1` (CI sets it
//! after installing NVRTC). The `cuda_*` tests need a device; without one they print
//! that they were skipped and pass, and the device machine runs them for real
//! (`SAESTREAM_REQUIRE_CUDA=1` makes a missing device a failure there).
//!
//! Each check builds the same inputs on both devices from fixed seeds, runs one op, and
//! compares every output. Tolerances are relative to the largest CPU value of that
//! output (see [`close`]) and are stated per op: exact where the kernel does the CPU's
//! arithmetic in the CPU's order (element-wise ops, selection, Adam), small where only
//! the summation order differs (reductions, products).
#![cfg(feature = "cuda")]

use kernels::cuda;
use kernels::ops;
use kernels::{Csr, Device, Tensor};
use rand::{Rng, SeedableRng};

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// `cuda:0`, or `None` (the test is skipped) when there is no usable device.
fn gpu() -> Option<Device> {
    match Device::parse("cuda:0") {
        Ok(d) => Some(d),
        Err(e) if !required("SAESTREAM_REQUIRE_CUDA") => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("SAESTREAM_REQUIRE_CUDA=1 but {e}"),
    }
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A random `[shape]` tensor on `d` (uniform in [-1, 1), from `seed`).
fn rt(d: &Device, shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(d, shape, random(shape.iter().product(), seed)).unwrap()
}

/// Like [`rt`], with values mapped by `f`.
fn rt_map(d: &Device, shape: &[usize], seed: u64, f: impl Fn(f32) -> f32) -> Tensor {
    let v = random(shape.iter().product(), seed)
        .into_iter()
        .map(f)
        .collect();
    Tensor::from_vec(d, shape, v).unwrap()
}

/// |a - b| <= tol * max(1, max finite |b|), element-wise, or both the same infinity or
/// both NaN (Lp penalties with p < 1 have infinite gradients at 0); names the first
/// failure.
fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b
        .iter()
        .filter(|x| x.is_finite())
        .fold(1.0f32, |m, x| m.max(x.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let ok = x == y || (x - y).abs() <= tol * scale || (x.is_nan() && y.is_nan());
        assert!(ok, "{what}[{i}]: cuda {x} vs cpu {y} (tol {tol})");
    }
}

/// Runs `f` on the CPU and on `g`, and compares each output it returns.
fn same(g: &Device, tol: f32, what: &str, f: impl Fn(&Device) -> Vec<Vec<f32>>) {
    let (want, got) = (f(&Device::Cpu), f(g));
    assert_eq!(want.len(), got.len());
    for (i, (w, o)) in want.iter().zip(&got).enumerate() {
        close(o, w, tol, &format!("{what} output {i}"));
    }
}

/// [`same`] with bit-for-bit equality.
fn exact(g: &Device, what: &str, f: impl Fn(&Device) -> Vec<Vec<f32>>) {
    let (want, got) = (f(&Device::Cpu), f(g));
    for (i, (w, o)) in want.iter().zip(&got).enumerate() {
        let (wb, ob): (Vec<u32>, Vec<u32>) = (
            w.iter().map(|v| v.to_bits()).collect(),
            o.iter().map(|v| v.to_bits()).collect(),
        );
        assert!(wb == ob, "{what} output {i}: cuda {o:?} vs cpu {w:?}");
    }
}

fn v(t: &Tensor) -> Vec<f32> {
    t.to_vec()
}

fn csr_parts(c: &Csr) -> Vec<Vec<f32>> {
    vec![
        c.offsets_to_vec().iter().map(|&o| o as f32).collect(),
        c.indices_to_vec().iter().map(|&i| i as f32).collect(),
        c.values().to_vec(),
    ]
}

// Shapes that are not multiples of the block sizes, and more rows than one column
// chunk (64).
const R: usize = 131;
const C: usize = 300;

#[test]
fn cuda_device_strings_say_what_is_missing() {
    if !cuda::driver_present() {
        let e = Device::parse("cuda:0").unwrap_err().to_string();
        assert!(
            e.contains("the CUDA driver (libcuda) cannot be loaded"),
            "{e}"
        );
    } else if let Some(g) = gpu() {
        assert_eq!(g, Device::Cuda(0));
        assert_eq!(g.to_string(), "cuda:0");
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        let e = Device::parse("cuda:4096").unwrap_err().to_string();
        assert!(e.contains("cuda:4096 asked for, but"), "{e}");
    }
    let e = Device::parse("gpu").unwrap_err().to_string();
    assert!(e.contains("expected 'cpu', 'cuda' or 'cuda:N'"), "{e}");
}

#[test]
fn nvrtc_compiles_every_kernel() {
    if !cuda::nvrtc_present() {
        assert!(
            !required("SAESTREAM_REQUIRE_NVRTC"),
            "SAESTREAM_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded"
        );
        eprintln!("skipped: libnvrtc cannot be loaded here");
        return;
    }
    let ptx = cuda::compile().unwrap().to_src();
    for k in cuda::KERNELS {
        assert!(
            ptx.contains(&format!(".entry {k}(")),
            "no entry for {k} in the PTX"
        );
    }
    // And no kernel is missing from the list the backend loads.
    let entries = ptx.matches(".entry ").count();
    assert_eq!(
        entries,
        cuda::KERNELS.len(),
        "kernels in the PTX vs KERNELS"
    );
}

#[test]
fn cuda_tensors_round_trip_and_clone() {
    let Some(g) = gpu() else { return };
    let x = rt(&g, &[R, C], 1);
    assert_eq!(x.device(), g);
    assert_eq!(x.to_vec(), random(R * C, 1));
    let mut y = x.clone();
    ops::scale(&mut y, 2.0);
    assert_eq!(x.to_vec(), random(R * C, 1), "a clone is a copy");
    assert_eq!(Tensor::full(&g, &[3], 1.5).to_vec(), vec![1.5; 3]);
    assert_eq!(Tensor::full(&g, &[1], -2.0).item(), -2.0);
    let mut z = Tensor::zeros(&g, &[2, 3]);
    z.resize(&[4, 5]);
    assert_eq!(z.to_vec().len(), 20);
    assert_eq!(x.to_device(&Device::Cpu).to_vec(), x.to_vec());
    // Empty tensors (the models' placeholders): CUDA refuses zero-byte allocations.
    let mut e = Tensor::zeros(&g, &[0, 0]);
    assert!(e.clone().to_vec().is_empty());
    ops::fill(&mut e, 1.0);
    e.resize(&[2, 2]);
    ops::fill(&mut e, 1.0);
    assert_eq!(e.to_vec(), vec![1.0; 4]);
    let empty = Csr::empty(&g);
    assert_eq!((empty.clone().nnz(), empty.offsets_to_vec()), (0, vec![0]));
    let c = Csr::from_parts(&g, 2, 4, vec![0, 1, 3], vec![2, 0, 3], vec![1.0, 2.0, 3.0]);
    assert_eq!(c.device(), g);
    assert_eq!(c.offsets_to_vec(), vec![0, 1, 3]);
    assert_eq!(c.to_device(&Device::Cpu).indices_to_vec(), vec![2, 0, 3]);
}

#[test]
fn cuda_gemm_matches_cpu_in_every_orientation() {
    let Some(g) = gpu() else { return };
    let (m, n, k) = (65, 130, 97);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a_shape: &[usize] = if ta { &[k, m] } else { &[m, k] };
        let b_shape: &[usize] = if tb { &[n, k] } else { &[k, n] };
        let run = |d: &Device| {
            let mut out = rt(d, &[m, n], 22);
            let (a, b) = (rt(d, a_shape, 20), rt(d, b_shape, 21));
            ops::matmul(&mut out, &a, ta, &b, tb, 0.5, 2.0);
            let mut y = rt(d, &[if ta { k } else { m }], 23);
            let x = rt(d, &[if ta { m } else { k }], 24);
            ops::matvec(&mut y, &a, !ta, &x, 1.5, 0.0);
            vec![v(&out), v(&y)]
        };
        // f32 GEMM: summation order only (k = 97 terms of size <= 1).
        same(&g, 1e-5, &format!("matmul ta={ta} tb={tb}"), run);
        // TF32 rounds inputs to 10 mantissa bits (relative 2^-11 per product), bf16
        // to 8 (2^-9): over 97 terms of size <= 1, against outputs of size ~10.
        for (mode, tol) in [(cuda::Matmul::Tf32, 2e-2), (cuda::Matmul::Bf16, 5e-2)] {
            cuda::set_matmul(&g, mode).unwrap();
            same(&g, tol, &format!("{mode:?} matmul ta={ta} tb={tb}"), run);
        }
        cuda::set_matmul(&g, cuda::Matmul::F32).unwrap();
        // And bf16 is exactly "round the inputs to bf16, multiply in f32".
        cuda::set_matmul(&g, cuda::Matmul::Bf16).unwrap();
        let mut got = rt(&g, &[m, n], 22);
        ops::matmul(
            &mut got,
            &rt(&g, a_shape, 20),
            ta,
            &rt(&g, b_shape, 21),
            tb,
            0.5,
            2.0,
        );
        cuda::set_matmul(&g, cuda::Matmul::F32).unwrap();
        let c = Device::Cpu;
        let mut want = rt(&c, &[m, n], 22);
        let (a, b) = (rt_map(&c, a_shape, 20, bf16), rt_map(&c, b_shape, 21, bf16));
        ops::matmul(&mut want, &a, ta, &b, tb, 0.5, 2.0);
        close(
            &got.to_vec(),
            &want.to_vec(),
            1e-5,
            "bf16 matmul vs rounded inputs",
        );
    }
}

/// `v` rounded to the nearest bf16 (ties to even), as f32.
fn bf16(v: f32) -> f32 {
    let u = v.to_bits();
    f32::from_bits((u + 0x7fff + ((u >> 16) & 1)) & 0xffff_0000)
}

#[test]
fn cuda_elementwise_ops_match_cpu_exactly() {
    let Some(g) = gpu() else { return };
    // The kernels do the CPU's arithmetic in its order with no fused multiply-adds:
    // bit-identical results.
    exact(&g, "element-wise", |d| {
        let x = rt(d, &[R, C], 1);
        let y = rt(d, &[R, C], 2);
        let (vc, vr) = (rt(d, &[C], 3), rt(d, &[R], 4));
        let mut out = Vec::new();
        let mut t = Tensor::zeros(d, &[R, C]);
        ops::fill(&mut t, 0.25);
        out.push(v(&t));
        ops::copy(&mut t, &x);
        ops::scale(&mut t, -1.5);
        out.push(v(&t));
        ops::scale(&mut t, 0.0);
        out.push(v(&t));
        ops::copy(&mut t, &x);
        ops::axpy(&mut t, 0.3, &y);
        ops::mul(&mut t, &y);
        out.push(v(&t));
        ops::add_row_vec(&mut t, &vc, -0.5);
        ops::mul_row_vec(&mut t, &vc);
        out.push(v(&t));
        ops::row_affine(&mut t, &vr, &rt(d, &[R], 5));
        out.push(v(&t));
        ops::add_scaled_rows(
            &mut t,
            &y,
            &rt_map(d, &[R], 6, |v| if v < 0.0 { 0.0 } else { v }),
        );
        out.push(v(&t));
        let mut f = Tensor::zeros(d, &[R, C]);
        ops::relu(&x, &mut f);
        out.push(v(&f));
        ops::relu_backward(&x, &y, &mut f);
        out.push(v(&f));
        ops::copy(&mut t, &y);
        ops::mask_positive(&mut t, &x);
        out.push(v(&t));
        ops::jumprelu(&x, &rt(d, &[C], 7), &mut f);
        out.push(v(&f));
        ops::sq_err(&x, &y, None, &mut f);
        out.push(v(&f));
        ops::sq_err(&x, &y, Some(&vr), &mut f);
        out.push(v(&f));
        ops::div_eps(&x, &rt_map(d, &[R, C], 8, f32::abs), 1e-3, &mut f);
        out.push(v(&f));
        let mut sub = Tensor::zeros(d, &[R, 40]);
        ops::copy_cols(&x, 17, &mut sub);
        out.push(v(&sub));
        ops::copy(&mut t, &y);
        ops::add_cols(&mut t, 250, &sub);
        out.push(v(&t));
        let mut rows = Tensor::zeros(d, &[9, C]);
        ops::copy_rows(&x, 100, &mut rows);
        out.push(v(&rows));
        ops::add_rows(&mut t, 3, &rows);
        out.push(v(&t));
        ops::copy(&mut t, &x);
        ops::add_normal_noise(&mut t, 0.1, 42);
        out.push(v(&t));
        out
    });
    // expf / tanhf are within 2 ulp of the correctly rounded result.
    same(&g, 1e-6, "transcendental", |d| {
        let x = rt(d, &[R, C], 1);
        let y = rt(d, &[R, C], 2);
        let mut e = Tensor::zeros(d, &[R, C]);
        ops::exp(&x, &mut e);
        let mut t = x.clone();
        ops::tanh(&mut t);
        let mut b = Tensor::zeros(d, &[R, C]);
        ops::tanh_relu_backward(&x, &y, &mut b);
        vec![v(&e), v(&t), v(&b)]
    });
}

#[test]
fn cuda_reductions_match_cpu() {
    let Some(g) = gpu() else { return };
    // Sums in double on both sides, in a different order: 1e-6 relative.
    same(&g, 1e-6, "reductions", |d| {
        let x = rt(d, &[R, C], 1);
        let y = rt(d, &[R, C], 2);
        let relu = rt_map(d, &[R, C], 3, |v| v.max(0.0));
        let (mut cs, mut rn, mut rd) = (
            rt(d, &[C], 4),
            Tensor::zeros(d, &[R]),
            Tensor::zeros(d, &[R]),
        );
        ops::col_sums(&x, &mut cs, 0.5, 2.0);
        ops::row_norms(&x, &mut rn);
        ops::row_dots(&x, &y, &mut rd);
        let (mut mu, mut sd, mut cn) = (
            Tensor::zeros(d, &[R]),
            Tensor::zeros(d, &[R]),
            Tensor::zeros(d, &[R]),
        );
        ops::row_mean_std(&x, &mut mu, &mut sd);
        ops::centered_row_norms(&x, &mut cn);
        let (mut cz, mut rz, mut st) = (
            Tensor::zeros(d, &[C]),
            Tensor::zeros(d, &[R]),
            Tensor::zeros(d, &[R]),
        );
        ops::col_nonzero_counts(&relu, &mut cz);
        ops::row_nonzero_counts(&relu, &mut rz);
        ops::step_count_rows(&x, &rt(d, &[C], 5), &mut st);
        let scalars = vec![
            ops::sum(&x) as f32,
            ops::sum_squares(&x) as f32,
            ops::min_positive(&x).unwrap(),
            ops::min_positive(&rt_map(d, &[7], 1, |v| -v.abs())).map_or(-1.0, |v| v),
        ];
        vec![
            v(&cs),
            v(&rn),
            v(&rd),
            v(&mu),
            v(&sd),
            v(&cn),
            v(&cz),
            v(&rz),
            v(&st),
            scalars,
        ]
    });
}

#[test]
fn cuda_losses_and_backwards_match_cpu() {
    let Some(g) = gpu() else { return };
    // Row and column sums in double in another order, then rounded to f32: 1e-5.
    same(&g, 1e-5, "losses", |d| {
        let h = rt(d, &[R, C], 1);
        let f = rt_map(d, &[R, C], 2, |v| v.max(0.0));
        let t = rt_map(d, &[C], 3, |v| 0.5 * v.abs());
        let df = rt(d, &[R, C], 4);
        let n = rt_map(d, &[C], 5, |v| 0.5 + v.abs());
        let mut out = Vec::new();
        for ste in [false, true] {
            let (mut dh, mut dt) = (rt(d, &[R, C], 6), rt(d, &[C], 7));
            ops::jumprelu_backward(&h, &t, &df, 0.1, ste, &mut dh, &mut dt);
            ops::step_backward(&h, &t, &rt(d, &[R], 8), 0.1, ste, &mut dh, &mut dt);
            out.extend([v(&dh), v(&dt)]);
        }
        let (mut dfa, mut dn) = (rt(d, &[R, C], 9), rt(d, &[C], 10));
        let tot = ops::tanh_sparsity(&f, &n, 4.0, 0.3, &mut dfa, &mut dn);
        out.extend([v(&dfa), v(&dn), vec![tot as f32]]);
        for p in [1.0, 2.0, 0.5] {
            for with_n in [false, true] {
                let (mut dfa, mut dn) = (rt(d, &[R, C], 11), rt(d, &[C], 12));
                let nn = with_n.then_some(&n);
                let dnn = with_n.then_some(&mut dn);
                let tot = ops::lp_sparsity(&f, nn, p, 0.7, Some(&mut dfa), dnn);
                let plain = ops::lp_sparsity(&f, nn, p, 0.7, None, None);
                out.extend([v(&dfa), v(&dn), vec![tot as f32, plain as f32]]);
            }
        }
        let dead = rt_map(d, &[C], 13, |v| (v > 0.0) as u8 as f32);
        let (mut dh, mut dt, mut dn) = (rt(d, &[R, C], 14), rt(d, &[C], 15), rt(d, &[C], 16));
        let tot = ops::pre_act_loss(&h, &t, &dead, &n, 0.2, &mut dh, &mut dt, &mut dn);
        out.extend([v(&dh), v(&dt), v(&dn), vec![tot as f32]]);
        let w = rt_map(d, &[R], 17, f32::abs);
        for row_w in [None, Some(&w)] {
            let mut gr = Tensor::zeros(d, &[R, C]);
            let l = ops::mse(&h, &df, row_w, Some((&mut gr, 0.01)));
            let l2 = ops::mse(&h, &df, row_w, None);
            out.extend([v(&gr), vec![l as f32, l2 as f32]]);
        }
        let mut gr = Tensor::zeros(d, &[R, C]);
        let ew = rt_map(d, &[R, C], 18, f32::abs);
        let l = ops::weighted_sq_err(&h, &df, &ew, Some((&mut gr, 0.5)));
        let l2 = ops::weighted_sq_err(&h, &df, &ew, None);
        out.extend([v(&gr), vec![l as f32, l2 as f32]]);
        let (mut g1, mut g2) = (rt(d, &[R, C], 19), rt(d, &[C], 20));
        let norm = ops::clip_grad_norm(&mut [&mut g1, &mut g2], 1.0);
        out.extend([v(&g1), v(&g2), vec![norm]]);
        out
    });
}

#[test]
fn cuda_adam_matches_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    // The kernel rounds every operation as the CPU does (no fused multiply-add).
    exact(&g, "adam", |d| {
        let n = 10_000;
        let mut p = rt(d, &[n], 18);
        let (mut m, mut s) = (Tensor::zeros(d, &[n]), Tensor::zeros(d, &[n]));
        for step in 1..=5u64 {
            let gr = rt(d, &[n], 100 + step);
            ops::adam(&mut p, &gr, &mut m, &mut s, 3e-4, 0.9, 0.999, 1e-8, step);
        }
        vec![v(&p), v(&m), v(&s)]
    });
}

#[test]
fn cuda_topk_and_batch_topk_select_what_the_cpu_selects() {
    let Some(g) = gpu() else { return };
    // Selection copies values: exact, and the same indices in the same order.
    for (rows, cols, k) in [
        (7, 100, 1),
        (33, 4096, 32),
        (5, 24576, 512),
        (3, 50, 50),
        (4, 10, 0),
    ] {
        exact(&g, &format!("topk {rows}x{cols} k={k}"), |d| {
            let mut out = Csr::empty(d);
            ops::topk_rows(&rt(d, &[rows, cols], 1), k, None, &mut out);
            csr_parts(&out)
        });
    }
    exact(&g, "topk with a dead mask (AuxK)", |d| {
        let mask = rt_map(d, &[700], 2, |v| (v > 0.3) as u8 as f32);
        let mut out = Csr::empty(d);
        ops::topk_rows(&rt(d, &[16, 700], 3), 8, Some(&mask), &mut out);
        csr_parts(&out)
    });
    // Batch top-k on ReLU outputs, with ties at the cut (values quantised to 1/8).
    for total in [0, 1, 16 * 8, 300, 16 * 700] {
        exact(&g, &format!("batch top-k total={total}"), |d| {
            let x = rt_map(d, &[16, 700], 4, |v| (v * 8.0).round().max(0.0) / 8.0);
            let mut out = Csr::empty(d);
            ops::batch_topk(&x, total, &mut out);
            csr_parts(&out)
        });
    }
}

#[test]
fn cuda_sparse_ops_match_cpu() {
    let Some(g) = gpu() else { return };
    let (rows, m, dd, k) = (R, 500, 96, 12);
    let sparse = |d: &Device| {
        let mut a = Csr::empty(d);
        ops::topk_rows(&rt(d, &[rows, m], 1), k, None, &mut a);
        a
    };
    exact(&g, "csr copies", |d| {
        let a = sparse(d);
        let mut dense = Tensor::zeros(d, &[rows, m]);
        ops::csr_to_dense(&a, &mut dense);
        let mut gathered = Tensor::zeros(d, &[a.nnz()]);
        ops::csr_gather(&a, &rt(d, &[rows, m], 2), &mut gathered);
        let mut acc = rt(d, &[rows, m], 3);
        ops::csr_scatter_add(&a, &mut acc);
        let mut scaled = a.clone();
        ops::csr_scale_cols(&mut scaled, &rt(d, &[m], 4));
        let (mut cc, mut rc) = (rt(d, &[m], 5), rt(d, &[rows], 6));
        ops::csr_col_nonzero_counts(&a, &mut cc);
        ops::csr_row_nonzero_counts(&a, &mut rc);
        vec![
            v(&dense),
            v(&gathered),
            v(&acc),
            v(scaled.values()),
            v(&cc),
            v(&rc),
        ]
    });
    // Sums of k (or rows) products in another order: 1e-5.
    same(&g, 1e-5, "csr products", |d| {
        let a = sparse(d);
        let w = rt(d, &[m, dd], 7);
        let x = rt(d, &[rows, dd], 8);
        let mut dec = rt(d, &[rows, dd], 9);
        ops::csr_matmul(&mut dec, &a, &w, 0.5, 2.0);
        let mut dw = rt(d, &[m, dd], 10);
        ops::csr_t_matmul(&mut dw, &a, &x, false, 0.5, 2.0);
        let mut dwt = rt(d, &[dd, m], 11);
        ops::csr_t_matmul(&mut dwt, &a, &x, true, 1.0, 0.0);
        let mut sd = Tensor::zeros(d, &[a.nnz()]);
        ops::csr_sampled_dot(&a, &x, &w, &mut sd);
        let (mut c1, mut c2) = (rt(d, &[m], 12), rt(d, &[m], 13));
        ops::csr_col_dot(&a, None, &mut c1, 1.0, 0.0);
        ops::csr_col_dot(&a, Some(&sd), &mut c2, -0.5, 1.0);
        vec![v(&dec), v(&dw), v(&dwt), v(&sd), v(&c1), v(&c2)]
    });
}
