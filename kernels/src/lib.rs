//! The numeric core shared by every model: row-major `f32` tensors, a sparse row
//! format for top-k activations, and the ops the SAE math is written in.
//!
//! Callers only use [`Tensor`], [`Csr`], [`Device`] and the functions in [`ops`];
//! they never touch a backend directly. Two backends: the CPU (the `gemm` crate for
//! matrix products, rayon for everything else) and, with the `cuda` feature, CUDA
//! (cuBLAS and our kernels, [`cuda`]). A tensor's storage says where it lives and each
//! op dispatches on it, so model code is the same for both.
//!
//! Conventions: every matrix is row-major `[rows, cols]`; a vector is 1-D `[n]`.
//! Shape mismatches are programming errors and panic with the shapes involved.

mod align;
mod cpu;
mod cpu_lm;
mod cpu_sparse;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod ops;
mod sparse;
mod tensor;

pub use sparse::Csr;
pub use tensor::Tensor;

use std::fmt;

/// Every program that links the kernels allocates large blocks on cache lines, so
/// that tensors' rows (and the ops' scratch) load whole lines ([`align`]).
#[global_allocator]
static ALLOCATOR: align::Aligned = align::Aligned;

/// Errors a caller can act on (device selection, bad data from outside).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("device '{0}' is not known: expected 'cpu', 'cuda' or 'cuda:N'")]
    UnknownDevice(String),
    #[error("device '{0}' needs CUDA, but this binary was built without the `cuda` feature (rebuild with `--features cuda`)")]
    NotBuiltWithCuda(String),
    /// A CUDA library, device or launch failed (feature `cuda`).
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("tensor data has {got} values but shape {shape:?} needs {want}")]
    ShapeData {
        shape: Vec<usize>,
        want: usize,
        got: usize,
    },
}

/// Where tensors live and ops run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// GPU `N`. Only [`Device::parse`] of a build with the `cuda` feature makes one.
    Cuda(usize),
}

impl Device {
    /// Parses SAELens-style device strings: `cpu`, `cuda`, `cuda:N`.
    pub fn parse(s: &str) -> Result<Device, KernelError> {
        let s = s.trim();
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        let is_cuda = s == "cuda"
            || s.strip_prefix("cuda:")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !is_cuda {
            return Err(KernelError::UnknownDevice(s.to_string()));
        }
        #[cfg(feature = "cuda")]
        {
            let ordinal = s
                .strip_prefix("cuda:")
                .map_or(0, |n| n.parse().unwrap_or(0));
            // Opens the device and compiles the kernels now, so that a missing driver,
            // device, cuBLAS or NVRTC is reported here rather than by the first op.
            cuda::backend(ordinal).map_err(|e| match e {
                KernelError::Cuda(m) => KernelError::Cuda(format!("{s}: {m}")),
                e => e,
            })?;
            Ok(Device::Cuda(ordinal))
        }
        #[cfg(not(feature = "cuda"))]
        Err(KernelError::NotBuiltWithCuda(s.to_string()))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Waits until every op queued on `device` has finished. CUDA ops return as soon as
/// they are queued, so timings must wait; on the CPU there is nothing to wait for.
pub fn synchronize(device: &Device) -> Result<(), KernelError> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(o) => cuda::backend(*o)?
            .stream
            .synchronize()
            .map_err(|e| KernelError::Cuda(e.to_string())),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(o) => Err(KernelError::NotBuiltWithCuda(format!("cuda:{o}"))),
    }
}

/// Sets the number of CPU threads used by every op (call once, before the first op).
/// Returns an error string if the global pool was already started.
pub fn set_num_threads(n: usize) -> Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| e.to_string())
}

/// Number of CPU threads the ops use.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        // Without the feature, CUDA names the feature (with it, tests/cuda.rs checks).
        #[cfg(not(feature = "cuda"))]
        for d in ["cuda:0", "cuda"] {
            assert!(matches!(
                Device::parse(d),
                Err(KernelError::NotBuiltWithCuda(_))
            ));
        }
        assert!(matches!(
            Device::parse("tpu"),
            Err(KernelError::UnknownDevice(_))
        ));
        assert!(matches!(
            Device::parse("cuda:x"),
            Err(KernelError::UnknownDevice(_))
        ));
    }
}
