//! The CUDA kernels against the CPU ops (feature `cuda`).
//!
//! `nvrtc_compiles_every_kernel` needs only NVRTC (no GPU): it runs wherever libnvrtc
//! loads, and fails instead of skipping when `SAESTREAM_REQUIRE_NVRTC=1` (CI sets it
//! after installing NVRTC). The `cuda_*` tests need a device; without one they print
//! that they were skipped and pass, and the device machine runs them for real
//! (`SAESTREAM_REQUIRE_CUDA=1` makes a missing device a failure there).
#![cfg(feature = "cuda")]

use kernels::cuda::{self, Cuda};
use kernels::ops;
use kernels::{Csr, Device, Tensor};
use rand::{Rng, SeedableRng};

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

fn device() -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(c) => Some(c),
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

fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(&Device::Cpu, shape, v).unwrap()
}

/// |a - b| <= tol * max(1, max |b|), elementwise; names the first failure.
fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: cuda {x} vs cpu {y}"
        );
    }
}

/// [`close`] for a device buffer against a CPU tensor.
fn close_dev(gpu: &Cuda, dev: &cudarc::driver::CudaSlice<f32>, cpu: &Tensor, tol: f32, what: &str) {
    close(&gpu.download(dev).unwrap(), &cpu.to_vec(), tol, what);
}

#[test]
fn cuda_device_strings_say_what_is_missing() {
    let e = Device::parse("cuda:0").unwrap_err().to_string();
    if !cuda::driver_present() {
        assert!(
            e.contains("the CUDA driver (libcuda) cannot be loaded"),
            "{e}"
        );
    } else {
        assert!(e.contains("tensors cannot be placed on CUDA yet"), "{e}");
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
}

#[test]
fn cuda_topk_rows_matches_cpu() {
    let Some(gpu) = device() else { return };
    for (rows, cols, k) in [(7, 100, 1), (33, 4096, 32), (5, 24576, 512), (3, 50, 50)] {
        let x = random(rows * cols, 1);
        let mut cpu = Csr::empty(&Device::Cpu);
        ops::topk_rows(&tensor(x.clone(), &[rows, cols]), k, None, &mut cpu);
        let got = gpu
            .topk_rows(&gpu.upload(&x).unwrap(), rows, cols, k)
            .unwrap();
        assert_eq!(gpu.download(&got.offsets).unwrap(), cpu.offsets_to_vec());
        let what = format!("indices {rows}x{cols} k={k}");
        assert_eq!(
            gpu.download(&got.indices).unwrap(),
            cpu.indices_to_vec(),
            "{what}"
        );
        // Exact: the kernel copies the selected values.
        assert_eq!(gpu.download(&got.values).unwrap(), cpu.values().to_vec());
    }
}

#[test]
fn cuda_batch_topk_threshold_matches_cpu() {
    let Some(gpu) = device() else { return };
    let (rows, cols, total) = (64, 2048, 64 * 32);
    let x: Vec<f32> = random(rows * cols, 2)
        .into_iter()
        .map(|v| v.max(0.0))
        .collect();
    let key = gpu
        .kth_largest_key(&gpu.upload(&x).unwrap(), total)
        .unwrap()
        .unwrap();
    let mut sorted = x.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let u = sorted[total - 1].to_bits();
    let want = if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    };
    assert_eq!(key, want, "the {total}-th largest value's key");
}

#[test]
fn cuda_bias_activations_match_cpu() {
    let Some(gpu) = device() else { return };
    let (rows, cols) = (37, 300);
    let x = random(rows * cols, 3);
    let b = random(cols, 4);
    let thr: Vec<f32> = random(cols, 5).iter().map(|t| t.abs() * 0.5).collect();
    let mut pre_cpu = tensor(x.clone(), &[rows, cols]);
    ops::add_row_vec(&mut pre_cpu, &tensor(b.clone(), &[cols]), 1.0);
    let mut relu = Tensor::zeros(&Device::Cpu, &[rows, cols]);
    ops::relu(&pre_cpu, &mut relu);
    let mut jump = Tensor::zeros(&Device::Cpu, &[rows, cols]);
    ops::jumprelu(&pre_cpu, &tensor(thr.clone(), &[cols]), &mut jump);

    let (db, dthr) = (gpu.upload(&b).unwrap(), gpu.upload(&thr).unwrap());
    let mut pre = gpu.upload(&x).unwrap();
    // Outputs start as NaN: an element the kernel does not write cannot pass.
    let mut act = gpu.upload(&vec![f32::NAN; rows * cols]).unwrap();
    gpu.bias_relu(&mut pre, &db, &mut act, cols).unwrap();
    // The same f32 addition on both sides: exact.
    assert_eq!(gpu.download(&pre).unwrap(), pre_cpu.to_vec());
    assert_eq!(gpu.download(&act).unwrap(), relu.to_vec());
    let mut pre = gpu.upload(&x).unwrap();
    let mut act = gpu.upload(&vec![f32::NAN; rows * cols]).unwrap();
    gpu.bias_jumprelu(&mut pre, &db, &dthr, &mut act, cols)
        .unwrap();
    assert_eq!(gpu.download(&act).unwrap(), jump.to_vec());
}

