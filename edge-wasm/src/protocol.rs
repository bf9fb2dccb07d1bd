//! The edge's side of the KV protocol ([`tandem_common::wire`]) without any I/O: messages in, events out.
//!
//! Every transport drives the same [`KvClient`]: a native background thread over tokio-tungstenite, the wasmtime
//! component over its host's `kv-link`, the browser over its WebSocket. The client checks the order of frames, each
//! payload's checksum, and decodes each layer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tandem_common::codec::{Codec, KvShape, RopeParams, decode_layer};
use tandem_common::engine::Engine;
use tandem_common::kv::{KvState, LayerKv};
use tandem_common::model::usable_gate;
use tandem_common::wire::{self, Frame, KvMode, PROTOCOL_VERSION, Projection};
use web_time::Instant;

/// A shared context held by a cloud, and how to ask for it.
#[derive(Debug, Clone)]
pub struct CloudContext {
    /// The cloud's base URL, `http://host:port` (or `ws://…`).
    pub cloud_url: String,
    /// The model's name on the cloud.
    pub model: String,
    pub context: String,
    /// A codec to insist on; the cloud picks when `None`.
    pub codec: Option<Codec>,
    /// Whose reading of the context to fetch: the edge model's own KV (default) or the cloud LLM's, projected.
    pub mode: KvMode,
    /// This edge's download bandwidth, bits per second; when `None`, the rate measured on this process's last stream.
    pub bandwidth_bps: Option<u64>,
    pub auth: Option<String>,
    /// Longest wait for the connection and the context header, and then between two layers.
    pub timeout: Duration,
}

impl CloudContext {
    /// The fetch of this context's KV for `engine`: all its layers, any codec.
    pub fn fetch_request(&self, engine: &Engine) -> FetchRequest {
        let c = engine.model.config();
        FetchRequest {
            cloud: self.clone(),
            weights: engine.model.fingerprint().to_string(),
            layers: c.n_layers as u32,
            from_layer: 0,
            rope: RopeParams::of(c),
            codecs: Codec::ALL.to_vec(),
            prefill_tps: None,
        }
    }

    /// The WebSocket URL of the cloud's KV endpoint.
    pub fn kv_url(&self) -> String {
        let base = self.cloud_url.trim_end_matches('/');
        let ws = if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else {
            base.to_string()
        };
        format!("{ws}/v1/kv")
    }
}

/// A [`CloudContext`] and what the edge's model needs of it.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub cloud: CloudContext,
    /// This edge's weights fingerprint (the cloud refuses KV of other weights).
    pub weights: String,
    /// Layers of the edge's model (the cloud must send them all, from `from_layer` on), and its rotary embedding
    /// (for the codecs).
    pub layers: u32,
    /// The first layer wanted: 0, or where a broken stream resumes.
    pub from_layer: u32,
    pub rope: RopeParams,
    /// Codecs this edge accepts.
    pub codecs: Vec<Codec>,
    /// This edge's measured context-prefill speed, tokens/s: when given, the cloud may leave it the lowest layers
    /// (the header's `first_layer`), so only callers that compute those set it.
    pub prefill_tps: Option<f64>,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum FetchError {
    #[error("cannot reach the cloud at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the cloud refused: {code:?}: {message}")]
    Refused {
        code: wire::ErrorCode,
        message: String,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no answer from the cloud within {0:?}")]
    Timeout(Duration),
}

/// What a received message meant.
#[derive(Debug)]
pub enum KvEvent {
    /// Send this message to the cloud.
    Reply(Vec<u8>),
    /// The context's tokens, positions and shape (no layers), the codec its layers come in, and for a projected
    /// mode how they were made.
    Header {
        header: KvState,
        codec: Codec,
        projection: Option<Projection>,
    },
    /// The next layer, decoded; `wire_bytes` is its payload's size.
    Layer {
        layer: usize,
        kv: LayerKv,
        wire_bytes: usize,
    },
    /// The stream is complete.
    Done,
}

impl KvEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            KvEvent::Reply(_) => "a reply",
            KvEvent::Header { .. } => "the context header",
            KvEvent::Layer { .. } => "a layer",
            KvEvent::Done => "the end of the stream",
        }
    }
}

/// The protocol state of one KV fetch.
pub struct KvClient {
    req: FetchRequest,
    stage: Stage,
}

enum Stage {
    Welcome,
    Context,
    Layers {
        shape: KvShape,
        codec: Codec,
        /// The context's token ids and positions (the codecs need both).
        tokens: Vec<u32>,
        positions: Vec<u32>,
        /// The layers that will come, in order, and how many have.
        expected: Vec<u32>,
        at: usize,
        started: Instant,
        received: usize,
    },
    Done,
    Finished,
}

