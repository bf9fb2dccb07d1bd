//! Fetching a context's KV from the cloud over the WebSocket protocol ([`tandem_common::wire`]), natively.
//!
//! A background thread speaks the protocol and decodes each layer as it arrives (checksum, then codec), so the
//! compute thread only ever waits for a layer that has not arrived yet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tandem_common::codec::{Codec, KvShape, RopeParams, decode_layer};
use tandem_common::engine::Engine;
use tandem_common::kv::{KvState, LayerKv};
use tandem_common::wire::{self, Frame, PROTOCOL_VERSION};
use tokio_tungstenite::tungstenite::Message;
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
            rope: RopeParams::of(c),
            codecs: Codec::ALL.to_vec(),
        }
    }
}

/// A [`CloudContext`] and what the edge's model needs of it.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub cloud: CloudContext,
    /// This edge's weights fingerprint (the cloud refuses KV of other weights).
    pub weights: String,
    /// Layers of the edge's model (the cloud must send them all), and its rotary embedding (for the codecs).
    pub layers: u32,
    pub rope: RopeParams,
    /// Codecs this edge accepts.
    pub codecs: Vec<Codec>,
}

/// A fetch under way: the context's header, and its layers as they arrive.
pub struct KvFetch {
    /// The context's tokens, positions and shape (no layers).
    pub header: KvState,
    pub codec: Codec,
    layers: mpsc::Receiver<Result<Arrived, String>>,
    timeout: Duration,
    pub stats: FetchStats,
}

struct Arrived {
    layer: usize,
    kv: LayerKv,
    wire_bytes: usize,
}

/// What a fetch cost.
#[derive(Debug, Clone, Default)]
pub struct FetchStats {
    /// From the start of the fetch to the context header.
    pub header_after: Duration,
    /// From the start to the last layer.
    pub done_after: Duration,
    /// KV payload bytes received.
    pub kv_bytes: usize,
    /// Layers received.
    pub layers: usize,
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

impl KvFetch {
    /// Connects, says hello, asks for the context's KV (all layers, all tokens) and waits for its header; the layers
    /// keep arriving in the background.
    pub fn start(req: FetchRequest, started: Instant) -> Result<KvFetch, FetchError> {
        let (header_tx, header_rx) = mpsc::channel();
        let (layer_tx, layer_rx) = mpsc::channel();
        let timeout = req.cloud.timeout;
        std::thread::Builder::new()
            .name("tandem-kv-fetch".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = header_tx.send(Err(FetchError::Protocol(e.to_string())));
                        return;
                    }
                };
                rt.block_on(run(req, header_tx, layer_tx));
            })
            .map_err(|e| FetchError::Protocol(e.to_string()))?;
        let (header, codec) = header_rx
            .recv_timeout(timeout)
            .map_err(|_| FetchError::Timeout(timeout))??;
        Ok(KvFetch {
            header,
            codec,
            layers: layer_rx,
            timeout,
            stats: FetchStats {
                header_after: started.elapsed(),
                ..Default::default()
            },
        })
    }

    /// Waits for layer `l` (layers arrive in order).
    pub fn layer(&mut self, l: usize, started: Instant) -> Result<LayerKv, String> {
        let got = self
            .layers
            .recv_timeout(self.timeout)
            .map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => {
                    format!("layer {l} not received within {:?}", self.timeout)
                }
                mpsc::RecvTimeoutError::Disconnected => {
                    format!("connection ended before layer {l}")
                }
            })??;
        if got.layer != l {
            return Err(format!(
                "expected layer {l}, the cloud sent layer {}",
                got.layer
            ));
        }
        self.stats.kv_bytes += got.wire_bytes;
        self.stats.layers += 1;
        self.stats.done_after = started.elapsed();
        Ok(got.kv)
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

type HeaderTx = mpsc::Sender<Result<(KvState, Codec), FetchError>>;
type LayerTx = mpsc::Sender<Result<Arrived, String>>;

fn kv_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let ws = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        base.to_string()
    };
    format!("{ws}/v1/kv")
}

async fn run(req: FetchRequest, header_tx: HeaderTx, layer_tx: LayerTx) {
    let mut header_tx = Some(header_tx);
    if let Err(e) = converse(&req, &mut header_tx, &layer_tx).await {
        // Before the header, the error goes to the caller waiting for it; after, to the layer consumer.
        match header_tx.take() {
            Some(h) => {
                let _ = h.send(Err(e));
            }
            None => {
                let _ = layer_tx.send(Err(e.to_string()));
            }
        }
    }
}

