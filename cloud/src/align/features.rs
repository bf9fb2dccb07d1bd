//! A layer's KV as matrices to align: one row per token, the KV heads side by side, keys without their rotary
//! embedding (the two models rotate at different frequencies, `head_dim` differing; a projection must act on what
//! the keys mean, and the edge's own rotary goes back on afterwards).

use nalgebra::DMatrix;
use tandem_common::codec::{KvShape, RopeParams};
use tandem_common::kv::{KvState, LayerKv};

/// `[kv_heads][tokens][head_dim]` → `tokens × (kv_heads · head_dim)`.
pub fn token_rows(values: &[f32], kv_heads: usize, tokens: usize, head_dim: usize) -> DMatrix<f32> {
    DMatrix::from_fn(tokens, kv_heads * head_dim, |t, c| {
        let (h, j) = (c / head_dim, c % head_dim);
        values[(h * tokens + t) * head_dim + j]
    })
}

/// The inverse of [`token_rows`].
pub fn head_major(rows: &DMatrix<f32>, kv_heads: usize, head_dim: usize) -> Vec<f32> {
    let tokens = rows.nrows();
    let mut out = vec![0.0; kv_heads * tokens * head_dim];
    for t in 0..tokens {
        for c in 0..kv_heads * head_dim {
            let (h, j) = (c / head_dim, c % head_dim);
            out[(h * tokens + t) * head_dim + j] = rows[(t, c)];
        }
    }
    out
}

/// Layer `layer` of `kv` as (keys without rotary, values), token rows.
pub fn layer_rows(kv: &KvState, layer: usize, rope: RopeParams) -> (DMatrix<f32>, DMatrix<f32>) {
    let LayerKv { k, v } = &kv.layers[layer];
    let mut k = k.clone();
    rope.at(&kv.positions).apply(&mut k, kv.shape(), true);
    (
        token_rows(&k, kv.kv_heads, kv.len(), kv.head_dim),
        token_rows(v, kv.kv_heads, kv.len(), kv.head_dim),
    )
}

/// A layer back from token rows: keys rotated by `rope` at `positions`.
pub fn layer_from_rows(
    k: &DMatrix<f32>,
    v: &DMatrix<f32>,
    kv_heads: usize,
    head_dim: usize,
    positions: &[u32],
    rope: RopeParams,
) -> LayerKv {
    let mut keys = head_major(k, kv_heads, head_dim);
    let s = KvShape {
        kv_heads,
        tokens: k.nrows(),
        head_dim,
    };
    rope.at(positions).apply(&mut keys, s, false);
    LayerKv {
        k: keys,
        v: head_major(v, kv_heads, head_dim),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_back() {
        let values: Vec<f32> = (0..2 * 3 * 4).map(|i| i as f32).collect();
        let rows = token_rows(&values, 2, 3, 4);
        assert_eq!(rows.shape(), (3, 8));
        assert_eq!(rows[(1, 5)], values[(3 + 1) * 4 + 1]);
        assert_eq!(head_major(&rows, 2, 4), values);
    }
}
