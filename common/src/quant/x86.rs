//! AVX2 + FMA (+ F16C) dot-product kernels (x86-64), chosen at run time when the CPU has them.
//!
//! Each kernel computes exactly what `dot::dot_scalar` computes for its type: weights are unpacked 32 at a time to
//! bytes, multiplied with the int8 activations by `maddubs` (u8 × i8 pairs → i16) and `madd` (→ i32), and scaled in
//! f32. Offsets and minimums are folded in through the activation block sums.

use std::arch::x86_64::*;

use super::GgmlType;
use super::dot::{ActRow, DotFn};

/// The AVX2 kernel for `ty`, if this CPU has AVX2, FMA and F16C.
pub(super) fn kernel(ty: GgmlType) -> Option<DotFn> {
    if !(is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c"))
    {
        return None;
    }
    // SAFETY (each wrapper): the CPU supports AVX2, FMA and F16C (checked above); slices are bounds-checked by the callers'
    // shape asserts and each kernel reads only whole blocks within `w` and `a`.
    Some(match ty {
        GgmlType::Q4_0 => |w, a| unsafe { q4_0(w, a) },
        GgmlType::Q4_1 => |w, a| unsafe { q4_1(w, a) },
        GgmlType::Q5_0 => |w, a| unsafe { q5_0(w, a) },
        GgmlType::Q8_0 => |w, a| unsafe { q8_0(w, a) },
        GgmlType::Q4K => |w, a| unsafe { q4k(w, a) },
        GgmlType::Q6K => |w, a| unsafe { q6k(w, a) },
        _ => return None,
    })
}

/// How far ahead of the block being read to ask for weights. The VMs this runs on prefetch poorly on their own:
/// this alone made decode ~25% faster.
const PREFETCH_BYTES: usize = 2048;

#[inline(always)]
fn prefetch(blk: &[u8]) {
    // SAFETY: prefetching is a hint; an address past the end of the weights is never dereferenced.
    unsafe {
        _mm_prefetch(
            blk.as_ptr().wrapping_add(PREFETCH_BYTES) as *const i8,
            _MM_HINT_T0,
        )
    };
}

/// The little-endian f16 at byte `i` of `b`, converted in-line (the `half` crate's conversion is a call per value).
///
/// In assembly because LLVM, seeing only 16 bits used, loads them with `vpinsrw` into whatever register it likes, often
/// a loop's accumulator: a false dependency that chained every block to the previous one (3× slower decode,
/// measured). `vmovd` writes the whole register and depends on nothing.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_at(b: &[u8], i: usize) -> f32 {
    let bits = u32::from(u16::from_le_bytes([b[i], b[i + 1]]));
    let out: __m128;
    // SAFETY: register-only instructions the caller's target features (F16C) provide.
    unsafe {
        std::arch::asm!(
            "vmovd {t}, {bits:e}",
            "vcvtph2ps {out}, {t}",
            bits = in(reg) bits,
            t = out(xmm_reg) _,
            out = out(xmm_reg) out,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    _mm_cvtss_f32(out)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 32 unsigned weight bytes (each < 128) times 32 int8 activations, summed in pairs of four → 8 × i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_u8_i8(w: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
}

/// 32 signed weight bytes times 32 int8 activations (sign moved onto the activations).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_i8_i8(w: __m256i, a: __m256i) -> __m256i {
    dot_u8_i8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
}

/// 16 bytes of packed nibbles → 32 bytes: low nibbles first (elements 0..16), then high nibbles (16..32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let b = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let lo = _mm_and_si128(b, _mm_set1_epi8(0x0f));
    let hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0f));
    _mm256_set_m128i(hi, lo)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: *const i8) -> __m256i {
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut off = 0f32;
    for (b, blk) in w.chunks_exact(18).enumerate() {
        prefetch(blk);
        let s = f16_at(blk, 0) * a.d[b];
        let p = dot_u8_i8(unsafe { nibbles(blk.as_ptr().add(2)) }, unsafe {
            load(a.qs.as_ptr().add(32 * b))
        });
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc);
        off += s * a.sum[b] as f32;
    }
    hsum(acc) - 8.0 * off
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut off = 0f32;
    for (b, blk) in w.chunks_exact(20).enumerate() {
        prefetch(blk);
        let s = f16_at(blk, 0) * a.d[b];
        let p = dot_u8_i8(unsafe { nibbles(blk.as_ptr().add(4)) }, unsafe {
            load(a.qs.as_ptr().add(32 * b))
        });
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc);
        off += f16_at(blk, 2) * a.d[b] * a.sum[b] as f32;
    }
    hsum(acc) + off
}

