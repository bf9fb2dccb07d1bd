//! GGML tensor types: block layouts, reference dequantization, and quantized mat-vec kernels.
//!
//! Weights stay in their GGUF blocks in memory. Activations are quantized to 8-bit blocks of 32 ([`Q8Act`]) and
//! dotted against the weight blocks with integer arithmetic, as llama.cpp does; [`matmul`] is the one entry point
//! and picks the fastest kernel this CPU has (AVX2 natively, simd128 in wasm, portable Rust otherwise).

mod batched;
mod dequant;
mod dot;
pub(crate) mod repack;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm_blocks32;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm_kquants;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use dequant::dequantize_row;
#[cfg(target_arch = "wasm32")]
pub(crate) use dot::dot_f32;
pub use dot::{Precision, Q8Act, QK8, matmul, matmul_scalar};

/// The GGML tensor types this project knows, by their GGUF type id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    BF16,
    /// Not a GGUF type: Q4_1 regrouped for the WebAssembly kernels ([`repack`]), four blocks of 32 at a time as
    /// their four scales and four minimums in f32, then their four runs of 16 nibble bytes (96 bytes per 128
    /// weights); a row ends with zero blocks up to a whole group.
    Q4_1x4,
}

impl GgmlType {
    pub fn from_u32(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            30 => BF16,
            _ => return None,
        })
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 => 32,
            Q2K | Q3K | Q4K | Q5K | Q6K | Q8K => 256,
            Q4_1x4 => 128,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2K => 84,
            Q3K => 110,
            Q4K => 144,
            Q5K => 176,
            Q6K => 210,
            Q8K => 292,
            Q4_1x4 => 96,
        }
    }

    /// Whether the compute kernels here can use a tensor of this type.
    pub fn is_supported(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | Q4_0 | Q4_1 | Q5_0 | Q8_0 | Q4K | Q6K)
    }

    /// Bytes of a row of `row_len` values (GGUF rows are whole blocks; a [`GgmlType::Q4_1x4`] row ends padded).
    pub fn row_bytes(self, row_len: usize) -> usize {
        row_len.div_ceil(self.block_len()) * self.block_bytes()
    }
}

/// Block `b` (of 32 values) of a row of 4-bit blocks (Q4_0, Q4_1, Q4_1x4): its scale, its minimum (0 for Q4_0) and
/// its 16 nibble bytes.
#[inline]
pub(crate) fn nibble_block(ty: GgmlType, row: &[u8], b: usize) -> (f32, f32, &[u8]) {
    if ty == GgmlType::Q4_1x4 {
        return repack::q4_1x4_block(row, b);
    }
    let blk = &row[b * ty.block_bytes()..][..ty.block_bytes()];
    match ty {
        GgmlType::Q4_1 => (f16_at(blk, 0), f16_at(blk, 2), &blk[4..20]),
        _ => (f16_at(blk, 0), 0.0, &blk[2..18]),
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}
