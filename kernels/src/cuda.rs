//! The CUDA backend's kernels (feature `cuda`): `kernels/cuda/sae.cu`, compiled by NVRTC
//! at run time and launched through cudarc on one device's default stream.
//!
//! cudarc loads the driver, NVRTC and cuBLAS when first used, so this builds on a
//! machine without CUDA; [`Cuda::new`] checks that they can be loaded and says which is
//! missing instead of letting cudarc panic. Buffers are plain `CudaSlice`s here; wiring
//! them into [`crate::Tensor`] and the op dispatch is the next step.

use crate::KernelError;
use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::Arc;

/// The kernel source, as NVRTC compiles it.
pub const SOURCE: &str = include_str!("../cuda/sae.cu");

/// Every kernel in [`SOURCE`].
pub const KERNELS: &[&str] = &[
    "bias_relu",
    "bias_jumprelu",
    "mask_cols",
    "topk_rows",
    "radix_hist",
    "keep_from_key",
    "scale_inplace",
    "add_row_vec",
    "csr_matmul",
    "csr_sampled_dot",
    "csr_t_matmul",
    "csr_col_dot",
    "row_losses",
    "row_norms",
    "remove_parallel_grad",
    "sum_squares",
    "adam_step",
];

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the shared library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC can be loaded (PyPI's `nvidia-cuda-nvrtc-cu12` carries it).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the shared library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn cuda_err(e: impl std::fmt::Display) -> KernelError {
    KernelError::Cuda(e.to_string())
}

/// Compiles [`SOURCE`] to PTX (needs NVRTC, not a GPU).
pub fn compile() -> Result<Ptx, KernelError> {
    if !nvrtc_present() {
        return Err(KernelError::Cuda(
            "NVRTC (libnvrtc) cannot be loaded: install the CUDA runtime or PyPI's nvidia-cuda-nvrtc-cu12 and put its lib folder on LD_LIBRARY_PATH".into(),
        ));
    }
    let opts = CompileOptions {
        name: Some("sae.cu".into()),
        // Exact IEEE division and square root: the CPU backend's results are the reference.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        // PTX for compute 8.0 (A100 and later; the driver JITs it for H100/H200): f64
        // atomicAdd needs 6.0, NVRTC's default target is older.
        arch: Some("compute_80"),
        ..Default::default()
    };
    compile_ptx_with_opts(SOURCE, opts).map_err(cuda_err)
}

/// Checks that device `ordinal` can be used: the driver and cuBLAS load and the
/// device exists. Names what is missing.
pub fn probe(ordinal: usize) -> Result<(), KernelError> {
    if !driver_present() {
        return Err(KernelError::Cuda(
            "the CUDA driver (libcuda) cannot be loaded: is there an NVIDIA GPU and driver?".into(),
        ));
    }
    let count = CudaContext::device_count().map_err(cuda_err)?;
    if ordinal >= count.max(0) as usize {
        return Err(KernelError::Cuda(format!(
            "cuda:{ordinal} asked for, but {count} CUDA device(s) are present"
        )));
    }
    // SAFETY: only tries to open the shared library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(KernelError::Cuda(
            "cuBLAS (libcublas) cannot be loaded: install the CUDA runtime libraries".into(),
        ));
    }
    Ok(())
}

/// Threads per block of the row kernels and of the grid-stride kernels.
const THREADS: u32 = 256;
/// Threads per block of `topk_rows` (its scans assume a multiple of 32, at most 1024).
const TOPK_THREADS: u32 = 1024;

fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(THREADS).clamp(1, 65_535), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A CSR matrix on the device, laid out as [`crate::Csr`]: row `r` holds entries
/// `offsets[r]..offsets[r + 1]` of `indices` (columns, ascending) and `values`.
pub struct DevCsr {
    pub rows: usize,
    pub cols: usize,
    pub offsets: CudaSlice<u32>,
    pub indices: CudaSlice<u32>,
    pub values: CudaSlice<f32>,
}

impl DevCsr {
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }
}

/// One device: its stream, cuBLAS on that stream, and the compiled kernels.
pub struct Cuda {
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
}

