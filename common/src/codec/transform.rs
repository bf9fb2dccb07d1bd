//! Transform coding of one KV head's keys or values (the `pca` codecs).
//!
//! The tokens' vectors are centred and turned onto their principal axes — in a space where each key channel is
//! scaled by how strongly the model's queries read it, when the encoder knows ([`QueryEnergy`]), since an error in
//! a channel no query looks at changes no attention weight. Every coordinate is then rounded to one step (a share of
//! the head's RMS): axes whose codes are all zero are dropped, so the low-rank reduction follows from the step, and
//! the small integer codes, axis by axis, are left to brotli. Unlike fixed-width groups, an outlier (an attention
//! sink's key) costs only its own longer codes, never a coarser step for its neighbours.
//!
//! Heads with fewer than 4 tokens per channel keep their channels as axes (a basis would cost more than it saves).
//!
//! Block layout: rank `r` (u16), step (f32), the kind of axes (u8: 0 channels, 1 principal), the outlier tokens (a
//! varint count, varint gaps, then their rows as f16), the other tokens' mean (d × f32), the reconstruction basis
//! (d × r f16, axis by axis, or r scales for channel axes: the decoder needs no eigen-solver and no weights), then
//! their zigzag varint codes, axis by axis.
//!
//! [`QueryEnergy`]: crate::model::QueryEnergy

use half::f16;
use nalgebra::{DMatrix, SymmetricEigen};

use super::CodecError;

/// Appends the block for `x: [tokens][d]`; `weights` (one per channel, > 0) say how much an error in each counts.
pub(super) fn encode(
    out: &mut Vec<u8>,
    x: &[f32],
    d: usize,
    rel_step: f64,
    weights: Option<&[f32]>,
) {
    let tokens = if d == 0 { 0 } else { x.len() / d };
    let scale = channel_scales(weights, d);
    let row = |t: usize| &x[t * d..(t + 1) * d];
    let outliers = outliers(x, d, &scale);
    let inliers: Vec<usize> = (0..tokens)
        .filter(|t| outliers.binary_search(t).is_err())
        .collect();
    let n = inliers.len().max(1) as f64;
    let mean: Vec<f64> = (0..d)
        .map(|i| inliers.iter().map(|&t| row(t)[i] as f64).sum::<f64>() / n)
        .collect();
    // Centred, weighted rows.
    let z = DMatrix::from_fn(inliers.len(), d, |r, i| {
        (row(inliers[r])[i] as f64 - mean[i]) * scale[i]
    });
    let cov = z.tr_mul(&z) / n;
    let rms = (cov.trace() / d.max(1) as f64).sqrt();
    let step = if rms > 0.0 && rms.is_finite() {
        rel_step * rms
    } else {
        1.0
    };
    // A basis costs d values per axis: only worth it over enough tokens; fewer are coded on their own channels.
    let principal = inliers.len() >= PRINCIPAL_TOKENS_PER_CHANNEL * d;
    let axes = if principal {
        let eigen = SymmetricEigen::new(cov);
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
        DMatrix::from_fn(d, d, |i, k| eigen.eigenvectors[(i, order[k])])
    } else {
        DMatrix::identity(d, d)
    };
    // The rank: up to the last axis with a non-zero code.
    let coords = &z * &axes;
    let rank = (0..d)
        .rev()
        .find(|&k| coords.column(k).iter().any(|y| (y / step).round() != 0.0))
        .map_or(0, |k| k + 1);
    // The basis the decoder will use: back to unweighted channels, rounded to f16.
    let basis = DMatrix::from_fn(d, rank, |i, k| {
        f16::from_f64(axes[(i, k)] / scale[i]).to_f64()
    });
    // Coordinates against that rounded basis, by weighted least squares (the rounding leaves it not quite
    // orthogonal; projecting onto the exact axes would turn that into a systematic error).
    let w = DMatrix::from_diagonal(&nalgebra::DVector::from_fn(d, |i, _| scale[i] * scale[i]));
    let centred = DMatrix::from_fn(inliers.len(), d, |r, i| row(inliers[r])[i] as f64 - mean[i]);
    let gram = basis.transpose() * &w * &basis;
    let coords = match gram.try_inverse() {
        Some(inv) => centred * (&w * &basis * inv.transpose()),
        None => coords.columns(0, rank).into_owned(),
    };

    out.extend_from_slice(&(rank as u16).to_le_bytes());
    out.extend_from_slice(&(step as f32).to_le_bytes());
    out.push(u8::from(principal));
    put_varint(out, outliers.len() as u32);
    let mut last = 0;
    for &t in &outliers {
        put_varint(out, (t - last) as u32);
        last = t;
    }
    for &t in &outliers {
        for v in row(t) {
            out.extend_from_slice(&f16::from_f32(*v).to_le_bytes());
        }
    }
    for m in &mean {
        out.extend_from_slice(&(*m as f32).to_le_bytes());
    }
    // Channel axes: only each axis's scale.
    let sent: Vec<f64> = match principal {
        true => basis.iter().copied().collect(),
        false => (0..rank).map(|k| basis[(k, k)]).collect(),
    };
    for v in sent {
        out.extend_from_slice(&f16::from_f64(v).to_le_bytes());
    }
    for k in 0..rank {
        for r in 0..inliers.len() {
            let q = (coords[(r, k)] / step)
                .round()
                .clamp(-(1 << 30) as f64, (1 << 30) as f64) as i32;
            put_varint(out, ((q << 1) ^ (q >> 31)) as u32);
        }
    }
}

