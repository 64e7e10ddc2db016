use crate::{Device, KernelError};

/// Backing memory of a buffer. One variant per backend.
#[derive(Debug)]
pub(crate) enum Storage<T> {
    Cpu(Vec<T>),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::Buf<T>),
}

/// Element types of a [`Storage`] (`f32` values, `u32` sparse indices).
#[cfg(feature = "cuda")]
pub(crate) trait Elem:
    Clone + Default + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits
{
}
#[cfg(not(feature = "cuda"))]
pub(crate) trait Elem: Clone + Default {}
impl Elem for f32 {}
impl Elem for u32 {}

impl<T: Elem> Clone for Storage<T> {
    fn clone(&self) -> Self {
        match self {
            Storage::Cpu(v) => Storage::Cpu(v.clone()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Storage::Cuda(b.clone()),
        }
    }
}

impl<T: Elem> Storage<T> {
    /// `n` zeros (or default values) on `device`.
    pub(crate) fn zeros(device: &Device, n: usize) -> Storage<T> {
        match device {
            Device::Cpu => Storage::Cpu(vec![T::default(); n]),
            #[cfg(feature = "cuda")]
            Device::Cuda(o) => cuda_storage(*o, |g| g.zeros(n)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => not_built(),
        }
    }

    /// Host data moved onto `device`.
    pub(crate) fn from_vec(device: &Device, v: Vec<T>) -> Storage<T> {
        match device {
            Device::Cpu => Storage::Cpu(v),
            #[cfg(feature = "cuda")]
            Device::Cuda(o) => cuda_storage(*o, |g| g.upload(&v)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => not_built(),
        }
    }

    pub(crate) fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Device::Cuda(b.g.ordinal),
        }
    }

