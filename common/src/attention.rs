//! Attention over KV segments, merged exactly by their log-sum-exps (CE-LSLM Eq. 5).
//!
//! A query attends to a shared-context segment (KV computed anywhere: the cloud, a gateway, a cache) and to the
//! session's own segment. Each segment yields its softmax-weighted output `o_i` and log-sum-exp `lse_i`; then
//! `o = Σ α_i·o_i` with `α_i = exp(lse_i − lse)` and `lse = log Σ exp(lse_i)`, which equals attention over the
//! concatenated keys. Neither segment is copied into the other.

mod matmul;

use burn::tensor::Tensor;

/// One segment's attention: output and log-sum-exp per query row.
pub struct Partial {
    /// `[heads, rows, head_dim]`
    pub out: Tensor<3>,
    /// `[heads, rows, 1]`
    pub lse: Tensor<3>,
}

/// Attention of `q: [heads, rows, d]` (already scaled by `1/√d`) over `k, v: [heads, keys, d]`.
/// `mask`, if given, is added to the scores (`[rows, keys]`, 0 or −∞); every row must see at least one key.
pub fn attend(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, mask: Option<Tensor<2>>) -> Partial {
    let mut scores = matmul::matmul_nt(q, k);
    if let Some(m) = mask {
        scores = scores + m.unsqueeze_dim(0);
    }
    let max = scores.clone().max_dim(2);
    let e = (scores - max.clone()).exp();
    let sum = e.clone().sum_dim(2);
    let out = matmul::matmul_nn(e, v) / sum.clone();
    Partial {
        out,
        lse: max + sum.log(),
    }
}

/// Combines two segments' partial attentions into attention over both.
pub fn merge(a: Partial, b: Partial) -> Partial {
    let m = a.lse.clone().max_pair(b.lse.clone());
    let wa = (a.lse - m.clone()).exp();
    let wb = (b.lse - m.clone()).exp();
    let total = wa.clone() + wb.clone();
    Partial {
        out: (a.out * wa + b.out * wb) / total.clone(),
        lse: m + total.log(),
    }
}

/// Two readings of the same keys combined with weight `w` on the second: output and log-sum-exp both interpolated,
/// so the segment keeps its place against the others when merged (the same reading twice gives it back).
pub fn blend(a: Partial, b: Partial, w: f32) -> Partial {
    let w = w as f64;
    Partial {
        out: a.out.mul_scalar(1.0 - w) + b.out.mul_scalar(w),
        lse: a.lse.mul_scalar(1.0 - w) + b.lse.mul_scalar(w),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};
    use proptest::prelude::*;

    fn tensor(v: &[f32], shape: [usize; 3], dev: &Device) -> Tensor<3> {
        Tensor::from_data(TensorData::new(v.to_vec(), shape), dev)
    }

    /// Softmax attention computed with plain loops.
    fn naive(q: &[f32], k: &[f32], v: &[f32], h: usize, r: usize, s: usize, d: usize) -> Vec<f32> {
        let mut out = vec![0f32; h * r * d];
        for hh in 0..h {
            for i in 0..r {
                let qi = &q[(hh * r + i) * d..][..d];
                let scores: Vec<f32> = (0..s)
                    .map(|j| {
                        qi.iter()
                            .zip(&k[(hh * s + j) * d..][..d])
                            .map(|(a, b)| a * b)
                            .sum()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for j in 0..s {
                    for c in 0..d {
                        out[(hh * r + i) * d + c] += e[j] / z * v[(hh * s + j) * d + c];
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// merge(attend(ctx), attend(own)) equals attention over the concatenated keys, for random shapes.
        #[test]
        fn merge_equals_concatenation(h in 1usize..4, r in 1usize..6, s1 in 1usize..9, s2 in 1usize..9, d in 1usize..17, seed in 0u64..1000) {
            let dev = Device::flex();
            let q = values(h * r * d, seed);
            let (k1, v1) = (values(h * s1 * d, seed + 1), values(h * s1 * d, seed + 2));
            let (k2, v2) = (values(h * s2 * d, seed + 3), values(h * s2 * d, seed + 4));
            let qt = tensor(&q, [h, r, d], &dev);
            let merged = merge(
                attend(qt.clone(), tensor(&k1, [h, s1, d], &dev), tensor(&v1, [h, s1, d], &dev), None),
                attend(qt, tensor(&k2, [h, s2, d], &dev), tensor(&v2, [h, s2, d], &dev), None),
            );
            let got = merged.out.into_data().try_to_vec::<f32>().unwrap();
            let cat = |a: &[f32], b: &[f32]| -> Vec<f32> {
                (0..h).flat_map(|hh| a[hh * s1 * d..(hh + 1) * s1 * d].iter().chain(&b[hh * s2 * d..(hh + 1) * s2 * d]).copied()).collect()
            };
            let want = naive(&q, &cat(&k1, &k2), &cat(&v1, &v2), h, r, s1 + s2, d);
            for (a, b) in got.iter().zip(&want) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "merged {a} vs concatenated {b}");
            }
        }
    }

    /// Non-contiguous inputs (views made by swapping axes) give the same result as contiguous copies.
    /// At the models' head size, with a key count that is not a multiple of four (WebAssembly's mat-muls take keys
    /// four at a time and head dimensions 16 at a time; natively this checks burn's).
    #[test]
    fn model_sized_heads_match_naive() {
        let dev = Device::flex();
        let (h, r, s, d) = (2, 7, 37, 64);
        let (q, k, v) = (
            values(h * r * d, 1),
            values(h * s * d, 2),
            values(h * s * d, 3),
        );
        let got = attend(
            tensor(&q, [h, r, d], &dev).mul_scalar(0.125),
            tensor(&k, [h, s, d], &dev),
            tensor(&v, [h, s, d], &dev),
            None,
        )
        .out
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
        let q: Vec<f32> = q.iter().map(|x| x * 0.125).collect();
        let want = naive(&q, &k, &v, h, r, s, d);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn strided_inputs_match_naive() {
        let dev = Device::flex();
        let (h, r, s, d) = (2, 3, 5, 4);
        let q = values(h * r * d, 7);
        let k = values(h * s * d, 8);
        let v = values(h * s * d, 9);
        // Build k and v as [s, h, d] and view them as [h, s, d].
        let to_shd = |x: &[f32]| -> Vec<f32> {
            let mut o = vec![0f32; x.len()];
            for hh in 0..h {
                for j in 0..s {
                    for c in 0..d {
                        o[(j * h + hh) * d + c] = x[(hh * s + j) * d + c];
                    }
                }
            }
            o
        };
        let kt = tensor(&to_shd(&k), [s, h, d], &dev).swap_dims(0, 1);
        let vt = tensor(&to_shd(&v), [s, h, d], &dev).swap_dims(0, 1);
        let got = attend(tensor(&q, [h, r, d], &dev), kt, vt, None)
            .out
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let want = naive(&q, &k, &v, h, r, s, d);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
