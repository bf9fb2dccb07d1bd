//! Transform coding of one layer's keys and values (the `pca` codecs).
//!
//! The layer's tensors — each KV head's keys and values, the [`Part`]s — are coded together: K and V of every
//! head are projections of the same hidden state, so one principal basis over all of them needs about a fifth
//! fewer bits than a basis per head. Each part is first scaled so that one unit is its own rounding step (a share
//! of its RMS; keys arrive already mapped into the metric of the queries that will read them, see
//! [`metric`](super::metric), so their plain error is the error attention sees). The tokens' rows
//! are then centred and turned onto their principal axes, and every coordinate is rounded to a whole unit: axes
//! whose codes are all zero are dropped, so the low-rank reduction follows from the steps. What is coded is each
//! coordinate less its prediction from the tokens before it ([`predict`]: the same token's earlier occurrences,
//! the previous token), rounded; these small integer codes are range-coded axis by axis ([`entropy`]). Unlike fixed-width groups, an outlier (an attention sink's
//! key) costs only its own row, never a coarser step for its neighbours.
//!
//! The basis travels as integers, each axis rounded to its own step: an axis the tokens' codes spread far along
//! needs a precise direction, one barely above the rounding step a coarse one ([`BASIS_ERROR`]).
//!
//! Too few tokens for a joint basis ([`group`]) and each part is coded alone; fewer than 4 tokens per channel and
//! a part keeps its channels as axes (a basis would cost more than it saves).
//!
//! Each group travels as a postcard [`Block`]: channel scales, axes, outlier tokens and their f16 rows, the
//! others' mean, the prediction's coefficients, the range-coded codes. The decoder needs no eigen-solver and no
//! weights, only the tokens' ids.

use half::f16;
use nalgebra::{DMatrix, SymmetricEigen};
use serde::{Deserialize, Serialize};

use super::{CodecError, entropy, predict};

/// One tensor of a layer: `[tokens][d]` values, rounded to `rel_step` of their RMS.
pub(super) struct Part<'a> {
    pub x: &'a [f32],
    pub rel_step: f64,
}

/// How many of a layer's `parts` parts of `tokens` × `d` go in one block: all of them when the tokens are enough
/// for a basis over all their channels, else one.
pub(super) fn group(parts: usize, tokens: usize, d: usize) -> usize {
    match tokens >= PRINCIPAL_TOKENS_PER_CHANNEL * parts * d {
        true => parts.max(1),
        false => 1,
    }
}

