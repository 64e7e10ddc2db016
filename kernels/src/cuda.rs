//! The CUDA backend (feature `cuda`): the kernels in `kernels/cuda/*.cu`, compiled by
//! NVRTC at run time and launched through cudarc on one device's default stream, and
//! cuBLAS for the dense products.
//!
//! cudarc loads the driver, NVRTC and cuBLAS when first used, so this builds on a
//! machine without CUDA; [`probe`] and [`Cuda::new`] check that they can be loaded and
//! say which is missing instead of letting cudarc panic. Tensors on `Device::Cuda(n)`
//! hold a [`Buf`]: a `CudaSlice` and the device's [`Cuda`], which every op in
//! [`crate::ops`] dispatches to. Methods here take raw buffers and dimensions; the op
//! layer has already checked the shapes.

use crate::KernelError;
use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The kernel source, as NVRTC compiles it (one program: ops.cu uses sae.cu's helpers).
pub const SOURCE: &str = concat!(
    include_str!("../cuda/sae.cu"),
    "\n",
    include_str!("../cuda/ops.cu")
);

/// Every kernel in [`SOURCE`].
pub const KERNELS: &[&str] = &[
    // sae.cu
    "topk_rows",
    "radix_hist",
    "scale_inplace",
    "add_row_vec",
    "csr_matmul",
    "csr_sampled_dot",
    "csr_col_dot",
    "adam_step",
    // ops.cu
    "fill_f32",
    "f32_to_bf16",
    "axpy_f32",
    "mul_f32",
    "exp_f32",
    "tanh_f32",
    "mul_row_vec",
    "row_affine",
    "add_scaled_rows",
    "relu_f32",
    "relu_backward",
    "mask_positive",
    "jumprelu",
    "sq_err",
    "div_eps",
    "tanh_relu_backward",
    "copy_cols",
    "add_cols",
    "add_f64",
    "sum_f64",
    "weighted_sq_err",
    "min_positive",
    "row_reduce",
    "row_mean_std",
    "centered_row_norms",
    "mse_rows",
    "lp_norms",
    "col_reduce",
    "jumprelu_backward",
    "step_backward",
    "tanh_sparsity",
    "lp_backward",
    "pre_act_loss",
    "csr_col_count",
    "exclusive_scan_u32",
    "csr_to_csc",
    "csc_t_matmul",
    "batch_count",
    "batch_write",
    "csr_to_dense",
    "csr_gather",
    "csr_scatter_add",
    "csr_scale_cols",
    "csr_col_nnz",
    "csr_row_nnz",
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

/// Unwraps a CUDA result inside an op: ops have no error path, so a failed launch or
/// allocation (out of memory) stops the program with CUDA's message.
pub(crate) fn check<T>(r: Result<T, KernelError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
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
        // Exact IEEE division and square root, and no fused multiply-adds: the CPU
        // backend's results are the reference, and it rounds every product.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        fmad: Some(false),
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

/// The backend of device `ordinal`, opened (and its kernels compiled) on first use and
/// kept for the life of the process, like torch's per-device state.
pub(crate) fn backend(ordinal: usize) -> Result<&'static Cuda, KernelError> {
    static DEVICES: Mutex<Vec<&'static Cuda>> = Mutex::new(Vec::new());
    let mut open = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(g) = open.iter().find(|g| g.ordinal == ordinal) {
        return Ok(g);
    }
    let g: &'static Cuda = Box::leak(Box::new(Cuda::new(ordinal)?));
    open.push(g);
    Ok(g)
}

/// How cuBLAS does the dense products (torch's `allow_tf32` and bf16 autocast).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matmul {
    /// Exact f32 (the default, as torch's default).
    F32,
    /// TF32 tensor cores: inputs rounded to 10 mantissa bits, f32 accumulation.
    Tf32,
    /// Inputs rounded to bf16 (8 mantissa bits), f32 accumulation and output.
    Bf16,
}

/// Sets how the dense products on `device` are done; the CPU always does exact f32
/// and refuses the others.
pub fn set_matmul(device: &crate::Device, mode: Matmul) -> Result<(), KernelError> {
    match device {
        crate::Device::Cuda(o) => backend(*o)?.set_matmul(mode),
        crate::Device::Cpu if mode == Matmul::F32 => Ok(()),
        crate::Device::Cpu => Err(KernelError::Cuda(format!(
            "{} matrix products need a CUDA device; the CPU does them in f32",
            format!("{mode:?}").to_lowercase()
        ))),
    }
}

/// A device buffer and the backend that owns it: the CUDA form of a tensor's storage.
pub(crate) struct Buf<T> {
    pub(crate) g: &'static Cuda,
    pub(crate) s: CudaSlice<T>,
}

impl<T: DeviceRepr + ValidAsZeroBits> Clone for Buf<T> {
    fn clone(&self) -> Self {
        Buf {
            g: self.g,
            s: check(self.g.dup(&self.s)),
        }
    }
}

impl<T> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{}[{}]", self.g.ordinal, self.s.len())
    }
}

type F32 = CudaSlice<f32>;
type U32 = CudaSlice<u32>;

