//! Multi-token mat-mul (prefill): each weight row is unpacked once into a common form and dotted with the
//! activations of several tokens at a time, instead of unpacking its blocks again for every token.
//!
//! The common form holds, for a row of `k` weights, signed 8-bit values `q`, a scale per 16 values and an additive
//! minimum per 32, so that `w[j] = scale[j / 16] · q[j] + min[j / 32]` for every supported block type. The dot product
//! with a [`Q8Act`] row is then `Σ_b d_a[b] · (Σ_halves scale · Σ q·a) + Σ_b min[b] · d_a[b] · Σa_b`, the same
//! integers and scales `dot::dot_scalar` uses.

use super::dequant::{q4k_scale_min, q6k_group};
use super::dot::{ActRow, Q8Act};
use super::{GgmlType, f16_at};

/// Tokens dotted together against one unpacked row.
pub(super) const TILE: usize = 4;

/// The activation rows of `tokens` (at most [`TILE`]); missing tokens of a short tile repeat the first, and their
/// results are dropped.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "wasm32", target_feature = "simd128")
))]
fn tile_rows<'a>(act: &'a Q8Act, tokens: &std::ops::Range<usize>) -> [ActRow<'a>; TILE] {
    let n = tokens.len();
    std::array::from_fn(|i| act.row(tokens.start + if i < n { i } else { 0 }))
}

/// A weight row in the common form.
pub(super) struct UnpackedRow {
    q: Vec<i8>,
    scale: Vec<f32>,
    min: Vec<f32>,
    /// Whether any `min` is non-zero (Q4_1, Q4_K); the other types skip that term.
    has_min: bool,
}

impl UnpackedRow {
    pub(super) fn new(k: usize) -> Self {
        UnpackedRow {
            q: vec![0; k],
            scale: vec![0.0; k / 16],
            min: vec![0.0; k / 32],
            has_min: false,
        }
    }

