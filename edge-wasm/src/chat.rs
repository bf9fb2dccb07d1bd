//! One chat turn on the edge: the shared context's KV comes from the cloud layer by layer while the user's prompt is
//! prefilled against the layers already there (CE-LSLM's pipelined state loading); the user's messages never leave
//! this machine. If the cloud is unreachable, refuses, or stalls, the turn falls back to a local prefill of the
//! context and gives the same answer.

use std::time::Duration;

use tandem_common::codec::Codec;
use tandem_common::engine::{Engine, EngineError, GenerateOptions, GenerateStats, Generation};
use tandem_common::kv::{DeviceKv, LayerKv};
use tandem_common::model::{ContextLayer, LayerKvAt, LayerwisePrefill, Logits, Session};
use tandem_common::tokenizer::Message;
use tandem_common::wire::KvMode;
use web_time::Instant;

use crate::incoming::{Connect, FetchStats, LayerTiming};
pub use crate::protocol::CloudContext;
use crate::protocol::FetchRequest;

/// The context of a turn: from a cloud, with its text for a local fallback (optional when the cloud is trusted to
/// answer), or local only.
#[derive(Debug, Clone, Default)]
pub struct ContextSource {
    pub cloud: Option<CloudContext>,
    pub text: Option<String>,
}

/// Where the context's KV came from.
#[derive(Debug, Clone, PartialEq)]
pub enum KvSource {
    Cloud {
        codec: Codec,
        /// Whose reading of the context it was, and for a projected mode the alignment that made it.
        mode: KvMode,
        alignment: Option<String>,
    },
    /// Computed here, and why.
    Local {
        reason: String,
    },
    None,
}

impl KvSource {
    /// The edge model's own KV from the cloud, in `codec`.
    pub fn exact(codec: Codec) -> Self {
        KvSource::Cloud {
            codec,
            mode: KvMode::Exact,
            alignment: None,
        }
    }
}

/// What one turn did.
#[derive(Debug, Clone)]
pub struct TurnStats {
    pub generate: GenerateStats,
    pub source: KvSource,
    pub context_tokens: usize,
    /// What fetching the context's KV from the cloud cost (bytes, when the last layer arrived, per-layer timing;
    /// empty when it was computed here).
    pub kv: FetchStats,
    /// What the context's KV would be as f16, all layers: the baseline for `kv_bytes`.
    pub kv_fp16_bytes: usize,
    /// Time to first token, from the start of the turn (connection and loading included).
    pub ttft: Duration,
}

/// A turn's statistics flattened for hosts and pages (the WIT `turn-stats` record, the browser's JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StatsSummary {
    /// `cloud`, `local` or `none`.
    pub kv_source: &'static str,
    pub fallback_reason: Option<String>,
    pub codec: Option<String>,
    /// `exact`, `split:K` or `fused` (cloud KV only), and the alignment a projected mode used.
    pub kv_mode: Option<String>,
    pub alignment: Option<String>,
    pub context_tokens: u32,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub kv_bytes: u64,
    pub ttft_ms: f64,
    /// When the context's last layer arrived, from the start of the turn.
    pub kv_done_ms: f64,
    pub kv_timeline: Vec<LayerTiming>,
    pub kv_fp16_bytes: u64,
    /// The lowest context layers this edge computed itself while the others streamed.
    pub kv_local_layers: u32,
    /// Times the KV stream broke and was resumed from where it broke.
    pub kv_resumes: u32,
    pub decode_tokens_per_second: f64,
}

impl TurnStats {
    pub fn summary(&self) -> StatsSummary {
        let (kv_source, fallback_reason, codec, kv_mode, alignment) = match &self.source {
            KvSource::Cloud {
                codec,
                mode,
                alignment,
            } => (
                "cloud",
                None,
                Some(codec.to_string()),
                Some(mode.to_string()),
                alignment.clone(),
            ),
            KvSource::Local { reason } => ("local", Some(reason.clone()), None, None, None),
            KvSource::None => ("none", None, None, None, None),
        };
        StatsSummary {
            kv_source,
            fallback_reason,
            codec,
            kv_mode,
            alignment,
            context_tokens: self.context_tokens as u32,
            prompt_tokens: self.generate.prompt_tokens as u32,
            generated_tokens: self.generate.generated_tokens as u32,
            kv_bytes: self.kv.kv_bytes as u64,
            ttft_ms: self.ttft.as_secs_f64() * 1e3,
            kv_done_ms: self.kv.done_after.as_secs_f64() * 1e3,
            kv_timeline: self.kv.timeline.clone(),
            kv_fp16_bytes: self.kv_fp16_bytes as u64,
            kv_local_layers: self.kv.local_layers as u32,
            kv_resumes: self.kv.resumes as u32,
            decode_tokens_per_second: self.generate.decode_tokens_per_s(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(
        "the context could not come from the cloud ({0}) and no local copy of its text was given"
    )]
    NoContext(String),
}

/// A turn whose context and prompt are in, generating: pull its tokens with [`next_token`](Turn::next_token).
pub struct Turn<'e> {
    generation: Generation<'e, Session<'e>>,
    source: KvSource,
    context_tokens: usize,
    fetch: FetchStats,
    kv_fp16_bytes: usize,
}

impl Turn<'_> {
    /// The next token and the text it completes, or `None` when the answer is complete.
    pub fn next_token(&mut self) -> Result<Option<(u32, String)>, ChatError> {
        Ok(self.generation.next_token()?)
    }

