//! This machine's f32 GEMM rate in the shapes the models use, both orientations of the
//! right operand (`x @ w` with `w` `[k, n]`, and `x @ w^T` with `w` `[n, k]`, as
//! `nn.Linear` stores it). One JSON line per shape:
//!
//!     cargo run --release -p kernels --example gemm_peak [-- M K N ...]
use kernels::{ops, Device, Tensor};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let shapes: Vec<[usize; 3]> = if args.len() >= 3 {
        args.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect()
    } else {
        vec![
            [4096, 768, 24576],
            [4096, 768, 2304],
            [1024, 2304, 9216],
            [1024, 9216, 2304],
            [1024, 2304, 2048],
        ]
    };
    for [m, k, n] in shapes {
        let x = Tensor::from_vec(
            &Device::Cpu,
            &[m, k],
            (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect(),
        )
        .unwrap();
        for trans in [false, true] {
            let shape = if trans { [n, k] } else { [k, n] };
            let w = Tensor::from_vec(
                &Device::Cpu,
                &shape,
                (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect(),
            )
            .unwrap();
            let mut out = Tensor::zeros(&Device::Cpu, &[m, n]);
            ops::matmul(&mut out, &x, false, &w, trans, 1.0, 0.0);
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                ops::matmul(&mut out, &x, false, &w, trans, 1.0, 0.0);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gflops = 2.0 * (m * k * n) as f64 / best / 1e9;
            println!("{{\"m\": {m}, \"k\": {k}, \"n\": {n}, \"rhs\": \"{}\", \"gflops\": {gflops:.1}, \"threads\": {}}}", if trans { "[n,k]^T" } else { "[k,n]" }, kernels::num_threads());
        }
    }
}