/// The 32 bits of `qh` spread to bytes: byte j is 0x10 where bit j is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn high_bits(qh: u32) -> __m256i {
    let v = _mm256_set1_epi32(qh as i32);
    // Byte j of the result looks at byte j/8 of qh …
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(v, shuf);
    // … and tests bit j%8 of it.
    let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut off = 0f32;
    for (b, blk) in w.chunks_exact(22).enumerate() {
        prefetch(blk);
        let s = f16_at(blk, 0) * a.d[b];
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let q = _mm256_or_si256(unsafe { nibbles(blk.as_ptr().add(6)) }, high_bits(qh));
        let p = dot_u8_i8(q, unsafe { load(a.qs.as_ptr().add(32 * b)) });
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc);
        off += s * a.sum[b] as f32;
    }
    hsum(acc) - 16.0 * off
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (b, blk) in w.chunks_exact(34).enumerate() {
        prefetch(blk);
        let s = f16_at(blk, 0) * a.d[b];
        let q = unsafe { load(blk.as_ptr().add(2) as *const i8) };
        let p = dot_i8_i8(q, unsafe { load(a.qs.as_ptr().add(32 * b)) });
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc);
    }
    hsum(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    let mask = _mm256_set1_epi8(0x0f);
    for (sb, blk) in w.chunks_exact(144).enumerate() {
        prefetch(blk);
        let d = f16_at(blk, 0);
        let dmin = f16_at(blk, 2);
        let scales = &blk[4..16];
        for j in 0..4 {
            let q = unsafe { _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * j) as *const __m256i) };
            let lo = _mm256_and_si256(q, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
            for (h, qv) in [(0, lo), (1, hi)] {
                let g = 2 * j + h;
                let ab = sb * 8 + g;
                let (sc, m) = super::dequant::q4k_scale_min(g, scales);
                let p = dot_u8_i8(qv, unsafe { load(a.qs.as_ptr().add(32 * ab)) });
                acc = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(p),
                    _mm256_set1_ps(d * sc as f32 * a.d[ab]),
                    acc,
                );
                mins += dmin * m as f32 * a.d[ab] * a.sum[ab] as f32;
            }
        }
    }
    hsum(acc) - mins
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k(w: &[u8], a: ActRow<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mask4 = _mm256_set1_epi8(0x0f);
    let mask2 = _mm256_set1_epi8(0x03);
    let m32 = _mm256_set1_epi8(32);
    for (sb, blk) in w.chunks_exact(210).enumerate() {
        prefetch(blk);
        let d = f16_at(blk, 208);
        for half in 0..2 {
            let qh =
                unsafe { _mm256_loadu_si256(blk.as_ptr().add(128 + 32 * half) as *const __m256i) };
            for part in 0..4 {
                let ql = unsafe {
                    _mm256_loadu_si256(
                        blk.as_ptr().add(64 * half + 32 * (part & 1)) as *const __m256i
                    )
                };
                let lo = if part < 2 {
                    _mm256_and_si256(ql, mask4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(ql, 4), mask4)
                };
                let hb = _mm256_and_si256(
                    _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * part as i32)),
                    mask2,
                );
                let q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hb, 4)), m32);
                let g = 4 * half + part;
                let ab = sb * 8 + g;
                let p = dot_i8_i8(q, unsafe { load(a.qs.as_ptr().add(32 * ab)) });
                let sc = &blk[192 + 8 * half + 2 * part..];
                let s0 = d * (sc[0] as i8) as f32 * a.d[ab];
                let s1 = d * (sc[1] as i8) as f32 * a.d[ab];
                // Lanes 0..4 hold elements 0..16 (first scale), lanes 4..8 elements 16..32 (second scale).
                let scale = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc);
            }
        }
    }
    hsum(acc)
}
