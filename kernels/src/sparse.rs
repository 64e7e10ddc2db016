use crate::tensor::Storage;
use crate::{Device, Tensor};

/// Compressed sparse rows: the active latents of each token.
///
/// Row `r` holds `indices[offsets[r]..offsets[r+1]]` (column ids, ascending) and the
/// matching `values`. Top-k and batch-top-k selections produce this, and the sparse
/// decode and backward ops consume it, so the `[n_tokens, d_sae]` dense activation
/// matrix never has to exist.
#[derive(Clone, Debug)]
pub struct Csr {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) offsets: Storage<u32>,
    pub(crate) indices: Storage<u32>,
    pub(crate) values: Tensor,
}

impl Csr {
    /// An empty `[0, 0]` matrix whose buffers grow on first use.
    pub fn empty(device: &Device) -> Csr {
        Csr {
            rows: 0,
            cols: 0,
            offsets: Storage::from_vec(device, vec![0]),
            indices: Storage::from_vec(device, Vec::new()),
            values: Tensor::zeros(device, &[0]),
        }
    }

    /// Builds a CSR matrix from host parts (for tests and loading).
    pub fn from_parts(
        device: &Device,
        rows: usize,
        cols: usize,
        offsets: Vec<u32>,
        indices: Vec<u32>,
        values: Vec<f32>,
    ) -> Csr {
        assert_eq!(offsets.len(), rows + 1, "offsets must have rows+1 entries");
        assert_eq!(indices.len(), values.len(), "one value per index");
        assert_eq!(*offsets.last().unwrap() as usize, indices.len());
        assert!(
            indices.iter().all(|&j| (j as usize) < cols),
            "column out of range"
        );
        let nnz = values.len();
        Csr {
            rows,
            cols,
            offsets: Storage::from_vec(device, offsets),
            indices: Storage::from_vec(device, indices),
            values: Tensor::from_vec(device, &[nnz], values).expect("length checked"),
        }
    }

    /// Sets the shape and hands out the host buffers for a CPU kernel to fill; call
    /// [`Csr::fit_values`] after.
    pub(crate) fn fill_cpu(&mut self, rows: usize, cols: usize) -> crate::cpu::CsrBufs<'_> {
        (self.rows, self.cols) = (rows, cols);
        crate::cpu::CsrBufs {
            offsets: self.offsets.cpu_mut(),
            indices: self.indices.cpu_mut(),
            values: self.values.data.cpu_mut(),
        }
    }

    /// The values' shape after their buffer was filled: `[nnz]`.
    pub(crate) fn fit_values(&mut self) {
        let nnz = self.indices.cpu().len();
        self.values.resize(&[nnz]);
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.values.numel()
    }
    /// The stored values, `[nnz]`, in row order.
    pub fn values(&self) -> &Tensor {
        &self.values
    }
    pub fn values_mut(&mut self) -> &mut Tensor {
        &mut self.values
    }
    pub fn offsets_to_vec(&self) -> Vec<u32> {
        self.offsets.to_vec()
    }
    pub fn indices_to_vec(&self) -> Vec<u32> {
        self.indices.to_vec()
    }
    pub fn device(&self) -> Device {
        self.values.device()
    }
    /// A copy on `device`.
    pub fn to_device(&self, device: &Device) -> Csr {
        Csr::from_parts(
            device,
            self.rows,
            self.cols,
            self.offsets_to_vec(),
            self.indices_to_vec(),
            self.values.to_vec(),
        )
    }
    /// A matrix with the same sparsity pattern and zero values.
    pub fn zeros_like(&self) -> Csr {
        let mut c = self.clone();
        crate::ops::fill(&mut c.values, 0.0);
        c
    }
}

#[cfg(feature = "cuda")]
impl Csr {
    /// Device `(offsets, indices, values)`.
    pub(crate) fn cu(
        &self,
    ) -> (
        &cudarc::driver::CudaSlice<u32>,
        &cudarc::driver::CudaSlice<u32>,
        &cudarc::driver::CudaSlice<f32>,
    ) {
        (self.offsets.cu(), self.indices.cu(), self.values.cu())
    }

    /// Replaces the contents with device parts from `g`.
    pub(crate) fn set_cu(
        &mut self,
        g: &'static crate::cuda::Cuda,
        (rows, cols): (usize, usize),
        (off, idx, val): (
            cudarc::driver::CudaSlice<u32>,
            cudarc::driver::CudaSlice<u32>,
            cudarc::driver::CudaSlice<f32>,
        ),
    ) {
        self.rows = rows;
        self.cols = cols;
        self.offsets.set_cu(g, off);
        self.indices.set_cu(g, idx);
        self.values = Tensor::from_cu(g, &[val.len()], val);
    }
}
