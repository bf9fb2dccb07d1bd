//! Weights re-laid out once, when the model loads, for the kernels of the CPU that runs them.
//!
//! In WebAssembly, Q5_0 blocks are widened to Q8_0: the same values (each 5-bit code less 16 in a signed byte,
//! under the block's own f16 scale), so every result is bit-for-bit what the Q5_0 kernel gives. simd128 has no
//! cheap way to spread Q5_0's fifth bits into bytes, which made its kernel compute-bound at about half the memory
//! bandwidth; the Q8_0 kernel reads 55% more bytes and is still faster (qwen-0.5b decode in the wasmtime
//! component: 25.4 → 31.2 tok/s).
//!
//! Q4_1 blocks are regrouped four at a time ([`GgmlType::Q4_1x4`]): four f32 scales, four f32 minimums, then the
//! four blocks' nibbles. Its kernel is compute-bound in simd128, and each block's two f16 halves were gathered with
//! scalar loads and converted in software; now they are two vector loads, with the same f32 values, so results are
//! bit for bit the Q4_1 kernel's. Rows are padded to whole groups (SmolLM2's rows of 18 blocks: 20 blocks' room).

use super::GgmlType;

/// The type and blocks the kernels here would rather have for `ty`'s `blocks` (rows of `cols` values), if they
/// want a change.
pub fn for_kernels(ty: GgmlType, blocks: &[u8], cols: usize) -> Option<(GgmlType, Vec<u8>)> {
    if !cfg!(all(target_arch = "wasm32", target_feature = "simd128")) {
        return None;
    }
    match ty {
        GgmlType::Q5_0 => Some((GgmlType::Q8_0, q5_0_as_q8_0(blocks))),
        GgmlType::Q4_1 => Some((GgmlType::Q4_1x4, q4_1_in_fours(blocks, cols))),
        _ => None,
    }
}

/// Rows of Q4_1 blocks (`cols` values a row) as [`GgmlType::Q4_1x4`] rows of the same values.
pub fn q4_1_in_fours(blocks: &[u8], cols: usize) -> Vec<u8> {
    let (from, to) = (GgmlType::Q4_1, GgmlType::Q4_1x4);
    let mut out = Vec::with_capacity(blocks.len() / from.row_bytes(cols) * to.row_bytes(cols));
    for row in blocks.chunks_exact(from.row_bytes(cols)) {
        let blocks: Vec<&[u8]> = row.chunks_exact(from.block_bytes()).collect();
        for four in blocks.chunks(4) {
            let half = |b: &[u8], at: usize| super::f16_at(b, at).to_le_bytes();
            let zeros = [0u8; 4];
            let lane = |j: usize, at: usize| four.get(j).map_or(zeros, |b| half(b, at));
            out.extend((0..4).flat_map(|j| lane(j, 0)));
            out.extend((0..4).flat_map(|j| lane(j, 2)));
            for j in 0..4 {
                out.extend_from_slice(four.get(j).map_or(&[0u8; 16][..], |b| &b[4..20]));
            }
        }
    }
    out
}

/// Block `b` of a [`GgmlType::Q4_1x4`] row: its scale, its minimum and its 16 nibble bytes.
#[inline]
pub(super) fn q4_1x4_block(row: &[u8], b: usize) -> (f32, f32, &[u8]) {
    let group = &row[b / 4 * 96..][..96];
    let j = b % 4;
    let f32_at = |at: usize| f32::from_le_bytes(group[at..at + 4].try_into().expect("4 bytes"));
    (
        f32_at(4 * j),
        f32_at(16 + 4 * j),
        &group[32 + 16 * j..][..16],
    )
}

