//! `tandem codec-report`: for a real context, what each KV codec costs on the wire and what it does to the next
//! tokens (top-1 agreement with exact KV, teacher-forced along the exact run's greedy tokens, and how far the log
//! probability of each of those tokens moves: a finer measure than agreement, which only sees near ties flip).

use std::time::Instant;

use tandem_common::codec::{Codec, RopeParams, decode_layer, encode_layer_weighted};
use tandem_common::engine::{Engine, EngineError};
use tandem_common::kv::KvState;
use tandem_common::quant::Precision;
use tandem_common::sample::{argmax, log_prob};
use tandem_common::tokenizer::Message;

/// One codec's line of the report.
#[derive(Debug, Clone)]
pub struct CodecRow {
    pub codec: Codec,
    pub bytes: usize,
    pub bytes_per_token: f64,
    /// Relative to f16 (the size a plain half-precision cache would have on the wire, uncompressed).
    pub smaller_than_f16: f64,
    pub agreement: f64,
    /// Mean |Δ log p| of the exact run's tokens (nats): 0 for exact KV.
    pub logprob_shift: f64,
    pub encode_ms: f64,
    pub decode_ms: f64,
}

/// Measures `codecs` on the KV of `context` (as a system message) for `questions`, `steps` tokens each.
pub fn codec_report(
    engine: &Engine,
    context: &str,
    questions: &[&str],
    steps: usize,
    precision: Precision,
    codecs: &[Codec],
) -> Result<Vec<CodecRow>, EngineError> {
    let (exact, energy) = engine.prefill_context(&engine.tokenizer.context_tokens(context)?)?;
    let mut references = Vec::new();
    for q in questions {
        let prompt = engine
            .tokenizer
            .chat_tokens(&[Message::new("user", q)], true)?;
        let run = teacher_forced(engine, &exact, &prompt, None, steps, precision)?;
        references.push((prompt, run));
    }
    let shape = tandem_common::codec::KvShape {
        kv_heads: exact.kv_heads,
        tokens: exact.len(),
        head_dim: exact.head_dim,
    };
    let f16_bytes = (exact.layers.len() * 2 * shape.values().unwrap_or(0) * 2) as f64;
    let rotary = RopeParams::of(engine.model.config()).at(&exact.positions);
    let mut rows = Vec::new();
    for &codec in codecs {
        let t = Instant::now();
        let encoded: Vec<Vec<u8>> = exact
            .layers
            .iter()
            .zip(&energy.layers)
            .map(|(l, w)| encode_layer_weighted(codec, shape, Some(rotary), Some(w), l))
            .collect();
        let encode_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let layers = encoded
            .iter()
            .map(|b| decode_layer(codec, shape, Some(rotary), b).expect("own encoding decodes"))
            .collect();
        let decode_ms = t.elapsed().as_secs_f64() * 1e3;
        let received = KvState {
            layers,
            ..exact.clone()
        };
        let (mut agree, mut total, mut shift) = (0, 0, 0.0);
        for (prompt, exact_run) in &references {
            let run = teacher_forced(
                engine,
                &received,
                prompt,
                Some(&exact_run.tokens),
                steps,
                precision,
            )?;
            agree += run.hits;
            total += run.tokens.len();
            shift += (exact_run.logprobs.iter().zip(&run.logprobs))
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>();
        }
        let bytes: usize = encoded.iter().map(Vec::len).sum();
        rows.push(CodecRow {
            codec,
            bytes,
            bytes_per_token: bytes as f64 / exact.len() as f64,
            smaller_than_f16: f16_bytes / bytes as f64,
            agreement: agree as f64 / total.max(1) as f64,
            logprob_shift: shift / total.max(1) as f64,
            encode_ms,
            decode_ms,
        });
    }
    Ok(rows)
}

/// A teacher-forced run.
struct Run {
    /// Steps whose own top-1 was the token fed.
    hits: usize,
    /// The tokens fed.
    tokens: Vec<u32>,
    /// The log probability the run gave each token fed.
    logprobs: Vec<f64>,
}

/// Runs `prompt` after `ctx` for `steps` tokens: greedy when `follow` is `None`, else fed `follow`'s tokens while
/// counting how often its own top-1 agrees.
fn teacher_forced(
    engine: &Engine,
    ctx: &KvState,
    prompt: &[u32],
    follow: Option<&[u32]>,
    steps: usize,
    precision: Precision,
) -> Result<Run, EngineError> {
    let steps = follow.map_or(steps, <[u32]>::len);
    let mut s = engine.session();
    s.set_precision(precision);
    s.attach_context(ctx)?;
    let mut logits = s.prefill(prompt)?;
    let mut run = Run {
        hits: 0,
        tokens: Vec::new(),
        logprobs: Vec::new(),
    };
    for i in 0..steps {
        let top = argmax(&logits);
        let t = follow.map_or(top, |f| f[i]);
        run.hits += usize::from(top == t);
        run.tokens.push(t);
        run.logprobs.push(log_prob(&logits, t as usize));
        if s.len() + 1 > engine.model.config().context_length {
            break;
        }
        logits = s.decode(t)?;
    }
    Ok(run)
}