    /// [`next_token`](Self::next_token) without blocking on the device: a browser's GPU answers through its event
    /// loop.
    pub async fn next_token_async(&mut self) -> Result<Option<(u32, String)>, ChatError> {
        Ok(self.generation.next_token_async().await?)
    }

    /// What the turn did so far.
    pub fn stats(&self) -> TurnStats {
        let generate = self.generation.stats().clone();
        TurnStats {
            ttft: generate.ttft,
            generate,
            source: self.source.clone(),
            context_tokens: self.context_tokens,
            kv: self.fetch.clone(),
            kv_fp16_bytes: self.kv_fp16_bytes,
        }
    }

    /// Every generated id (a final stop token included) and the turn's statistics.
    pub fn finish(self) -> (Vec<u32>, TurnStats) {
        let stats = self.stats();
        (self.generation.finish().0, stats)
    }
}

/// Answers `messages` after `context`, calling `on_token` per generated token; returns the token ids and stats.
/// The context's KV comes over a native WebSocket ([`crate::fetch`]).
#[cfg(not(target_arch = "wasm32"))]
pub fn chat_turn(
    engine: &Engine,
    context: &ContextSource,
    messages: &[Message],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32, &str),
) -> Result<(Vec<u32>, TurnStats), ChatError> {
    let mut turn = start_turn(engine, context, messages, opts, &crate::fetch::start)?;
    while let Some((id, text)) = turn.next_token()? {
        on_token(id, &text);
    }
    Ok(turn.finish())
}

/// Starts a turn: fetches the context's KV through `connect` while prefilling the prompt against it (or prefills
/// the context here when the cloud fails), and returns the turn ready to generate.
pub fn start_turn<'e>(
    engine: &'e Engine,
    context: &ContextSource,
    messages: &[Message],
    opts: &GenerateOptions,
    connect: &Connect<'_>,
) -> Result<Turn<'e>, ChatError> {
    let t0 = Instant::now();
    let has_context = context.cloud.is_some() || context.text.is_some();
    let prompt = engine
        .tokenizer
        .chat_tokens(messages, has_context)
        .map_err(EngineError::from)?;
    let mut session = engine.session();
    let cloud = context
        .cloud
        .as_ref()
        .map(|c| cloud_prefill(engine, &mut session, c, &prompt, connect, t0));
    let (logits, source, fetch) = match cloud {
        Some(Ok(CloudKv {
            logits,
            source,
            fetch,
        })) => (logits, source, fetch),
        failed => {
            let (reason, header_tokens) = match failed {
                Some(Err(failure)) => failure,
                _ => ("no cloud configured".to_string(), None),
            };
            let ctx_tokens = match (header_tokens, &context.text) {
                (Some(t), _) => t,
                (None, Some(text)) => engine
                    .tokenizer
                    .context_tokens(text)
                    .map_err(EngineError::from)?,
                (None, None) if context.cloud.is_some() => {
                    return Err(ChatError::NoContext(reason));
                }
                (None, None) => Vec::new(),
            };
            // The context as its own KV segment, then the prompt: the very computation of the cloud path, so both
            // give the same tokens.
            session = engine.session();
            let source = if ctx_tokens.is_empty() {
                KvSource::None
            } else {
                local_context(engine, &mut session, &ctx_tokens)?;
                KvSource::Local { reason }
            };
            let logits = session.advance(&prompt).map_err(EngineError::from)?;
            (logits, source, FetchStats::default())
        }
    };
    let context_tokens = session.len() - prompt.len();
    let c = engine.model.config();
    let kv_fp16_bytes = c.n_layers * 2 * c.n_kv_heads * context_tokens * c.head_dim * 2;
    Ok(Turn {
        generation: Generation::new(engine, session, logits, prompt.len(), t0, opts.clone()),
        source,
        context_tokens,
        fetch,
        kv_fp16_bytes,
    })
}

/// Prefills the context `tokens` here as `session`'s shared context (the cloud's computation, on this device).
fn local_context(
    engine: &Engine,
    session: &mut Session<'_>,
    tokens: &[u32],
) -> Result<(), EngineError> {
    let t0 = Instant::now();
    session.advance(tokens)?;
    session.own_as_context()?;
    engine.record_prefill(tokens.len(), t0.elapsed());
    Ok(())
}

