//! The key metric: how much an error in a (pre-rotary) key moves the attention logits of the queries still to
//! come, and the linear map that makes it the plain squared error the transform coder minimises.
//!
//! A query at position t reads a key at p through the rotation between them: the logit's error is
//! `q̃ᵀ R((p − t)θ) δk̃`, so the metric is the queries' second moment `C` turned by `R((t − p)θ)` and averaged over
//! the offsets `t − p` the keys will see (from the context's end to some answer tokens past it). For the fast
//! rotary pairs that average leaves each pair's energy on its two channels and nothing between channels; for the
//! slow pairs, whose rotation turns less than half a turn over those offsets, the queries' direction survives, and
//! the metric between their channels stays dense. The map is then `M^½`: a scale per channel, and a dense
//! symmetric block over the slowest pairs when there are enough tokens to pay for sending its inverse.

use half::f16;
use nalgebra::{DMatrix, SymmetricEigen};
use serde::{Deserialize, Serialize};

use super::CodecError;

/// Answer tokens past the context's end the averaged rotation counts.
const QUERY_HORIZON: u32 = 256;
/// Metric weights below this share of the mean count as this share: no direction is ever free.
const FLOOR: f64 = 1e-3;
/// Tokens × channels per dense value: the dense block's inverse travels at 16 bits a value against about 2 bits
/// a coded key value, and it buys about a tenth of the key bits.
const VALUES_PER_DENSE_VALUE: usize = 320;

/// The key head's rotary layout and the offsets its keys will be read at.
pub(super) struct Rotation<'a> {
    /// Angular speed of each pair, radians per position.
    pub freqs: &'a [f64],
    pub neox: bool,
    /// Query-minus-key offsets, first and last (uniform between); `None` when unknown: every pair averages fully.
    pub offsets: Option<(u32, u32)>,
}

/// Offsets between keys at `positions` and queries from `from` to [`QUERY_HORIZON`] past it.
pub(super) fn offsets(positions: &[u32], from: u32) -> Option<(u32, u32)> {
    let (first, last) = (positions.iter().min()?, positions.iter().max()?);
    let lo = from.saturating_sub(*last).max(1);
    let hi = from
        .saturating_sub(*first)
        .max(lo)
        .saturating_add(QUERY_HORIZON);
    Some((lo, hi))
}

/// Channel of component `a` (0 or 1) of rotary pair `j` of `pairs`: NEOX pairs channel j with j + pairs (Qwen2),
/// llama 2j with 2j + 1.
fn channel(pairs: usize, neox: bool, j: usize, a: usize) -> usize {
    match neox {
        true => j + a * pairs,
        false => 2 * j + a,
    }
}

impl Rotation<'_> {
    /// Mean of `e^{iωΔ}` over the offsets.
    fn mean_turn(&self, omega: f64) -> (f64, f64) {
        let Some((lo, hi)) = self.offsets else {
            return if omega == 0.0 { (1.0, 0.0) } else { (0.0, 0.0) };
        };
        let n = (hi - lo + 1) as f64;
        let half = omega / 2.0;
        // Dirichlet kernel: Σ e^{iωΔ} = e^{iω(lo+hi)/2} · sin(nω/2) / sin(ω/2).
        let ratio = match half.sin().abs() < 1e-12 {
            true => 1.0,
            false => (n * half).sin() / (n * half.sin()),
        };
        let (s, c) = (omega * (lo as f64 + hi as f64) / 2.0).sin_cos();
        (ratio * c, ratio * s)
    }

    /// Pairs, slowest last, whose rotation turns less than half a turn over the offsets.
    fn slow_pairs(&self) -> usize {
        let Some((lo, hi)) = self.offsets else {
            return 0;
        };
        let span = (hi - lo) as f64;
        self.freqs
            .iter()
            .filter(|&&f| f * span < std::f64::consts::PI)
            .count()
    }
}

