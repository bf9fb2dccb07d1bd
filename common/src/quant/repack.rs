//! Weights re-laid out once, when the model loads, for the kernels of the CPU that runs them.
//!
//! In WebAssembly, Q5_0 blocks are widened to Q8_0: the same values (each 5-bit code less 16 in a signed byte,
//! under the block's own f16 scale), so every result is bit-for-bit what the Q5_0 kernel gives. simd128 has no
//! cheap way to spread Q5_0's fifth bits into bytes, which made its kernel compute-bound at about half the memory
//! bandwidth; the Q8_0 kernel reads 55% more bytes and is still faster (qwen-0.5b decode in the wasmtime
//! component: 25.4 → 31.2 tok/s).

use super::GgmlType;

/// The type and blocks the kernels here would rather have for `ty`'s `blocks`, if they want a change.
pub fn for_kernels(ty: GgmlType, blocks: &[u8]) -> Option<(GgmlType, Vec<u8>)> {
    let wasm = cfg!(all(target_arch = "wasm32", target_feature = "simd128"));
    (wasm && ty == GgmlType::Q5_0).then(|| (GgmlType::Q8_0, q5_0_as_q8_0(blocks)))
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