impl KvClient {
    /// A client for `req`, and its first message (the `Hello`).
    pub fn new(req: FetchRequest) -> (KvClient, Vec<u8>) {
        let hello = wire::encode(&Frame::Hello {
            version: PROTOCOL_VERSION,
            auth: req.cloud.auth.clone(),
            model: req.cloud.model.clone(),
            weights: req.weights.clone(),
            codecs: req.codecs.clone(),
            bandwidth_bps: req.cloud.bandwidth_bps.or_else(measured_bandwidth),
        });
        let client = KvClient {
            req,
            stage: Stage::Welcome,
        };
        (client, hello)
    }

    /// Whether the stream is complete.
    pub fn is_finished(&self) -> bool {
        matches!(self.stage, Stage::Finished)
    }

    /// Takes one message from the cloud. An `Error` frame becomes [`FetchError::Refused`]; any frame out of order,
    /// a bad checksum or an undecodable layer is a [`FetchError::Protocol`] naming what was wrong.
    pub fn receive(&mut self, message: &[u8]) -> Result<KvEvent, FetchError> {
        let frame = match wire::decode(message).map_err(|e| FetchError::Protocol(e.to_string()))? {
            Frame::Error { code, message } => return Err(FetchError::Refused { code, message }),
            f => f,
        };
        match (&mut self.stage, frame) {
            (Stage::Welcome, Frame::Welcome { .. }) => {
                self.stage = Stage::Context;
                Ok(KvEvent::Reply(wire::encode(&Frame::Request {
                    context: self.req.cloud.context.clone(),
                    layers: (self.req.from_layer, self.req.layers),
                    tokens: None,
                    codec: self.req.cloud.codec,
                    edge_prefill_tps: self.req.prefill_tps.map(|r| r as f32),
                    mode: self.req.cloud.mode,
                })))
            }
            (
                Stage::Context,
                Frame::Context {
                    tokens,
                    positions,
                    layers,
                    kv_heads,
                    head_dim,
                    codec,
                    projection,
                    ..
                },
            ) => {
                // The cloud sends every layer asked for, or leaves the lowest to this edge: in exact mode as it
                // sees fit, in split mode the ones asked for.
                let from = self.req.from_layer;
                let first_ok = match self.req.cloud.mode {
                    KvMode::Exact => layers.0 >= from,
                    KvMode::Split { own_layers } => layers.0 == from.max(own_layers),
                    KvMode::Fused => layers.0 == from,
                };
                if tokens.len() != positions.len()
                    || layers.1 != self.req.layers
                    || !first_ok
                    || layers.0 >= layers.1
                {
                    return Err(FetchError::Protocol(format!(
                        "inconsistent context header: {} tokens, {} positions, layers {layers:?}",
                        tokens.len(),
                        positions.len()
                    )));
                }
                check_projection(self.req.cloud.mode, projection.as_ref(), self.req.layers)?;
                // Fused: only the layers whose gate reads the projected KV come.
                let expected: Vec<u32> = (layers.0..layers.1)
                    .filter(|&l| match (self.req.cloud.mode, &projection) {
                        (KvMode::Fused, Some(p)) => p.gates[l as usize] > 0.0,
                        _ => true,
                    })
                    .collect();
                if expected.is_empty() {
                    return Err(FetchError::Protocol(format!(
                        "context header: no layer of {layers:?} to come"
                    )));
                }
                let shape = KvShape {
                    kv_heads: kv_heads as usize,
                    tokens: tokens.len(),
                    head_dim: head_dim as usize,
                };
                let header = KvState {
                    model: self.req.weights.clone(),
                    first_layer: layers.0 as usize,
                    kv_heads: shape.kv_heads,
                    head_dim: shape.head_dim,
                    tokens: tokens.clone(),
                    positions: positions.clone(),
                    layers: Vec::new(),
                };
                self.stage = Stage::Layers {
                    shape,
                    codec,
                    tokens,
                    positions,
                    expected,
                    at: 0,
                    started: Instant::now(),
                    received: 0,
                };
                Ok(KvEvent::Header {
                    header,
                    codec,
                    projection,
                })
            }
            (
                Stage::Layers {
                    shape,
                    codec,
                    tokens: ids,
                    positions,
                    expected,
                    at,
                    started,
                    received,
                },
                Frame::LayerChunk {
                    layer,
                    tokens,
                    codec: c,
                    checksum,
                    payload,
                },
            ) => {
                let l = expected[*at];
                if layer != l || c != *codec || tokens != (0, shape.tokens as u32) {
                    return Err(FetchError::Protocol(format!(
                        "expected layer {l} of tokens 0..{} in {codec}, got layer {layer} of {tokens:?} in {c}",
                        shape.tokens
                    )));
                }
                if wire::checksum(&payload) != checksum {
                    return Err(FetchError::Protocol(format!(
                        "layer {l}: payload checksum mismatch"
                    )));
                }
                let kv = decode_layer(
                    *codec,
                    *shape,
                    Some(self.req.rope.at(positions)),
                    ids,
                    &payload,
                )
                .map_err(|e| FetchError::Protocol(format!("layer {l}: {e}")))?;
                *received += payload.len();
                *at += 1;
                if *at == expected.len() {
                    record_bandwidth(*received, started.elapsed());
                    self.stage = Stage::Done;
                }
                Ok(KvEvent::Layer {
                    layer: l as usize,
                    kv,
                    wire_bytes: payload.len(),
                })
            }
            (Stage::Done, Frame::Done { .. }) => {
                self.stage = Stage::Finished;
                Ok(KvEvent::Done)
            }
            (stage, other) => Err(FetchError::Protocol(format!(
                "expected {}, got {}",
                stage.expects(),
                other.kind()
            ))),
        }
    }
}

