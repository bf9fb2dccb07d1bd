//! simd128 kernels for the 32-element block types (Q4_0, Q4_1, Q5_0, Q8_0), four blocks of a row per step: the
//! four blocks' integer dot products are summed across lanes into one vector (lane j: block j), so their f16 scales
//! are converted together in SIMD (simd128 has no f16 conversion; `half`'s software one, once or twice per block,
//! cost about as much as the dot product) and the activations' scales and sums are read as vectors. A row is still
//! read front to back: kernels over four rows at once measured slower on weights streamed from memory.

use std::arch::wasm32::*;

use super::dot::ActRow;
use super::wasm::{
    fifth_bits, hsum, load_f32x4, load_i32x4, load16, load16_i8, nibbles, sum_lanes,
};

/// One activation block of 32 signed bytes, as loaded (halves 0..16, 16..32) and widened to i16.
pub(super) struct Act32 {
    // Read only by relaxed SIMD's 8-bit dot products.
    #[cfg_attr(not(target_feature = "relaxed-simd"), allow(dead_code))]
    a0: v128,
    #[cfg_attr(not(target_feature = "relaxed-simd"), allow(dead_code))]
    a1: v128,
    // Read only where the build has no relaxed SIMD.
    #[cfg_attr(target_feature = "relaxed-simd", allow(dead_code))]
    wide: [v128; 4],
}

impl Act32 {
    #[inline(always)]
    pub(super) fn load(q: &[i8; 32]) -> Self {
        let (a0, a1) = (load16_i8(q, 0), load16_i8(q, 16));
        Act32 {
            a0,
            a1,
            wide: [
                i16x8_extend_low_i8x16(a0),
                i16x8_extend_high_i8x16(a0),
                i16x8_extend_low_i8x16(a1),
                i16x8_extend_high_i8x16(a1),
            ],
        }
    }

    /// Σ w·a in i32 lanes for signed weight bytes (halves `w0`, `w1`).
    #[cfg_attr(target_feature = "relaxed-simd", allow(dead_code))]
    #[inline(always)]
    fn dot(&self, w0: v128, w1: v128) -> v128 {
        let p0 = i32x4_add(
            i32x4_dot_i16x8(i16x8_extend_low_i8x16(w0), self.wide[0]),
            i32x4_dot_i16x8(i16x8_extend_high_i8x16(w0), self.wide[1]),
        );
        let p1 = i32x4_add(
            i32x4_dot_i16x8(i16x8_extend_low_i8x16(w1), self.wide[2]),
            i32x4_dot_i16x8(i16x8_extend_high_i8x16(w1), self.wide[3]),
        );
        i32x4_add(p0, p1)
    }

    /// As [`Act32::dot`] for weights in -127..=127 (Q8_0): where the build has relaxed SIMD, the weights split into
    /// their positive part and their negated negative part, each in 0..=127 as relaxed SIMD's 8-bit dot product
    /// needs, and the two products subtracted in i16 (each pair of products is at most 2·127², and their difference
    /// is a pair of w·a, so nothing saturates or wraps). Two products and a split cost less than widening both sides
    /// to i16 (and `w < 0` as a mask would compile, through LLVM's `ashr`, to a five-instruction shift on x86).
    /// A code of -128, which llama.cpp never writes, comes out as +128 where the dot product reads it as signed.
    #[inline(always)]
    fn dot_i8(&self, w0: v128, w1: v128) -> v128 {
        #[cfg(target_feature = "relaxed-simd")]
        {
            let half = |a: v128, w: v128| {
                let pos = i8x16_max(w, i8x16_splat(0));
                let neg = i8x16_sub(pos, w);
                i32x4_extadd_pairwise_i16x8(i16x8_sub(
                    i16x8_relaxed_dot_i8x16_i7x16(a, pos),
                    i16x8_relaxed_dot_i8x16_i7x16(a, neg),
                ))
            };
            return i32x4_add(half(self.a0, w0), half(self.a1, w1));
        }
        #[cfg(not(target_feature = "relaxed-simd"))]
        self.dot(w0, w1)
    }

