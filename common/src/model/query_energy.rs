//! How strongly a model's queries read each rotary channel pair of each layer's keys, measured over the tokens a
//! session ran. A key error in pair j moves attention logits by about `|q_j|·|δk_j|`, so a KV codec that spends its
//! bits where queries look (see [`crate::codec`]) keeps the attention the model computes, not just the keys' values.
//! Pair energies are rotation-invariant: the rotary embedding turns each pair but never changes its length.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::RopeStyle;

/// Mean squared query norm per layer, KV head and rotary pair: `layers[l][h * pairs + j]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryEnergy {
    pub kv_heads: usize,
    /// `head_dim / 2`.
    pub pairs: usize,
    pub layers: Vec<Vec<f32>>,
    /// Query rows averaged so far per layer (tokens × query heads per KV head).
    counts: Vec<u64>,
}

impl QueryEnergy {
    pub fn new(n_layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        let pairs = head_dim / 2;
        QueryEnergy {
            kv_heads,
            pairs,
            layers: vec![vec![0.0; kv_heads * pairs]; n_layers],
            counts: vec![0; n_layers],
        }
    }

    /// Folds layer `l`'s queries `[tokens, heads, head_dim]` (heads grouped by KV head, as GQA groups them) into
    /// the running means.
    pub(super) fn add(&mut self, l: usize, q: Tensor<3>, style: RopeStyle) {
        let [t, nh, hd] = q.dims();
        let (nkv, half) = (self.kv_heads, hd / 2);
        let sq = q.clone() * q;
        let pairs = match style {
            RopeStyle::Neox => sq.clone().narrow(2, 0, half) + sq.narrow(2, half, half),
            RopeStyle::Interleaved => sq
                .reshape([t, nh, half, 2])
                .sum_dim(3)
                .reshape([t, nh, half]),
        };
        let sums = pairs
            .sum_dim(0)
            .reshape([nkv, nh / nkv, half])
            .sum_dim(1)
            .into_data()
            .try_into_vec::<f32>()
            .expect("query energies are f32");
        let (old, new) = (self.counts[l], (t * nh / nkv) as u64);
        let total = (old + new) as f64;
        for (mean, s) in self.layers[l].iter_mut().zip(sums) {
            *mean = ((*mean as f64 * old as f64 + s as f64) / total) as f32;
        }
        self.counts[l] = old + new;
    }
}
