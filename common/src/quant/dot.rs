//! Quantized mat-mul: `out[n][r] = Σ_k x[n][k] · W[r][k]` with W in GGML blocks and x quantized to 8 bits.
//!
//! Every weight type is dotted against the same activation format, [`Q8Act`]: blocks of 32 int8 values with an f32
//! scale and the block's integer sum (which folds in the weights' offsets and minimums). The portable kernels in this
//! file define the arithmetic; SIMD kernels must agree with them exactly up to f32 summation order.

use super::batched::{TILE, UnpackedRow};
use super::dequant::{q4k_scale_min, q6k_group};
use super::{GgmlType, f16_at};
use crate::parallel::OutMatrix;

/// From this many tokens on, weight rows are unpacked once and dotted with several tokens at a time.
const BATCH_MIN_TOKENS: usize = 4;

/// Activation block length.
pub const QK8: usize = 32;

/// Rows of activations quantized to int8 in blocks of [`QK8`]. Each row is padded with zero blocks (scale and sum 0)
/// to a multiple of [`ROW_BLOCKS_ALIGN`] blocks, so kernels that take four blocks a step can end a row with a whole
/// step: the padding adds exactly nothing.
#[derive(Debug, Clone, Default)]
pub struct Q8Act {
    pub k: usize,
    rows: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<i32>,
}

/// Blocks a [`Q8Act`] row is padded to a multiple of.
pub const ROW_BLOCKS_ALIGN: usize = 4;

impl Q8Act {
    /// Quantizes `x` (`rows × k`, row-major; `k` a multiple of 32).
    pub fn quantize(x: &[f32], k: usize) -> Self {
        assert!(
            k.is_multiple_of(QK8) && x.len().is_multiple_of(k),
            "activation length {} / row {} not in blocks of 32",
            x.len(),
            k
        );
        let rows = x.len().checked_div(k).unwrap_or(0);
        let stride = Self::row_blocks(k);
        let mut a = Q8Act {
            k,
            rows,
            qs: vec![0; rows * stride * QK8],
            d: vec![0.0; rows * stride],
            sum: vec![0; rows * stride],
        };
        for (row, xr) in x.chunks_exact(k).enumerate() {
            for (col, xs) in xr.chunks_exact(QK8).enumerate() {
                let at = row * stride + col;
                let xs: &[f32; QK8] = xs.try_into().expect("a block");
                let q: &mut [i8; QK8] = (&mut a.qs[at * QK8..(at + 1) * QK8])
                    .try_into()
                    .expect("a block");
                (a.d[at], a.sum[at]) = quantize_block(xs, q);
            }
        }
        a
    }

    /// Blocks per row, padding included.
    fn row_blocks(k: usize) -> usize {
        (k / QK8).next_multiple_of(ROW_BLOCKS_ALIGN)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// One row's blocks, padding included.
    #[inline]
    pub fn row(&self, n: usize) -> ActRow<'_> {
        let nb = Self::row_blocks(self.k);
        ActRow {
            qs: &self.qs[n * nb * QK8..(n + 1) * nb * QK8],
            d: &self.d[n * nb..(n + 1) * nb],
            sum: &self.sum[n * nb..(n + 1) * nb],
        }
    }
}

/// One block of 32 activations as int8 codes in `q`: returns the scale and the codes' sum.
#[inline]
fn quantize_block(xs: &[f32; QK8], q: &mut [i8; QK8]) -> (f32, i32) {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return super::wasm::quantize_block(xs, q);
    #[allow(unreachable_code)]
    quantize_block_scalar(xs, q)
}

/// [`quantize_block`] in plain Rust: the definition the SIMD version matches bit for bit.
fn quantize_block_scalar(xs: &[f32; QK8], q: &mut [i8; QK8]) -> (f32, i32) {
    // Comparisons, not `f32::max`: in WebAssembly that is a call to `fmaxf` (NaN rules differ).
    let amax = xs
        .iter()
        .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut s = 0i32;
    for (q, &v) in q.iter_mut().zip(xs) {
        *q = round_half_away(v * id) as i8;
        s += *q as i32;
    }
    (d, s)
}

