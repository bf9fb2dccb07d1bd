//! simd128 kernels for the 32-element block types (Q4_0, Q4_1, Q5_0, Q8_0), four blocks of a row per step: the
//! four blocks' integer dot products are summed across lanes into one vector (lane j: block j), so their f16 scales
//! are converted together in SIMD (simd128 has no f16 conversion; `half`'s software one, once or twice per block,
//! cost about as much as the dot product) and the activations' scales and sums are read as vectors. A row is still
//! read front to back: kernels over four rows at once measured slower on weights streamed from memory.

use std::arch::wasm32::*;

use super::dot::ActRow;
use super::f16_at;
use super::wasm::{fifth_bits, load16, load16_i8, nibbles};

/// One activation block of 32 signed bytes, as loaded (halves 0..16, 16..32) and widened to i16.
pub(super) struct Act32 {
    a0: v128,
    a1: v128,
    wide: [v128; 4],
}

impl Act32 {
    #[inline(always)]
    fn load(a: ActRow<'_>, b: usize) -> Self {
        let (a0, a1) = (load16_i8(a.qs, 32 * b), load16_i8(a.qs, 32 * b + 16));
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

    /// As [`Act32::dot`] for weights in 0..128: relaxed SIMD's 8-bit dot product where the build has it (its
    /// result is only implementation-defined for weights ≥ 128, which these never are).
    #[inline(always)]
    fn dot_u7(&self, w0: v128, w1: v128) -> v128 {
        #[cfg(target_feature = "relaxed-simd")]
        return i32x4_relaxed_dot_i8x16_i7x16_add(
            self.a1,
            w1,
            i32x4_relaxed_dot_i8x16_i7x16_add(self.a0, w0, i32x4_splat(0)),
        );
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
        a.dot_u7(lo, hi)
    }
}

impl Block32 for Q4_1 {
    const BYTES: usize = 20;
    const MIN: bool = true;
    #[inline(always)]
    fn dot(blk: &[u8], a: &Act32) -> v128 {
        let (lo, hi) = nibbles(load16(blk, 4));
        a.dot_u7(lo, hi)
    }
}

impl Block32 for Q5_0 {
    const BYTES: usize = 22;
    const OFFSET: i32 = 16;
    #[inline(always)]
    fn dot(blk: &[u8], a: &Act32) -> v128 {
        let (h0, h1) = fifth_bits(u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]));
        let (lo, hi) = nibbles(load16(blk, 6));
        a.dot_u7(v128_or(lo, h0), v128_or(hi, h1))
    }
}

impl Block32 for Q8_0 {
    const BYTES: usize = 34;
    #[inline(always)]
    fn dot(blk: &[u8], a: &Act32) -> v128 {
        a.dot(load16(blk, 2), load16(blk, 18))
    }
}

