//! Attention over KV segments, merged exactly by their log-sum-exps (CE-LSLM Eq. 5).
//!
//! A query attends to a shared-context segment (KV computed anywhere: the cloud, a gateway, a cache) and to the
//! session's own segment. Each segment yields its softmax-weighted output `o_i` and log-sum-exp `lse_i`; then
//! `o = Σ α_i·o_i` with `α_i = exp(lse_i − lse)` and `lse = log Σ exp(lse_i)`, which equals attention over the
//! concatenated keys. Neither segment is copied into the other.

use burn::tensor::Tensor;

/// One segment's attention: output and log-sum-exp per query row.
pub struct Partial {
    /// `[heads, rows, head_dim]`
    pub out: Tensor<3>,
    /// `[heads, rows, 1]`
    pub lse: Tensor<3>,
}

/// Attention of `q: [heads, rows, d]` (already scaled by `1/√d`) over `k, v: [heads, keys, d]`.
/// `mask`, if given, is added to the scores (`[rows, keys]`, 0 or −∞); every row must see at least one key.
pub fn attend(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, mask: Option<Tensor<2>>) -> Partial {
    let mut scores = q.matmul(k.swap_dims(1, 2));
    if let Some(m) = mask {
        scores = scores + m.unsqueeze_dim(0);
    }
    let max = scores.clone().max_dim(2);
    let e = (scores - max.clone()).exp();
    let sum = e.clone().sum_dim(2);
    let out = e.matmul(v) / sum.clone();
    Partial { out, lse: max + sum.log() }
}

/// Combines two segments' partial attentions into attention over both.
pub fn merge(a: Partial, b: Partial) -> Partial {
    let m = a.lse.clone().max_pair(b.lse.clone());
    let wa = (a.lse - m.clone()).exp();
    let wb = (b.lse - m.clone()).exp();
    let total = wa.clone() + wb.clone();
    Partial { out: (a.out * wa + b.out * wb) / total.clone(), lse: m + total.log() }
}