/// A projected mode's header must say how its layers were made, with a usable gate per layer; exact KV has none.
fn check_projection(mode: KvMode, p: Option<&Projection>, layers: u32) -> Result<(), FetchError> {
    let bad = |why: String| {
        Err(FetchError::Protocol(format!(
            "{mode} context header: {why}"
        )))
    };
    match (mode, p) {
        (KvMode::Exact, None) => Ok(()),
        (KvMode::Exact, Some(p)) => bad(format!("projected by {} unasked", p.alignment)),
        (_, None) => bad("no projection named".into()),
        (_, Some(p)) if p.gates.len() != layers as usize => {
            bad(format!("{} gates for {layers} layers", p.gates.len()))
        }
        (_, Some(p)) if !p.gates.iter().copied().all(usable_gate) => {
            bad("a gate outside [0, 1]".into())
        }
        _ => Ok(()),
    }
}

impl Stage {
    fn expects(&self) -> &'static str {
        match self {
            Stage::Welcome => "Welcome",
            Stage::Context => "Context",
            Stage::Layers { .. } => "LayerChunk",
            Stage::Done => "Done",
            Stage::Finished => "the end of the stream",
        }
    }
}

/// The delivery rate of this process's last complete KV stream, bits per second (0: none yet). Reported in the next
/// `Hello` when the caller gives no bandwidth, so the cloud's codec choice follows the link the edge really has.
static LAST_BANDWIDTH_BPS: AtomicU64 = AtomicU64::new(0);

fn measured_bandwidth() -> Option<u64> {
    Some(LAST_BANDWIDTH_BPS.load(Ordering::Relaxed)).filter(|&b| b > 0)
}

fn record_bandwidth(bytes: usize, took: Duration) {
    // Too short a stream says more about latency than bandwidth.
    if bytes >= 256 << 10 && !took.is_zero() {
        let bps = (bytes as f64 * 8.0 / took.as_secs_f64()) as u64;
        LAST_BANDWIDTH_BPS.store(bps, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_measured_from_long_enough_streams() {
        assert_eq!(measured_bandwidth(), None);
        record_bandwidth(1000, Duration::from_millis(1));
        assert_eq!(measured_bandwidth(), None, "a 1 kB stream measures latency");
        record_bandwidth(1 << 20, Duration::from_secs(1));
        assert_eq!(measured_bandwidth(), Some(8 << 20));
    }

    #[test]
    fn projected_headers_must_name_a_usable_projection() {
        let p = |gates: Vec<f32>| Projection {
            alignment: "a".into(),
            llm: "big".into(),
            gates,
        };
        let split = KvMode::Split { own_layers: 1 };
        assert!(check_projection(KvMode::Exact, None, 2).is_ok());
        assert!(check_projection(split, Some(&p(vec![0.0, 1.0])), 2).is_ok());
        for (mode, proj) in [
            (KvMode::Exact, Some(p(vec![0.0, 0.0]))),
            (KvMode::Fused, None),
            (KvMode::Fused, Some(p(vec![0.5]))),
            (KvMode::Fused, Some(p(vec![0.5, 2.0]))),
            (split, Some(p(vec![0.5, f32::NAN]))),
        ] {
            let e = check_projection(mode, proj.as_ref(), 2).unwrap_err();
            assert!(e.to_string().contains(&mode.to_string()), "{e}");
        }
    }

    #[test]
    fn urls_become_websocket_urls() {
        let at = |url: &str| {
            CloudContext {
                cloud_url: url.into(),
                model: String::new(),
                context: String::new(),
                codec: None,
                mode: KvMode::Exact,
                bandwidth_bps: None,
                auth: None,
                timeout: Duration::ZERO,
            }
            .kv_url()
        };
        assert_eq!(at("http://h:8080/"), "ws://h:8080/v1/kv");
        assert_eq!(at("https://h"), "wss://h/v1/kv");
        assert_eq!(at("ws://h"), "ws://h/v1/kv");
    }
}
