//! Times the ops of one sparse SAE step one by one, at an SAE's shape with random
//! latents of a given density: the encoder GEMM, the passes over `[batch, d_sae]`,
//! the sparse products and Adam. One JSON line per op (median of 5):
//!
//!     cargo run --release -p kernels --example sparse_ops [-- BATCH D_IN D_SAE DENSITY] [OPS]
//!
//! `OPS`, a word, times only the ops whose names contain it (`csr_`: the products).
use kernels::{ops, Csr, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn time(name: &str, flops: f64, mut f: impl FnMut()) {
    let only = std::env::args().skip(1).find(|a| a.parse::<f64>().is_err());
    if only.is_some_and(|o| !name.contains(&o)) {
        return;
    }
    f();
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    let ms = t[2] * 1e3;
    let gflops = flops / t[2] / 1e9;
    println!("{{\"op\": \"{name}\", \"ms\": {ms:.1}, \"gflops\": {gflops:.1}}}");
}

fn main() {
    let a: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (b, d, m, density) = match a[..] {
        [b, d, m, p] => (b as usize, d as usize, m as usize, p),
        _ => (4096, 768, 24576, 0.02),
    };
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() - 0.5).collect() };
    let x = Tensor::from_vec(&dev, &[b, d], rand(b * d)).unwrap();
    let w_enc = Tensor::from_vec(&dev, &[d, m], rand(d * m)).unwrap();
    let w_dec = Tensor::from_vec(&dev, &[m, d], rand(m * d)).unwrap();
    let bias = Tensor::from_vec(&dev, &[m], rand(m)).unwrap();
    // Pre-activations with `density` of them positive.
    let h: Vec<f32> = rand(b * m)
        .into_iter()
        .map(|v| v - 0.5 + density as f32)
        .collect();
    let h = Tensor::from_vec(&dev, &[b, m], h).unwrap();
    let mut csr = Csr::empty(&dev);
    ops::relu_to_csr(&h, &mut csr);
    let nnz = csr.nnz() as f64;
    let sparse_flops = 2.0 * nnz * d as f64;

    let mut pre = Tensor::zeros(&dev, &[b, m]);
    time("encoder_gemm", 2.0 * (b * d * m) as f64, || {
        ops::matmul(&mut pre, &x, false, &w_enc, false, 1.0, 0.0)
    });
    time("add_bias", 0.0, || ops::add_row_vec(&mut pre, &bias, 1.0));
    time("count_positive", 0.0, || {
        std::hint::black_box(ops::count_positive(&h));
    });
    time("relu_to_csr", 0.0, || ops::relu_to_csr(&h, &mut csr));
    // What a step runs: the bias pass counts, the CSR build only splits.
    time("add_bias_and_count", 0.0, || {
        ops::Split::relu(m).add_bias_and_count(&mut pre, &bias)
    });
    let split = ops::Split::relu(m);
    split.nnz(&h);
    time("split_to_csr", 0.0, || split.to_csr(&h, &mut csr, None));
    let mut sel = Csr::empty(&dev);
    time("topk_rows_32", 0.0, || {
        ops::topk_rows(&h, 32, None, &mut sel)
    });
    // Gated's magnitudes from the gate pre-activations: two passes, or one. (A unit
    // scale keeps the values away from subnormals over the repeats.)
    let one = Tensor::full(&dev, &[m], 1.0);
    time("mul_then_add_row_vecs", 0.0, || {
        ops::mul_row_vec(&mut pre, &one);
        ops::add_row_vec(&mut pre, &bias, 1.0)
    });
    time("scale_shift_cols", 0.0, || {
        ops::scale_shift_cols(&mut pre, &one, &bias)
    });
    time("batch_topk_32", 0.0, || {
        ops::batch_topk(&h, 32 * b, &mut sel)
    });
    // TopK's step: the bias goes in with the selection's pass.
    time("add_bias_topk_rows_32", 0.0, || {
        ops::add_bias_topk_rows(&mut pre, &bias, 32, &mut sel)
    });
    let mut out = Tensor::zeros(&dev, &[b, d]);
    time("csr_matmul", sparse_flops, || {
        ops::csr_matmul(&mut out, &csr, &w_dec, 1.0, 0.0)
    });
    let mut vals = Tensor::zeros(&dev, &[csr.nnz()]);
    time("csr_sampled_dot", sparse_flops, || {
        ops::csr_sampled_dot(&csr, &x, &w_dec, &mut vals)
    });
    let mut g_dec = Tensor::zeros(&dev, &[m, d]);
    time("csr_t_matmul", sparse_flops, || {
        ops::csr_t_matmul(&mut g_dec, &csr, &x, false, 1.0, 1.0)
    });
    let mut g_enc = Tensor::zeros(&dev, &[d, m]);
    time("csr_t_matmul_transposed", sparse_flops, || {
        ops::csr_t_matmul(&mut g_enc, &csr, &x, true, 1.0, 1.0)
    });
    let (mut p, mut m1, mut v1) = (w_dec.clone(), g_dec.clone(), g_dec.clone());
    let mut step = 0;
    time("adam_w_dec", 0.0, || {
        step += 1;
        ops::adam(
            &mut p, &g_dec, &mut m1, &mut v1, 1e-4, 0.9, 0.999, 1e-8, step,
        )
    });
    time("sum_squares_w_dec", 0.0, || {
        std::hint::black_box(ops::sum_squares(&g_dec));
    });
    println!(
        "{{\"batch\": {b}, \"d_in\": {d}, \"d_sae\": {m}, \"nnz\": {nnz}, \"threads\": {}}}",
        kernels::num_threads()
    );
}
