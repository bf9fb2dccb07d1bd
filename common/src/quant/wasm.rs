//! WebAssembly SIMD (simd128) dot-product kernels, for the browser and wasmtime builds (compiled with
//! `+simd128`, which every current browser and wasmtime run).
//!
//! Each kernel computes what `dot::dot_scalar` computes for its type: weights are unpacked 16 at a time to bytes,
//! widened with the int8 activations to i16 and multiplied-and-added in pairs (`i32x4.dot_i16x8_s`) to i32, then
//! scaled in f32. Offsets and minimums are folded in through the activation block sums, as on x86. Where relaxed
//! SIMD is enabled (the wasmtime component, the browser's relaxed engine), 4- to 6-bit weights use its 8-bit dot
//! product instead. The 32-element block types (Q4_0, Q4_1, Q5_0, Q8_0) are in `wasm_blocks32`.

use std::arch::wasm32::*;

use super::dot::ActRow;
use super::wasm_blocks32 as blocks32;
use super::{GgmlType, f16_at};

type DotFn = fn(&[u8], ActRow<'_>) -> f32;

/// The simd128 kernel for `ty`.
pub(super) fn kernel(ty: GgmlType) -> Option<DotFn> {
    Some(match ty {
        GgmlType::Q4_0 => blocks32::dot::<blocks32::Q4_0>,
        GgmlType::Q4_1 => blocks32::dot::<blocks32::Q4_1>,
        GgmlType::Q5_0 => blocks32::dot::<blocks32::Q5_0>,
        GgmlType::Q8_0 => blocks32::dot::<blocks32::Q8_0>,
        GgmlType::Q4K => q4k,
        GgmlType::Q6K => q6k,
        _ => return None,
    })
}

/// 16 bytes at `b[at..]` (bounds-checked).
#[inline(always)]
pub(super) fn load16(b: &[u8], at: usize) -> v128 {
    let s = &b[at..at + 16];
    // SAFETY: `s` is 16 readable bytes; wasm loads need no alignment.
    unsafe { v128_load(s.as_ptr() as *const v128) }
}

#[inline(always)]
pub(super) fn load16_i8(b: &[i8], at: usize) -> v128 {
    let s = &b[at..at + 16];
    // SAFETY: as in `load16`.
    unsafe { v128_load(s.as_ptr() as *const v128) }
}

/// Σ w·a over 16 signed bytes each, in 4 × i32 lanes.
#[cfg(not(target_feature = "relaxed-simd"))]
#[inline(always)]
fn dot16(w: v128, a: v128) -> v128 {
    let lo = i32x4_dot_i16x8(i16x8_extend_low_i8x16(w), i16x8_extend_low_i8x16(a));
    let hi = i32x4_dot_i16x8(i16x8_extend_high_i8x16(w), i16x8_extend_high_i8x16(a));
    i32x4_add(lo, hi)
}

/// Σ w·a over the 32 elements of activation block `b`, given the weights as two halves of 16 bytes.
#[cfg(not(target_feature = "relaxed-simd"))]
#[inline(always)]
fn dot32(w0: v128, w1: v128, a: ActRow<'_>, b: usize) -> v128 {
    i32x4_add(
        dot16(w0, load16_i8(a.qs, 32 * b)),
        dot16(w1, load16_i8(a.qs, 32 * b + 16)),
    )
}

/// As [`dot32`] for weights in 0..128, with relaxed SIMD's 8-bit dot product (one `pmaddubsw` + `pmaddwd` on x86,
/// `sdot` on ARM). Its result is only implementation-defined for weights ≥ 128, which these never are.
#[cfg(target_feature = "relaxed-simd")]
#[inline(always)]
fn dot32_u7(w0: v128, w1: v128, a: ActRow<'_>, b: usize) -> v128 {
    let acc = i32x4_relaxed_dot_i8x16_i7x16_add(load16_i8(a.qs, 32 * b), w0, i32x4_splat(0));
    i32x4_relaxed_dot_i8x16_i7x16_add(load16_i8(a.qs, 32 * b + 16), w1, acc)
}

#[cfg(not(target_feature = "relaxed-simd"))]
use self::dot32 as dot32_u7;

/// Σ (q − 32)·a over 16 elements for 6-bit weights `q` in 0..64.
#[inline(always)]
fn dot16_q6(q: v128, a: v128) -> v128 {
    #[cfg(target_feature = "relaxed-simd")]
    return i32x4_sub(
        i32x4_relaxed_dot_i8x16_i7x16_add(a, q, i32x4_splat(0)),
        i32x4_relaxed_dot_i8x16_i7x16_add(a, i8x16_splat(32), i32x4_splat(0)),
    );
    #[cfg(not(target_feature = "relaxed-simd"))]
    dot16(i8x16_sub(q, i8x16_splat(32)), a)
}

/// Dot products of one weight row in batched.rs's common form (signed bytes `q`, a scale per 16) with a tile of
/// activation rows, without the rows' `min` terms. Each block's weights are widened once for the whole tile.
pub(super) fn dot_tile_unpacked<const T: usize>(
    q: &[i8],
    scale: &[f32],
    rows: &[ActRow<'_>; T],
) -> [f32; T] {
    let mut acc = [f32x4_splat(0.0); T];
    for b in 0..q.len() / 32 {
        let (w0, w1) = (load16_i8(q, 32 * b), load16_i8(q, 32 * b + 16));
        let w = [
            i16x8_extend_low_i8x16(w0),
            i16x8_extend_high_i8x16(w0),
            i16x8_extend_low_i8x16(w1),
            i16x8_extend_high_i8x16(w1),
        ];
        let (s0, s1) = (scale[2 * b], scale[2 * b + 1]);
        for (acc, a) in acc.iter_mut().zip(rows) {
            let (a0, a1) = (load16_i8(a.qs, 32 * b), load16_i8(a.qs, 32 * b + 16));
            let p0 = i32x4_add(
                i32x4_dot_i16x8(w[0], i16x8_extend_low_i8x16(a0)),
                i32x4_dot_i16x8(w[1], i16x8_extend_high_i8x16(a0)),
            );
            let p1 = i32x4_add(
                i32x4_dot_i16x8(w[2], i16x8_extend_low_i8x16(a1)),
                i32x4_dot_i16x8(w[3], i16x8_extend_high_i8x16(a1)),
            );
            let da = a.d[b];
            *acc = scaled(scaled(*acc, p0, s0 * da), p1, s1 * da);
        }
    }
    std::array::from_fn(|t| hsum(acc[t]))
}

/// `acc + p · s` for i32 lanes `p`.
#[inline(always)]
fn scaled(acc: v128, p: v128, s: f32) -> v128 {
    f32x4_add(acc, f32x4_mul(f32x4_convert_i32x4(p), f32x4_splat(s)))
}

#[inline(always)]
fn hsum(v: v128) -> f32 {
    (f32x4_extract_lane::<0>(v) + f32x4_extract_lane::<1>(v))
        + (f32x4_extract_lane::<2>(v) + f32x4_extract_lane::<3>(v))
}

/// 16 bytes of packed nibbles → (low nibbles, high nibbles).
#[inline(always)]
pub(super) fn nibbles(b: v128) -> (v128, v128) {
    (v128_and(b, u8x16_splat(0x0f)), u8x16_shr(b, 4))
}

/// The fifth bits of a Q5_0 block's 32 weights (bit j of `qh`) as bytes 0 or 16: weights 0..16, then 16..32.
#[inline(always)]
pub(super) fn fifth_bits(qh: u32) -> (v128, v128) {
    let bytes = u32x4_splat(qh);
    let bit = u8x16(1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128);
    let spread = |sel: v128| {
        let set = u8x16_eq(v128_and(i8x16_swizzle(bytes, sel), bit), bit);
        v128_and(set, u8x16_splat(16))
    };
    (
        spread(u8x16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)),
        spread(u8x16(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3)),
    )
}

fn q4k(w: &[u8], a: ActRow<'_>) -> f32 {
    let (mut acc, mut mins) = (f32x4_splat(0.0), 0f32);
    for (sb, blk) in w.chunks_exact(144).enumerate() {
        let d = f16_at(blk, 0);
        let dmin = f16_at(blk, 2);
        let scales = &blk[4..16];
        for j in 0..4 {
            // 32 bytes: their low nibbles are group 2j, their high nibbles group 2j + 1.
            let (lo0, hi0) = nibbles(load16(blk, 16 + 32 * j));
            let (lo1, hi1) = nibbles(load16(blk, 32 + 32 * j));
            for (h, (w0, w1)) in [(0, (lo0, lo1)), (1, (hi0, hi1))] {
                let g = 2 * j + h;
                let ab = sb * 8 + g;
                let (sc, m) = super::dequant::q4k_scale_min(g, scales);
                acc = scaled(acc, dot32_u7(w0, w1, a, ab), d * sc as f32 * a.d[ab]);
                mins += dmin * m as f32 * a.d[ab] * a.sum[ab] as f32;
            }
        }
    }
    hsum(acc) - mins
}

fn q6k(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = f32x4_splat(0.0);
    for (sb, blk) in w.chunks_exact(210).enumerate() {
        let d = f16_at(blk, 208);
        for half in 0..2 {
            for part in 0..4 {
                let g = 4 * half + part;
                let ab = sb * 8 + g;
                let sc = &blk[192 + 8 * half + 2 * part..];
                // Elements 0..16 of the group use the first scale, 16..32 the second.
                for (i, &scale) in sc[..2].iter().enumerate() {
                    let ql = load16(blk, 64 * half + 32 * (part & 1) + 16 * i);
                    let qh = load16(blk, 128 + 32 * half + 16 * i);
                    let lo = if part < 2 {
                        v128_and(ql, u8x16_splat(0x0f))
                    } else {
                        u8x16_shr(ql, 4)
                    };
                    let hb = v128_and(u8x16_shr(qh, 2 * part as u32), u8x16_splat(0x03));
                    let p = dot16_q6(
                        v128_or(lo, i8x16_shl(hb, 4)),
                        load16_i8(a.qs, 32 * ab + 16 * i),
                    );
                    acc = scaled(acc, p, d * (scale as i8) as f32 * a.d[ab]);
                }
            }
        }
    }
    hsum(acc)
}
