//! The rotary position embedding, as a backend extension.
//!
//! Written with tensor ops it is about nine ops per projection per layer (narrow, multiply, subtract, add, cat),
//! each a pass and an allocation; in a decode step of a small model on the CPU that cost more than the
//! arithmetic (5% of SmolLM2's decode in the wasm component). On the CPU backend it is one loop here, computing
//! the same f32 expressions in the same order (`x1·cos − x2·sin`, `x2·cos + x1·sin`), so every bit is what the
//! tensor ops give; other backends run the tensor ops.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, TensorMetadata, backend_extension};
use burn::tensor::{Device, Shape, Slice, Tensor, TensorData};

use super::{ModelConfig, RopeStyle, rope_frequencies};

/// Rotary tables for a run of positions: `cos`, `sin` as `[tokens, 1, head_dim / 2]`.
pub(crate) struct Rope {
    cos: Tensor<3>,
    sin: Tensor<3>,
    style: RopeStyle,
}

impl Rope {
    /// The tables for positions `start..start + n`.
    pub(crate) fn new(c: &ModelConfig, start: usize, n: usize, device: &Device) -> Self {
        let half = c.head_dim / 2;
        let freqs = rope_frequencies(c.rope_theta, c.head_dim);
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in start..start + n {
            for &freq in &freqs {
                let a = p as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Rope {
            cos: Tensor::from_data(TensorData::new(cos, [n, 1, half]), device),
            sin: Tensor::from_data(TensorData::new(sin, [n, 1, half]), device),
            style: c.rope_style,
        }
    }

    /// Rotates `x: [tokens, heads, head_dim]`.
    pub(crate) fn apply(&self, x: Tensor<3>) -> Tensor<3> {
        use burn::backend::Dispatch;
        Tensor::from_dispatch(<Dispatch as RopeOps>::rope(
            x.into_dispatch(),
            self.cos.clone().into_dispatch(),
            self.sin.clone().into_dispatch(),
            self.style == RopeStyle::Neox,
        ))
    }
}

#[backend_extension(Flex: cfg(feature = "flex"), Cube: cfg(feature = "webgpu"))]
pub trait RopeOps: Backend {
    /// Rotates `x: [t, h, d]` by `cos`, `sin: [t, 1, d / 2]`: channel `i` pairs with `i + d/2` (`neox`, Qwen2) or
    /// channel `2i` with `2i + 1` (llama).
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        neox: bool,
    ) -> FloatTensor<Self> {
        rope_by_tensor_ops::<Self>(x, cos, sin, neox)
    }
}

/// [`RopeOps::rope`] as tensor ops.
fn rope_by_tensor_ops<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    neox: bool,
) -> FloatTensor<B> {
    let dims = x.shape();
    let (t, h, d) = (dims[0], dims[1], dims[2]);
    let half = d / 2;
    // Pairs as two halves of the last axis: [t, h, d/2] each (neox), or [t, h, d/2, 1] each (interleaved).
    let (x1, x2, cos, sin) = if neox {
        let part = |at: usize| {
            B::float_slice(
                x.clone(),
                &[Slice::from(..), Slice::from(..), Slice::from(at..at + half)],
            )
        };
        (part(0), part(half), cos, sin)
    } else {
        let x = B::float_reshape(x, Shape::new([t, h, half, 2]));
        let part = |at: usize| {
            B::float_slice(
                x.clone(),
                &[
                    Slice::from(..),
                    Slice::from(..),
                    Slice::from(..),
                    Slice::from(at..at + 1),
                ],
            )
        };
        let column = |table| B::float_reshape(table, Shape::new([t, 1, half, 1]));
        (part(0), part(1), column(cos), column(sin))
    };
    let r1 = B::float_sub(
        B::float_mul(x1.clone(), cos.clone()),
        B::float_mul(x2.clone(), sin.clone()),
    );
    let r2 = B::float_add(B::float_mul(x2, cos), B::float_mul(x1, sin));
    let axis = if neox { 2 } else { 3 };
    B::float_reshape(B::float_cat(vec![r1, r2], axis), Shape::new([t, h, d]))
}

#[cfg(feature = "flex")]
impl RopeOps for burn::backend::Flex {
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        neox: bool,
    ) -> FloatTensor<Self> {
        let dims = x.shape();
        let (t, h, d) = (dims[0], dims[1], dims[2]);
        let half = d / 2;
        let (x, cos, sin) = (contiguous(x), contiguous(cos), contiguous(sin));
        let (xs, cos, sin) = (values(&x), values(&cos), values(&sin));
        assert!(
            xs.len() == t * h * d && cos.len() == t * half && sin.len() == t * half,
            "rope: [{t}, {h}, {d}] with tables of {} and {}",
            cos.len(),
            sin.len()
        );
        let mut out = vec![0f32; xs.len()];
        for (token, (x, out)) in xs
            .chunks_exact(h * d)
            .zip(out.chunks_exact_mut(h * d))
            .enumerate()
        {
            let (cos, sin) = (&cos[token * half..][..half], &sin[token * half..][..half]);
            for (x, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                for i in 0..half {
                    // Where pair i's two channels sit in a head.
                    let (a, b) = if neox {
                        (i, i + half)
                    } else {
                        (2 * i, 2 * i + 1)
                    };
                    let (x1, x2) = (x[a], x[b]);
                    out[a] = x1 * cos[i] - x2 * sin[i];
                    out[b] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
        burn::backend::flex::FlexTensor::from_data(TensorData::new(out, [t, h, d]))
    }
}

#[cfg(feature = "flex")]
fn contiguous(x: burn::backend::flex::FlexTensor) -> burn::backend::flex::FlexTensor {
    if x.is_contiguous() {
        x
    } else {
        x.to_contiguous()
    }
}

#[cfg(feature = "flex")]
fn values(x: &burn::backend::flex::FlexTensor) -> &[f32] {
    x.as_slice::<f32>().expect("rope: contiguous f32 tensors")
}

#[cfg(feature = "webgpu")]
impl RopeOps for burn::backend::Cube {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU loop gives the tensor ops' bits, for both pairings.
    #[test]
    fn loop_matches_tensor_ops() {
        type Flex = burn::backend::Flex;
        let (t, h, d) = (3, 2, 8);
        let values = |n: usize, k: f32| -> Vec<f32> {
            (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * k).collect()
        };
        let tensor = |v: Vec<f32>, shape: [usize; 3]| {
            burn::backend::flex::FlexTensor::from_data(TensorData::new(v, shape))
        };
        for neox in [true, false] {
            let x = || tensor(values(t * h * d, 0.37), [t, h, d]);
            let cos = || tensor(values(t * d / 2, 0.041), [t, 1, d / 2]);
            let sin = || tensor(values(t * d / 2, -0.029), [t, 1, d / 2]);
            let fused = <Flex as RopeOps>::rope(x(), cos(), sin(), neox);
            let ops = rope_by_tensor_ops::<Flex>(x(), cos(), sin(), neox);
            let bits = |x: &FloatTensor<Flex>| -> Vec<u32> {
                x.to_contiguous()
                    .as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(bits(&fused), bits(&ops), "neox {neox}");
        }
    }
}