/// Tokens far from the rest (attention sinks: their keys and values are often many times the others' size), sent
/// as f16 rows instead: on the axes they would skew the principal axes and stretch the codes of every token.
/// The first [`SINKS`] tokens, and rows whose weighted distance from the mean is over 4 × the RMS (the largest
/// `tokens / 64` at most).
fn outliers(x: &[f32], d: usize, scale: &[f64]) -> Vec<usize> {
    let tokens = if d == 0 { 0 } else { x.len() / d };
    if tokens < 2 * SINKS {
        return Vec::new();
    }
    let mean: Vec<f64> = (0..d)
        .map(|i| (0..tokens).map(|t| x[t * d + i] as f64).sum::<f64>() / tokens as f64)
        .collect();
    let dist: Vec<f64> = (0..tokens)
        .map(|t| {
            (0..d)
                .map(|i| ((x[t * d + i] as f64 - mean[i]) * scale[i]).powi(2))
                .sum()
        })
        .collect();
    let limit = 16.0 * dist.iter().sum::<f64>() / tokens as f64;
    let mut far: Vec<usize> = (SINKS..tokens).filter(|&t| dist[t] > limit).collect();
    far.sort_by(|&a, &b| dist[b].total_cmp(&dist[a]));
    far.truncate(tokens / 64);
    far.extend(0..SINKS);
    far.sort_unstable();
    far
}

/// Tokens per channel from which a head is coded on its principal axes.
const PRINCIPAL_TOKENS_PER_CHANNEL: usize = 4;

/// Leading tokens always sent as rows: models park attention on the first tokens (attention sinks), so their keys
/// and values weigh on every query.
const SINKS: usize = 4;