/// Appends the block coding `parts` (each `tokens` × `d`) together; `ids` are the tokens' ids (empty when
/// unknown: then no coordinate is predicted from an earlier occurrence of its token).
pub(super) fn encode(out: &mut Vec<u8>, parts: &[Part], ids: &[u32], tokens: usize, d: usize) {
    let width = parts.len() * d;
    let at = |t: usize, j: usize| parts[j / d].x[t * d + j % d] as f64;
    // Outliers by their distance from the mean, each part counted relative to its own spread.
    let all: Vec<usize> = (0..tokens).collect();
    let spread = part_rms(parts, d, &all);
    let relative: Vec<f64> = (0..width)
        .map(|j| 1.0 / spread[j / d].max(f64::MIN_POSITIVE))
        .collect();
    let outliers = outliers(tokens, width, &at, &relative);
    let inliers: Vec<usize> = (0..tokens)
        .filter(|t| outliers.binary_search(t).is_err())
        .collect();
    let n = inliers.len().max(1) as f64;
    let mean: Vec<f64> = (0..width)
        .map(|j| inliers.iter().map(|&t| at(t, j)).sum::<f64>() / n)
        .collect();
    // One unit of a channel: its part's step.
    let rms = part_rms(parts, d, &inliers);
    let scale: Vec<f32> = (0..width)
        .map(|j| {
            let units = (1.0 / (parts[j / d].rel_step * rms[j / d])) as f32;
            // A constant part (no spread to take a step from) is coded in its own units.
            match units.is_finite() && units > 0.0 {
                true => units,
                false => 1.0,
            }
        })
        .collect();
    // Centred rows in units.
    let z = DMatrix::from_fn(inliers.len(), width, |r, j| {
        (at(inliers[r], j) - mean[j]) * scale[j] as f64
    });
    let principal = inliers.len() >= PRINCIPAL_TOKENS_PER_CHANNEL * width;
    let (axes, coords) = if principal {
        principal_axes(&z)
    } else {
        (
            Axes::Channels {
                rank: rank(&z) as u32,
            },
            z,
        )
    };
    let rank = axes.rank(width);
    let n = inliers.len();
    let inlier_ids = inlier_ids(ids, &inliers, tokens);
    let prediction = predict::Coefficients::fit(&coords, rank, inlier_ids.as_deref());
    let mut codes = vec![0i32; rank * n];
    predict::walk(
        &prediction,
        n,
        rank,
        inlier_ids.as_deref(),
        |r, k, predicted| {
            let code = (coords[(r, k)] - predicted)
                .round()
                .clamp(-(1 << 30) as f64, (1 << 30) as f64) as i32;
            codes[k * n + r] = code;
            code
        },
    );
    let mut last = 0;
    let block = Block {
        scale,
        axes,
        outlier_gaps: outliers
            .iter()
            .map(|&t| (t - std::mem::replace(&mut last, t)) as u32)
            .collect(),
        outlier_rows: outliers
            .iter()
            .flat_map(|&t| (0..width).map(move |j| f16::from_f64(at(t, j)).to_le_bytes()))
            .collect(),
        mean: mean.iter().map(|&m| m as f32).collect(),
        prediction,
        codes: entropy::encode(&codes, rank),
    };
    out.extend(postcard::to_allocvec(&block).expect("a block serialises"));
}

/// The principal axes of `z` (rows: tokens in units) up to the last with a non-zero code, each rounded to its own
/// step, and the rows' coordinates against those rounded axes.
fn principal_axes(z: &DMatrix<f64>) -> (Axes, DMatrix<f64>) {
    let width = z.ncols();
    let n = z.nrows().max(1) as f64;
    let eigen = SymmetricEigen::new(z.tr_mul(z) / n);
    let mut order: Vec<usize> = (0..width).collect();
    order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
    let exact = DMatrix::from_fn(width, width, |j, k| eigen.eigenvectors[(j, order[k])]);
    let rank = rank(&(z * &exact));
    if rank == 0 {
        let none = Axes::Principal {
            steps: Vec::new(),
            basis: Vec::new(),
        };
        return (none, DMatrix::zeros(z.nrows(), 0));
    }
    // Rounding an axis's direction by δ moves each token by its coordinate on it (spread σ) times δ: steps ∝ 1/σ
    // spend the basis's bits where they matter, scaled so that all axes together add BASIS_ERROR to the rounding
    // noise.
    let unit = (BASIS_ERROR / rank as f64).sqrt();
    let coarsest = 0.25 / (width as f64).sqrt();
    let steps: Vec<f32> = (0..rank)
        .map(|k| {
            let spread = eigen.eigenvalues[order[k]].max(0.0).sqrt();
            (unit / spread).min(coarsest) as f32
        })
        .collect();
    let basis: Vec<i32> = (0..rank)
        .flat_map(|k| (0..width).map(move |j| (k, j)))
        .map(|(k, j)| (exact[(j, k)] / steps[k] as f64).round() as i32)
        .collect();
    let rounded = DMatrix::from_fn(width, rank, |j, k| {
        basis[k * width + j] as f64 * steps[k] as f64
    });
    // Coordinates by least squares against the rounded axes (no longer quite orthogonal: projecting onto them
    // would turn that into a systematic error).
    let coords = match (rounded.transpose() * &rounded).try_inverse() {
        Some(inv) => z * &rounded * inv,
        None => (z * exact).columns(0, rank).into_owned(),
    };
    (Axes::Principal { steps, basis }, coords)
}