    /// As [`Act32::dot`] for weights in 0..64 (4- and 5-bit): where the build has relaxed SIMD, its 8-bit dot
    /// product into i16 pairs (`pmaddubsw` on x86; exact: |a| ≤ 127, so four products stay under 2^15), the two
    /// halves added in i16 and widened once.
    #[inline(always)]
    pub(super) fn dot_u6(&self, w0: v128, w1: v128) -> v128 {
        #[cfg(target_feature = "relaxed-simd")]
        return i32x4_extadd_pairwise_i16x8(i16x8_add(
            i16x8_relaxed_dot_i8x16_i7x16(self.a0, w0),
            i16x8_relaxed_dot_i8x16_i7x16(self.a1, w1),
        ));
        #[cfg(not(target_feature = "relaxed-simd"))]
        self.dot(w0, w1)
    }
}

/// A block type of 32 weights with an f16 scale at its start.
pub(super) trait Block32 {
    const BYTES: usize;
    /// What the stored weights are offset by (`q − OFFSET` is the weight): 8 for Q4_0, 16 for Q5_0.
    const OFFSET: i32 = 0;
    /// Whether an f16 minimum follows the scale (Q4_1).
    const MIN: bool = false;
    /// Σ q·a over the block, in i32 lanes.
    fn dot(blk: &[u8], a: &Act32) -> v128;
}

#[allow(non_camel_case_types)]
pub(super) struct Q4_0;
#[allow(non_camel_case_types)]
pub(super) struct Q4_1;
#[allow(non_camel_case_types)]
pub(super) struct Q5_0;
#[allow(non_camel_case_types)]
pub(super) struct Q8_0;

impl Block32 for Q4_0 {
    const BYTES: usize = 18;
    const OFFSET: i32 = 8;
    #[inline(always)]
    fn dot(blk: &[u8], a: &Act32) -> v128 {
        let (lo, hi) = nibbles(load16(blk, 2));
        a.dot_u6(lo, hi)
    }
}

impl Block32 for Q4_1 {
    const BYTES: usize = 20;
    const MIN: bool = true;
    #[inline(always)]
    fn dot(blk: &[u8], a: &Act32) -> v128 {
        let (lo, hi) = nibbles(load16(blk, 4));
        a.dot_u6(lo, hi)
    }
}

impl Block32 for Q5_0 {
    const BYTES: usize = 22;
    const OFFSET: i32 = 16;
    #[inline(always)]
    fn dot(blk: &[u8], a: &Act32) -> v128 {
        let (h0, h1) = fifth_bits(u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]));
        let (lo, hi) = nibbles(load16(blk, 6));
        a.dot_u6(v128_or(lo, h0), v128_or(hi, h1))
    }
}

impl Block32 for Q8_0 {
    const BYTES: usize = 34;
    #[inline(always)]
    fn dot(blk: &[u8], a: &Act32) -> v128 {
        a.dot_i8(load16(blk, 2), load16(blk, 18))
    }
}

/// Σ w·a over one row of `B` blocks.
#[inline(always)]
pub(super) fn dot<B: Block32>(w: &[u8], a: ActRow<'_>) -> f32 {
    let blocks = w.len() / B::BYTES;
    let block = |b: usize| &w[b * B::BYTES..(b + 1) * B::BYTES];
    let mut acc = f32x4_splat(0.0);
    let mut b = 0;
    while b + 4 <= blocks {
        let four = &w[b * B::BYTES..(b + 4) * B::BYTES];
        let (b0, rest) = four.split_at(B::BYTES);
        let (b1, rest) = rest.split_at(B::BYTES);
        let (b2, b3) = rest.split_at(B::BYTES);
        let (q, ad, sums) = four_act_blocks(a, b);
        acc = f32x4_add(acc, step::<B>([b0, b1, b2, b3], q, ad, sums));
        b += 4;
    }
    if b < blocks {
        // The last one to three blocks as a step of four: the activation row's padding gives the missing lanes
        // zero codes, scales and sums, and their weight lanes repeat the row's last block, so they add nothing.
        let lane = |j: usize| block((b + j).min(blocks - 1));
        let (q, ad, sums) = four_act_blocks(a, b);
        acc = f32x4_add(
            acc,
            step::<B>([lane(0), lane(1), lane(2), lane(3)], q, ad, sums),
        );
    }
    hsum(acc)
}