impl Cuda {
    /// Opens device `ordinal` and compiles the kernels for it.
    pub fn new(ordinal: usize) -> Result<Cuda, KernelError> {
        probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(cuda_err)?;
        let module = ctx.load_module(compile()?).map_err(cuda_err)?;
        let mut funcs = HashMap::new();
        for &name in KERNELS {
            funcs.insert(name, module.load_function(name).map_err(cuda_err)?);
        }
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(cuda_err)?;
        Ok(Cuda {
            stream,
            blas,
            funcs,
        })
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    pub fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        v: &[T],
    ) -> Result<CudaSlice<T>, KernelError> {
        self.stream.clone_htod(v).map_err(cuda_err)
    }

    pub fn download<T: cudarc::driver::DeviceRepr>(
        &self,
        v: &CudaSlice<T>,
    ) -> Result<Vec<T>, KernelError> {
        self.stream.clone_dtoh(v).map_err(cuda_err)
    }

    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, KernelError> {
        self.stream.alloc_zeros(n).map_err(cuda_err)
    }

    /// Lets cuBLAS use TF32 tensor cores for f32 GEMMs (10-bit mantissa products,
    /// f32 accumulation), or not (exact f32, the default).
    pub fn set_tf32(&self, on: bool) -> Result<(), KernelError> {
        let mode = if on {
            cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle is live for as long as `self`.
        let status = unsafe { cudarc::cublas::sys::cublasSetMathMode(*self.blas.handle(), mode) };
        status.result().map_err(cuda_err)
    }

    /// Row-major `out[m, n] = alpha * op(a) @ op(b) + beta * out`, `op(a)` `[m, k]`,
    /// `op(b)` `[k, n]` (the CPU `ops::matmul` contract), on cuBLAS's column-major GEMM
    /// as `out^T = op(b)^T @ op(a)^T`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        out: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        trans_a: bool,
        b: &CudaSlice<f32>,
        trans_b: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        beta: f32,
    ) -> Result<(), KernelError> {
        assert!(
            a.len() == m * k && b.len() == k * n && out.len() == m * n,
            "matmul shapes"
        );
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let cfg = GemmConfig {
            transa: op(trans_b),
            transb: op(trans_a),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha,
            lda: if trans_b { k } else { n } as i32,
            ldb: if trans_a { m } else { k } as i32,
            beta,
            ldc: n as i32,
        };
        // SAFETY: the lengths were checked against the shapes above.
        unsafe { self.blas.gemm(cfg, b, a, out) }.map_err(cuda_err)
    }

