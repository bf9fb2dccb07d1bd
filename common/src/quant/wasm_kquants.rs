//! simd128 kernels for the 256-element K-quant super-blocks (Q4_K, Q6_K). As in `wasm_blocks32`, the integer dot
//! products of four groups are summed across lanes into one vector (lane j: group j), so each group's scale, the
//! activations' scales and the minimums are applied as vectors rather than one scalar chain per group.

use std::arch::wasm32::*;

use super::dot::ActRow;
use super::f16_at;
use super::wasm::{hsum, load_f32x4, load_i32x4, load16, load16_i8, nibbles, sum_lanes};
use super::wasm_blocks32::Act32;

/// The activations of super-block `sb`: 8 blocks of 32.
#[inline(always)]
fn act_blocks<'a>(a: ActRow<'a>, sb: usize) -> &'a [i8; 256] {
    a.qs[256 * sb..256 * sb + 256]
        .try_into()
        .expect("256 activations")
}

/// Activation block `g` (0..8) of a super-block's 256.
#[inline(always)]
fn act_block(q: &[i8; 256], g: usize) -> &[i8; 32] {
    q[32 * g..32 * g + 32].try_into().expect("32 activations")
}

/// Four unsigned bytes (packed in `v`) as f32 lanes.
#[inline(always)]
fn u8x4_to_f32(v: u32) -> v128 {
    f32x4_convert_u32x4(u32x4_extend_low_u16x8(u16x8_extend_low_u8x16(u32x4_splat(
        v,
    ))))
}

/// Four signed bytes as f32 lanes.
#[inline(always)]
fn i8x4_to_f32(b: &[u8]) -> v128 {
    let v = u32::from_le_bytes(b[..4].try_into().expect("four bytes"));
    f32x4_convert_i32x4(i32x4_extend_low_i16x8(i16x8_extend_low_i8x16(u32x4_splat(
        v,
    ))))
}

/// A Q4_K super-block's 6-bit scales and minimums (12 bytes) as f32 lanes: (scales of groups 0..4, of 4..8,
/// minimums of 0..4, of 4..8). Groups 4..8 keep their low four bits in bytes 8..12 and their top two in the top
/// bits of bytes 0..8 (see `dequant::q4k_scale_min`), unpacked here four bytes at a time.
#[inline(always)]
fn q4k_scales(s: &[u8]) -> [v128; 4] {
    let word = |i: usize| u32::from_le_bytes(s[4 * i..4 * i + 4].try_into().expect("four bytes"));
    let (x0, x1, x2) = (word(0), word(1), word(2));
    [
        u8x4_to_f32(x0 & 0x3f3f_3f3f),
        u8x4_to_f32((x2 & 0x0f0f_0f0f) | ((x0 >> 2) & 0x3030_3030)),
        u8x4_to_f32(x1 & 0x3f3f_3f3f),
        u8x4_to_f32(((x2 >> 4) & 0x0f0f_0f0f) | ((x1 >> 2) & 0x3030_3030)),
    ]
}

#[inline(always)]
pub(super) fn q4k(w: &[u8], a: ActRow<'_>) -> f32 {
    let (mut acc, mut mins) = (f32x4_splat(0.0), f32x4_splat(0.0));
    for (sb, blk) in w.chunks_exact(144).enumerate() {
        let q = act_blocks(a, sb);
        let [sc_lo, sc_hi, m_lo, m_hi] = q4k_scales(&blk[4..16]);
        // 32 bytes: their low nibbles are group 2j, their high nibbles group 2j + 1.
        let pair = |j: usize| {
            let (lo0, hi0) = nibbles(load16(blk, 16 + 32 * j));
            let (lo1, hi1) = nibbles(load16(blk, 32 + 32 * j));
            (
                Act32::load(act_block(q, 2 * j)).dot_u6(lo0, lo1),
                Act32::load(act_block(q, 2 * j + 1)).dot_u6(hi0, hi1),
            )
        };
        let (p0, p1) = pair(0);
        let (p2, p3) = pair(1);
        let (p4, p5) = pair(2);
        let (p6, p7) = pair(3);
        let (ad_lo, ad_hi) = (
            load_f32x4(&a.d[8 * sb..8 * sb + 4]),
            load_f32x4(&a.d[8 * sb + 4..8 * sb + 8]),
        );
        let scaled = |p: [v128; 4], sc: v128, ad: v128| {
            f32x4_mul(f32x4_convert_i32x4(sum_lanes(p)), f32x4_mul(sc, ad))
        };
        let dots = f32x4_add(
            scaled([p0, p1, p2, p3], sc_lo, ad_lo),
            scaled([p4, p5, p6, p7], sc_hi, ad_hi),
        );
        acc = f32x4_add(acc, f32x4_mul(dots, f32x4_splat(f16_at(blk, 0))));
        let sums = |at: usize| f32x4_convert_i32x4(load_i32x4(&a.sum[at..at + 4]));
        let m = f32x4_add(
            f32x4_mul(f32x4_mul(m_lo, ad_lo), sums(8 * sb)),
            f32x4_mul(f32x4_mul(m_hi, ad_hi), sums(8 * sb + 4)),
        );
        mins = f32x4_add(mins, f32x4_mul(m, f32x4_splat(f16_at(blk, 2))));
    }
    hsum(f32x4_sub(acc, mins))
}

