//! `tandem codec-report`: for a real context, what each KV codec costs on the wire and what it does to the next
//! tokens (top-1 agreement with exact KV, teacher-forced along the exact run's greedy tokens, and how far the log
//! probability of each of those tokens moves: a finer measure than agreement, which only sees near ties flip; the
//! flips come with the interval they pin the loss to, [`Score::loss_interval`]).

use std::time::Instant;

use tandem_common::codec::{
    Codec, LayerStep, RopeParams, Rotary, StepScales, decode_layer, encode_layer_weighted,
};
use tandem_common::engine::{Engine, EngineError};
use tandem_common::kv::{KvState, LayerKv};
use tandem_common::model::QueryEnergy;
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
    /// What the codec's KV did to the exact runs.
    pub score: Score,
    pub encode_ms: f64,
    pub decode_ms: f64,
}

/// Measures `codecs` on the KV of `context` (as a system message) for `questions`, `steps` tokens each; the `pca`
/// codecs scale their steps by `scales` when given (a model's [`StepScales`]).
pub fn codec_report(
    engine: &Engine,
    context: &str,
    questions: &[&str],
    steps: usize,
    precision: Precision,
    codecs: &[Codec],
    scales: Option<&StepScales>,
) -> Result<Vec<CodecRow>, EngineError> {
    let tokens = engine.tokenizer.context_tokens(context)?;
    let probe = Probe::new(engine, &tokens, questions, steps, precision)?;
    let f16_bytes =
        (probe.exact.layers.len() * 2 * probe.exact.shape().values().unwrap_or(0) * 2) as f64;
    let mut rows = Vec::new();
    for &codec in codecs {
        let t = Instant::now();
        let encoded: Vec<Vec<u8>> = (0..probe.exact.layers.len())
            .map(|l| {
                probe.encode(
                    codec,
                    l,
                    scales.map_or_else(LayerStep::default, |s| s.layer(l)),
                )
            })
            .collect();
        let encode_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let layers = encoded.iter().map(|b| probe.decode(codec, b)).collect();
        let decode_ms = t.elapsed().as_secs_f64() * 1e3;
        let score = probe.score(&KvState {
            layers,
            ..probe.exact.clone()
        })?;
        let bytes: usize = encoded.iter().map(Vec::len).sum();
        rows.push(CodecRow {
            codec,
            bytes,
            bytes_per_token: bytes as f64 / probe.exact.len() as f64,
            smaller_than_f16: f16_bytes / bytes as f64,
            score,
            encode_ms,
            decode_ms,
        });
    }
    Ok(rows)
}

/// A context's exact KV and the exact runs of some questions after it: what a changed KV is scored against.
pub(crate) struct Probe<'e> {
    engine: &'e Engine,
    precision: Precision,
    pub exact: KvState,
    energy: QueryEnergy,
    /// Each question's prompt and its exact greedy run.
    references: Vec<(Vec<u32>, Run)>,
}

/// How a changed KV did against the exact runs (teacher-forced along their tokens).
#[derive(Debug, Clone, Copy)]
pub struct Score {
    /// Tokens scored, and those whose top-1 differed from the exact run's.
    pub scored: usize,
    pub flips: usize,
    /// Mean |Δ log p| of the exact runs' tokens, nats: 0 for exact KV.
    pub logprob_shift: f64,
}

impl Score {
    /// Top-1 agreement with the exact runs.
    pub fn agreement(&self) -> f64 {
        self.scored.saturating_sub(self.flips) as f64 / self.scored.max(1) as f64
    }

    /// The 95% interval of the agreement loss these flips put the codec in ([`loss_interval`]).
    pub fn loss_interval(&self) -> (f64, f64) {
        loss_interval(self.flips, self.scored)
    }
}