/// The sparse products on TopK latents (k per row) and on BatchTopK latents (a
/// different count per row), each against the CPU op with the same alpha/beta.
#[test]
fn cuda_sparse_products_match_cpu() {
    let Some(gpu) = device() else { return };
    let (rows, d_in, d_sae, k) = (48, 96, 1024, 16);
    let pre = random(rows * d_sae, 6);
    let relu: Vec<f32> = pre.iter().map(|v| v.max(0.0)).collect();
    let w_dec = random(d_sae * d_in, 7);
    let x = random(rows * d_in, 10);
    let g_out = random(rows * d_in, 11);
    let start_out = random(rows * d_in, 12);
    let start_w = random(d_sae * d_in, 13);
    let start_b = random(d_sae, 14);
    let mut topk = Csr::empty(&Device::Cpu);
    ops::topk_rows(&tensor(pre.clone(), &[rows, d_sae]), k, None, &mut topk);
    let mut batch = Csr::empty(&Device::Cpu);
    ops::batch_topk(&tensor(relu, &[rows, d_sae]), rows * k, &mut batch);
    let w_t = tensor(w_dec.clone(), &[d_sae, d_in]);
    let x_t = tensor(x.clone(), &[rows, d_in]);
    let g_t = tensor(g_out.clone(), &[rows, d_in]);
    let (dw, dx, dg) = (
        gpu.upload(&w_dec).unwrap(),
        gpu.upload(&x).unwrap(),
        gpu.upload(&g_out).unwrap(),
    );
    for (name, a) in [("topk", &topk), ("batch_topk", &batch)] {
        let da = gpu.upload_csr(a).unwrap();
        // Decode: out = 0.5 out + 2 a @ W_dec. Sums in another order: 1e-5.
        let mut want = tensor(start_out.clone(), &[rows, d_in]);
        ops::csr_matmul(&mut want, a, &w_t, 2.0, 0.5);
        let mut out = gpu.upload(&start_out).unwrap();
        gpu.csr_matmul(&mut out, &da, &dw, 2.0, 0.5).unwrap();
        close_dev(&gpu, &out, &want, 1e-5, &format!("{name} csr_matmul"));
        // Gradient at the active latents.
        let mut want = Tensor::zeros(&Device::Cpu, &[a.nnz()]);
        ops::csr_sampled_dot(a, &g_t, &w_t, &mut want);
        let mut out = gpu.upload(&vec![f32::NAN; a.nnz()]).unwrap();
        gpu.csr_sampled_dot(&da, &dg, &dw, &mut out).unwrap();
        close_dev(&gpu, &out, &want, 1e-5, &format!("{name} csr_sampled_dot"));
        // Weight gradients, both layouts, accumulating into a start value.
        for (transposed, shape) in [(false, [d_sae, d_in]), (true, [d_in, d_sae])] {
            let mut want = tensor(start_w.clone(), &shape);
            ops::csr_t_matmul(&mut want, a, &x_t, transposed, 1.5, 1.0);
            let mut out = gpu.upload(&start_w).unwrap();
            gpu.csr_t_matmul(&mut out, &da, &dx, transposed, 1.5, 1.0)
                .unwrap();
            let what = format!("{name} csr_t_matmul transposed={transposed}");
            close_dev(&gpu, &out, &want, 1e-5, &what);
        }
        // Bias gradient: column sums, alone and times another same-pattern matrix.
        let other = random(a.nnz(), 15);
        let other_t = tensor(other.clone(), &[a.nnz()]);
        for with_other in [false, true] {
            let mut want = tensor(start_b.clone(), &[d_sae]);
            let o = with_other.then_some(&other_t);
            ops::csr_col_dot(a, o, &mut want, -1.0, 0.0);
            let mut out = gpu.upload(&start_b).unwrap();
            let dother = gpu.upload(&other).unwrap();
            let od = with_other.then_some(&dother);
            gpu.csr_col_dot(&da, od, &mut out, -1.0, 0.0).unwrap();
            let what = format!("{name} csr_col_dot other={with_other}");
            close_dev(&gpu, &out, &want, 1e-5, &what);
        }
    }
    // The decoder bias.
    let b_dec = random(d_in, 16);
    let mut want = tensor(x.clone(), &[rows, d_in]);
    ops::add_row_vec(&mut want, &tensor(b_dec.clone(), &[d_in]), 1.0);
    let mut out = gpu.upload(&x).unwrap();
    gpu.add_row_vec(&mut out, &gpu.upload(&b_dec).unwrap(), 1.0)
        .unwrap();
    // One f32 addition per element on both sides: exact.
    assert_eq!(gpu.download(&out).unwrap(), want.to_vec());
}

