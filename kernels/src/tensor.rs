use crate::{Device, KernelError};

/// Backing memory of a buffer. One variant per backend.
#[derive(Clone, Debug)]
pub(crate) enum Storage<T> {
    Cpu(Vec<T>),
}

impl<T> Storage<T> {
    pub(crate) fn cpu(&self) -> &[T] {
        match self {
            Storage::Cpu(v) => v,
        }
    }
    pub(crate) fn cpu_mut(&mut self) -> &mut Vec<T> {
        match self {
            Storage::Cpu(v) => v,
        }
    }
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
        match device {
            Device::Cpu => Tensor {
                shape: shape.to_vec(),
                data: Storage::Cpu(vec![value; n]),
            },
        }
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
        match device {
            Device::Cpu => Ok(Tensor {
                shape: shape.to_vec(),
                data: Storage::Cpu(data),
            }),
        }
    }

    /// Copies the values to the host, row-major.
    pub fn to_vec(&self) -> Vec<f32> {
        self.data.cpu().to_vec()
    }

    /// The single value of a 1-element tensor.
    pub fn item(&self) -> f32 {
        assert_eq!(
            self.numel(),
            1,
            "item() on a tensor of shape {:?}",
            self.shape
        );
        self.data.cpu()[0]
    }

    pub fn device(&self) -> Device {
        match self.data {
            Storage::Cpu(_) => Device::Cpu,
        }
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
        let n = shape.iter().product();
        self.data.cpu_mut().resize(n, 0.0);
        self.shape = shape.to_vec();
    }

    pub(crate) fn cpu(&self) -> &[f32] {
        self.data.cpu()
    }

    pub(crate) fn cpu_mut(&mut self) -> &mut [f32] {
        self.data.cpu_mut()
    }
}
