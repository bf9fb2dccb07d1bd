//! Quantized weight matrices and the `q_matmul` backend extension: the model's one linear-layer operation.
//!
//! A [`QMatrix`] is a view of a GGUF tensor's blocks (no copy, no dequantization). `x · Wᵀ` goes through burn's
//! backend-extension mechanism: on the CPU backend (`flex`) it runs the integer SIMD kernels of [`crate::quant`]
//! on the tensor's own buffer. Devices without such kernels (WebGPU) get the matrix dequantized once into device
//! memory when the model loads ([`Weight`]) and use the backend's float matmul. The model code calls [`q_linear`]
//! and never knows which ran.

use std::sync::Arc;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DispatchDevice, backend_extension};
use burn::tensor::{Device, Tensor, TensorData};

use crate::gguf::{Gguf, GgufError, TensorInfo};
use crate::quant::{self, GgmlType, Precision};

/// A 2-D weight `[rows, cols]` (GGML `dims = [cols, rows]`), kept in its GGUF blocks.
#[derive(Clone)]
pub struct QMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    buf: Arc<dyn AsRef<[u8]> + Send + Sync>,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, [{}, {}])", self.ty, self.rows, self.cols)
    }
}

impl QMatrix {
    /// The tensor `name` of `g` as a matrix, checking its type is one the kernels support.
    pub fn from_gguf(g: &Gguf, name: &str) -> Result<Self, GgufError> {
        let t = g.tensor(name)?;
        Self::from_info(g, t)
    }

    fn from_info(g: &Gguf, t: &TensorInfo) -> Result<Self, GgufError> {
        let bad = |problem: String| GgufError::BadTensor {
            name: t.name.clone(),
            problem,
        };
        if !t.ty.is_supported() {
            return Err(bad(format!(
                "type {:?} is not supported by tandem's kernels",
                t.ty
            )));
        }
        let (cols, rows) = match t.dims[..] {
            [c] => (c, 1),
            [c, r] => (c, r),
            _ => {
                return Err(bad(format!(
                    "expected a matrix, found dimensions {:?}",
                    t.dims
                )));
            }
        };
        Ok(QMatrix {
            ty: t.ty,
            rows: rows as usize,
            cols: cols as usize,
            buf: g.buffer(),
            offset: t.offset as usize,
            len: t.size as usize,
        })
    }

    /// The raw blocks.
    pub fn bytes(&self) -> &[u8] {
        &(*self.buf).as_ref()[self.offset..self.offset + self.len]
    }

    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols)
    }

    /// Rows `ids` dequantized to f32, `[ids.len(), cols]` row-major (embedding lookup).
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let rb = self.row_bytes();
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &id) in out.chunks_exact_mut(self.cols).zip(ids) {
            let r = id as usize;
            quant::dequantize_row(self.ty, &self.bytes()[r * rb..(r + 1) * rb], o);
        }
        out
    }

    /// The same matrix in the blocks this CPU's kernels would rather read ([`quant::repack`]), if they differ.
    fn for_kernels(self) -> QMatrix {
        match quant::repack::for_kernels(self.ty, self.bytes(), self.cols) {
            Some((ty, blocks)) => QMatrix {
                ty,
                offset: 0,
                len: blocks.len(),
                buf: Arc::new(blocks),
                ..self
            },
            None => self,
        }
    }

    /// The whole matrix as f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let ids: Vec<u32> = (0..self.rows as u32).collect();
        self.dequantize_rows(&ids)
    }

    /// A 1-D weight (norm gains, biases) as a float tensor.
    pub fn to_vector(&self, device: &burn::tensor::Device) -> Tensor<1> {
        let v = self.dequantize();
        Tensor::from_data(TensorData::new(v, [self.rows * self.cols]), device)
    }
}

/// Whether `device` multiplies by quantized blocks directly (the CPU backend); others get dense weights.
pub fn has_quantized_kernels(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    return matches!(device.as_dispatch(), DispatchDevice::Flex(_));
    #[cfg(not(feature = "flex"))]
    return false;
}

/// A linear layer's weight as its device multiplies by it: the GGUF blocks, and on a device without quantized
/// kernels also the matrix dequantized once into device memory (`q_matmul`'s default body would dequantize and
/// upload it on every call).
#[derive(Clone, Debug)]
pub struct Weight {
    pub q: QMatrix,
    /// `W` as f32 `[rows, cols]` on the device, where it has no quantized kernels.
    dense: Option<Tensor<2>>,
}

impl Weight {
    pub fn new(q: QMatrix, device: &Device) -> Self {
        if has_quantized_kernels(device) {
            return Weight {
                q: q.for_kernels(),
                dense: None,
            };
        }
        let dense = Tensor::from_data(TensorData::new(q.dequantize(), [q.rows, q.cols]), device);
        Weight {
            q,
            dense: Some(dense),
        }
    }
}

/// Backend extension: `x · Wᵀ` with `W` quantized.
#[backend_extension(Flex: cfg(feature = "flex"), Cube: cfg(feature = "webgpu"))]
pub trait QuantOps: Backend {
    /// `x: [n, cols]` times the transpose of `w: [rows, cols]`, giving `[n, rows]`.
    ///
    /// The default body dequantizes `w` on the host and uses the backend's float matmul.
    fn q_matmul(x: FloatTensor<Self>, w: QMatrix, precision: Precision) -> FloatTensor<Self> {
        let _ = precision; // dequantized weights: the float matmul is exact either way
        let device = burn::backend::TensorMetadata::device(&x);
        let wt = Self::float_from_data(TensorData::new(w.dequantize(), [w.rows, w.cols]), &device);
        Self::float_matmul(x, Self::float_transpose(wt))
    }
}

#[cfg(feature = "flex")]
impl QuantOps for burn::backend::Flex {
    fn q_matmul(x: FloatTensor<Self>, w: QMatrix, precision: Precision) -> FloatTensor<Self> {
        let x = if x.is_contiguous() {
            x
        } else {
            x.to_contiguous()
        };
        let dims = x.layout().shape().clone();
        let n = dims[0];
        assert_eq!(
            dims[1], w.cols,
            "q_matmul: input width {} does not match weight width {}",
            dims[1], w.cols
        );
        let xs = x
            .as_slice::<f32>()
            .expect("q_matmul: input must be contiguous f32");
        let mut out = vec![0f32; n * w.rows];
        quant::matmul(w.ty, w.bytes(), w.rows, w.cols, xs, &mut out, precision);
        burn::backend::flex::FlexTensor::from_data(TensorData::new(out, [n, w.rows]))
    }
}

#[cfg(feature = "webgpu")]
impl QuantOps for burn::backend::Cube {}

/// `x · Wᵀ (+ bias)` for `x: [n, cols]`.
pub fn q_linear(
    x: Tensor<2>,
    w: &Weight,
    bias: Option<&Tensor<1>>,
    precision: Precision,
) -> Tensor<2> {
    use burn::backend::Dispatch;
    let y = match &w.dense {
        Some(dense) => x.matmul(dense.clone().transpose()),
        None => Tensor::<2>::from_dispatch(<Dispatch as QuantOps>::q_matmul(
            x.into_dispatch(),
            w.q.clone(),
            precision,
        )),
    };
    match bias {
        Some(b) => y + b.clone().unsqueeze_dim(0),
        None => y,
    }
}