/// Σ w·a over one row of `B` blocks.
pub(super) fn dot<B: Block32>(w: &[u8], a: ActRow<'_>) -> f32 {
    let blocks = w.len() / B::BYTES;
    let mut acc = f32x4_splat(0.0);
    let mut b = 0;
    while b + 4 <= blocks {
        let four = &w[b * B::BYTES..(b + 4) * B::BYTES];
        let (b0, rest) = four.split_at(B::BYTES);
        let (b1, rest) = rest.split_at(B::BYTES);
        let (b2, b3) = rest.split_at(B::BYTES);
        let blk = [b0, b1, b2, b3];
        let mut s = sum_lanes([
            block_dot::<B>(blk[0], a, b),
            block_dot::<B>(blk[1], a, b + 1),
            block_dot::<B>(blk[2], a, b + 2),
            block_dot::<B>(blk[3], a, b + 3),
        ]);
        let sums = load_i32x4(&a.sum[b..b + 4]);
        if B::OFFSET != 0 {
            s = i32x4_sub(s, i32x4_mul(sums, i32x4_splat(B::OFFSET)));
        }
        let ad = load_f32x4(&a.d[b..b + 4]);
        let mut t = f32x4_mul(f32x4_mul(f16x4(&blk, 0), ad), f32x4_convert_i32x4(s));
        if B::MIN {
            let m = f32x4_mul(f16x4(&blk, 2), ad);
            t = f32x4_add(t, f32x4_mul(m, f32x4_convert_i32x4(sums)));
        }
        acc = f32x4_add(acc, t);
        b += 4;
    }
    let mut total = (f32x4_extract_lane::<0>(acc) + f32x4_extract_lane::<1>(acc))
        + (f32x4_extract_lane::<2>(acc) + f32x4_extract_lane::<3>(acc));
    for b in b..blocks {
        let blk = &w[b * B::BYTES..(b + 1) * B::BYTES];
        let p = block_dot::<B>(blk, a, b);
        let s = (i32x4_extract_lane::<0>(p) + i32x4_extract_lane::<1>(p))
            + (i32x4_extract_lane::<2>(p) + i32x4_extract_lane::<3>(p));
        total += f16_at(blk, 0) * a.d[b] * (s - B::OFFSET * a.sum[b]) as f32;
        if B::MIN {
            total += f16_at(blk, 2) * a.d[b] * a.sum[b] as f32;
        }
    }
    total
}

/// Σ q·a over block `b` (`blk`), in i32 lanes.
#[inline(always)]
fn block_dot<B: Block32>(blk: &[u8], a: ActRow<'_>, b: usize) -> v128 {
    B::dot(blk, &Act32::load(a, b))
}

/// `[Σ p[0], Σ p[1], Σ p[2], Σ p[3]]`, each the sum of that vector's four lanes (exact: integers).
#[inline(always)]
fn sum_lanes([p0, p1, p2, p3]: [v128; 4]) -> v128 {
    let u0 = i32x4_add(
        i32x4_shuffle::<0, 4, 1, 5>(p0, p1),
        i32x4_shuffle::<2, 6, 3, 7>(p0, p1),
    );
    let u1 = i32x4_add(
        i32x4_shuffle::<0, 4, 1, 5>(p2, p3),
        i32x4_shuffle::<2, 6, 3, 7>(p2, p3),
    );
    i32x4_add(i64x2_shuffle::<0, 2>(u0, u1), i64x2_shuffle::<1, 3>(u0, u1))
}

/// The f16 at byte `at` of each block, as f32 lanes. Exact for every finite f16 (normal or subnormal): its
/// exponent and mantissa bits, moved to f32's positions, read as an f32 that is 2^-112 times the value. Infinities
/// and NaNs (which no valid GGUF scale is) come out as large finite numbers.
#[inline(always)]
fn f16x4(blocks: &[&[u8]; 4], at: usize) -> v128 {
    let h = |j: usize| u32::from(u16::from_le_bytes([blocks[j][at], blocks[j][at + 1]]));
    let bits = u32x4(h(0), h(1), h(2), h(3));
    let magnitude = i32x4_shl(v128_and(bits, u32x4_splat(0x7fff)), 13);
    let value = f32x4_mul(magnitude, f32x4_splat(f32::from_bits((127 + 112) << 23)));
    v128_or(value, i32x4_shl(v128_and(bits, u32x4_splat(0x8000)), 16))
}

#[inline(always)]
fn load_i32x4(v: &[i32]) -> v128 {
    let v: &[i32; 4] = v.try_into().expect("four lanes");
    // SAFETY: 16 readable bytes; wasm loads need no alignment.
    unsafe { v128_load(v.as_ptr() as *const v128) }
}

#[inline(always)]
fn load_f32x4(v: &[f32]) -> v128 {
    let v: &[f32; 4] = v.try_into().expect("four lanes");
    // SAFETY: as in `load_i32x4`.
    unsafe { v128_load(v.as_ptr() as *const v128) }
}