/// `x` rounded half away from zero, as `f32::round` does (and llama.cpp's `roundf`), from `trunc`: one instruction
/// in WebAssembly, where `round` is a call to libm's `roundf`. `x − trunc(x)` is exact.
#[inline]
fn round_half_away(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

/// A borrowed row of a [`Q8Act`].
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub sum: &'a [i32],
}

/// How a quantized mat-mul treats its activations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Precision {
    /// Activations quantized to 8 bits, integer dot products: the fast path (as llama.cpp).
    #[default]
    Q8,
    /// Weights dequantized to f32 and dotted with f32 activations: slow, but free of activation rounding, so
    /// results depend only continuously on the inputs (reference runs, exactness tests).
    F32,
}

/// Computes `out = x · Wᵀ` for `x: [n, k]` (f32) and `w: [rows, k]` in GGML type `ty`, using all worker threads.
///
/// `out` is `[n, rows]`. Float weights (F32/F16) are always dotted in f32; quantized weights per `precision`.
pub fn matmul(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    k: usize,
    x: &[f32],
    out: &mut [f32],
    precision: Precision,
) {
    let n = x.len() / k;
    let row_bytes = ty.row_bytes(k);
    assert_eq!(
        w.len(),
        rows * row_bytes,
        "weight bytes do not match [{rows}, {k}] of {ty:?}"
    );
    assert_eq!(out.len(), n * rows);
    let out = OutMatrix::new(out, n, rows);
    let weight_row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];

    let float_weights = matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    if float_weights || precision == Precision::F32 {
        crate::parallel::for_each_chunk(out, true, |r0, r1, sink| {
            let mut wrow = vec![0f32; k];
            for r in r0..r1 {
                super::dequantize_row(ty, weight_row(r), &mut wrow);
                for i in 0..n {
                    sink(i, r, &[dot_f32(&x[i * k..(i + 1) * k], &wrow)]);
                }
            }
        });
        return;
    }

    let act = Q8Act::quantize(x, k);
    if n >= BATCH_MIN_TOKENS {
        crate::parallel::for_each_chunk(out, true, |r0, r1, sink| {
            let mut row = UnpackedRow::new(k);
            for r in r0..r1 {
                row.fill(ty, weight_row(r));
                for t0 in (0..n).step_by(TILE) {
                    let t1 = (t0 + TILE).min(n);
                    for (t, v) in (t0..t1).zip(row.dot_tile(&act, t0..t1)) {
                        sink(t, r, &[v]);
                    }
                }
            }
        });
    } else {
        let kernel = pick_kernel(ty);
        let rows_kernel = pick_rows_kernel(ty);
        let split = w.len() >= crate::parallel::MIN_SPLIT_BYTES;
        crate::parallel::for_each_chunk(out, split, |r0, r1, sink| {
            // Runs of rows, each a few kB of weights that stay in cache for every token.
            const RUN: usize = 32;
            let mut values = [0f32; RUN];
            for r in (r0..r1).step_by(RUN) {
                let m = (r1 - r).min(RUN);
                let run = &w[r * row_bytes..(r + m) * row_bytes];
                for i in 0..n {
                    match rows_kernel {
                        Some(rows_kernel) => {
                            rows_kernel(run, row_bytes, act.row(i), &mut values[..m])
                        }
                        None => each_row(run, row_bytes, act.row(i), &mut values[..m], kernel),
                    }
                    sink(i, r, &values[..m]);
                }
            }
        });
    }
}