impl<'e> Probe<'e> {
    /// Prefills `context` (tokens) and runs each question after it, `steps` greedy tokens.
    pub fn new(
        engine: &'e Engine,
        context: &[u32],
        questions: &[&str],
        steps: usize,
        precision: Precision,
    ) -> Result<Self, EngineError> {
        let (exact, energy) = engine.prefill_context(context)?;
        let mut references = Vec::new();
        for q in questions {
            let prompt = engine
                .tokenizer
                .chat_tokens(&[Message::new("user", q)], true)?;
            let run = teacher_forced(engine, &exact, &prompt, None, steps, precision)?;
            references.push((prompt, run));
        }
        Ok(Probe {
            engine,
            precision,
            exact,
            energy,
            references,
        })
    }

    fn rotary(&self) -> Rotary<'_> {
        RopeParams::of(self.engine.model.config()).at(&self.exact.positions)
    }

    /// Layer `l` of the exact KV in `codec`, as the cloud would encode it.
    pub fn encode(&self, codec: Codec, l: usize, step: LayerStep) -> Vec<u8> {
        encode_layer_weighted(
            codec,
            self.exact.shape(),
            Some(self.rotary()),
            &self.exact.tokens,
            self.energy.keys(l),
            step,
            &self.exact.layers[l],
        )
    }

    pub fn decode(&self, codec: Codec, bytes: &[u8]) -> LayerKv {
        decode_layer(
            codec,
            self.exact.shape(),
            Some(self.rotary()),
            &self.exact.tokens,
            bytes,
        )
        .expect("own encoding decodes")
    }

    /// Tokens each [`score`](Self::score) compares.
    pub fn scored_tokens(&self) -> usize {
        self.references.iter().map(|(_, r)| r.tokens.len()).sum()
    }

    /// Runs every question after `kv`, fed the exact runs' tokens.
    pub fn score(&self, kv: &KvState) -> Result<Score, EngineError> {
        let (mut agree, mut total, mut shift) = (0, 0, 0.0);
        for (prompt, exact_run) in &self.references {
            let run = teacher_forced(
                self.engine,
                kv,
                prompt,
                Some(&exact_run.tokens),
                exact_run.tokens.len(),
                self.precision,
            )?;
            agree += run.hits;
            total += run.tokens.len();
            shift += (exact_run.logprobs.iter().zip(&run.logprobs))
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>();
        }
        Ok(Score {
            scored: total,
            flips: total - agree,
            logprob_shift: shift / total.max(1) as f64,
        })
    }
}

/// The 95% Wilson interval of the share of tokens a codec flips, from `flips` of `scored`: how far a measured
/// agreement could be from the codec's agreement over many more questions (the flips are near ties, so which of
/// them flip is close to chance: a probe of 1,000 tokens pins a 1% loss only to about ±0.6%).
fn loss_interval(flips: usize, scored: usize) -> (f64, f64) {
    if scored == 0 {
        return (0.0, 1.0);
    }
    let (n, z2) = (scored as f64, 1.96f64 * 1.96);
    let p = flips.min(scored) as f64 / n;
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let half = (z2 * (p * (1.0 - p) / n + z2 / (4.0 * n * n))).sqrt() / denominator;
    ((centre - half).max(0.0), (centre + half).min(1.0))
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

#[cfg(test)]
mod tests {
    use super::loss_interval;

    #[test]
    fn loss_interval_is_wilsons() {
        // No flip in 100 tokens still allows a loss of up to 3.7%.
        let (lo, hi) = loss_interval(0, 100);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.0370).abs() < 5e-4, "{hi}");
        // 11 flips in 1,020 tokens (1.08%): 0.60% to 1.92%.
        let (lo, hi) = loss_interval(11, 1020);
        assert!(
            (lo - 0.0060).abs() < 5e-4 && (hi - 0.0192).abs() < 5e-4,
            "{lo} {hi}"
        );
        assert_eq!(loss_interval(5, 0), (0.0, 1.0));
        assert_eq!(loss_interval(10, 10).1, 1.0);
    }
}