/// Why the cloud path failed, and the context's tokens if its header had arrived.
type CloudFailure = (String, Option<Vec<u32>>);

/// The prompt prefilled against the cloud's context: the logits, and how the context came.
struct CloudKv {
    logits: Logits,
    source: KvSource,
    fetch: FetchStats,
}

/// The prompt prefilled against the cloud's context as it streams in. Where the cloud left the lowest layers to
/// this edge (`header.first_layer`: its choice in exact mode, the edge's in split mode), they are computed here, a
/// layer at a time, while the others arrive; in fused mode every layer is computed here and, where the alignment's
/// gate is above 0, the streamed projected layer is blended into it. A stream that breaks (dropped, stalled, a
/// chunk failing its checksum) resumes from the layer it broke at on a new connection, up to [`MAX_RESUMES`]
/// times. On failure: the reason, and the context's tokens when the header had arrived (so the fallback needs no
/// local text).
fn cloud_prefill(
    engine: &Engine,
    session: &mut Session<'_>,
    cloud: &CloudContext,
    prompt: &[u32],
    connect: &Connect<'_>,
    t0: Instant,
) -> Result<CloudKv, CloudFailure> {
    let req = FetchRequest {
        prefill_tps: engine.prefill_tokens_per_s(),
        ..cloud.fetch_request(engine)
    };
    let mut fetch = connect(req, t0).map_err(|e| (e.to_string(), None))?;
    let (header, projection) = (fetch.header.clone(), fetch.projection.clone());
    let failed = |e: String| (e, Some(header.tokens.clone()));
    let n_layers = engine.model.config().n_layers;
    let gates = match (cloud.mode, &projection) {
        (KvMode::Fused, Some(p)) => Some(p.gates.clone()),
        _ => None,
    };
    // The layers computed here.
    let own = if gates.is_some() {
        n_layers
    } else {
        header.first_layer
    };
    let mut local = match own {
        0 => None,
        _ if !header
            .positions
            .iter()
            .enumerate()
            .all(|(i, &p)| p as usize == i) =>
        {
            return Err(failed(
                "the cloud left layers to compute for a context not at positions 0..n".into(),
            ));
        }
        _ => Some(
            LayerwisePrefill::new(&engine.model, &header.tokens, 0)
                .map_err(|e| failed(e.to_string()))?,
        ),
    };
    let local_started = Instant::now();
    let mut computed = |l: usize| -> Result<Option<DeviceKv>, String> {
        match local.as_mut() {
            Some(p) if l < own => {
                let kv = p.next_layer_on_device().ok_or("no such layer")?;
                if l + 1 == own {
                    // The measured speed of this machine, for the next request's split.
                    let all_layers = local_started
                        .elapsed()
                        .mul_f64(n_layers as f64 / own as f64);
                    engine.record_prefill(header.tokens.len(), all_layers);
                }
                Ok(Some(kv))
            }
            _ => Ok(None),
        }
    };
    let mut streamed = |l: usize| -> Result<LayerKv, String> {
        loop {
            let broke = match fetch.layer(l, t0) {
                Ok(kv) => return Ok(kv),
                Err(e) if fetch.stats.resumes < MAX_RESUMES => e,
                Err(e) => return Err(e),
            };
            // Resume from this layer on a new connection: same codec and mode, no new split, the same context.
            let cloud = CloudContext {
                codec: Some(fetch.codec),
                ..cloud.clone()
            };
            let req = FetchRequest {
                from_layer: l as u32,
                ..cloud.fetch_request(engine)
            };
            let mut again = connect(req, t0)
                .map_err(|e| format!("{broke}; resuming from layer {l} failed: {e}"))?;
            if again.header.tokens != header.tokens
                || again.header.positions != header.positions
                || again.projection != projection
            {
                return Err(format!(
                    "{broke}; on resuming, the cloud's context had changed"
                ));
            }
            again.resumes(std::mem::take(&mut fetch.stats));
            fetch = again;
        }
    };
    let logits = session
        .prefill_streamed(&header, prompt, &mut |l| {
            Ok(match (computed(l)?, &gates) {
                // Only layers whose gate reads the projected KV stream in fused mode.
                (Some(kv), Some(g)) if g[l] > 0.0 => ContextLayer {
                    kv: LayerKvAt::Device(kv),
                    gated: Some((streamed(l)?, g[l])),
                },
                (Some(kv), _) => kv.into(),
                (None, _) => streamed(l)?.into(),
            })
        })
        .map_err(|e| failed(e.to_string()))?;
    let mut stats = fetch.stats;
    stats.local_layers = own;
    Ok(CloudKv {
        logits,
        source: KvSource::Cloud {
            codec: fetch.codec,
            mode: cloud.mode,
            alignment: projection.map(|p| p.alignment),
        },
        fetch: stats,
    })
}

/// How often one turn reconnects to resume a broken KV stream before it computes the context itself.
const MAX_RESUMES: usize = 2;