/// Σ (q − 32)·a over 16 elements for 6-bit weights `q` in 0..64.
#[inline(always)]
fn dot16_q6(q: v128, a: v128) -> v128 {
    // Relaxed SIMD: 8-bit dot products into i16 pairs, exact (|a| ≤ 127: |pair| ≤ 2·63·127 and the difference of
    // two stays under 2^15), widened once.
    #[cfg(target_feature = "relaxed-simd")]
    return i32x4_extadd_pairwise_i16x8(i16x8_sub(
        i16x8_relaxed_dot_i8x16_i7x16(a, q),
        i16x8_relaxed_dot_i8x16_i7x16(a, i8x16_splat(32)),
    ));
    #[cfg(not(target_feature = "relaxed-simd"))]
    {
        let w = i8x16_sub(q, i8x16_splat(32));
        let lo = i32x4_dot_i16x8(i16x8_extend_low_i8x16(w), i16x8_extend_low_i8x16(a));
        let hi = i32x4_dot_i16x8(i16x8_extend_high_i8x16(w), i16x8_extend_high_i8x16(a));
        i32x4_add(lo, hi)
    }
}

/// Σ (q − 32)·a over sub-block `S` (0..16, 16 weights, one scale each) of a Q6_K super-block. `S` is a constant so
/// that the bit shifts are: simd128's byte shifts by a variable amount compile to long sequences on x86.
#[inline(always)]
fn q6k_sub<const S: usize>(blk: &[u8], q: &[i8; 256]) -> v128 {
    let (g, i) = (S / 2, S % 2);
    let (half, part) = (g / 4, g % 4);
    let ql = load16(blk, 64 * half + 32 * (part & 1) + 16 * i);
    let qh = load16(blk, 128 + 32 * half + 16 * i);
    let lo = if part < 2 {
        v128_and(ql, u8x16_splat(0x0f))
    } else {
        u8x16_shr(ql, 4)
    };
    let hb = v128_and(u8x16_shr(qh, 2 * part as u32), u8x16_splat(0x03));
    dot16_q6(v128_or(lo, i8x16_shl(hb, 4)), load16_i8(q, 16 * S))
}

#[inline(always)]
pub(super) fn q6k(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = f32x4_splat(0.0);
    for (sb, blk) in w.chunks_exact(210).enumerate() {
        let q = act_blocks(a, sb);
        // Sub-blocks 4k..4k + 4: groups 2k and 2k + 1, two halves of 16 each.
        let quads = [
            sum_lanes([
                q6k_sub::<0>(blk, q),
                q6k_sub::<1>(blk, q),
                q6k_sub::<2>(blk, q),
                q6k_sub::<3>(blk, q),
            ]),
            sum_lanes([
                q6k_sub::<4>(blk, q),
                q6k_sub::<5>(blk, q),
                q6k_sub::<6>(blk, q),
                q6k_sub::<7>(blk, q),
            ]),
            sum_lanes([
                q6k_sub::<8>(blk, q),
                q6k_sub::<9>(blk, q),
                q6k_sub::<10>(blk, q),
                q6k_sub::<11>(blk, q),
            ]),
            sum_lanes([
                q6k_sub::<12>(blk, q),
                q6k_sub::<13>(blk, q),
                q6k_sub::<14>(blk, q),
                q6k_sub::<15>(blk, q),
            ]),
        ];
        let mut dots = f32x4_splat(0.0);
        for (k, s) in quads.into_iter().enumerate() {
            let (d0, d1) = (a.d[8 * sb + 2 * k], a.d[8 * sb + 2 * k + 1]);
            let scale = f32x4_mul(i8x4_to_f32(&blk[192 + 4 * k..]), f32x4(d0, d0, d1, d1));
            dots = f32x4_add(dots, f32x4_mul(f32x4_convert_i32x4(s), scale));
        }
        acc = f32x4_add(acc, f32x4_mul(dots, f32x4_splat(f16_at(blk, 208))));
    }
    hsum(acc)
}