/// Reads one block for `tokens` × `d` values from the front of `raw`.
pub(super) fn decode(raw: &mut &[u8], tokens: usize, d: usize) -> Result<Vec<f32>, CodecError> {
    let bad = |what: &str| CodecError::Malformed(what.to_string());
    let rank = u16::from_le_bytes(take::<2>(raw).ok_or_else(|| bad("rank missing"))?) as usize;
    if rank > d {
        return Err(bad(&format!("rank {rank} over the head size {d}")));
    }
    let step = f32::from_le_bytes(take::<4>(raw).ok_or_else(|| bad("step missing"))?);
    if !step.is_finite() {
        return Err(CodecError::NotFinite);
    }
    let principal = match take::<1>(raw).ok_or_else(|| bad("axes missing"))? {
        [0] => false,
        [1] => true,
        [k] => return Err(bad(&format!("unknown kind of axes {k}"))),
    };
    let count = get_varint(raw).ok_or_else(|| bad("outlier count missing"))? as usize;
    if count > tokens {
        return Err(bad(&format!("{count} outliers among {tokens} tokens")));
    }
    let mut outliers = Vec::with_capacity(count);
    for i in 0..count {
        let delta = get_varint(raw).ok_or_else(|| bad("outliers cut short"))? as usize;
        let t = outliers.last().map_or(0, |&p: &usize| p) + delta;
        if t >= tokens || (i > 0 && delta == 0) {
            return Err(bad("outlier tokens out of order"));
        }
        outliers.push(t);
    }
    let mut outlier_rows = Vec::with_capacity(count * d);
    for _ in 0..count * d {
        outlier_rows.push(
            f16::from_le_bytes(take::<2>(raw).ok_or_else(|| bad("outlier rows cut short"))?)
                .to_f32(),
        );
    }
    let mut mean = Vec::with_capacity(d);
    for _ in 0..d {
        mean.push(f32::from_le_bytes(
            take::<4>(raw).ok_or_else(|| bad("mean cut short"))?,
        ));
    }
    let mut basis = vec![0f32; d * rank];
    for k in 0..rank {
        let axis = &mut basis[k * d..(k + 1) * d];
        let mut next = || -> Result<f32, CodecError> {
            Ok(f16::from_le_bytes(take::<2>(raw).ok_or_else(|| bad("basis cut short"))?).to_f32())
        };
        match principal {
            true => {
                for b in axis.iter_mut() {
                    *b = next()?;
                }
            }
            false => axis[k] = next()?,
        }
    }
    let mut x: Vec<f32> = (0..tokens).flat_map(|_| mean.iter().copied()).collect();
    let inliers: Vec<usize> = (0..tokens)
        .filter(|t| outliers.binary_search(t).is_err())
        .collect();
    for k in 0..rank {
        let axis = &basis[k * d..(k + 1) * d];
        for &t in &inliers {
            let z = get_varint(raw).ok_or_else(|| bad("codes cut short"))?;
            let q = ((z >> 1) as i32) ^ -((z & 1) as i32);
            if q != 0 {
                let y = q as f32 * step;
                for (out, b) in x[t * d..(t + 1) * d].iter_mut().zip(axis) {
                    *out += y * b;
                }
            }
        }
    }
    for (&t, r) in outliers.iter().zip(outlier_rows.chunks_exact(d.max(1))) {
        x[t * d..(t + 1) * d].copy_from_slice(r);
    }
    Ok(x)
}

/// Square roots of the weights, normalised to mean square 1 (tiny weights floored, so every channel keeps a
/// finite scale).
fn channel_scales(weights: Option<&[f32]>, d: usize) -> Vec<f64> {
    let Some(w) = weights.filter(|w| w.len() == d && w.iter().all(|v| v.is_finite())) else {
        return vec![1.0; d];
    };
    let top = w.iter().fold(0f32, |a, &b| a.max(b)) as f64;
    if top <= 0.0 {
        return vec![1.0; d];
    }
    let w: Vec<f64> = w.iter().map(|&v| (v as f64).max(top * 1e-4)).collect();
    let mean = w.iter().sum::<f64>() / d as f64;
    w.iter().map(|v| (v / mean).sqrt()).collect()
}

fn take<const N: usize>(raw: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = raw.split_first_chunk::<N>()?;
    *raw = rest;
    Some(*head)
}

fn put_varint(out: &mut Vec<u8>, mut z: u32) {
    while z >= 0x80 {
        out.push(z as u8 | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn get_varint(raw: &mut &[u8]) -> Option<u32> {
    let mut z = 0u32;
    for shift in (0..35).step_by(7) {
        let (&b, rest) = raw.split_first()?;
        *raw = rest;
        z |= ((b & 0x7f) as u32).checked_shl(shift)?;
        if b < 0x80 {
            return Some(z);
        }
    }
    None
}