    /// A host copy.
    pub(crate) fn to_vec(&self) -> Vec<T> {
        match self {
            Storage::Cpu(v) => v.clone(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => crate::cuda::check(b.g.download(&b.s)),
        }
    }

    /// Makes the buffer hold `n` values; contents are unspecified afterwards.
    pub(crate) fn resize(&mut self, n: usize) {
        match self {
            Storage::Cpu(v) => v.resize(n, T::default()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => {
                if b.s.len() != n {
                    b.s = crate::cuda::check(b.g.zeros(n));
                }
            }
        }
    }

    /// The host values. An op without a CUDA form that is handed a device tensor
    /// stops here with a message naming the device.
    pub(crate) fn cpu(&self) -> &[T] {
        match self {
            Storage::Cpu(v) => v,
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => cpu_only(b.g.ordinal),
        }
    }

    pub(crate) fn cpu_mut(&mut self) -> &mut Vec<T> {
        match self {
            Storage::Cpu(v) => v,
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => cpu_only(b.g.ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn cpu_only(ordinal: usize) -> ! {
    panic!("this op runs on the CPU only, but its tensor is on cuda:{ordinal}")
}

#[cfg(feature = "cuda")]
fn cuda_storage<T>(
    ordinal: usize,
    make: impl FnOnce(&'static crate::cuda::Cuda) -> Result<cudarc::driver::CudaSlice<T>, KernelError>,
) -> Storage<T> {
    use crate::cuda::{backend, check, Buf};
    let g = check(backend(ordinal));
    Storage::Cuda(Buf {
        g,
        s: check(make(g)),
    })
}

#[cfg(not(feature = "cuda"))]
fn not_built() -> ! {
    // Device::parse never yields Device::Cuda without the feature.
    panic!("{}", KernelError::NotBuiltWithCuda("cuda".into()))
}

#[cfg(feature = "cuda")]
impl<T> Storage<T> {
    /// The backend of a device buffer, `None` on the CPU.
    pub(crate) fn gpu(&self) -> Option<&'static crate::cuda::Cuda> {
        match self {
            Storage::Cuda(b) => Some(b.g),
            Storage::Cpu(_) => None,
        }
    }

    pub(crate) fn cu(&self) -> &cudarc::driver::CudaSlice<T> {
        match self {
            Storage::Cuda(b) => &b.s,
            Storage::Cpu(_) => mixed(),
        }
    }

    pub(crate) fn cu_mut(&mut self) -> &mut cudarc::driver::CudaSlice<T> {
        match self {
            Storage::Cuda(b) => &mut b.s,
            Storage::Cpu(_) => mixed(),
        }
    }

    /// Replaces the contents with a device buffer of the same backend.
    pub(crate) fn set_cu(
        &mut self,
        g: &'static crate::cuda::Cuda,
        s: cudarc::driver::CudaSlice<T>,
    ) {
        *self = Storage::Cuda(crate::cuda::Buf { g, s });
    }
}

#[cfg(feature = "cuda")]
fn mixed() -> ! {
    panic!("an op was given tensors on different devices (cpu and cuda)")
}

/// A dense row-major `f32` tensor of rank 0, 1 or 2 (`[]`, `[n]`, `[rows, cols]`).
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    pub(crate) data: Storage<f32>,
}

impl Tensor {
    /// A zero tensor. Allocates `shape.product()` floats.
    pub fn zeros(device: &Device, shape: &[usize]) -> Tensor {
        Self::full(device, shape, 0.0)
    }

    /// A tensor filled with `value`.
    pub fn full(device: &Device, shape: &[usize], value: f32) -> Tensor {
        assert!(shape.len() <= 2, "tensors are at most 2-D, got {shape:?}");
        let n = shape.iter().product();
        let mut t = Tensor {
            shape: shape.to_vec(),
            data: Storage::zeros(device, n),
        };
        if value != 0.0 {
            crate::ops::fill(&mut t, value);
        }
        t
    }

    /// Moves host data onto `device` with the given shape.
    pub fn from_vec(
        device: &Device,
        shape: &[usize],
        data: Vec<f32>,
    ) -> Result<Tensor, KernelError> {
        let want: usize = shape.iter().product();
        if data.len() != want || shape.len() > 2 {
            return Err(KernelError::ShapeData {
                shape: shape.to_vec(),
                want,
                got: data.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data: Storage::from_vec(device, data),
        })
    }

    /// Copies the values to the host, row-major.
    pub fn to_vec(&self) -> Vec<f32> {
        self.data.to_vec()
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: &Device) -> Tensor {
        Tensor::from_vec(device, &self.shape, self.to_vec()).expect("same shape")
    }

    /// The single value of a 1-element tensor.
    pub fn item(&self) -> f32 {
        assert_eq!(
            self.numel(),
            1,
            "item() on a tensor of shape {:?}",
            self.shape
        );
        self.data.to_vec()[0]
    }

    pub fn device(&self) -> Device {
        self.data.device()
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows of a matrix; 1 for a vector or scalar.
    pub fn rows(&self) -> usize {
        if self.shape.len() == 2 {
            self.shape[0]
        } else {
            1
        }
    }

    /// Columns of a matrix, length of a vector, 1 for a scalar.
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            self.numel(),
            "cannot reshape {:?} to {shape:?}",
            self.shape
        );
        assert!(shape.len() <= 2, "tensors are at most 2-D, got {shape:?}");
        self.shape = shape.to_vec();
        self
    }

    /// Resizes to `shape`, keeping the allocation when it is large enough.
    /// The contents are unspecified afterwards (callers overwrite them).
    pub fn resize(&mut self, shape: &[usize]) {
        assert!(shape.len() <= 2, "tensors are at most 2-D, got {shape:?}");
        self.data.resize(shape.iter().product());
        self.shape = shape.to_vec();
    }

    pub(crate) fn cpu(&self) -> &[f32] {
        self.data.cpu()
    }

    pub(crate) fn cpu_mut(&mut self) -> &mut [f32] {
        self.data.cpu_mut()
    }
}

#[cfg(feature = "cuda")]
impl Tensor {
    /// A tensor over a device buffer of `g`.
    pub(crate) fn from_cu(
        g: &'static crate::cuda::Cuda,
        shape: &[usize],
        s: cudarc::driver::CudaSlice<f32>,
    ) -> Tensor {
        assert_eq!(
            s.len(),
            shape.iter().product::<usize>(),
            "device buffer length"
        );
        Tensor {
            shape: shape.to_vec(),
            data: Storage::Cuda(crate::cuda::Buf { g, s }),
        }
    }

    pub(crate) fn gpu(&self) -> Option<&'static crate::cuda::Cuda> {
        self.data.gpu()
    }

    pub(crate) fn cu(&self) -> &cudarc::driver::CudaSlice<f32> {
        self.data.cu()
    }

    pub(crate) fn cu_mut(&mut self) -> &mut cudarc::driver::CudaSlice<f32> {
        self.data.cu_mut()
    }
}