    /// Sets `x` to -inf in every column where `mask` is 0 (AuxK: only dead latents
    /// compete in the following top-k).
    pub fn mask_cols(
        &self,
        x: &mut CudaSlice<f32>,
        mask: &CudaSlice<u8>,
        cols: usize,
    ) -> Result<(), KernelError> {
        let n = x.len() as i64;
        let c = cols as i32;
        let mut l = self.stream.launch_builder(self.f("mask_cols"));
        l.arg(x).arg(mask).arg(&n).arg(&c);
        // SAFETY: grid-stride over n; mask holds cols.
        unsafe { l.launch(grid_stride(n as usize)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// `out = x` where `x`'s order key is at least `key`, else 0 (batch top-k's
    /// selection once [`Cuda::kth_largest_key`] has found the threshold).
    pub fn keep_from_key(
        &self,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        key: u32,
    ) -> Result<(), KernelError> {
        let n = x.len() as i64;
        let mut l = self.stream.launch_builder(self.f("keep_from_key"));
        l.arg(x).arg(out).arg(&n).arg(&key);
        // SAFETY: grid-stride over n; out holds n.
        unsafe { l.launch(grid_stride(n as usize)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// `pre += b` (per column), `act = relu(pre)`; `pre` is `[n / cols, cols]`.
    pub fn bias_relu(
        &self,
        pre: &mut CudaSlice<f32>,
        b: &CudaSlice<f32>,
        act: &mut CudaSlice<f32>,
        cols: usize,
    ) -> Result<(), KernelError> {
        let n = pre.len() as i64;
        let c = cols as i32;
        let mut l = self.stream.launch_builder(self.f("bias_relu"));
        l.arg(pre).arg(b).arg(act).arg(&n).arg(&c);
        // SAFETY: argument types and order match the kernel; n bounds every index.
        unsafe { l.launch(grid_stride(n as usize)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// `pre += b`, `act = pre where pre > thr[col] else 0`.
    pub fn bias_jumprelu(
        &self,
        pre: &mut CudaSlice<f32>,
        b: &CudaSlice<f32>,
        thr: &CudaSlice<f32>,
        act: &mut CudaSlice<f32>,
        cols: usize,
    ) -> Result<(), KernelError> {
        let n = pre.len() as i64;
        let c = cols as i32;
        let mut l = self.stream.launch_builder(self.f("bias_jumprelu"));
        l.arg(pre).arg(b).arg(thr).arg(act).arg(&n).arg(&c);
        // SAFETY: as above.
        unsafe { l.launch(grid_stride(n as usize)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// Top-`k` of each row of `x` `[rows, cols]` as CSR (k per row, columns ascending),
    /// as `ops::topk_rows` (without a mask; [`Cuda::mask_cols`] first for AuxK).
    pub fn topk_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<DevCsr, KernelError> {
        assert!(k <= cols && x.len() == rows * cols, "topk_rows shapes");
        // Poisoned, so that an unwritten slot cannot pass for a chosen latent.
        let mut indices = self.upload(&vec![u32::MAX; rows * k])?;
        let mut values = self.upload(&vec![f32::NAN; rows * k])?;
        let (c, kk) = (cols as i32, k as i32);
        let mut l = self.stream.launch_builder(self.f("topk_rows"));
        l.arg(x).arg(&c).arg(&kk).arg(&mut indices).arg(&mut values);
        // SAFETY: one block per row; outputs hold rows * k.
        unsafe { l.launch(per_row(rows, TOPK_THREADS)) }.map_err(cuda_err)?;
        let offsets: Vec<u32> = (0..=rows).map(|r| (r * k) as u32).collect();
        Ok(DevCsr {
            rows,
            cols,
            offsets: self.upload(&offsets)?,
            indices,
            values,
        })
    }

    /// The order key of the `total`-th largest value of `x` (batch top-k's threshold),
    /// by four histogram passes; `None` when `total` is 0 or exceeds the length.
    pub fn kth_largest_key(
        &self,
        x: &CudaSlice<f32>,
        total: usize,
    ) -> Result<Option<u32>, KernelError> {
        if total == 0 || total > x.len() {
            return Ok(None);
        }
        let n = x.len() as i64;
        let (mut prefix, mut mask, mut need) = (0u32, 0u32, total as u64);
        for shift in [24i32, 16, 8, 0] {
            let mut hist = self.zeros::<u64>(256)?;
            let mut l = self.stream.launch_builder(self.f("radix_hist"));
            l.arg(x)
                .arg(&n)
                .arg(&prefix)
                .arg(&mask)
                .arg(&shift)
                .arg(&mut hist);
            // SAFETY: hist holds 256 counters; n bounds the reads.
            unsafe { l.launch(grid_stride(n as usize)) }.map_err(cuda_err)?;
            let h = self.download(&hist)?;
            let mut seen = 0u64;
            let mut d = 255usize;
            while d > 0 && seen + h[d] < need {
                seen += h[d];
                d -= 1;
            }
            prefix |= (d as u32) << shift;
            mask |= 255u32 << shift;
            need -= seen;
        }
        Ok(Some(prefix))
    }

    /// A host CSR matrix on the device.
    pub fn upload_csr(&self, a: &crate::Csr) -> Result<DevCsr, KernelError> {
        Ok(DevCsr {
            rows: a.rows(),
            cols: a.cols(),
            offsets: self.upload(&a.offsets_to_vec())?,
            indices: self.upload(&a.indices_to_vec())?,
            values: self.upload(&a.values().to_vec())?,
        })
    }

    /// `x *= s` (`s == 0` writes zeros, as the CPU ops' `beta = 0` ignores old values).
    fn scale_inplace(&self, x: &mut CudaSlice<f32>, s: f32) -> Result<(), KernelError> {
        let n = x.len() as i64;
        let mut l = self.stream.launch_builder(self.f("scale_inplace"));
        l.arg(x).arg(&n).arg(&s);
        // SAFETY: grid-stride over n.
        unsafe { l.launch(grid_stride(n as usize)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// `x[r, :] += alpha * v` (`ops::add_row_vec`).
    pub fn add_row_vec(
        &self,
        x: &mut CudaSlice<f32>,
        v: &CudaSlice<f32>,
        alpha: f32,
    ) -> Result<(), KernelError> {
        let n = x.len() as i64;
        let c = v.len() as i32;
        let mut l = self.stream.launch_builder(self.f("add_row_vec"));
        l.arg(x).arg(v).arg(&n).arg(&c).arg(&alpha);
        // SAFETY: grid-stride over n; v holds cols.
        unsafe { l.launch(grid_stride(n as usize)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// `out = beta * out + alpha * a @ w`, `w` `[a.cols, d]` (`ops::csr_matmul`: the
    /// sparse decode).
    pub fn csr_matmul(
        &self,
        out: &mut CudaSlice<f32>,
        a: &DevCsr,
        w: &CudaSlice<f32>,
        alpha: f32,
        beta: f32,
    ) -> Result<(), KernelError> {
        let d = w.len() / a.cols.max(1);
        assert!(out.len() == a.rows * d, "csr_matmul shapes");
        let di = d as i32;
        let mut l = self.stream.launch_builder(self.f("csr_matmul"));
        l.arg(&a.offsets)
            .arg(&a.indices)
            .arg(&a.values)
            .arg(w)
            .arg(&di);
        l.arg(&alpha).arg(&beta).arg(out);
        // SAFETY: one block per row; out holds rows * d.
        unsafe { l.launch(per_row(a.rows, THREADS)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// `out[e] = x[r] . w[j]` for each stored `(r, j)` (`ops::csr_sampled_dot`).
    pub fn csr_sampled_dot(
        &self,
        a: &DevCsr,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let d = x.len() / a.rows.max(1);
        assert!(
            w.len() == a.cols * d && out.len() == a.nnz(),
            "csr_sampled_dot shapes"
        );
        let di = d as i32;
        let mut l = self.stream.launch_builder(self.f("csr_sampled_dot"));
        l.arg(&a.offsets)
            .arg(&a.indices)
            .arg(x)
            .arg(w)
            .arg(&di)
            .arg(out);
        // SAFETY: one block per row, warps over its entries.
        unsafe { l.launch(per_row(a.rows, THREADS)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// `out = beta * out + alpha * a^T @ x`, `out` `[a.cols, d]` or `[d, a.cols]` when
    /// `transposed` (`ops::csr_t_matmul`: the weight gradients).
    #[allow(clippy::too_many_arguments)]
    pub fn csr_t_matmul(
        &self,
        out: &mut CudaSlice<f32>,
        a: &DevCsr,
        x: &CudaSlice<f32>,
        transposed: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<(), KernelError> {
        let d = x.len() / a.rows.max(1);
        assert!(out.len() == a.cols * d, "csr_t_matmul shapes");
        if beta != 1.0 {
            self.scale_inplace(out, beta)?;
        }
        let (di, m, t) = (d as i32, a.cols as i32, transposed as i32);
        let mut l = self.stream.launch_builder(self.f("csr_t_matmul"));
        l.arg(&a.offsets)
            .arg(&a.indices)
            .arg(&a.values)
            .arg(x)
            .arg(&di)
            .arg(&m);
        l.arg(&t).arg(&alpha).arg(out);
        // SAFETY: one block per row of a.
        unsafe { l.launch(per_row(a.rows, THREADS)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// `out[j] = beta * out[j] + alpha * sum of column j's values` (times `other`'s
    /// matching values when given) (`ops::csr_col_dot`).
    pub fn csr_col_dot(
        &self,
        a: &DevCsr,
        other: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        alpha: f32,
        beta: f32,
    ) -> Result<(), KernelError> {
        assert!(out.len() == a.cols, "csr_col_dot shapes");
        if beta != 1.0 {
            self.scale_inplace(out, beta)?;
        }
        let nnz = a.nnz() as i64;
        let null: u64 = 0;
        let mut l = self.stream.launch_builder(self.f("csr_col_dot"));
        l.arg(&a.indices).arg(&a.values);
        match other {
            Some(o) => l.arg(o),
            None => l.arg(&null),
        };
        l.arg(&nnz).arg(&alpha).arg(out);
        // SAFETY: grid-stride over the entries; a null `other` means "times 1".
        unsafe { l.launch(grid_stride(nnz as usize)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// Per-row squared error of `a - b` (`[rows, d_in]`), and of the dense latents `s`
    /// `[rows, d_sae]` the L1 (weighted by `w` per latent) and L0: three `[rows]`.
    #[allow(clippy::too_many_arguments)]
    pub fn row_losses(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        d_in: usize,
        s: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        d_sae: usize,
    ) -> Result<[Vec<f32>; 3], KernelError> {
        let rows = a.len() / d_in;
        let mut out: Vec<CudaSlice<f32>> = (0..3)
            .map(|_| self.zeros::<f32>(rows))
            .collect::<Result<_, _>>()?;
        let (d, m) = (d_in as i32, d_sae as i32);
        let [sq, l1, l0] = &mut out[..] else {
            unreachable!()
        };
        let mut l = self.stream.launch_builder(self.f("row_losses"));
        l.arg(a)
            .arg(b)
            .arg(&d)
            .arg(s)
            .arg(w)
            .arg(&m)
            .arg(sq)
            .arg(l1)
            .arg(l0);
        // SAFETY: one block per row; outputs hold rows.
        unsafe { l.launch(per_row(rows, THREADS)) }.map_err(cuda_err)?;
        Ok([
            self.download(&out[0])?,
            self.download(&out[1])?,
            self.download(&out[2])?,
        ])
    }

    /// L2 norm of each row of `w` `[rows, cols]`.
    pub fn row_norms(&self, w: &CudaSlice<f32>, cols: usize) -> Result<Vec<f32>, KernelError> {
        let rows = w.len() / cols;
        let mut norms = self.zeros::<f32>(rows)?;
        let c = cols as i32;
        let mut l = self.stream.launch_builder(self.f("row_norms"));
        l.arg(w).arg(&c).arg(&mut norms);
        // SAFETY: one block per row.
        unsafe { l.launch(per_row(rows, THREADS)) }.map_err(cuda_err)?;
        self.download(&norms)
    }

    /// Removes from each row of `g` its component along the same row of `w`.
    pub fn remove_parallel_grad(
        &self,
        w: &CudaSlice<f32>,
        g: &mut CudaSlice<f32>,
        cols: usize,
    ) -> Result<(), KernelError> {
        let rows = w.len() / cols;
        let c = cols as i32;
        let mut l = self.stream.launch_builder(self.f("remove_parallel_grad"));
        l.arg(w).arg(g).arg(&c);
        // SAFETY: one block per row.
        unsafe { l.launch(per_row(rows, THREADS)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// Sum of squares of `g` (accumulated in f64).
    pub fn sum_squares(&self, g: &CudaSlice<f32>) -> Result<f64, KernelError> {
        let mut out = self.zeros::<f64>(1)?;
        let n = g.len() as i64;
        let mut l = self.stream.launch_builder(self.f("sum_squares"));
        l.arg(g).arg(&n).arg(&mut out);
        // SAFETY: grid-stride over n; out is one value.
        unsafe { l.launch(grid_stride(n as usize)) }.map_err(cuda_err)?;
        Ok(self.download(&out)?[0])
    }

    /// One torch Adam step (`step` from 1) with the gradient scaled by `clip`,
    /// bit-identical to the CPU backend's `ops::adam`.
    #[allow(clippy::too_many_arguments)]
    pub fn adam(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        lr: f64,
        betas: (f64, f64),
        eps: f64,
        step: u64,
        clip: f32,
    ) -> Result<(), KernelError> {
        let n = p.len() as i64;
        // The scalars exactly as the CPU backend derives them (f64, then f32).
        let t = step as i32;
        let step_size = (lr / (1.0 - betas.0.powi(t))) as f32;
        let bc2_sqrt = (1.0 - betas.1.powi(t)).sqrt() as f32;
        let (w, b2) = ((1.0 - betas.0) as f32, betas.1 as f32);
        let (omb2, eps) = ((1.0 - betas.1) as f32, eps as f32);
        let mut l = self.stream.launch_builder(self.f("adam_step"));
        l.arg(p)
            .arg(g)
            .arg(m)
            .arg(v)
            .arg(&n)
            .arg(&step_size)
            .arg(&w)
            .arg(&b2);
        l.arg(&omb2).arg(&eps).arg(&bc2_sqrt).arg(&clip);
        // SAFETY: grid-stride over n; all four buffers hold n.
        unsafe { l.launch(grid_stride(n as usize)) }.map_err(cuda_err)?;
        Ok(())
    }
}