/// Threads per block of the row kernels and of the grid-stride kernels.
const THREADS: u32 = 256;
/// Threads per block of `topk_rows` and `batch_write` (their scans assume a multiple of
/// 32, at most 1024).
const SCAN_THREADS: u32 = 1024;
/// Rows per block of the column-chunk kernels (`COL_CHUNK` in ops.cu).
const COL_CHUNK: usize = 64;

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

fn col_chunks(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (cols as u32).div_ceil(THREADS),
            rows.div_ceil(COL_CHUNK) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches kernel `$name` of backend `$g` with `$cfg` and the arguments in order
/// (each a reference that outlives the call).
macro_rules! launch {
    ($g:expr, $name:literal, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let cfg = $cfg;
        // Empty grids are not launches (rows or elements may be 0).
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.1 == 0 {
            Ok(())
        } else {
            let mut l = $g.stream.launch_builder($g.f($name));
            $( l.arg($arg); )*
            // SAFETY: the arguments mirror the kernel's parameter list in order and
            // type, and the op layer checked every buffer against the shapes passed.
            unsafe { l.launch(cfg) }.map(|_| ()).map_err(cuda_err)
        }
    }};
}

/// A null device pointer for an optional kernel argument.
const NULL: u64 = 0;

/// One device: its stream, cuBLAS on that stream, and the compiled kernels.
pub struct Cuda {
    pub ordinal: usize,
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    matmul_mode: Mutex<Matmul>,
    funcs: HashMap<&'static str, CudaFunction>,
}

impl Cuda {
    /// Opens device `ordinal` and compiles the kernels for it.
    pub fn new(ordinal: usize) -> Result<Cuda, KernelError> {
        probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(cuda_err)?;
        // SAFETY: everything runs on the one default stream of this context, so there is
        // nothing to order between streams; without tracking, allocations (many per
        // step) skip creating two CUDA events each.
        unsafe { ctx.disable_event_tracking() };
        let module = ctx.load_module(compile()?).map_err(cuda_err)?;
        let mut funcs = HashMap::new();
        for &name in KERNELS {
            funcs.insert(name, module.load_function(name).map_err(cuda_err)?);
        }
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(cuda_err)?;
        Ok(Cuda {
            ordinal,
            stream,
            blas,
            matmul_mode: Mutex::new(Matmul::F32),
            funcs,
        })
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        v: &[T],
    ) -> Result<CudaSlice<T>, KernelError> {
        if v.is_empty() {
            return self.zeros(0);
        }
        self.stream.clone_htod(v).map_err(cuda_err)
    }

    pub fn download<T: DeviceRepr>(&self, v: &CudaSlice<T>) -> Result<Vec<T>, KernelError> {
        if v.is_empty() {
            return Ok(Vec::new());
        }
        self.stream.clone_dtoh(v).map_err(cuda_err)
    }