    /// Unpacks one row of `ty` blocks.
    pub(super) fn fill(&mut self, ty: GgmlType, w: &[u8]) {
        let bb = ty.block_bytes();
        self.has_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q4_1x4 | GgmlType::Q4K);
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                for (b, blk) in w.chunks_exact(bb).enumerate() {
                    let d = f16_at(blk, 0);
                    self.scale[2 * b] = d;
                    self.scale[2 * b + 1] = d;
                    self.min[b] = if ty == GgmlType::Q4_1 {
                        f16_at(blk, 2)
                    } else {
                        0.0
                    };
                    let q = &mut self.q[32 * b..32 * b + 32];
                    match ty {
                        GgmlType::Q8_0 => q
                            .iter_mut()
                            .zip(&blk[2..34])
                            .for_each(|(o, &v)| *o = v as i8),
                        GgmlType::Q5_0 => {
                            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                            for j in 0..16 {
                                q[j] = (((blk[6 + j] & 0xf) as u32 | (((qh >> j) & 1) << 4)) as i32
                                    - 16) as i8;
                                q[j + 16] = (((blk[6 + j] >> 4) as u32
                                    | (((qh >> (j + 16)) & 1) << 4))
                                    as i32
                                    - 16) as i8;
                            }
                        }
                        _ => {
                            let (qs, off) = if ty == GgmlType::Q4_1 {
                                (&blk[4..20], 0)
                            } else {
                                (&blk[2..18], 8)
                            };
                            for j in 0..16 {
                                q[j] = ((qs[j] & 0xf) as i8) - off;
                                q[j + 16] = ((qs[j] >> 4) as i8) - off;
                            }
                        }
                    }
                }
            }
            GgmlType::Q4_1x4 => {
                for b in 0..self.min.len() {
                    let (d, m, qs) = super::nibble_block(ty, w, b);
                    (self.scale[2 * b], self.scale[2 * b + 1], self.min[b]) = (d, d, m);
                    let q = &mut self.q[32 * b..32 * b + 32];
                    for j in 0..16 {
                        q[j] = (qs[j] & 0xf) as i8;
                        q[j + 16] = (qs[j] >> 4) as i8;
                    }
                }
            }
            GgmlType::Q4K => {
                for (sb, blk) in w.chunks_exact(bb).enumerate() {
                    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                    for g in 0..8 {
                        let (sc, m) = q4k_scale_min(g, &blk[4..16]);
                        let ab = sb * 8 + g;
                        self.scale[2 * ab] = d * sc as f32;
                        self.scale[2 * ab + 1] = d * sc as f32;
                        self.min[ab] = -dmin * m as f32;
                        let src = &blk[16 + 32 * (g / 2)..][..32];
                        let shift = 4 * (g % 2);
                        for (o, &v) in self.q[32 * ab..32 * ab + 32].iter_mut().zip(src) {
                            *o = ((v >> shift) & 0xf) as i8;
                        }
                    }
                }
            }
            GgmlType::Q6K => {
                for (sb, blk) in w.chunks_exact(bb).enumerate() {
                    let d = f16_at(blk, 208);
                    for g in 0..8 {
                        let (q, sc) = q6k_group(blk, g);
                        let ab = sb * 8 + g;
                        self.scale[2 * ab] = d * sc[0] as f32;
                        self.scale[2 * ab + 1] = d * sc[1] as f32;
                        self.min[ab] = 0.0;
                        self.q[32 * ab..32 * ab + 32].copy_from_slice(&q);
                    }
                }
            }
            other => panic!("no batched kernel for {other:?}"),
        }
    }

    /// Dot products of this row with activation rows `tokens` (at most [`TILE`]) of `act`.
    pub(super) fn dot_tile(&self, act: &Q8Act, tokens: std::ops::Range<usize>) -> [f32; TILE] {
        debug_assert!(tokens.len() <= TILE && !tokens.is_empty());
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA are present (checked above); all reads are within the row and the activations.
            return unsafe { self.dot_tile_avx2(act, tokens) };
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        {
            let rows = tile_rows(act, &tokens);
            let mut out = super::wasm::dot_tile_unpacked(&self.q, &self.scale, &rows);
            let mins = self.mins(&rows);
            for t in 0..TILE {
                out[t] += mins[t];
            }
            return out;
        }
        #[allow(unreachable_code)]
        let mut out = [0f32; TILE];
        for (o, t) in out.iter_mut().zip(tokens) {
            *o = self.dot(act.row(t));
        }
        out
    }

    /// The `min` terms of a tile's dot products (zero for types without minimums).
    #[inline(always)]
    fn mins(&self, rows: &[ActRow<'_>; TILE]) -> [f32; TILE] {
        // Plain loops: a closure here is not inlined into a `target_feature` function reliably, and a call per
        // block cost a third of prefill time (measured).
        let mut mins = [0f32; TILE];
        if self.has_min {
            for t in 0..TILE {
                let a = &rows[t];
                for b in 0..self.min.len() {
                    mins[t] += self.min[b] * a.d[b] * a.sum[b] as f32;
                }
            }
        }
        mins
    }

    /// Portable dot product with one activation row.
    fn dot(&self, a: ActRow<'_>) -> f32 {
        let mut acc = 0f32;
        for b in 0..self.min.len() {
            let q = &self.q[32 * b..32 * b + 32];
            let x = &a.qs[32 * b..32 * b + 32];
            let s0: i32 = q[..16]
                .iter()
                .zip(&x[..16])
                .map(|(&w, &v)| w as i32 * v as i32)
                .sum();
            let s1: i32 = q[16..]
                .iter()
                .zip(&x[16..])
                .map(|(&w, &v)| w as i32 * v as i32)
                .sum();
            acc += a.d[b] * (self.scale[2 * b] * s0 as f32 + self.scale[2 * b + 1] * s1 as f32);
            acc += self.min[b] * a.d[b] * a.sum[b] as f32;
        }
        acc
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_tile_avx2(&self, act: &Q8Act, tokens: std::ops::Range<usize>) -> [f32; TILE] {
        use std::arch::x86_64::*;
        let rows = tile_rows(act, &tokens);
        let mut acc = [_mm256_setzero_ps(); TILE];
        let ones = _mm256_set1_epi16(1);
        for b in 0..self.min.len() {
            let w = unsafe { _mm256_loadu_si256(self.q.as_ptr().add(32 * b) as *const __m256i) };
            let wabs = _mm256_sign_epi8(w, w);
            // Lanes 0..4 hold values 0..16 (first scale), lanes 4..8 values 16..32 (second).
            let sv = _mm256_set_m128(
                _mm_set1_ps(self.scale[2 * b + 1]),
                _mm_set1_ps(self.scale[2 * b]),
            );
            for t in 0..TILE {
                let a = unsafe {
                    _mm256_loadu_si256(rows[t].qs.as_ptr().add(32 * b) as *const __m256i)
                };
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(a, w)), ones);
                let da = rows[t].d[b];
                acc[t] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(p),
                    _mm256_mul_ps(sv, _mm256_set1_ps(da)),
                    acc[t],
                );
            }
        }
        let mins = self.mins(&rows);
        let mut out = [0f32; TILE];
        for t in 0..TILE {
            let v = acc[t];
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            out[t] = _mm_cvtss_f32(s) + mins[t];
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dot::dot_scalar;
    use crate::quant::dot::tests::{TYPES, random_row};

    /// The unpacked form's portable and SIMD dot products equal the per-token kernels' reference, for every type.
    #[test]
    fn unpacked_rows_match_reference() {
        let k = 512;
        let x: Vec<f32> = (0..3 * k)
            .map(|i| ((i * 41 % 103) as f32 - 51.0) / 20.0)
            .collect();
        let act = Q8Act::quantize(&x, k);
        for ty in TYPES {
            let w = random_row(ty, k, 99);
            let mut row = UnpackedRow::new(k);
            row.fill(ty, &w);
            let tile = row.dot_tile(&act, 0..3);
            for (t, &tiled) in tile.iter().enumerate().take(3) {
                let want = dot_scalar(ty, &w, act.row(t));
                let portable = row.dot(act.row(t));
                for got in [portable, tiled] {
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{ty:?} token {t}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