/// The metric `M` (d × d) of keys read by queries of second moment `moment` (d × d, row-major) through `rot`.
fn averaged(moment: &[f32], d: usize, rot: &Rotation) -> DMatrix<f64> {
    let c = |i: usize, j: usize| moment[i * d + j] as f64;
    let pairs = rot.freqs.len();
    let mut m = DMatrix::zeros(d, d);
    for i in 0..pairs {
        for j in 0..pairs {
            let ch = |p, a| channel(pairs, rot.neox, p, a);
            let (a, b) = (c(ch(i, 0), ch(j, 0)), c(ch(i, 0), ch(j, 1)));
            let (cc, dd) = (c(ch(i, 1), ch(j, 0)), c(ch(i, 1), ch(j, 1)));
            // The block splits into a part that commutes with rotations (p0 + i·p1) and one that mirrors them
            // (q0, q1): turned by R(Δθi) on the left and R(-Δθj) on the right, the first turns by Δ(θi - θj), the
            // second by -Δ(θi + θj).
            let (p0, p1) = ((a + dd) / 2.0, (cc - b) / 2.0);
            let (q0, q1) = ((a - dd) / 2.0, (b + cc) / 2.0);
            let (pc, ps) = rot.mean_turn(rot.freqs[i] - rot.freqs[j]);
            let (qc, qs) = rot.mean_turn(-(rot.freqs[i] + rot.freqs[j]));
            // P·R(φ) and Q·R(ψ), each R(φ) = [[cos, -sin], [sin, cos]] averaged.
            let p = [
                [p0 * pc - p1 * ps, -p0 * ps - p1 * pc],
                [p1 * pc + p0 * ps, -p1 * ps + p0 * pc],
            ];
            let q = [
                [q0 * qc + q1 * qs, -q0 * qs + q1 * qc],
                [q1 * qc - q0 * qs, -q1 * qs - q0 * qc],
            ];
            for (x, row) in p.iter().zip(&q).enumerate() {
                for y in 0..2 {
                    m[(ch(i, x), ch(j, y))] = row.0[y] + row.1[y];
                }
            }
        }
    }
    m
}

/// What the decoder needs to undo one key head's map: a scale per channel outside the dense block, and the
/// dense block's inverse (its upper triangle, f16) over the slowest `dense_pairs` pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Unwhiten {
    dense_pairs: u32,
    /// Units per value of each channel outside the block, in channel order.
    scales: Vec<f32>,
    dense: Vec<[u8; 2]>,
}

/// One key head's map `x ↦ W x` (rows of keys in, rows in metric units out) and its undoing.
pub(super) struct Whitening {
    /// Channels of the dense block, ascending, and its forward map.
    dense_channels: Vec<usize>,
    dense: DMatrix<f64>,
    pub unwhiten: Unwhiten,
}

impl Whitening {
    /// The map for keys of width `d` read by queries of second moment `moment`, `tokens` of them coded.
    pub fn new(moment: &[f32], d: usize, tokens: usize, rot: &Rotation) -> Option<Self> {
        if d < 2 || moment.len() != d * d || moment.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let m = averaged(moment, d, rot);
        let mean = m.trace() / d as f64;
        if !(mean > 0.0) {
            return None;
        }
        let m = m / mean;
        let budget = tokens * d / VALUES_PER_DENSE_VALUE;
        let mut dense_pairs = rot.slow_pairs();
        while dense_pairs > 0 && (2 * dense_pairs) * (2 * dense_pairs + 1) / 2 > budget {
            dense_pairs -= 1;
        }
        let block = block_channels(d, dense_pairs, rot.neox);
        // Scales only when the dense block's inverse would not invert.
        let (dense_pairs, dense_channels, dense, inverse) = match dense_root(&m, &block) {
            Some((dense, inverse)) => (dense_pairs, block, dense, inverse),
            None => (0, Vec::new(), DMatrix::zeros(0, 0), Vec::new()),
        };
        let scales = (0..d)
            .filter(|c| dense_channels.binary_search(c).is_err())
            .map(|c| m[(c, c)].max(FLOOR).sqrt() as f32)
            .collect();
        let unwhiten = Unwhiten {
            dense_pairs: dense_pairs as u32,
            scales,
            dense: inverse,
        };
        Some(Whitening {
            dense_channels,
            dense,
            unwhiten,
        })
    }