/// Q5_0 blocks (f16 scale, 32 fifth bits, 16 bytes of nibbles) as Q8_0 blocks of the same values.
pub fn q5_0_as_q8_0(blocks: &[u8]) -> Vec<u8> {
    let (from, to) = (GgmlType::Q5_0.block_bytes(), GgmlType::Q8_0.block_bytes());
    let mut out = Vec::with_capacity(blocks.len() / from * to);
    for b in blocks.chunks_exact(from) {
        out.extend_from_slice(&b[..2]);
        let fifth = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let nibbles = &b[6..22];
        let code = |j: usize| {
            let nibble = if j < 16 {
                nibbles[j] & 0xf
            } else {
                nibbles[j - 16] >> 4
            };
            nibble | ((fifth >> j) & 1) as u8 * 16
        };
        out.extend((0..32).map(|j| (code(j) as i8 - 16) as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::dot::tests::random_row;
    use super::super::{Q8Act, dequantize_row, dot::dot_scalar};
    use super::*;

    /// Regrouped rows hold the same numbers and give the same dot products, bit for bit, whole groups or not.
    #[test]
    fn q4_1_regroups_to_the_same_values() {
        for k in [576, 1536] {
            let x: Vec<f32> = (0..k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 20.0)
                .collect();
            let act = Q8Act::quantize(&x, k);
            for seed in 1..10u64 {
                let rows: Vec<u8> = (0..3)
                    .flat_map(|r| random_row(GgmlType::Q4_1, k, seed * 7727 + r))
                    .collect();
                let x4 = q4_1_in_fours(&rows, k);
                assert_eq!(x4.len(), 3 * GgmlType::Q4_1x4.row_bytes(k));
                let (rb1, rb4) = (GgmlType::Q4_1.row_bytes(k), GgmlType::Q4_1x4.row_bytes(k));
                for (q1, q4) in rows.chunks_exact(rb1).zip(x4.chunks_exact(rb4)) {
                    let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
                    dequantize_row(GgmlType::Q4_1, q1, &mut a);
                    dequantize_row(GgmlType::Q4_1x4, q4, &mut b);
                    assert_eq!(a, b);
                    let bits = |ty, w| dot_scalar(ty, w, act.row(0)).to_bits();
                    assert_eq!(bits(GgmlType::Q4_1, q1), bits(GgmlType::Q4_1x4, q4));
                    // The kernels in use (in WebAssembly, the SIMD ones for both).
                    let kernel = |ty, w| super::super::dot::pick_kernel(ty)(w, act.row(0));
                    let (k1, k4) = (kernel(GgmlType::Q4_1, q1), kernel(GgmlType::Q4_1x4, q4));
                    if cfg!(target_arch = "wasm32") {
                        assert_eq!(k1.to_bits(), k4.to_bits(), "seed {seed}: {k1} vs {k4}");
                    }
                    assert!((k1 - k4).abs() <= 1e-4 * (1.0 + k1.abs()), "{k1} vs {k4}");
                }
                // Several tokens: the rows unpacked once for all of them (prefill).
                let tokens: Vec<f32> = (0..5 * k).map(|i| x[i % k] * (1 + i / k) as f32).collect();
                let product = |ty, w: &[u8]| {
                    let mut out = vec![0f32; 5 * 3];
                    crate::quant::matmul(ty, w, 3, k, &tokens, &mut out, Default::default());
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(
                    product(GgmlType::Q4_1, &rows),
                    product(GgmlType::Q4_1x4, &x4)
                );
            }
        }
    }

    /// The widened blocks hold the same numbers and give the same dot products, bit for bit.
    #[test]
    fn q5_0_widens_to_the_same_values() {
        let k = 608;
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 20.0)
            .collect();
        let act = Q8Act::quantize(&x, k);
        for seed in 1..20u64 {
            let q5 = random_row(GgmlType::Q5_0, k, seed * 104729);
            let q8 = q5_0_as_q8_0(&q5);
            assert_eq!(q8.len(), GgmlType::Q8_0.row_bytes(k));
            let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
            dequantize_row(GgmlType::Q5_0, &q5, &mut a);
            dequantize_row(GgmlType::Q8_0, &q8, &mut b);
            assert_eq!(a, b);
            let (d5, d8) = (
                dot_scalar(GgmlType::Q5_0, &q5, act.row(0)),
                dot_scalar(GgmlType::Q8_0, &q8, act.row(0)),
            );
            assert_eq!(d5.to_bits(), d8.to_bits(), "seed {seed}: {d5} vs {d8}");
        }
    }
}
