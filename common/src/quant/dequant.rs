//! Reference dequantization of one row of GGML blocks to f32: the ground truth the fast kernels are tested against,
//! and the path used where weights are uploaded to a GPU as plain floats.

use super::{GgmlType, f16_at};

/// Dequantizes `row` (whole blocks of `ty`) into `out` (`out.len()` elements).
///
/// Panics if `ty` is not supported or the lengths disagree: callers check both when the model is loaded.
pub fn dequantize_row(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    assert_eq!(
        row.len(),
        ty.row_bytes(out.len()),
        "row of {ty:?} has the wrong length"
    );
    let bb = ty.block_bytes();
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f16_at(row, 2 * i);
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_1x4 => {
            let off = if ty == GgmlType::Q4_0 { 8.0 } else { 0.0 };
            for (b, y) in out.chunks_exact_mut(32).enumerate() {
                let (d, m, qs) = super::nibble_block(ty, row, b);
                for j in 0..16 {
                    y[j] = ((qs[j] & 0xf) as f32 - off) * d + m;
                    y[j + 16] = ((qs[j] >> 4) as f32 - off) * d + m;
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            for (b, y) in row.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                let (m, rest, off) = if ty == GgmlType::Q5_1 {
                    (f16_at(b, 2), &b[4..], 0.0)
                } else {
                    (0.0, &b[2..], 16.0)
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                for j in 0..16 {
                    let h0 = ((qh >> j) & 1) << 4;
                    let h1 = ((qh >> (j + 16)) & 1) << 4;
                    y[j] = (((qs[j] & 0xf) as u32 | h0) as f32 - off) * d + m;
                    y[j + 16] = (((qs[j] >> 4) as u32 | h1) as f32 - off) * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, y) in row.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    y[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
        GgmlType::Q4K => {
            for (b, y) in row.chunks_exact(bb).zip(out.chunks_exact_mut(256)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                for j in 0..4 {
                    let (s1, m1) = q4k_scale_min(2 * j, scales);
                    let (s2, m2) = q4k_scale_min(2 * j + 1, scales);
                    let q = &qs[32 * j..32 * j + 32];
                    for l in 0..32 {
                        y[64 * j + l] = d * s1 as f32 * (q[l] & 0xf) as f32 - dmin * m1 as f32;
                        y[64 * j + 32 + l] = d * s2 as f32 * (q[l] >> 4) as f32 - dmin * m2 as f32;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (b, y) in row.chunks_exact(bb).zip(out.chunks_exact_mut(256)) {
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    let y = &mut y[128 * half..128 * half + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
        other => panic!("dequantization of {other:?} is not supported"),
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K block, packed in 12 bytes.
#[inline]
pub(crate) fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Group `g` (0..8, 32 values) of a Q6_K block: its signed 6-bit values and the scales of its two halves of 16.
#[inline]
pub(crate) fn q6k_group(blk: &[u8], g: usize) -> ([i8; 32], [i8; 2]) {
    let (half, part) = (g / 4, g % 4);
    let ql = &blk[64 * half + 32 * (part & 1)..][..32];
    let qh = &blk[128 + 32 * half..][..32];
    let sc = &blk[192 + 8 * half + 2 * part..];
    let q = std::array::from_fn(|l| {
        let lo = if part < 2 { ql[l] & 0xf } else { ql[l] >> 4 };
        ((lo | (((qh[l] >> (2 * part)) & 3) << 4)) as i32 - 32) as i8
    });
    (q, [sc[0] as i8, sc[1] as i8])
}