    /// Maps rows of `d` values in place.
    pub fn apply(&self, x: &mut [f32], d: usize) {
        let scales = per_channel(d, &self.dense_channels, &self.unwhiten.scales);
        map_rows(
            x,
            d,
            &self.dense_channels,
            &self.dense,
            |v, s| v * s,
            &scales,
        );
    }
}

/// `M^½` over `channels` with its inverse rounded to f16 (upper triangle) and the map made the exact inverse of
/// that rounding, so the decoder undoes precisely what the encoder did; eigenvalues floored at [`FLOOR`].
fn dense_root(m: &DMatrix<f64>, channels: &[usize]) -> Option<(DMatrix<f64>, Vec<[u8; 2]>)> {
    let n = channels.len();
    if n == 0 {
        return Some((DMatrix::zeros(0, 0), Vec::new()));
    }
    let block = DMatrix::from_fn(n, n, |i, j| m[(channels[i], channels[j])]);
    let eigen = SymmetricEigen::new(block);
    let inv_root = DMatrix::from_diagonal(&eigen.eigenvalues.map(|l| 1.0 / l.max(FLOOR).sqrt()));
    let inverse = &eigen.eigenvectors * inv_root * eigen.eigenvectors.transpose();
    let triangle: Vec<[u8; 2]> = (0..n)
        .flat_map(|i| (i..n).map(move |j| (i, j)))
        .map(|(i, j)| f16::from_f64(inverse[(i, j)]).to_le_bytes())
        .collect();
    let rounded = symmetric(&triangle, n);
    let forward = rounded.map(|v| v as f64).try_inverse()?;
    forward
        .iter()
        .all(|v| v.is_finite())
        .then_some((forward, triangle))
}

/// The symmetric `n` × `n` matrix whose upper triangle (row by row) is `triangle`.
fn symmetric(triangle: &[[u8; 2]], n: usize) -> DMatrix<f32> {
    let mut m = DMatrix::zeros(n, n);
    let mut values = triangle.iter().map(|b| f16::from_le_bytes(*b).to_f32());
    for i in 0..n {
        for j in i..n {
            let v = values.next().unwrap_or(0.0);
            m[(i, j)] = v;
            m[(j, i)] = v;
        }
    }
    m
}

impl Unwhiten {
    /// Undoes the map on rows of `d` values (`[tokens][d]`) in place; `neox` as the encoder's rotary layout.
    pub fn apply(&self, x: &mut [f32], d: usize, neox: bool) -> Result<(), CodecError> {
        let bad = |what: String| CodecError::Malformed(what);
        if d < 2 {
            return Err(bad(format!("a key map for {d} channels")));
        }
        let pairs = d / 2;
        let dense_pairs = self.dense_pairs as usize;
        if dense_pairs > pairs {
            return Err(bad(format!("{dense_pairs} dense pairs of {pairs}")));
        }
        let n = 2 * dense_pairs;
        if self.scales.len() != d - n || self.dense.len() != n * (n + 1) / 2 {
            return Err(bad(format!(
                "key map of {} scales and {} dense values for {d} channels, {dense_pairs} dense pairs",
                self.scales.len(),
                self.dense.len()
            )));
        }
        if self.scales.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(bad("a key channel scale is zero or not finite".into()));
        }
        let block = block_channels(d, dense_pairs, neox);
        let inverse = symmetric(&self.dense, n).map(|v| v as f64);
        let scales = per_channel(d, &block, &self.scales);
        map_rows(x, d, &block, &inverse, |v, s| v / s, &scales);
        Ok(())
    }
}

/// The channels of the slowest `dense_pairs` of `d / 2` rotary pairs, ascending.
fn block_channels(d: usize, dense_pairs: usize, neox: bool) -> Vec<usize> {
    let pairs = d / 2;
    let mut block: Vec<usize> = (pairs - dense_pairs.min(pairs)..pairs)
        .flat_map(|j| [channel(pairs, neox, j, 0), channel(pairs, neox, j, 1)])
        .collect();
    block.sort_unstable();
    block
}