#[test]
fn cuda_losses_norms_and_parallel_grad_match_cpu() {
    let Some(gpu) = device() else { return };
    let (rows, d_in, d_sae) = (20, 64, 512);
    let a = random(rows * d_in, 12);
    let b = random(rows * d_in, 13);
    let s: Vec<f32> = random(rows * d_sae, 14)
        .iter()
        .map(|v| v.max(0.0))
        .collect();
    let w = random(d_sae, 15);
    let up = |v: &[f32]| gpu.upload(v).unwrap();
    let [sq, l1, l0] = gpu
        .row_losses(&up(&a), &up(&b), d_in, &up(&s), &up(&w), d_sae)
        .unwrap();
    let mut err = Tensor::zeros(&Device::Cpu, &[rows, d_in]);
    ops::sq_err(
        &tensor(a.clone(), &[rows, d_in]),
        &tensor(b.clone(), &[rows, d_in]),
        None,
        &mut err,
    );
    let sq_cpu: Vec<f32> = err.to_vec().chunks(d_in).map(|r| r.iter().sum()).collect();
    close(&sq, &sq_cpu, 1e-5, "squared error");
    let l1_cpu: Vec<f32> = s
        .chunks(d_sae)
        .map(|r| r.iter().zip(&w).map(|(v, w)| v.abs() * w).sum())
        .collect();
    close(&l1, &l1_cpu, 1e-5, "weighted L1");
    let l0_cpu: Vec<f32> = s
        .chunks(d_sae)
        .map(|r| r.iter().filter(|v| **v != 0.0).count() as f32)
        .collect();
    assert_eq!(l0, l0_cpu);

    let wd = random(d_sae * d_in, 16);
    let mut norms_cpu = Tensor::zeros(&Device::Cpu, &[d_sae]);
    ops::row_norms(&tensor(wd.clone(), &[d_sae, d_in]), &mut norms_cpu);
    let dwd = up(&wd);
    close(
        &gpu.row_norms(&dwd, d_in).unwrap(),
        &norms_cpu.to_vec(),
        1e-6,
        "row norms",
    );

    let g = random(d_sae * d_in, 17);
    let mut dg = up(&g);
    gpu.remove_parallel_grad(&dwd, &mut dg, d_in).unwrap();
    let g2 = gpu.download(&dg).unwrap();
    // Independent check: what is left is orthogonal to its decoder row.
    for (r, (gr, wr)) in g2.chunks(d_in).zip(wd.chunks(d_in)).enumerate() {
        let dot: f32 = gr.iter().zip(wr).map(|(a, b)| a * b).sum();
        let norm: f32 = wr.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(dot.abs() <= 1e-4 * norm, "row {r}: g.w = {dot}");
    }
    let total = gpu.sum_squares(&up(&g)).unwrap();
    let want = ops::sum_squares(&tensor(g.clone(), &[g.len()]));
    assert!((total - want).abs() <= 1e-5 * want, "{total} vs {want}");
}