/// The ids of the `inliers` of `tokens` tokens, when `ids` holds one per token.
fn inlier_ids(ids: &[u32], inliers: &[usize], tokens: usize) -> Option<Vec<u32>> {
    (ids.len() == tokens).then(|| inliers.iter().map(|&t| ids[t]).collect())
}

/// Axes up to the last with a non-zero code.
fn rank(coords: &DMatrix<f64>) -> usize {
    (0..coords.ncols())
        .rev()
        .find(|&k| coords.column(k).iter().any(|y| y.round() != 0.0))
        .map_or(0, |k| k + 1)
}

/// Each part's RMS over `tokens`, about its own mean.
fn part_rms(parts: &[Part], d: usize, tokens: &[usize]) -> Vec<f64> {
    let n = tokens.len().max(1) as f64;
    parts
        .iter()
        .map(|part| {
            let sum: f64 = (0..d)
                .map(|i| {
                    let x = |t: usize| part.x[t * d + i] as f64;
                    let m = tokens.iter().map(|&t| x(t)).sum::<f64>() / n;
                    tokens.iter().map(|&t| (x(t) - m).powi(2)).sum::<f64>()
                })
                .sum();
            (sum / (n * d.max(1) as f64)).sqrt()
        })
        .collect()
}

/// How far a rounded basis may move the tokens, as a share of the rounding noise.
const BASIS_ERROR: f64 = 0.01;

/// One group's tensors as they travel (postcard).
#[derive(Serialize, Deserialize)]
struct Block {
    /// Units per value, per channel of the group (parts one after the other).
    scale: Vec<f32>,
    axes: Axes,
    /// Outlier tokens, each as its distance from the one before (the first from 0).
    outlier_gaps: Vec<u32>,
    /// Their rows, f16.
    outlier_rows: Vec<[u8; 2]>,
    /// The other tokens' mean.
    mean: Vec<f32>,
    /// How each axis's coordinates are predicted from the tokens before ([`predict`]).
    prediction: predict::Coefficients,
    /// The other tokens' codes, axis by axis.
    codes: entropy::CodedAxes,
}

/// The axes codes are along.
#[derive(Serialize, Deserialize)]
enum Axes {
    /// The first `rank` channels.
    Channels { rank: u32 },
    /// Principal axes in units, axis by axis: `basis` holds each axis's `width` values as multiples of its step.
    Principal { steps: Vec<f32>, basis: Vec<i32> },
}

impl Axes {
    fn rank(&self, width: usize) -> usize {
        match self {
            Axes::Channels { rank } => (*rank as usize).min(width),
            Axes::Principal { steps, .. } => steps.len(),
        }
    }
}