/// Each of `d` channels' scale, in order from `scales`; none for the `block`'s channels.
fn per_channel(d: usize, block: &[usize], scales: &[f32]) -> Vec<Option<f32>> {
    let mut scales = scales.iter();
    (0..d)
        .map(|c| match block.binary_search(&c) {
            Ok(_) => None,
            Err(_) => scales.next().copied(),
        })
        .collect()
}

/// Rows of `d` values in place: the `block`'s channels times `matrix`, every other channel `op`(value, its scale).
fn map_rows(
    x: &mut [f32],
    d: usize,
    block: &[usize],
    matrix: &DMatrix<f64>,
    op: impl Fn(f32, f32) -> f32,
    scales: &[Option<f32>],
) {
    let mut values = vec![0f64; block.len()];
    for row in x.chunks_exact_mut(d.max(1)) {
        for (v, &c) in values.iter_mut().zip(block) {
            *v = row[c] as f64;
        }
        for (i, &c) in block.iter().enumerate() {
            row[c] = (0..block.len())
                .map(|j| matrix[(i, j)] * values[j])
                .sum::<f64>() as f32;
        }
        for (v, s) in row.iter_mut().zip(scales) {
            if let Some(s) = s {
                *v = op(*v, *s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `R(α)` on pair `j` of a `d`-vector (NEOX layout), as the model's rotary embedding turns it.
    fn turn(x: &mut [f64], freqs: &[f64], offset: f64) {
        let half = freqs.len();
        for (j, f) in freqs.iter().enumerate() {
            let (s, c) = (offset * f).sin_cos();
            let (a, b) = (x[j], x[j + half]);
            x[j] = a * c - b * s;
            x[j + half] = b * c + a * s;
        }
    }

    #[test]
    fn the_averaged_metric_is_the_mean_over_offsets_of_the_turned_moment() {
        let d = 8;
        let freqs = crate::model::rope_frequencies(1e4, d);
        // A moment of three queries.
        let queries: Vec<Vec<f64>> = (0..3)
            .map(|q| (0..d).map(|i| ((q * 5 + i * 3) as f64).sin()).collect())
            .collect();
        let moment: Vec<f32> = (0..d * d)
            .map(|i| queries.iter().map(|q| q[i / d] * q[i % d]).sum::<f64>() as f32 / 3.0)
            .collect();
        let rot = Rotation {
            freqs: &freqs,
            neox: true,
            offsets: Some((3, 40)),
        };
        let m = averaged(&moment, d, &rot);
        let mut brute = DMatrix::<f64>::zeros(d, d);
        for offset in 3..=40 {
            for q in &queries {
                let mut q = q.clone();
                turn(&mut q, &freqs, offset as f64);
                brute += DMatrix::from_fn(d, d, |i, j| q[i] * q[j]) / (3.0 * 38.0);
            }
        }
        assert!((&m - &brute).abs().max() < 1e-5, "{m} vs {brute}");
    }

    #[test]
    fn unwhitening_undoes_whitening() {
        let d = 16;
        let freqs = crate::model::rope_frequencies(1e4, d);
        let moment: Vec<f32> = (0..d * d)
            .map(|i| {
                ((i / d) as f32 + 1.0).recip() * ((i % d) as f32 + 1.0).recip()
                    + (i / d == i % d) as u8 as f32
            })
            .collect();
        for neox in [true, false] {
            let rot = Rotation {
                freqs: &freqs,
                neox,
                offsets: Some((1, 300)),
            };
            let w = Whitening::new(&moment, d, 4000, &rot).unwrap();
            assert!(w.unwhiten.dense_pairs > 0);
            let x: Vec<f32> = (0..5 * d).map(|i| (i as f32 * 0.37).cos()).collect();
            let mut y = x.clone();
            w.apply(&mut y, d);
            w.unwhiten.apply(&mut y, d, neox).unwrap();
            let err = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "{err}");
        }
    }
}
