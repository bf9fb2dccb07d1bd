//! Teacher-forced scoring of a continuation after a context: what `tandem eval` compares modes by and what the
//! fused mode's gates are fitted to.

use tandem_common::engine::Engine;
use tandem_common::kv::KvState;
use tandem_common::sample::{argmax, log_prob};

/// Negative log-likelihood sum, count, and the top token at each scored position.
#[derive(Clone)]
pub struct Scored {
    pub nll: f64,
    pub count: usize,
    pub top: Vec<u32>,
}

/// Scores `continuation[1..]` after `context` (teacher-forced: each step is fed the true previous token); `gated`
/// adds a second reading of the context's tokens with a gate per layer (the fused mode).
pub fn score(
    e: &Engine,
    context: Option<&KvState>,
    gated: Option<(&KvState, &[f32])>,
    continuation: &[u32],
) -> anyhow::Result<Scored> {
    let mut s = e.session();
    if let Some(kv) = context {
        s.attach_context(kv)?;
    }
    if let Some((kv, gates)) = gated {
        s.attach_gated(kv, gates)?;
    }
    let mut out = Scored {
        nll: 0.0,
        count: 0,
        top: Vec::new(),
    };
    for w in continuation.windows(2) {
        let logits = s.decode(w[0])?;
        out.nll -= log_prob(&logits, w[1] as usize);
        out.count += 1;
        out.top.push(argmax(&logits));
    }
    Ok(out)
}
