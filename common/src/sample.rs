//! Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling with a seeded RNG.

use rand::{RngExt, SeedableRng, rngs::StdRng};

/// Sampling settings; `temperature == 0` is greedy.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let total: f32 = probs.iter().map(|p| p.1).sum();
        // Keep the smallest prefix whose mass reaches top_p.
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1 / total;
            if mass >= self.params.top_p {
                break;
            }
        }
        let probs = &probs[..kept];
        let sum: f32 = probs.iter().map(|p| p.1).sum();
        let mut x = self.rng.random::<f32>() * sum;
        for p in probs {
            x -= p.1;
            if x <= 0.0 {
                return p.0;
            }
        }
        probs[kept - 1].0
    }
}

/// The log probability of token `i` under `logits` (log-softmax, in f64).
pub fn log_prob(logits: &[f32], i: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[i] as f64 - max - sum.ln()
}

/// Index of the largest logit (the first, on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probabilities from `log_prob` sum to one, even for logits far too large for a plain `exp`.
    #[test]
    fn log_prob_is_a_normalised_log_softmax() {
        assert!((log_prob(&[0.0; 4], 2) + 4f64.ln()).abs() < 1e-12);
        let logits = [1000.0, 999.0, 990.0];
        let total: f64 = (0..3).map(|i| log_prob(&logits, i).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
        assert!(log_prob(&logits, 0) > log_prob(&logits, 1));
    }
}
