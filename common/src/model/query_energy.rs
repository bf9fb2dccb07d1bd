//! How a model's queries read each layer's keys, measured over the tokens a session ran: per KV head, the mean
//! of `q qᵀ` over its query heads' pre-rotary queries. A key error `δk` moves an attention logit by `q·δk`, whose
//! mean square is `δkᵀ (q qᵀ) δk` — so a KV codec that measures its error this way ([`crate::codec`]) keeps the
//! attention the model computes, not just the keys' values. The rotary embedding turns queries and keys by their
//! positions; the codec averages this moment over the rotations between the keys and the queries still to come.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::codec::KeyQueries;

/// Second moment of the pre-rotary queries per layer and KV head: `layers[l][(h * head_dim + i) * head_dim + j]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryEnergy {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: Vec<Vec<f32>>,
    /// One past the last position a query was measured at: where the queries still to come start.
    pub end: u32,
    /// Query rows averaged so far per layer (tokens × query heads per KV head).
    counts: Vec<u64>,
}

impl QueryEnergy {
    pub fn new(n_layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        QueryEnergy {
            kv_heads,
            head_dim,
            layers: vec![vec![0.0; kv_heads * head_dim * head_dim]; n_layers],
            end: 0,
            counts: vec![0; n_layers],
        }
    }

    /// How the queries read layer `l`'s keys, for the KV codec.
    pub fn keys(&self, l: usize) -> Option<KeyQueries<'_>> {
        Some(KeyQueries {
            moments: self.layers.get(l)?,
            from: self.end,
        })
    }

    /// Folds layer `l`'s pre-rotary queries `[tokens, heads, head_dim]` (heads grouped by KV head, as GQA groups
    /// them) into the running means.
    pub(super) fn add(&mut self, l: usize, q: Tensor<3>) {
        let [t, nh, hd] = q.dims();
        let nkv = self.kv_heads;
        // [nkv, hd, rows] · [nkv, rows, hd]
        let rows = q
            .reshape([t, nkv, nh / nkv, hd])
            .permute([1, 0, 2, 3])
            .reshape([nkv, t * nh / nkv, hd]);
        let sums = rows
            .clone()
            .swap_dims(1, 2)
            .matmul(rows)
            .into_data()
            .try_into_vec::<f32>()
            .expect("queries are f32");
        let (old, new) = (self.counts[l], (t * nh / nkv) as u64);
        let total = (old + new) as f64;
        for (mean, s) in self.layers[l].iter_mut().zip(sums) {
            *mean = ((*mean as f64 * old as f64 + s as f64) / total) as f32;
        }
        self.counts[l] = old + new;
    }
}