#[test]
fn cuda_adam_matches_cpu() {
    let Some(gpu) = device() else { return };
    let n = 10_000;
    let mut p_cpu = tensor(random(n, 18), &[n]);
    let mut m_cpu = Tensor::zeros(&Device::Cpu, &[n]);
    let mut v_cpu = Tensor::zeros(&Device::Cpu, &[n]);
    let mut p = gpu.upload(&p_cpu.to_vec()).unwrap();
    let mut m = gpu.zeros::<f32>(n).unwrap();
    let mut v = gpu.zeros::<f32>(n).unwrap();
    for step in 1..=5u64 {
        let g = random(n, 100 + step);
        let mut g_cpu = tensor(g.clone(), &[n]);
        // Steps 4 and 5 as after clip_grad_norm_: the CPU scales the gradient first.
        let clip = if step >= 4 { 0.37 } else { 1.0 };
        if clip != 1.0 {
            ops::scale(&mut g_cpu, clip);
        }
        ops::adam(
            &mut p_cpu, &g_cpu, &mut m_cpu, &mut v_cpu, 3e-4, 0.9, 0.999, 1e-8, step,
        );
        let dg = gpu.upload(&g).unwrap();
        gpu.adam(
            &mut p,
            &dg,
            &mut m,
            &mut v,
            3e-4,
            (0.9, 0.999),
            1e-8,
            step,
            clip,
        )
        .unwrap();
    }
    // The kernel rounds every operation as the CPU does (no fused multiply-add): exact.
    assert_eq!(gpu.download(&p).unwrap(), p_cpu.to_vec(), "param");
    assert_eq!(gpu.download(&m).unwrap(), m_cpu.to_vec(), "m");
    assert_eq!(gpu.download(&v).unwrap(), v_cpu.to_vec(), "v");
}

#[test]
fn cuda_gemm_matches_cpu_in_every_orientation() {
    let Some(gpu) = device() else { return };
    let (m, n, k) = (65, 130, 97);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = random(m * k, 20);
        let b = random(k * n, 21);
        let c0 = random(m * n, 22);
        let a_shape: &[usize] = if ta { &[k, m] } else { &[m, k] };
        let b_shape: &[usize] = if tb { &[n, k] } else { &[k, n] };
        let mut want = tensor(c0.clone(), &[m, n]);
        ops::matmul(
            &mut want,
            &tensor(a.clone(), a_shape),
            ta,
            &tensor(b.clone(), b_shape),
            tb,
            0.5,
            2.0,
        );
        for tf32 in [false, true] {
            gpu.set_tf32(tf32).unwrap();
            let mut out = gpu.upload(&c0).unwrap();
            let (da, db) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
            gpu.matmul(&mut out, &da, ta, &db, tb, (m, n, k), 0.5, 2.0)
                .unwrap();
            // f32: summation order only. TF32 rounds inputs to 10 mantissa bits
            // (relative 2^-11 per product, over k = 97 terms of size <= 1).
            let tol = if tf32 { 2e-2 } else { 1e-5 };
            let what = format!("matmul ta={ta} tb={tb} tf32={tf32}");
            close(&gpu.download(&out).unwrap(), &want.to_vec(), tol, &what);
        }
    }
}

#[test]
fn cuda_auxk_and_batch_topk_selection_match_cpu() {
    let Some(gpu) = device() else { return };
    let (rows, cols, k) = (16, 700, 8);
    let x = random(rows * cols, 23);
    // AuxK: only the columns marked dead compete.
    let dead: Vec<u8> = (0..cols).map(|c| (c % 3 == 0) as u8).collect();
    let mask_t = tensor(dead.iter().map(|&d| d as f32).collect(), &[cols]);
    let mut cpu = Csr::empty(&Device::Cpu);
    ops::topk_rows(
        &tensor(x.clone(), &[rows, cols]),
        k,
        Some(&mask_t),
        &mut cpu,
    );
    let mut dx = gpu.upload(&x).unwrap();
    gpu.mask_cols(&mut dx, &gpu.upload(&dead).unwrap(), cols)
        .unwrap();
    let got = gpu.topk_rows(&dx, rows, cols, k).unwrap();
    assert_eq!(gpu.download(&got.indices).unwrap(), cpu.indices_to_vec());
    assert_eq!(gpu.download(&got.values).unwrap(), cpu.values().to_vec());

    // Batch top-k on ReLU outputs: the same entries as the CPU op.
    let relu: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
    let total = rows * k;
    let mut cpu = Csr::empty(&Device::Cpu);
    ops::batch_topk(&tensor(relu.clone(), &[rows, cols]), total, &mut cpu);
    let mut dense = Tensor::zeros(&Device::Cpu, &[rows, cols]);
    ops::csr_to_dense(&cpu, &mut dense);
    let dr = gpu.upload(&relu).unwrap();
    let key = gpu.kth_largest_key(&dr, total).unwrap().unwrap();
    let mut out = gpu.upload(&vec![f32::NAN; rows * cols]).unwrap();
    gpu.keep_from_key(&dr, &mut out, key).unwrap();
    assert_eq!(gpu.download(&out).unwrap(), dense.to_vec());
}