/// Tokens far from the rest (attention sinks: their keys and values are often many times the others' size), sent
/// as f16 rows instead: on the axes they would skew the principal axes and stretch the codes of every token.
/// The first [`SINKS`] tokens, and rows whose distance from the mean (channel `j` scaled by `scale[j]`) is over
/// 4 × the RMS (the largest `tokens / 64` at most).
fn outliers(
    tokens: usize,
    width: usize,
    at: &dyn Fn(usize, usize) -> f64,
    scale: &[f64],
) -> Vec<usize> {
    if tokens < 2 * SINKS {
        return Vec::new();
    }
    let mean: Vec<f64> = (0..width)
        .map(|j| (0..tokens).map(|t| at(t, j)).sum::<f64>() / tokens as f64)
        .collect();
    let dist: Vec<f64> = (0..tokens)
        .map(|t| {
            (0..width)
                .map(|j| ((at(t, j) - mean[j]) * scale[j]).powi(2))
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

/// Tokens per channel from which a group is coded on its principal axes.
const PRINCIPAL_TOKENS_PER_CHANNEL: usize = 4;

/// Leading tokens always sent as rows: models park attention on the first tokens (attention sinks), so their keys
/// and values weigh on every query.
const SINKS: usize = 4;

/// Reads one block of `parts` parts of `tokens` × `d` values from the front of `raw`: `[part][tokens][d]`; `ids`
/// as the encoder was given them.
pub(super) fn decode(
    raw: &mut &[u8],
    parts: usize,
    ids: &[u32],
    tokens: usize,
    d: usize,
) -> Result<Vec<f32>, CodecError> {
    let bad = |what: String| CodecError::Malformed(what);
    let (block, rest) =
        postcard::take_from_bytes::<Block>(raw).map_err(|e| bad(format!("block: {e}")))?;
    *raw = rest;
    let width = parts * d;
    let rank = block.axes.rank(width);
    match &block.axes {
        Axes::Channels { rank } if *rank as usize > width => {
            return Err(bad(format!("{rank} channel axes for {width} channels")));
        }
        Axes::Principal { steps, basis } if steps.len() > width || basis.len() != rank * width => {
            return Err(bad(format!(
                "{} basis values for {} axes of {width}",
                basis.len(),
                steps.len()
            )));
        }
        Axes::Principal { steps, .. } if steps.iter().any(|s| !s.is_finite()) => {
            return Err(CodecError::NotFinite);
        }
        _ => {}
    }
    if block.scale.iter().any(|s| !s.is_finite() || *s == 0.0) {
        return Err(bad("a channel scale is zero or not finite".into()));
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
        (block.scale.len(), width, "channel scales"),
        (
            block.outlier_rows.len(),
            outliers.len() * width,
            "outlier row values",
        ),
        (block.mean.len(), width, "mean values"),
    ];
    if let Some((found, want, what)) = sizes.into_iter().find(|(f, w, _)| f != w) {
        return Err(bad(format!("{found} {what}, {want} expected")));
    }
    let inlier_ids = inlier_ids(ids, &inliers, tokens);
    (block.prediction)
        .check(rank, inlier_ids.is_some())
        .map_err(bad)?;
    let n = inliers.len();
    let codes = entropy::decode(&block.codes, rank, n)?;
    // Coordinates, row-major.
    let coords = predict::walk(
        &block.prediction,
        n,
        rank,
        inlier_ids.as_deref(),
        |r, k, _| codes[k * n + r],
    );
    let mut rows: Vec<f32> = (0..tokens)
        .flat_map(|_| block.mean.iter().copied())
        .collect();
    match &block.axes {
        Axes::Principal { steps, basis } if rank > 0 && n > 0 => {
            // Each axis as a change of the values per code (width × rank), times the codes (rank × tokens).
            let axes = DMatrix::from_fn(width, rank, |j, k| {
                basis[k * width + j] as f32 * steps[k] / block.scale[j]
            });
            let coords = DMatrix::from_fn(rank, n, |k, r| coords[r * rank + k] as f32);
            let change = axes * coords;
            for (&t, delta) in inliers
                .iter()
                .zip(change.as_slice().chunks_exact(width.max(1)))
            {
                for (out, d) in rows[t * width..(t + 1) * width].iter_mut().zip(delta) {
                    *out += d;
                }
            }
        }
        Axes::Principal { .. } => {}
        Axes::Channels { .. } => {
            for (&t, row) in inliers.iter().zip(coords.chunks_exact(rank.max(1))) {
                for (k, &y) in row.iter().enumerate() {
                    rows[t * width + k] += y as f32 / block.scale[k];
                }
            }
        }
    }
    for (&t, r) in outliers
        .iter()
        .zip(block.outlier_rows.chunks_exact(width.max(1)))
    {
        for (out, b) in rows[t * width..(t + 1) * width].iter_mut().zip(r) {
            *out = f16::from_le_bytes(*b).to_f32();
        }
    }
    // Rows of the group to parts.
    let mut x = vec![0f32; parts * tokens * d];
    for (t, row) in rows.chunks_exact(width.max(1)).enumerate() {
        for (p, values) in row.chunks_exact(d.max(1)).enumerate() {
            x[(p * tokens + t) * d..][..d].copy_from_slice(values);
        }
    }
    Ok(x)
}
