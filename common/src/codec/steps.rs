//! Per-layer rounding steps for the transform (`pca`) codecs, from how much each layer's keys and values matter.
//!
//! One step for every layer spends bits evenly, but layers are not equal: coding a single layer of
//! Qwen2.5-Coder-0.5B with pca2 moves the next tokens' log probabilities eighty times more in one layer than in
//! another. At a given size the error hurts least when a bit buys the same reduction of the damage in every
//! tensor. With damage ≈ aᵢ·Δᵢ² (KL, for small errors) and bits ≈ −log Δᵢ per value, that is aᵢ·Δᵢ² equal for all,
//! so Δᵢ ∝ 1/√aᵢ; the measured sensitivity sᵢ (mean |Δ log p| with tensor i alone coded) grows like √aᵢ·Δ, hence
//! steps ∝ 1/sᵢ. The scales keep a geometric mean of 1, so a codec's size stays about where its uniform step puts it.

use serde::{Deserialize, Serialize};

/// Multipliers of a codec's step for one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerStep {
    pub keys: f64,
    pub values: f64,
}

impl Default for LayerStep {
    fn default() -> Self {
        LayerStep {
            keys: 1.0,
            values: 1.0,
        }
    }
}

/// Step multipliers for every layer's keys and values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepScales {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

impl StepScales {
    /// No layer's step moves further than this factor from the codec's: a noisy measurement of a nearly
    /// insensitive layer must not leave it uncoded, nor a very sensitive one cost many times its share.
    pub const MAX_FACTOR: f64 = 8.0;

    /// Scales ∝ 1 / sensitivity, geometric mean 1, within [1 / [`MAX_FACTOR`](Self::MAX_FACTOR),
    /// `MAX_FACTOR`]. `keys[l]` and `values[l]`: the damage with layer l's keys (values) alone coded, other
    /// tensors exact; the same measure and codec for all. Non-finite or non-positive ones count as the least
    /// sensitive measured.
    pub fn from_sensitivity(keys: &[f64], values: &[f64]) -> StepScales {
        let all: Vec<f64> = keys.iter().chain(values).copied().collect();
        let floor = all
            .iter()
            .copied()
            .filter(|s| s.is_finite() && *s > 0.0)
            .fold(f64::INFINITY, f64::min);
        let floor = if floor.is_finite() { floor } else { 1.0 };
        let logs: Vec<f64> = all
            .iter()
            .map(|&s| -(if s.is_finite() && s > 0.0 { s } else { floor }).ln())
            .collect();
        let mean = logs.iter().sum::<f64>() / logs.len().max(1) as f64;
        let scale = |&l: &f64| {
            (l - mean)
                .exp()
                .clamp(1.0 / Self::MAX_FACTOR, Self::MAX_FACTOR) as f32
        };
        let (k, v) = logs.split_at(keys.len());
        StepScales {
            keys: k.iter().map(scale).collect(),
            values: v.iter().map(scale).collect(),
        }
    }

    /// Layer `l`'s multipliers (1 for a layer the scales do not cover).
    pub fn layer(&self, l: usize) -> LayerStep {
        let at = |v: &[f32]| v.get(l).map_or(1.0, |&s| s as f64);
        LayerStep {
            keys: at(&self.keys),
            values: at(&self.values),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_shrink_where_damage_grows() {
        let s = StepScales::from_sensitivity(&[0.01, 0.04], &[0.02, 0.0]);
        // 0.0 counts as the least sensitive measured (0.01).
        assert!((s.keys[0] / s.keys[1] - 4.0).abs() < 1e-5, "{s:?}");
        assert!((s.keys[0] / s.values[0] - 2.0).abs() < 1e-5);
        assert_eq!(s.values[1], s.keys[0]);
        let log_mean: f64 = s
            .keys
            .iter()
            .chain(&s.values)
            .map(|&x| (x as f64).ln())
            .sum();
        assert!(log_mean.abs() < 1e-5);
    }

    #[test]
    fn scales_are_clamped_and_default_to_one() {
        let s = StepScales::from_sensitivity(&[1e-6, 1.0], &[1.0, 1.0]);
        assert_eq!(s.keys[0] as f64, StepScales::MAX_FACTOR);
        assert_eq!(s.layer(7), LayerStep::default());
        assert_eq!(s.layer(1).keys, s.keys[1] as f64);
    }
}