/// f32 dot product in 16 independent lanes: a single running sum would serialise every add (and cannot be
/// vectorised without reordering, which only explicit lanes allow).
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for j in 0..L {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The portable reference for [`matmul`] on quantized weights: one thread, no SIMD.
pub fn matmul_scalar(ty: GgmlType, w: &[u8], rows: usize, k: usize, x: &[f32], out: &mut [f32]) {
    let act = Q8Act::quantize(x, k);
    let row_bytes = ty.row_bytes(k);
    for i in 0..act.rows() {
        for r in 0..rows {
            out[i * rows + r] = dot_scalar(ty, &w[r * row_bytes..(r + 1) * row_bytes], act.row(i));
        }
    }
}

pub(super) type DotFn = fn(&[u8], ActRow<'_>) -> f32;

/// Dot products of consecutive weight rows (`w`, rows of `row_bytes`) with one activation row, into `out`.
pub(super) type RowsFn = fn(&[u8], usize, ActRow<'_>, &mut [f32]);

/// `out[r] = dot(row r of w, a)` for consecutive rows of `row_bytes` (inlined, so a constant `dot` is too).
#[inline(always)]
pub(super) fn each_row(w: &[u8], row_bytes: usize, a: ActRow<'_>, out: &mut [f32], dot: DotFn) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
        *o = dot(row, a);
    }
}

/// A kernel over runs of rows, where the per-row kernel's call costs enough to matter (WebAssembly).
fn pick_rows_kernel(ty: GgmlType) -> Option<RowsFn> {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return super::wasm::rows_kernel(ty);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    {
        let _ = ty;
        None
    }
}

pub(super) fn pick_kernel(ty: GgmlType) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = super::x86::kernel(ty) {
        return k;
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if let Some(k) = super::wasm::kernel(ty) {
        return k;
    }
    match ty {
        GgmlType::Q4_0 => |w, a| dot_scalar(GgmlType::Q4_0, w, a),
        GgmlType::Q4_1 => |w, a| dot_scalar(GgmlType::Q4_1, w, a),
        GgmlType::Q4_1x4 => |w, a| dot_scalar(GgmlType::Q4_1x4, w, a),
        GgmlType::Q5_0 => |w, a| dot_scalar(GgmlType::Q5_0, w, a),
        GgmlType::Q8_0 => |w, a| dot_scalar(GgmlType::Q8_0, w, a),
        GgmlType::Q4K => |w, a| dot_scalar(GgmlType::Q4K, w, a),
        GgmlType::Q6K => |w, a| dot_scalar(GgmlType::Q6K, w, a),
        other => panic!("no mat-mul kernel for {other:?}"),
    }
}

/// Portable dot product of one weight row with one activation row.
pub fn dot_scalar(ty: GgmlType, w: &[u8], a: ActRow<'_>) -> f32 {
    let bb = ty.block_bytes();
    let mut acc = 0f32;
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_1x4 => {
            // Blocks of 32 (a Q4_1x4 row's padding included: its activations are zero blocks too).
            let blocks = (w.len() / bb * (ty.block_len() / 32)).min(a.d.len());
            for b in 0..blocks {
                let (d, m, qs) = super::nibble_block(ty, w, b);
                let aq = &a.qs[b * 32..b * 32 + 32];
                let mut s = 0i32;
                for j in 0..16 {
                    s += (qs[j] & 0xf) as i32 * aq[j] as i32
                        + (qs[j] >> 4) as i32 * aq[j + 16] as i32;
                }
                acc += if ty == GgmlType::Q4_0 {
                    d * a.d[b] * (s - 8 * a.sum[b]) as f32
                } else {
                    d * a.d[b] * s as f32 + m * a.d[b] * a.sum[b] as f32
                };
            }
        }
        GgmlType::Q5_0 => {
            for (b, blk) in w.chunks_exact(bb).enumerate() {
                let d = f16_at(blk, 0);
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let qs = &blk[6..22];
                let aq = &a.qs[b * 32..b * 32 + 32];
                let mut s = 0i32;
                for j in 0..16 {
                    let lo = (qs[j] & 0xf) as u32 | (((qh >> j) & 1) << 4);
                    let hi = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                    s += lo as i32 * aq[j] as i32 + hi as i32 * aq[j + 16] as i32;
                }
                acc += d * a.d[b] * (s - 16 * a.sum[b]) as f32;
            }
        }
        GgmlType::Q8_0 => {
            for (b, blk) in w.chunks_exact(bb).enumerate() {
                let aq = &a.qs[b * 32..b * 32 + 32];
                let s: i32 = blk[2..34]
                    .iter()
                    .zip(aq)
                    .map(|(&q, &x)| q as i8 as i32 * x as i32)
                    .sum();
                acc += f16_at(blk, 0) * a.d[b] * s as f32;
            }
        }
        GgmlType::Q4K => {
            for (sb, blk) in w.chunks_exact(bb).enumerate() {
                let d = f16_at(blk, 0);
                let dmin = f16_at(blk, 2);
                let scales = &blk[4..16];
                let qs = &blk[16..144];
                for j in 0..4 {
                    let q = &qs[32 * j..32 * j + 32];
                    for (h, shift) in [(0, 0), (1, 4)] {
                        let g = 2 * j + h; // 32-element group within the super-block
                        let ab = sb * 8 + g;
                        let (sc, m) = q4k_scale_min(g, scales);
                        let aq = &a.qs[ab * 32..ab * 32 + 32];
                        let s: i32 = q
                            .iter()
                            .zip(aq)
                            .map(|(&q, &x)| ((q >> shift) & 0xf) as i32 * x as i32)
                            .sum();
                        acc += a.d[ab]
                            * (d * sc as f32 * s as f32 - dmin * m as f32 * a.sum[ab] as f32);
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
                    let aq = &a.qs[ab * 32..ab * 32 + 32];
                    let mut s = [0i32; 2];
                    for l in 0..32 {
                        s[l / 16] += q[l] as i32 * aq[l] as i32;
                    }
                    acc += d * a.d[ab] * (sc[0] as i32 * s[0] + sc[1] as i32 * s[1]) as f32;
                }
            }
        }
        other => panic!("no mat-mul kernel for {other:?}"),
    }
    acc
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Random but valid blocks of `ty`: random quants, f16 scales of sane size.
    pub(in crate::quant) fn random_row(ty: GgmlType, k: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut row: Vec<u8> = (0..ty.row_bytes(k)).map(|_| next() as u8).collect();
        let scale = |row: &mut Vec<u8>, at: usize, v: f32| {
            row[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes())
        };
        for b in 0..k / ty.block_len() {
            let o = b * ty.block_bytes();
            let r = (next() % 1000) as f32 / 1000.0;
            match ty {
                GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                    scale(&mut row, o, 0.01 + 0.02 * r)
                }
                GgmlType::Q4_1 => {
                    scale(&mut row, o, 0.01 + 0.02 * r);
                    scale(&mut row, o + 2, -0.1 * r);
                }
                GgmlType::Q4K => {
                    scale(&mut row, o, 0.002 + 0.002 * r);
                    scale(&mut row, o + 2, 0.001 * r);
                }
                GgmlType::Q6K => scale(&mut row, o + 208, 0.001 + 0.001 * r),
                _ => unreachable!(),
            }
        }
        row
    }

    pub(in crate::quant) const TYPES: [GgmlType; 6] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];

    /// The kernel in use (SIMD where the CPU has it) agrees with the portable one, and both with f32 arithmetic on
    /// the dequantized weights up to the activations' 8-bit rounding.
    #[test]
    fn kernels_agree_with_reference() {
        // 512: whole super-blocks; 608: 19 blocks of 32, which kernels taking four blocks a step end with 3 left.
        for k in [512, 608] {
            kernels_agree_with_reference_for(k);
        }
    }

    fn kernels_agree_with_reference_for(k: usize) {
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let act = Q8Act::quantize(&x, k);
        for ty in TYPES
            .into_iter()
            .filter(|t| k.is_multiple_of(t.block_len()))
        {
            let kernel = pick_kernel(ty);
            for seed in 1..20u64 {
                let w = random_row(ty, k, seed * 7919);
                let fast = kernel(&w, act.row(0));
                let portable = dot_scalar(ty, &w, act.row(0));
                assert!(
                    (fast - portable).abs() <= 1e-4 * (1.0 + portable.abs()),
                    "{ty:?}: kernel {fast} vs portable {portable}"
                );
                let mut deq = vec![0f32; k];
                super::super::dequantize_row(ty, &w, &mut deq);
                let exact: f32 = deq.iter().zip(&x).map(|(a, b)| a * b).sum();
                let norm: f32 = deq.iter().map(|v| v.abs()).sum::<f32>() * 2.0 / 127.0;
                assert!(
                    (portable - exact).abs() <= norm,
                    "{ty:?}: portable {portable} vs exact {exact} (bound {norm})"
                );
            }
        }
    }

    #[test]
    fn round_half_away_is_f32_round() {
        for x in [
            0.5f32,
            -0.5,
            1.5,
            -2.5,
            0.49999997,
            -0.49999997,
            126.5,
            127.0,
            0.0,
            -0.0,
            3.2,
            -7.7,
        ] {
            assert_eq!(round_half_away(x).to_bits(), x.round().to_bits(), "{x}");
        }
        let mut x = 1u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = (x as f32 / u32::MAX as f32 - 0.5) * 300.0;
            assert_eq!(round_half_away(v), v.round(), "{v}");
        }
    }

    /// The block quantizer in use (simd128 in wasm) gives exactly the portable one's codes, scale and sum, on
    /// ordinary values, exact halves, zeros, huge values and NaNs.
    #[test]
    fn block_quantizer_matches_portable() {
        let mut x = 7u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for round in 0..2000 {
            let scale = [1e-3, 1.0, 37.0, 1e30][round % 4];
            let mut xs: [f32; QK8] =
                std::array::from_fn(|_| (next() as f32 / u32::MAX as f32 - 0.5) * scale);
            match round % 7 {
                // Scale 1 (the maximum is 127): every other code is an exact half before rounding.
                0 => {
                    xs = std::array::from_fn(|i| i as f32 - 15.5);
                    xs[round % QK8] = -127.0;
                }
                1 => xs = [0.0; QK8],
                2 => xs[3] = f32::NAN,
                3 => xs[5] = -xs.iter().fold(0f32, |m, v| m.max(v.abs())) * 1.0000001,
                _ => {}
            }
            let (mut fast, mut plain) = ([0i8; QK8], [0i8; QK8]);
            let a = quantize_block(&xs, &mut fast);
            let b = quantize_block_scalar(&xs, &mut plain);
            assert_eq!(
                (a.0.to_bits(), a.1, fast),
                (b.0.to_bits(), b.1, plain),
                "{xs:?}"
            );
        }
    }

    /// The threaded mat-mul fills every output of several rows, for both precisions.
    #[test]
    fn matmul_fills_all_outputs() {
        // 1 token: the per-token kernels; 6 tokens: the batched path, one full tile and a remainder of 2.
        for n in [1, 6] {
            matmul_fills_all_outputs_for(n);
        }
    }

    fn matmul_fills_all_outputs_for(n: usize) {
        let (rows, k) = (70, 256);
        let x: Vec<f32> = (0..n * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        for ty in TYPES {
            let w: Vec<u8> = (0..rows)
                .flat_map(|r| random_row(ty, k, r as u64 + 11))
                .collect();
            let mut fast = vec![f32::NAN; n * rows];
            matmul(ty, &w, rows, k, &x, &mut fast, Precision::Q8);
            let mut slow = vec![0f32; n * rows];
            matmul_scalar(ty, &w, rows, k, &x, &mut slow);
            let mut exact = vec![f32::NAN; n * rows];
            matmul(ty, &w, rows, k, &x, &mut exact, Precision::F32);
            let scale = exact.iter().fold(1f32, |m, v| m.max(v.abs()));
            for i in 0..n * rows {
                assert!(
                    (fast[i] - slow[i]).abs() <= 1e-4 * (1.0 + slow[i].abs()),
                    "{ty:?} [{i}]: {} vs {}",
                    fast[i],
                    slow[i]
                );
                let d = (exact[i] - slow[i]).abs();
                assert!(
                    d <= 0.02 * scale,
                    "{ty:?} [{i}]: f32 {} vs 8-bit {} (scale {scale})",
                    exact[i],
                    slow[i]
                );
            }
        }
    }
}
