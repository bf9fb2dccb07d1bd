//! WebAssembly SIMD (simd128) dot-product kernels, for the browser and wasmtime builds (compiled with
//! `+simd128`, which every current browser and wasmtime run).
//!
//! Each kernel computes what `dot::dot_scalar` computes for its type: weights are unpacked 16 at a time to bytes,
//! widened with the int8 activations to i16 and multiplied-and-added in pairs (`i32x4.dot_i16x8_s`) to i32, then
//! scaled in f32. Offsets and minimums are folded in through the activation block sums, as on x86. Where relaxed
//! SIMD is enabled (the wasmtime component, the browser's relaxed engine), 4- to 6-bit weights use its 8-bit dot
//! product instead. The 32-element block types (Q4_0, Q4_1, Q5_0, Q8_0) are in `wasm_blocks32`.

use std::arch::wasm32::*;

use super::GgmlType;
use super::dot::{ActRow, DotFn, RowsFn, each_row};
use super::wasm_blocks32 as blocks32;
use super::wasm_kquants as kquants;

/// The simd128 kernel for `ty`.
pub(super) fn kernel(ty: GgmlType) -> Option<DotFn> {
    Some(match ty {
        GgmlType::Q4_0 => blocks32::dot::<blocks32::Q4_0>,
        GgmlType::Q4_1 => blocks32::dot::<blocks32::Q4_1>,
        GgmlType::Q4_1x4 => blocks32::dot_q4_1x4,
        GgmlType::Q5_0 => blocks32::dot::<blocks32::Q5_0>,
        GgmlType::Q8_0 => blocks32::dot::<blocks32::Q8_0>,
        GgmlType::Q4K => kquants::q4k,
        GgmlType::Q6K => kquants::q6k,
        _ => return None,
    })
}

/// The simd128 kernel for `ty` over runs of rows: the per-row kernel inlined in the loop, so a row costs no call.
pub(super) fn rows_kernel(ty: GgmlType) -> Option<RowsFn> {
    Some(match ty {
        GgmlType::Q4_0 => |w, n, a, out| each_row(w, n, a, out, blocks32::dot::<blocks32::Q4_0>),
        GgmlType::Q4_1 => |w, n, a, out| each_row(w, n, a, out, blocks32::dot::<blocks32::Q4_1>),
        GgmlType::Q4_1x4 => |w, n, a, out| each_row(w, n, a, out, blocks32::dot_q4_1x4),
        GgmlType::Q5_0 => |w, n, a, out| each_row(w, n, a, out, blocks32::dot::<blocks32::Q5_0>),
        GgmlType::Q8_0 => |w, n, a, out| each_row(w, n, a, out, blocks32::dot::<blocks32::Q8_0>),
        GgmlType::Q4K => |w, n, a, out| each_row(w, n, a, out, kquants::q4k),
        GgmlType::Q6K => |w, n, a, out| each_row(w, n, a, out, kquants::q6k),
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

/// Dot products of one weight row in batched.rs's common form (signed bytes `q`, a scale per 16) with a tile of
/// activation rows, without the rows' `min` terms. Each block's weights are widened once for the whole tile.
/// Inlined: as a call, prefill measured ~5% slower.
#[inline(always)]
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

/// `dot::quantize_block` in simd128, bit for bit: the same maximum (`|x| > m ? |x| : m`, so a NaN never enters
/// it), the same products, rounding half away from zero from `trunc`, and saturating
/// conversion to bytes as `as i8` does.
#[inline]
pub(super) fn quantize_block(xs: &[f32; 32], q: &mut [i8; 32]) -> (f32, i32) {
    let v: [v128; 8] = std::array::from_fn(|i| load_f32x4(&xs[4 * i..4 * i + 4]));
    let m = v.iter().fold(f32x4_splat(0.0), |m, &x| {
        let a = f32x4_abs(x);
        v128_bitselect(a, m, f32x4_gt(a, m))
    });
    let lanes = [
        f32x4_extract_lane::<0>(m),
        f32x4_extract_lane::<1>(m),
        f32x4_extract_lane::<2>(m),
        f32x4_extract_lane::<3>(m),
    ];
    let amax = lanes.iter().fold(0f32, |m, &l| if l > m { l } else { m });
    let d = amax / 127.0;
    let id = f32x4_splat(if d > 0.0 { 1.0 / d } else { 0.0 });
    let codes: [v128; 8] = std::array::from_fn(|i| {
        let y = f32x4_mul(v[i], id);
        let t = f32x4_trunc(y);
        let away = f32x4_ge(f32x4_abs(f32x4_sub(y, t)), f32x4_splat(0.5));
        let one = v128_or(v128_and(y, f32x4_splat(-0.0)), f32x4_splat(1.0));
        i32x4_trunc_sat_f32x4(f32x4_add(t, v128_and(away, one)))
    });
    let sum = codes.iter().fold(i32x4_splat(0), |s, &c| i32x4_add(s, c));
    let sum = i32x4_extract_lane::<0>(sum)
        + i32x4_extract_lane::<1>(sum)
        + i32x4_extract_lane::<2>(sum)
        + i32x4_extract_lane::<3>(sum);
    let narrow = |a: usize| {
        i8x16_narrow_i16x8(
            i16x8_narrow_i32x4(codes[a], codes[a + 1]),
            i16x8_narrow_i32x4(codes[a + 2], codes[a + 3]),
        )
    };
    for (half, bytes) in q.chunks_exact_mut(16).enumerate() {
        // SAFETY: `bytes` is 16 writable bytes; wasm stores need no alignment.
        unsafe { v128_store(bytes.as_mut_ptr() as *mut v128, narrow(4 * half)) };
    }
    (d, sum)
}

/// `acc + p · s` for i32 lanes `p`.
#[inline(always)]
fn scaled(acc: v128, p: v128, s: f32) -> v128 {
    f32x4_add(acc, f32x4_mul(f32x4_convert_i32x4(p), f32x4_splat(s)))
}

#[inline(always)]
pub(super) fn hsum(v: v128) -> f32 {
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

/// `[Σ p[0], Σ p[1], Σ p[2], Σ p[3]]`, each the sum of that vector's four lanes (exact: integers).
#[inline(always)]
pub(super) fn sum_lanes([p0, p1, p2, p3]: [v128; 4]) -> v128 {
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

#[inline(always)]
pub(super) fn load_i32x4(v: &[i32]) -> v128 {
    let v: &[i32; 4] = v.try_into().expect("four lanes");
    // SAFETY: 16 readable bytes; wasm loads need no alignment.
    unsafe { v128_load(v.as_ptr() as *const v128) }
}

#[inline(always)]
pub(super) fn load_f32x4(v: &[f32]) -> v128 {
    let v: &[f32; 4] = v.try_into().expect("four lanes");
    // SAFETY: as in `load_i32x4`.
    unsafe { v128_load(v.as_ptr() as *const v128) }
}