/// Σ w·a over one [`GgmlType::Q4_1x4`](super::GgmlType::Q4_1x4) row: [`step`]'s arithmetic for Q4_1, with each
/// group's four scales and four minimums read as two vectors of f32.
#[inline(always)]
pub(super) fn dot_q4_1x4(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = f32x4_splat(0.0);
    for (g, group) in w.chunks_exact(96).enumerate() {
        let (q, ad, sums) = four_act_blocks(a, 4 * g);
        let block = |j: usize| {
            let (lo, hi) = nibbles(load16(group, 32 + 16 * j));
            Act32::load(q[j]).dot_u6(lo, hi)
        };
        let s = sum_lanes([block(0), block(1), block(2), block(3)]);
        let (d, m) = (load16(group, 0), load16(group, 16));
        let t = f32x4_mul(f32x4_mul(d, ad), f32x4_convert_i32x4(s));
        let t = f32x4_add(t, f32x4_mul(f32x4_mul(m, ad), f32x4_convert_i32x4(sums)));
        acc = f32x4_add(acc, t);
    }
    hsum(acc)
}

/// Activation blocks `b..b + 4` (into the row's padding at its end), their scales and their sums.
#[inline(always)]
fn four_act_blocks(a: ActRow<'_>, b: usize) -> ([&[i8; 32]; 4], v128, v128) {
    let q: &[i8; 128] = a.qs[32 * b..32 * b + 128].try_into().expect("padded row");
    let (q0, rest) = q.split_first_chunk::<32>().expect("block");
    let (q1, rest) = rest.split_first_chunk::<32>().expect("block");
    let (q2, q3) = rest.split_first_chunk::<32>().expect("block");
    let q3: &[i8; 32] = q3.try_into().expect("block");
    let (ad, sums) = (load_f32x4(&a.d[b..b + 4]), load_i32x4(&a.sum[b..b + 4]));
    ([q0, q1, q2, q3], ad, sums)
}

/// Four blocks' Σ w·a, lane j for weight block `blk[j]` and activation block `act[j]`, whose scale and sum are lane
/// j of `ad` and `sums`.
#[inline(always)]
fn step<B: Block32>(blk: [&[u8]; 4], act: [&[i8; 32]; 4], ad: v128, sums: v128) -> v128 {
    let mut s = sum_lanes([
        B::dot(blk[0], &Act32::load(act[0])),
        B::dot(blk[1], &Act32::load(act[1])),
        B::dot(blk[2], &Act32::load(act[2])),
        B::dot(blk[3], &Act32::load(act[3])),
    ]);
    if B::OFFSET != 0 {
        s = i32x4_sub(s, i32x4_mul(sums, i32x4_splat(B::OFFSET)));
    }
    // Each block's first four bytes: its f16 scale, then (Q4_1) its f16 minimum; one load per block for both.
    let head = |j: usize| u32::from_le_bytes(blk[j][..4].try_into().expect("block head"));
    let heads = u32x4(head(0), head(1), head(2), head(3));
    let d = f16_to_f32(heads);
    let mut t = f32x4_mul(f32x4_mul(d, ad), f32x4_convert_i32x4(s));
    if B::MIN {
        let m = f32x4_mul(f16_to_f32(u32x4_shr(heads, 16)), ad);
        t = f32x4_add(t, f32x4_mul(m, f32x4_convert_i32x4(sums)));
    }
    t
}

/// The f16s in the low 16 bits of each 32-bit lane (the high bits are ignored) as f32 lanes. Exact for every finite f16 (normal or
/// subnormal): its exponent and mantissa bits, moved to f32's positions, read as an f32 that is 2^-112 times the
/// value. Infinities and NaNs (which no valid GGUF scale is) come out as large finite numbers.
#[inline(always)]
fn f16_to_f32(bits: v128) -> v128 {
    let magnitude = i32x4_shl(v128_and(bits, u32x4_splat(0x7fff)), 13);
    let value = f32x4_mul(magnitude, f32x4_splat(f32::from_bits((127 + 112) << 23)));
    v128_or(value, i32x4_shl(v128_and(bits, u32x4_splat(0x8000)), 16))
}
