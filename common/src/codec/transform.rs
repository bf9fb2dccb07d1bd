//! Transform coding of one KV head's keys or values (the `pca` codecs).
//!
//! The tokens' vectors are centred and turned onto their principal axes — in a space where each key channel is
//! scaled by how strongly the model's queries read it, when the encoder knows ([`QueryEnergy`]), since an error in
//! a channel no query looks at changes no attention weight. Every coordinate is then rounded to one step (a share of
//! the head's RMS): axes whose codes are all zero are dropped, so the low-rank reduction follows from the step, and
//! the small integer codes are range-coded axis by axis ([`entropy`]). Unlike fixed-width groups, an outlier (an
//! attention sink's key) costs only its own longer codes, never a coarser step for its neighbours.
//!
//! Heads with fewer than 4 tokens per channel keep their channels as axes (a basis would cost more than it saves).
//!
//! Each head travels as a postcard [`Block`]: step, kind of axes, outlier tokens and their f16 rows, the others'
//! mean, the reconstruction basis (f16: the decoder needs no eigen-solver and no weights), their range-coded codes.
//!
//! [`QueryEnergy`]: crate::model::QueryEnergy

use half::f16;
use nalgebra::{DMatrix, SymmetricEigen};
use serde::{Deserialize, Serialize};

use super::{CodecError, entropy};

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

    let codes: Vec<i32> = (0..rank)
        .flat_map(|k| (0..inliers.len()).map(move |r| (k, r)))
        .map(|(k, r)| {
            (coords[(r, k)] / step)
                .round()
                .clamp(-(1 << 30) as f64, (1 << 30) as f64) as i32
        })
        .collect();
    let mut last = 0;
    let block = Block {
        step: step as f32,
        principal,
        outlier_gaps: outliers
            .iter()
            .map(|&t| (t - std::mem::replace(&mut last, t)) as u32)
            .collect(),
        outlier_rows: outliers
            .iter()
            .flat_map(|&t| row(t).iter().map(|&v| f16::from_f32(v).to_le_bytes()))
            .collect(),
        mean: mean.iter().map(|&m| m as f32).collect(),
        // Channel axes: only each axis's scale.
        basis: match principal {
            true => basis
                .iter()
                .map(|&v| f16::from_f64(v).to_le_bytes())
                .collect(),
            false => (0..rank)
                .map(|k| f16::from_f64(basis[(k, k)]).to_le_bytes())
                .collect(),
        },
        codes: entropy::encode(&codes, rank),
    };
    out.extend(postcard::to_allocvec(&block).expect("a block serialises"));
}

/// One head's keys or values as they travel (postcard).
#[derive(Serialize, Deserialize)]
struct Block {
    /// The rounding step of every axis.
    step: f32,
    /// Principal axes (a full basis column per axis), or the channels themselves (a scale per axis).
    principal: bool,
    /// Outlier tokens, each as its distance from the one before (the first from 0).
    outlier_gaps: Vec<u32>,
    /// Their rows, f16.
    outlier_rows: Vec<[u8; 2]>,
    /// The other tokens' mean.
    mean: Vec<f32>,
    /// The reconstruction basis, f16, axis by axis: d × rank, or rank scales for channel axes.
    basis: Vec<[u8; 2]>,
    /// The other tokens' codes, axis by axis.
    codes: entropy::CodedAxes,
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
    let bad = |what: String| CodecError::Malformed(what);
    let (block, rest) =
        postcard::take_from_bytes::<Block>(raw).map_err(|e| bad(format!("head block: {e}")))?;
    *raw = rest;
    let f16s = |v: &[[u8; 2]]| {
        v.iter()
            .map(|&b| f16::from_le_bytes(b).to_f32())
            .collect::<Vec<_>>()
    };
    let per_axis = if block.principal { d.max(1) } else { 1 };
    let rank = block.basis.len() / per_axis;
    if rank > d || block.basis.len() % per_axis != 0 {
        return Err(bad(format!(
            "{} basis values for heads of {d}",
            block.basis.len()
        )));
    }
    if !block.step.is_finite() {
        return Err(CodecError::NotFinite);
    }
    let mut outliers: Vec<usize> = Vec::with_capacity(block.outlier_gaps.len().min(tokens));
    for (i, &gap) in block.outlier_gaps.iter().enumerate() {
        let t = outliers.last().map_or(0, |&p| p) + gap as usize;
        if t >= tokens || (i > 0 && gap == 0) {
            return Err(bad("outlier tokens out of order".into()));
        }
        outliers.push(t);
    }
    let inliers: Vec<usize> = (0..tokens)
        .filter(|t| outliers.binary_search(t).is_err())
        .collect();
    let sizes = [
        (
            block.outlier_rows.len(),
            outliers.len() * d,
            "outlier row values",
        ),
        (block.mean.len(), d, "mean values"),
    ];
    if let Some((found, want, what)) = sizes.into_iter().find(|(f, w, _)| f != w) {
        return Err(bad(format!("{found} {what}, {want} expected")));
    }
    let codes = entropy::decode(&block.codes, rank, inliers.len())?;
    let basis = f16s(&block.basis);
    let mut x: Vec<f32> = (0..tokens)
        .flat_map(|_| block.mean.iter().copied())
        .collect();
    for k in 0..rank {
        for (&t, &q) in inliers.iter().zip(&codes[k * inliers.len()..]) {
            if q == 0 {
                continue;
            }
            let y = q as f32 * block.step;
            let row = &mut x[t * d..(t + 1) * d];
            match block.principal {
                true => {
                    for (out, b) in row.iter_mut().zip(&basis[k * d..(k + 1) * d]) {
                        *out += y * b;
                    }
                }
                false => row[k] += y * basis[k],
            }
        }
    }
    for (&t, r) in outliers
        .iter()
        .zip(f16s(&block.outlier_rows).chunks_exact(d.max(1)))
    {
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