async fn converse(
    req: &FetchRequest,
    header_tx: &mut Option<HeaderTx>,
    layer_tx: &LayerTx,
) -> Result<(), FetchError> {
    let url = kv_url(&req.cloud.cloud_url);
    let (mut ws, _) = tokio::time::timeout(
        req.cloud.timeout,
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await
    .map_err(|_| FetchError::Timeout(req.cloud.timeout))?
    .map_err(|e| FetchError::Unreachable {
        url: url.clone(),
        reason: e.to_string(),
    })?;
    let send = async |ws: &mut Ws, f: Frame| {
        ws.send(Message::binary(wire::encode(&f)))
            .await
            .map_err(|e| FetchError::Protocol(format!("sending {}: {e}", f.kind())))
    };
    send(
        &mut ws,
        Frame::Hello {
            version: PROTOCOL_VERSION,
            auth: req.cloud.auth.clone(),
            model: req.cloud.model.clone(),
            weights: req.weights.clone(),
            codecs: req.codecs.clone(),
            bandwidth_bps: req.cloud.bandwidth_bps.or_else(measured_bandwidth),
        },
    )
    .await?;
    match next(&mut ws, req.cloud.timeout).await? {
        Frame::Welcome { .. } => {}
        other => return Err(unexpected("Welcome", other)),
    }
    send(
        &mut ws,
        Frame::Request {
            context: req.cloud.context.clone(),
            layers: (0, req.layers),
            tokens: None,
            codec: req.cloud.codec,
        },
    )
    .await?;
    let (shape, codec, positions) = match next(&mut ws, req.cloud.timeout).await? {
        Frame::Context {
            tokens,
            positions,
            layers,
            kv_heads,
            head_dim,
            codec,
            ..
        } => {
            if tokens.len() != positions.len() || layers != (0, req.layers) {
                return Err(FetchError::Protocol(format!(
                    "inconsistent context header: {} tokens, {} positions, layers {layers:?}",
                    tokens.len(),
                    positions.len()
                )));
            }
            let shape = KvShape {
                kv_heads: kv_heads as usize,
                tokens: tokens.len(),
                head_dim: head_dim as usize,
            };
            let header = KvState {
                model: req.weights.clone(),
                first_layer: 0,
                kv_heads: shape.kv_heads,
                head_dim: shape.head_dim,
                tokens,
                positions: positions.clone(),
                layers: Vec::new(),
            };
            if let Some(h) = header_tx.take() {
                let _ = h.send(Ok((header, codec)));
            }
            (shape, codec, positions)
        }
        other => return Err(unexpected("Context", other)),
    };
    let (started, mut received) = (Instant::now(), 0usize);
    for l in 0..req.layers {
        match next(&mut ws, req.cloud.timeout).await? {
            Frame::LayerChunk {
                layer,
                tokens,
                codec: c,
                checksum,
                payload,
            } => {
                if layer != l || c != codec || tokens != (0, shape.tokens as u32) {
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
                let kv = decode_layer(codec, shape, Some(req.rope.at(&positions)), &payload)
                    .map_err(|e| FetchError::Protocol(format!("layer {l}: {e}")))?;
                received += payload.len();
                let arrived = Arrived {
                    layer: l as usize,
                    kv,
                    wire_bytes: payload.len(),
                };
                if layer_tx.send(Ok(arrived)).is_err() {
                    // The edge stopped listening (it fell back or finished): nothing more to do.
                    let _ = ws.close(None).await;
                    return Ok(());
                }
            }
            other => return Err(unexpected("LayerChunk", other)),
        }
    }
    record_bandwidth(received, started.elapsed());
    match next(&mut ws, req.cloud.timeout).await? {
        Frame::Done { .. } => {}
        other => return Err(unexpected("Done", other)),
    }
    let _ = ws.close(None).await;
    Ok(())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next frame from the cloud; an `Error` frame becomes [`FetchError::Refused`].
async fn next(ws: &mut Ws, timeout: Duration) -> Result<Frame, FetchError> {
    loop {
        let msg = tokio::time::timeout(timeout, ws.next())
            .await
            .map_err(|_| FetchError::Timeout(timeout))?
            .ok_or_else(|| FetchError::Protocol("the cloud closed the connection".into()))?
            .map_err(|e| FetchError::Protocol(e.to_string()))?;
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Close(_) => {
                return Err(FetchError::Protocol(
                    "the cloud closed the connection".into(),
                ));
            }
            Message::Text(_) => return Err(FetchError::Protocol("unexpected text message".into())),
        };
        return match wire::decode(&bytes).map_err(|e| FetchError::Protocol(e.to_string()))? {
            Frame::Error { code, message } => Err(FetchError::Refused { code, message }),
            f => Ok(f),
        };
    }
}

fn unexpected(want: &str, got: Frame) -> FetchError {
    FetchError::Protocol(format!("expected {want}, got {}", got.kind()))
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
    fn urls_become_websocket_urls() {
        assert_eq!(kv_url("http://h:8080/"), "ws://h:8080/v1/kv");
        assert_eq!(kv_url("https://h"), "wss://h/v1/kv");
        assert_eq!(kv_url("ws://h"), "ws://h/v1/kv");
    }
}
