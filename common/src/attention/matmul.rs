//! Attention's two batched mat-muls as a backend extension. On WebAssembly's CPU backend they run here, as dot
//! products in explicit f32 lanes and row updates, which compile to simd128: burn's CPU mat-mul (the `gemm` crate)
//! has no WebAssembly SIMD kernels, and its scalar ones took about as long as the quantized weights' mat-vecs once
//! a context reached a few hundred tokens. Everywhere else the backend's own mat-mul runs.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};
use burn::tensor::Tensor;

#[backend_extension(Flex: cfg(feature = "flex"), Cube: cfg(feature = "webgpu"))]
pub trait AttentionOps: Backend {
    /// `a: [h, m, d]` times the transpose of `b: [h, n, d]`, giving `[h, m, n]` (queries · keysᵀ).
    fn matmul_nt(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(a, Self::float_swap_dims(b, 1, 2))
    }

    /// `a: [h, m, n]` times `b: [h, n, d]`, giving `[h, m, d]` (weights · values).
    fn matmul_nn(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(a, b)
    }
}

#[cfg(feature = "flex")]
impl AttentionOps for burn::backend::Flex {
    #[cfg(target_arch = "wasm32")]
    fn matmul_nt(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, [h, m, d]) = Heads::of(a);
        let (y, [hb, n, db]) = Heads::of(b);
        assert!(
            h == hb && d == db,
            "matmul_nt: [{h}, {m}, {d}] · [{hb}, {n}, {db}]ᵀ"
        );
        let mut out = vec![0f32; h * m * n];
        for (head, out) in out.chunks_exact_mut(m * n).enumerate() {
            let (x, y) = (x.head(head, m * d), y.head(head, n * d));
            for (row, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(n)) {
                for (o, key) in out.iter_mut().zip(y.chunks_exact(d)) {
                    *o = crate::quant::dot_f32(row, key);
                }
            }
        }
        tensor(out, [h, m, n])
    }

    #[cfg(target_arch = "wasm32")]
    fn matmul_nn(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, [h, m, n]) = Heads::of(a);
        let (y, [hb, nb, d]) = Heads::of(b);
        assert!(
            h == hb && n == nb,
            "matmul_nn: [{h}, {m}, {n}] · [{hb}, {nb}, {d}]"
        );
        let mut out = vec![0f32; h * m * d];
        for (head, out) in out.chunks_exact_mut(m * d).enumerate() {
            let (x, y) = (x.head(head, m * n), y.head(head, n * d));
            for (weights, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(d)) {
                for (&w, value) in weights.iter().zip(y.chunks_exact(d)) {
                    for (o, v) in out.iter_mut().zip(value) {
                        *o += w * v;
                    }
                }
            }
        }
        tensor(out, [h, m, d])
    }
}

#[cfg(feature = "webgpu")]
impl AttentionOps for burn::backend::Cube {}

#[cfg(all(feature = "flex", target_arch = "wasm32"))]
type FlexTensor = burn::backend::flex::FlexTensor;

/// A `[h, rows, cols]` tensor read head by head: each head's rows contiguous, heads `stride` apart from `offset` in
/// the buffer. KV buffers' views (`DeviceKv::k`, a prefix of a longer buffer) are read in place; other layouts are
/// made contiguous first.
#[cfg(all(feature = "flex", target_arch = "wasm32"))]
struct Heads {
    t: FlexTensor,
    offset: usize,
    stride: usize,
}

#[cfg(all(feature = "flex", target_arch = "wasm32"))]
impl Heads {
    fn of(t: FlexTensor) -> (Self, [usize; 3]) {
        let s = t.layout().shape();
        let dims = [s[0], s[1], s[2]];
        let st = t.layout().strides();
        let rows_contiguous = st[2] == 1 && st[1] == dims[2] as isize && st[0] >= 0;
        let t = if rows_contiguous {
            t
        } else {
            t.to_contiguous()
        };
        let (offset, stride) = (t.layout().start_offset(), t.layout().strides()[0] as usize);
        (Heads { t, offset, stride }, dims)
    }

    /// Head `i`'s `len` values.
    fn head(&self, i: usize, len: usize) -> &[f32] {
        if len == 0 {
            return &[];
        }
        &self.t.storage::<f32>()[self.offset + i * self.stride..][..len]
    }
}

#[cfg(all(feature = "flex", target_arch = "wasm32"))]
fn tensor(values: Vec<f32>, shape: [usize; 3]) -> FlexTensor {
    FlexTensor::from_data(burn::tensor::TensorData::new(values, shape))
}

/// `q: [h, m, d] · kᵀ` for `k: [h, n, d]`.
pub fn matmul_nt(q: Tensor<3>, k: Tensor<3>) -> Tensor<3> {
    use burn::backend::Dispatch;
    Tensor::from_dispatch(<Dispatch as AttentionOps>::matmul_nt(
        q.into_dispatch(),
        k.into_dispatch(),
    ))
}

/// `p: [h, m, n] · v` for `v: [h, n, d]`.
pub fn matmul_nn(p: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
    use burn::backend::Dispatch;
    Tensor::from_dispatch(<Dispatch as AttentionOps>::matmul_nn(
        p.into_dispatch(),
        v.into_dispatch(),
    ))
}