    /// `n` zeros. CUDA refuses zero-byte allocations, and empty tensors are common
    /// (placeholders before the first batch), so an empty buffer owns a one-element
    /// allocation behind a zero length.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, KernelError> {
        if n > 0 {
            return self.stream.alloc_zeros(n).map_err(cuda_err);
        }
        let one = self.stream.alloc_zeros::<T>(1).map_err(cuda_err)?;
        // SAFETY: the pointer is the live allocation just leaked; the new slice owns
        // it (and frees it on drop) and claims none of its bytes.
        Ok(unsafe { self.stream.upgrade_device_ptr(one.leak(), 0) })
    }

    /// A copy of `s` (which may be empty).
    pub(crate) fn dup<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        s: &CudaSlice<T>,
    ) -> Result<CudaSlice<T>, KernelError> {
        let mut out = self.zeros(s.len())?;
        if !s.is_empty() {
            self.stream.memcpy_dtod(s, &mut out).map_err(cuda_err)?;
        }
        Ok(out)
    }

    fn memset0<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        s: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        if s.is_empty() {
            return Ok(());
        }
        self.stream.memset_zeros(s).map_err(cuda_err)
    }

    fn set_matmul(&self, mode: Matmul) -> Result<(), KernelError> {
        let math = if mode == Matmul::Tf32 {
            cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle is live for as long as `self`.
        let status = unsafe { cudarc::cublas::sys::cublasSetMathMode(*self.blas.handle(), math) };
        status.result().map_err(cuda_err)?;
        *self.matmul_mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
        Ok(())
    }

    /// `x` rounded to bf16 (round to nearest even), as raw bits.
    fn to_bf16(&self, x: &F32) -> Result<CudaSlice<u16>, KernelError> {
        let n = x.len() as i64;
        let mut y = self.zeros::<u16>(x.len())?;
        launch!(self, "f32_to_bf16", grid_stride(n as usize); x, &mut y, &n)?;
        Ok(y)
    }

    // -----------------------------------------------------------------------------
    // Dense products (cuBLAS)

    /// Row-major `out[m, n] = alpha * op(a) @ op(b) + beta * out`, `op(a)` `[m, k]`,
    /// `op(b)` `[k, n]` (the CPU `ops::matmul` contract), on cuBLAS's column-major GEMM
    /// as `out^T = op(b)^T @ op(a)^T`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul(
        &self,
        out: &mut F32,
        a: &F32,
        trans_a: bool,
        b: &F32,
        trans_b: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        beta: f32,
    ) -> Result<(), KernelError> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return self.scale(out, beta);
        }
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
        let mode = *self.matmul_mode.lock().unwrap_or_else(|e| e.into_inner());
        if mode != Matmul::Bf16 {
            // SAFETY: the op layer checked the lengths against (m, n, k).
            return unsafe { self.blas.gemm(cfg, b, a, out) }.map_err(cuda_err);
        }
        // bf16 inputs, f32 accumulation and output: cublasGemmEx on bf16 copies.
        let (a16, b16) = (self.to_bf16(a)?, self.to_bf16(b)?);
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let (pa, _ra) = a16.device_ptr(&self.stream);
        let (pb, _rb) = b16.device_ptr(&self.stream);
        let (pc, _rc) = out.device_ptr_mut(&self.stream);
        // SAFETY: as above; the bf16 copies have a's and b's lengths, and the
        // pointers' stream records live until the call is queued.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cfg.transa,
                cfg.transb,
                cfg.m,
                cfg.n,
                cfg.k,
                (&cfg.alpha) as *const f32 as *const _,
                pb as *const _,
                cudaDataType_t::CUDA_R_16BF,
                cfg.lda,
                pa as *const _,
                cudaDataType_t::CUDA_R_16BF,
                cfg.ldb,
                (&cfg.beta) as *const f32 as *const _,
                pc as *mut _,
                cudaDataType_t::CUDA_R_32F,
                cfg.ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cuda_err)
    }

    // -----------------------------------------------------------------------------
    // Element-wise

    pub(crate) fn fill(&self, x: &mut F32, v: f32) -> Result<(), KernelError> {
        let n = x.len() as i64;
        launch!(self, "fill_f32", grid_stride(n as usize); x, &n, &v)
    }

    /// `x *= s` (`s == 0` writes zeros, as the CPU's `scale`).
    pub(crate) fn scale(&self, x: &mut F32, s: f32) -> Result<(), KernelError> {
        let n = x.len() as i64;
        launch!(self, "scale_inplace", grid_stride(n as usize); x, &n, &s)
    }

    pub(crate) fn copy(&self, dst: &mut F32, src: &F32) -> Result<(), KernelError> {
        if src.is_empty() {
            return Ok(());
        }
        self.stream.memcpy_dtod(src, dst).map_err(cuda_err)
    }

    /// `dst = src[start..start + dst.len()]`.
    pub(crate) fn copy_range(
        &self,
        dst: &mut F32,
        src: &F32,
        start: usize,
    ) -> Result<(), KernelError> {
        if dst.is_empty() {
            return Ok(());
        }
        let view = src.slice(start..start + dst.len());
        self.stream.memcpy_dtod(&view, dst).map_err(cuda_err)
    }

    /// `dst[start..start + src.len()] = src`.
    pub(crate) fn copy_range_into(
        &self,
        dst: &mut F32,
        start: usize,
        src: &F32,
    ) -> Result<(), KernelError> {
        if src.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice_mut(start..start + src.len());
        self.stream.memcpy_dtod(src, &mut view).map_err(cuda_err)
    }

    /// `y[start..start + x.len()] += alpha * x`.
    pub(crate) fn axpy(
        &self,
        y: &mut F32,
        start: usize,
        alpha: f32,
        x: &F32,
    ) -> Result<(), KernelError> {
        let n = x.len() as i64;
        if n == 0 {
            return Ok(());
        }
        let mut view = y.slice_mut(start..start + x.len());
        launch!(self, "axpy_f32", grid_stride(n as usize); &mut view, x, &n, &alpha)
    }

    pub(crate) fn mul(&self, y: &mut F32, x: &F32) -> Result<(), KernelError> {
        let n = y.len() as i64;
        launch!(self, "mul_f32", grid_stride(n as usize); y, x, &n)
    }

    pub(crate) fn exp(&self, x: &F32, out: &mut F32) -> Result<(), KernelError> {
        let n = x.len() as i64;
        launch!(self, "exp_f32", grid_stride(n as usize); x, out, &n)
    }

    pub(crate) fn tanh(&self, x: &mut F32) -> Result<(), KernelError> {
        let n = x.len() as i64;
        launch!(self, "tanh_f32", grid_stride(n as usize); x, &n)
    }

    /// `x[r, :] += alpha * v`.
    pub(crate) fn add_row_vec(&self, x: &mut F32, v: &F32, alpha: f32) -> Result<(), KernelError> {
        let (n, c) = (x.len() as i64, v.len() as i32);
        launch!(self, "add_row_vec", grid_stride(n as usize); x, v, &n, &c, &alpha)
    }

    /// `x[r, j] *= v[j]`.
    pub(crate) fn mul_row_vec(&self, x: &mut F32, v: &F32) -> Result<(), KernelError> {
        let (n, c) = (x.len() as i64, v.len() as i32);
        launch!(self, "mul_row_vec", grid_stride(n as usize); x, v, &n, &c)
    }

    /// `x[r, :] = x[r, :] * scale[r] + shift[r]`.
    pub(crate) fn row_affine(
        &self,
        x: &mut F32,
        cols: usize,
        scale: &F32,
        shift: &F32,
    ) -> Result<(), KernelError> {
        let (n, c) = (x.len() as i64, cols as i32);
        launch!(self, "row_affine", grid_stride(n as usize); x, scale, shift, &n, &c)
    }

    /// `dst[r, :] += c[r] * src[r, :]`.
    pub(crate) fn add_scaled_rows(
        &self,
        dst: &mut F32,
        src: &F32,
        cols: usize,
        c: &F32,
    ) -> Result<(), KernelError> {
        let (n, cc) = (dst.len() as i64, cols as i32);
        launch!(self, "add_scaled_rows", grid_stride(n as usize); dst, src, c, &n, &cc)
    }

    pub(crate) fn relu(&self, h: &F32, f: &mut F32) -> Result<(), KernelError> {
        let n = h.len() as i64;
        launch!(self, "relu_f32", grid_stride(n as usize); h, f, &n)
    }

    pub(crate) fn relu_backward(&self, h: &F32, df: &F32, dh: &mut F32) -> Result<(), KernelError> {
        let n = h.len() as i64;
        launch!(self, "relu_backward", grid_stride(n as usize); h, df, dh, &n)
    }

    pub(crate) fn mask_positive(&self, x: &mut F32, g: &F32) -> Result<(), KernelError> {
        let n = x.len() as i64;
        launch!(self, "mask_positive", grid_stride(n as usize); x, g, &n)
    }

    pub(crate) fn jumprelu(&self, h: &F32, t: &F32, f: &mut F32) -> Result<(), KernelError> {
        let (n, c) = (h.len() as i64, t.len() as i32);
        launch!(self, "jumprelu", grid_stride(n as usize); h, t, f, &n, &c)
    }

    pub(crate) fn sq_err(
        &self,
        p: &F32,
        t: &F32,
        cols: usize,
        w: Option<&F32>,
        out: &mut F32,
    ) -> Result<(), KernelError> {
        let (n, c) = (p.len() as i64, cols as i32);
        match w {
            Some(w) => launch!(self, "sq_err", grid_stride(n as usize); p, t, w, out, &n, &c),
            None => launch!(self, "sq_err", grid_stride(n as usize); p, t, &NULL, out, &n, &c),
        }
    }

    pub(crate) fn div_eps(
        &self,
        a: &F32,
        b: &F32,
        eps: f32,
        out: &mut F32,
    ) -> Result<(), KernelError> {
        let n = a.len() as i64;
        launch!(self, "div_eps", grid_stride(n as usize); a, b, &eps, out, &n)
    }

    pub(crate) fn tanh_relu_backward(
        &self,
        h: &F32,
        df: &F32,
        dh: &mut F32,
    ) -> Result<(), KernelError> {
        let n = h.len() as i64;
        launch!(self, "tanh_relu_backward", grid_stride(n as usize); h, df, dh, &n)
    }

    /// `dst = src[:, start..start + dst_cols]`.
    pub(crate) fn copy_cols(
        &self,
        src: &F32,
        src_cols: usize,
        start: usize,
        dst: &mut F32,
        dst_cols: usize,
    ) -> Result<(), KernelError> {
        let (n, sc, st, dc) = (
            dst.len() as i64,
            src_cols as i32,
            start as i32,
            dst_cols as i32,
        );
        launch!(self, "copy_cols", grid_stride(n as usize); src, &sc, &st, dst, &dc, &n)
    }

    /// `dst[:, start..start + src_cols] += src`.
    pub(crate) fn add_cols(
        &self,
        dst: &mut F32,
        dst_cols: usize,
        start: usize,
        src: &F32,
        src_cols: usize,
    ) -> Result<(), KernelError> {
        let (n, dc, st, sc) = (
            src.len() as i64,
            dst_cols as i32,
            start as i32,
            src_cols as i32,
        );
        launch!(self, "add_cols", grid_stride(n as usize); dst, &dc, &st, src, &sc, &n)
    }

    /// `dst = beta * dst + alpha * acc` for a double accumulator.
    fn add_f64(
        &self,
        dst: &mut F32,
        acc: &CudaSlice<f64>,
        alpha: f32,
        beta: f32,
    ) -> Result<(), KernelError> {
        let n = dst.len() as i64;
        launch!(self, "add_f64", grid_stride(n as usize); dst, acc, &n, &alpha, &beta)
    }

    fn scalar(&self, acc: &CudaSlice<f64>) -> Result<f64, KernelError> {
        Ok(self.download(acc)?[0])
    }

    // -----------------------------------------------------------------------------
    // Reductions

    /// Sum (or with `square`, sum of squares) of all elements, in double.
    pub(crate) fn sum(&self, x: &F32, square: bool) -> Result<f64, KernelError> {
        let mut acc = self.zeros::<f64>(1)?;
        let (n, sq) = (x.len() as i64, square as i32);
        launch!(self, "sum_f64", grid_stride(n as usize); x, &n, &sq, &mut acc)?;
        self.scalar(&acc)
    }

    pub(crate) fn min_positive(&self, x: &F32) -> Result<Option<f32>, KernelError> {
        let mut best = self.upload(&[f32::INFINITY.to_bits()])?;
        let n = x.len() as i64;
        launch!(self, "min_positive", grid_stride(n as usize); x, &n, &mut best)?;
        let bits = self.download(&best)?[0];
        Ok((bits != f32::INFINITY.to_bits()).then(|| f32::from_bits(bits)))
    }

    /// Per row of `x` `[out.len(), cols]`: mode 0 the L2 norm, 1 the dot with `y`'s
    /// row, 2 the nonzero count, 3 the count of `x[r, c] > y[c]`.
    pub(crate) fn row_reduce(
        &self,
        x: &F32,
        y: Option<&F32>,
        cols: usize,
        mode: i32,
        out: &mut F32,
    ) -> Result<(), KernelError> {
        let (rows, c) = (out.len(), cols as i32);
        match y {
            Some(y) => launch!(self, "row_reduce", per_row(rows, THREADS); x, y, &c, &mode, out),
            None => launch!(self, "row_reduce", per_row(rows, THREADS); x, &NULL, &c, &mode, out),
        }
    }

    pub(crate) fn row_mean_std(
        &self,
        x: &F32,
        cols: usize,
        mean: &mut F32,
        sd: &mut F32,
    ) -> Result<(), KernelError> {
        let (rows, c) = (mean.len(), cols as i32);
        launch!(self, "row_mean_std", per_row(rows, THREADS); x, &c, mean, sd)
    }

    /// Column sums (mode 0) or nonzero counts (mode 1) of `x` `[rows, cols]` in double.
    fn col_reduce(
        &self,
        x: &F32,
        rows: usize,
        cols: usize,
        mode: i32,
    ) -> Result<CudaSlice<f64>, KernelError> {
        let mut acc = self.zeros::<f64>(cols)?;
        let (r, c) = (rows as i32, cols as i32);
        launch!(self, "col_reduce", col_chunks(rows, cols); x, &r, &c, &mode, &mut acc)?;
        Ok(acc)
    }

    /// `out = beta * out + alpha * column sums of x`.
    pub(crate) fn col_sums(
        &self,
        x: &F32,
        rows: usize,
        out: &mut F32,
        alpha: f32,
        beta: f32,
    ) -> Result<(), KernelError> {
        let acc = self.col_reduce(x, rows, out.len(), 0)?;
        self.add_f64(out, &acc, alpha, beta)
    }

    pub(crate) fn col_nonzero_counts(
        &self,
        x: &F32,
        rows: usize,
        out: &mut F32,
    ) -> Result<(), KernelError> {
        let acc = self.col_reduce(x, rows, out.len(), 1)?;
        self.add_f64(out, &acc, 1.0, 0.0)
    }

    /// `out[r] = ||x[r, :] - column means||_2`.
    pub(crate) fn centered_row_norms(
        &self,
        x: &F32,
        cols: usize,
        out: &mut F32,
    ) -> Result<(), KernelError> {
        let rows = out.len();
        let mut mean = self.zeros::<f32>(cols)?;
        if rows > 0 {
            self.col_sums(x, rows, &mut mean, 1.0 / rows as f32, 0.0)?;
        }
        let c = cols as i32;
        launch!(self, "centered_row_norms", per_row(rows, THREADS); x, &mean, &c, out)
    }

    // -----------------------------------------------------------------------------
    // Losses and their backwards

    /// `sum_r w[r] ||pred[r] - target[r]||^2`, writing `g = gscale * 2 w (pred - target)`
    /// when `g` is given.
    pub(crate) fn mse(
        &self,
        p: &F32,
        t: &F32,
        cols: usize,
        w: Option<&F32>,
        g: Option<(&mut F32, f32)>,
    ) -> Result<f64, KernelError> {
        let rows = p.len() / cols.max(1);
        let mut acc = self.zeros::<f64>(1)?;
        let c = cols as i32;
        let cfg = per_row(rows, THREADS);
        match (w, g) {
            (Some(w), Some((g, s))) => launch!(self, "mse_rows", cfg; p, t, w, &s, g, &c, &mut acc),
            (None, Some((g, s))) => {
                launch!(self, "mse_rows", cfg; p, t, &NULL, &s, g, &c, &mut acc)
            }
            (Some(w), None) => launch!(self, "mse_rows", cfg; p, t, w, &0f32, &NULL, &c, &mut acc),
            (None, None) => launch!(self, "mse_rows", cfg; p, t, &NULL, &0f32, &NULL, &c, &mut acc),
        }?;
        self.scalar(&acc)
    }

    pub(crate) fn weighted_sq_err(
        &self,
        p: &F32,
        t: &F32,
        w: &F32,
        g: Option<(&mut F32, f32)>,
    ) -> Result<f64, KernelError> {
        let mut acc = self.zeros::<f64>(1)?;
        let n = p.len() as i64;
        let cfg = grid_stride(n as usize);
        match g {
            Some((g, s)) => launch!(self, "weighted_sq_err", cfg; p, t, w, &s, g, &n, &mut acc),
            None => launch!(self, "weighted_sq_err", cfg; p, t, w, &0f32, &NULL, &n, &mut acc),
        }?;
        self.scalar(&acc)
    }

    /// JumpReLU backward (`ops::jumprelu_backward`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn jumprelu_backward(
        &self,
        h: &F32,
        t: &F32,
        df: &F32,
        bw: f32,
        ste_to_input: bool,
        dh: &mut F32,
        dt: &mut F32,
    ) -> Result<(), KernelError> {
        let cols = t.len();
        let rows = h.len() / cols.max(1);
        let mut acc = self.zeros::<f64>(cols)?;
        let (s, r, c) = (ste_to_input as i32, rows as i32, cols as i32);
        launch!(self, "jumprelu_backward", col_chunks(rows, cols); h, t, df, &bw, &s, dh, &mut acc, &r, &c)?;
        self.add_f64(dt, &acc, 1.0, 1.0)
    }

    /// Backward of the step `(h > t)` (`ops::step_backward`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step_backward(
        &self,
        h: &F32,
        t: &F32,
        g: &F32,
        bw: f32,
        ste_to_input: bool,
        dh: &mut F32,
        dt: &mut F32,
    ) -> Result<(), KernelError> {
        let (rows, cols) = (g.len(), t.len());
        let mut acc = self.zeros::<f64>(cols)?;
        let (s, r, c) = (ste_to_input as i32, rows as i32, cols as i32);
        launch!(self, "step_backward", col_chunks(rows, cols); h, t, g, &bw, &s, dh, &mut acc, &r, &c)?;
        self.add_f64(dt, &acc, 1.0, 1.0)
    }

    /// `ops::tanh_sparsity`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn tanh_sparsity(
        &self,
        f: &F32,
        n: &F32,
        s: f32,
        coef: f32,
        df: &mut F32,
        dn: &mut F32,
    ) -> Result<f64, KernelError> {
        let cols = n.len();
        let rows = f.len() / cols.max(1);
        let mut acc = self.zeros::<f64>(cols)?;
        let mut total = self.zeros::<f64>(1)?;
        let (r, c) = (rows as i32, cols as i32);
        launch!(self, "tanh_sparsity", col_chunks(rows, cols); f, n, &s, &coef, df, &mut acc, &mut total, &r, &c)?;
        self.add_f64(dn, &acc, 1.0, 1.0)?;
        self.scalar(&total)
    }

    /// `ops::lp_sparsity`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lp_sparsity(
        &self,
        f: &F32,
        cols: usize,
        n: Option<&F32>,
        p: f32,
        coef: f32,
        df: Option<&mut F32>,
        dn: Option<&mut F32>,
    ) -> Result<f64, KernelError> {
        let rows = f.len() / cols.max(1);
        let mut norms = self.zeros::<f64>(rows)?;
        let c = cols as i32;
        let cfg = per_row(rows, THREADS);
        match n {
            Some(n) => launch!(self, "lp_norms", cfg; f, n, &p, &c, &mut norms),
            None => launch!(self, "lp_norms", cfg; f, &NULL, &p, &c, &mut norms),
        }?;
        let total = self.download(&norms)?.iter().sum();
        let Some(df) = df else { return Ok(total) };
        // dn only makes sense with n (ops::lp_sparsity's contract).
        let mut acc = match (n, &dn) {
            (Some(_), Some(_)) => Some(self.zeros::<f64>(cols)?),
            _ => None,
        };
        let r = rows as i32;
        let cfg = col_chunks(rows, cols);
        match (n, acc.as_mut()) {
            (Some(n), Some(a)) => {
                launch!(self, "lp_backward", cfg; f, n, &norms, &p, &coef, df, a, &r, &c)
            }
            (Some(n), None) => {
                launch!(self, "lp_backward", cfg; f, n, &norms, &p, &coef, df, &NULL, &r, &c)
            }
            (None, _) => {
                launch!(self, "lp_backward", cfg; f, &NULL, &norms, &p, &coef, df, &NULL, &r, &c)
            }
        }?;
        if let (Some(a), Some(dn)) = (acc, dn) {
            self.add_f64(dn, &a, 1.0, 1.0)?;
        }
        Ok(total)
    }

    /// `ops::pre_act_loss`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pre_act_loss(
        &self,
        h: &F32,
        t: &F32,
        dead: &F32,
        n: &F32,
        coef: f32,
        dh: &mut F32,
        dt: &mut F32,
        dn: &mut F32,
    ) -> Result<f64, KernelError> {
        let cols = t.len();
        let rows = h.len() / cols.max(1);
        let mut at = self.zeros::<f64>(cols)?;
        let mut an = self.zeros::<f64>(cols)?;
        let mut total = self.zeros::<f64>(1)?;
        let (r, c) = (rows as i32, cols as i32);
        launch!(self, "pre_act_loss", col_chunks(rows, cols); h, t, dead, n, &coef, dh, &mut at, &mut an, &mut total, &r, &c)?;
        self.add_f64(dt, &at, 1.0, 1.0)?;
        self.add_f64(dn, &an, 1.0, 1.0)?;
        self.scalar(&total)
    }

    /// One torch Adam step (`step` from 1) with the gradient scaled by `clip`,
    /// bit-identical to the CPU backend's `ops::adam`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn adam(
        &self,
        p: &mut F32,
        g: &F32,
        m: &mut F32,
        v: &mut F32,
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
        launch!(self, "adam_step", grid_stride(n as usize);
            p, g, m, v, &n, &step_size, &w, &b2, &omb2, &eps, &bc2_sqrt, &clip)
    }

    // -----------------------------------------------------------------------------
    // Selection

    /// Top-`k` of each row of `x` `[rows, cols]` (only columns with `mask > 0` when
    /// given): CSR parts `(offsets, indices, values)` with k entries per row, columns
    /// ascending, as `ops::topk_rows`.
    pub(crate) fn topk_rows(
        &self,
        x: &F32,
        rows: usize,
        cols: usize,
        k: usize,
        mask: Option<&F32>,
    ) -> Result<(U32, U32, F32), KernelError> {
        if let Some(m) = mask {
            let allowed = self.download(m)?.iter().filter(|&&v| v > 0.0).count();
            assert!(allowed >= k, "top-k with k={k} of {allowed} candidates");
        }
        // Poisoned, so that an unwritten slot cannot pass for a chosen latent.
        let mut indices = self.upload(&vec![u32::MAX; rows * k])?;
        let mut values = self.upload(&vec![f32::NAN; rows * k])?;
        let offsets: Vec<u32> = (0..=rows).map(|r| (r * k) as u32).collect();
        if k > 0 {
            let (c, kk) = (cols as i32, k as i32);
            let cfg = per_row(rows, SCAN_THREADS);
            match mask {
                Some(m) => {
                    launch!(self, "topk_rows", cfg; x, &c, &kk, m, &mut indices, &mut values)
                }
                None => {
                    launch!(self, "topk_rows", cfg; x, &c, &kk, &NULL, &mut indices, &mut values)
                }
            }?;
        }
        Ok((self.upload(&offsets)?, indices, values))
    }

    /// The order key of the `total`-th largest value of `x` and how many values lie
    /// strictly above it, by four 8-bit histogram passes (`0 < total < x.len()`).
    fn kth_largest_key(&self, x: &F32, total: usize) -> Result<(u32, usize), KernelError> {
        let n = x.len() as i64;
        let (mut prefix, mut mask, mut need) = (0u32, 0u32, total as u64);
        for shift in [24i32, 16, 8, 0] {
            let mut hist = self.zeros::<u64>(256)?;
            launch!(self, "radix_hist", grid_stride(n as usize); x, &n, &prefix, &mask, &shift, &mut hist)?;
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
        Ok((prefix, total - need as usize))
    }

    /// The `total` largest positive entries of `x` `[rows, cols]` as CSR parts, ties
    /// at the cut taken in row-major order (`ops::batch_topk`).
    pub(crate) fn batch_topk(
        &self,
        x: &F32,
        rows: usize,
        cols: usize,
        total: usize,
    ) -> Result<(U32, U32, F32), KernelError> {
        // The CPU's select_threshold, including its edge cases.
        let (thr, n_above) = if total == 0 {
            (u32::MAX, 0)
        } else if total >= x.len() {
            (0, 0)
        } else {
            self.kth_largest_key(x, total)?
        };
        let mut above = self.zeros::<u32>(rows)?;
        let mut ties = self.zeros::<u32>(rows)?;
        let c = cols as i32;
        launch!(self, "batch_count", per_row(rows, THREADS); x, &c, &thr, &mut above, &mut ties)?;
        let (above, ties) = (self.download(&above)?, self.download(&ties)?);
        let mut ties_left = total.saturating_sub(n_above);
        let mut offsets = Vec::with_capacity(rows + 1);
        let mut take = Vec::with_capacity(rows);
        offsets.push(0u32);
        for (&a, &t) in above.iter().zip(&ties) {
            let t = (t as usize).min(ties_left);
            ties_left -= t;
            take.push(t as u32);
            offsets.push(offsets.last().unwrap() + a + t as u32);
        }
        let nnz = *offsets.last().unwrap() as usize;
        let off = self.upload(&offsets)?;
        let take = self.upload(&take)?;
        let mut idx = self.zeros::<u32>(nnz)?;
        let mut val = self.zeros::<f32>(nnz)?;
        launch!(self, "batch_write", per_row(rows, SCAN_THREADS); x, &c, &thr, &off, &take, &mut idx, &mut val)?;
        Ok((off, idx, val))
    }

    // -----------------------------------------------------------------------------
    // Sparse (CSR) ops: `off` has rows + 1 entries.

    pub(crate) fn csr_to_dense(
        &self,
        (off, idx, val): (&U32, &U32, &F32),
        cols: usize,
        out: &mut F32,
    ) -> Result<(), KernelError> {
        self.memset0(out)?;
        let c = cols as i32;
        launch!(self, "csr_to_dense", per_row(off.len() - 1, THREADS); off, idx, val, &c, out)
    }

    pub(crate) fn csr_gather(
        &self,
        (off, idx): (&U32, &U32),
        dense: &F32,
        cols: usize,
        out: &mut F32,
    ) -> Result<(), KernelError> {
        let c = cols as i32;
        launch!(self, "csr_gather", per_row(off.len() - 1, THREADS); off, idx, dense, &c, out)
    }

    pub(crate) fn csr_scatter_add(
        &self,
        (off, idx, val): (&U32, &U32, &F32),
        cols: usize,
        dense: &mut F32,
    ) -> Result<(), KernelError> {
        let c = cols as i32;
        launch!(self, "csr_scatter_add", per_row(off.len() - 1, THREADS); off, idx, val, &c, dense)
    }

    /// `out = beta * out + alpha * a @ w`, `w` `[a.cols, d]` (the sparse decode).
    pub(crate) fn csr_matmul(
        &self,
        out: &mut F32,
        (off, idx, val): (&U32, &U32, &F32),
        w: &F32,
        d: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<(), KernelError> {
        let di = d as i32;
        launch!(self, "csr_matmul", per_row(off.len() - 1, THREADS); off, idx, val, w, &di, &alpha, &beta, out)
    }

    /// `out[e] = x[r] . w[j]` for each stored `(r, j)`.
    pub(crate) fn csr_sampled_dot(
        &self,
        (off, idx): (&U32, &U32),
        x: &F32,
        w: &F32,
        d: usize,
        out: &mut F32,
    ) -> Result<(), KernelError> {
        let di = d as i32;
        launch!(self, "csr_sampled_dot", per_row(off.len() - 1, THREADS); off, idx, x, w, &di, out)
    }

    /// `out = beta * out + alpha * a^T @ x`, `out` `[m, d]` or `[d, m]` when
    /// `transposed` (the weight gradients), through `a`'s CSC form: no atomics on
    /// `out`, each element written once.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn csr_t_matmul(
        &self,
        out: &mut F32,
        (off, idx, val): (&U32, &U32, &F32),
        m: usize,
        x: &F32,
        d: usize,
        transposed: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<(), KernelError> {
        let (rows, nnz) = (off.len() - 1, idx.len());
        let mut counts = self.zeros::<u32>(m)?;
        let n = nnz as i64;
        launch!(self, "csr_col_count", grid_stride(nnz); idx, &n, &mut counts)?;
        let mut col_off = self.zeros::<u32>(m + 1)?;
        let mi = m as i32;
        launch!(self, "exclusive_scan_u32", per_row(1, SCAN_THREADS); &counts, &mut col_off, &mi)?;
        let mut cursor = self.zeros::<u32>(m)?;
        let mut csc_row = self.zeros::<u32>(nnz)?;
        let mut csc_val = self.zeros::<f32>(nnz)?;
        launch!(self, "csr_to_csc", per_row(rows, THREADS);
            off, idx, val, &col_off, &mut cursor, &mut csc_row, &mut csc_val)?;
        let (di, t) = (d as i32, transposed as i32);
        launch!(self, "csc_t_matmul", per_row(m, THREADS);
            &col_off, &csc_row, &csc_val, x, &di, &mi, &t, &alpha, &beta, out)
    }

    /// `out[j] = beta * out[j] + alpha * sum of column j's values` (times `other`'s).
    pub(crate) fn csr_col_dot(
        &self,
        (idx, val): (&U32, &F32),
        other: Option<&F32>,
        out: &mut F32,
        alpha: f32,
        beta: f32,
    ) -> Result<(), KernelError> {
        if beta != 1.0 {
            self.scale(out, beta)?;
        }
        let nnz = idx.len() as i64;
        let cfg = grid_stride(nnz as usize);
        match other {
            Some(o) => launch!(self, "csr_col_dot", cfg; idx, val, o, &nnz, &alpha, out),
            None => launch!(self, "csr_col_dot", cfg; idx, val, &NULL, &nnz, &alpha, out),
        }
    }

    pub(crate) fn csr_scale_cols(
        &self,
        idx: &U32,
        val: &mut F32,
        v: &F32,
    ) -> Result<(), KernelError> {
        let nnz = idx.len() as i64;
        launch!(self, "csr_scale_cols", grid_stride(nnz as usize); idx, val, v, &nnz)
    }

    pub(crate) fn csr_col_nonzero_counts(
        &self,
        (idx, val): (&U32, &F32),
        out: &mut F32,
    ) -> Result<(), KernelError> {
        self.memset0(out)?;
        let nnz = idx.len() as i64;
        launch!(self, "csr_col_nnz", grid_stride(nnz as usize); idx, val, &nnz, out)
    }

    pub(crate) fn csr_row_nonzero_counts(
        &self,
        (off, val): (&U32, &F32),
        out: &mut F32,
    ) -> Result<(), KernelError> {
        let rows = out.len() as i64;
        launch!(self, "csr_row_nnz", grid_stride(rows as usize); off, val, &rows, out)
    }
}
