//! A context's KV as it arrives, whatever carries it: the header first, then the layers in order.

use std::time::Duration;

use tandem_common::codec::Codec;
use tandem_common::kv::{KvState, LayerKv};
use tandem_common::wire::Projection;
use web_time::Instant;

use crate::protocol::{FetchError, FetchRequest, KvClient, KvEvent};

/// A layer as it arrived.
pub struct ArrivedLayer {
    pub layer: usize,
    pub kv: LayerKv,
    /// Its payload's size on the wire.
    pub wire_bytes: usize,
}

/// Waits for the next layer to arrive (the transport's own timeout applies).
pub type NextLayer = Box<dyn FnMut() -> Result<ArrivedLayer, String> + Send>;

/// A fetch under way: the context's header, and its layers as they arrive.
pub struct IncomingKv {
    /// The context's tokens, positions and shape (no layers).
    pub header: KvState,
    pub codec: Codec,
    /// How the layers were made, for a projected mode.
    pub projection: Option<Projection>,
    pub stats: FetchStats,
    next: NextLayer,
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
    /// The lowest layers the cloud left to this edge, computed here while the others streamed.
    pub local_layers: usize,
    /// Times a broken stream was resumed from the layer it broke at.
    pub resumes: usize,
    /// Per layer, in order: when the computation asked for it and when it had it.
    pub timeline: Vec<LayerTiming>,
}

/// When one context layer was needed and when it was there, from the start of the fetch: where `ready` is later
/// than `asked`, the computation waited for the network; where they meet, the layer had arrived in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LayerTiming {
    pub layer: usize,
    pub asked_ms: f64,
    pub ready_ms: f64,
    /// Its payload's size on the wire.
    pub wire_bytes: usize,
}

/// How an edge opens a fetch: a transport (a background WebSocket natively, a host's link in a component).
pub type Connect<'c> = dyn Fn(FetchRequest, Instant) -> Result<IncomingKv, FetchError> + 'c;

impl IncomingKv {
    /// A fetch whose header arrived `header_after` the start, with `next` yielding its layers.
    pub fn new(
        header: KvState,
        codec: Codec,
        projection: Option<Projection>,
        header_after: Duration,
        next: NextLayer,
    ) -> Self {
        IncomingKv {
            header,
            codec,
            projection,
            stats: FetchStats {
                header_after,
                ..Default::default()
            },
            next,
        }
    }

    /// This fetch resumes `before`, which broke: their costs add up.
    pub fn resumes(&mut self, before: FetchStats) {
        let s = &mut self.stats;
        s.header_after = before.header_after;
        s.kv_bytes += before.kv_bytes;
        s.layers += before.layers;
        s.local_layers = before.local_layers;
        s.resumes = before.resumes + 1;
        let mut timeline = before.timeline;
        timeline.append(&mut s.timeline);
        s.timeline = timeline;
    }

    /// Waits for layer `l` (layers arrive in order); `started` is when the fetch began.
    pub fn layer(&mut self, l: usize, started: Instant) -> Result<LayerKv, String> {
        let asked = started.elapsed();
        let got = (self.next)()?;
        if got.layer != l {
            return Err(format!(
                "expected layer {l}, the cloud sent layer {}",
                got.layer
            ));
        }
        self.stats.kv_bytes += got.wire_bytes;
        self.stats.layers += 1;
        self.stats.done_after = started.elapsed();
        self.stats.timeline.push(LayerTiming {
            layer: l,
            asked_ms: asked.as_secs_f64() * 1e3,
            ready_ms: self.stats.done_after.as_secs_f64() * 1e3,
            wire_bytes: got.wire_bytes,
        });
        Ok(got.kv)
    }
}

/// A timeout in whole milliseconds, as the hosts' links take it (saturating).
pub fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

/// A blocking, message-oriented connection to a KV source (one message = one wire frame).
pub trait MessageLink: Send {
    fn send(&mut self, message: Vec<u8>) -> Result<(), String>;
    /// The next message, waiting at most `timeout`.
    fn receive(&mut self, timeout: Duration) -> Result<Vec<u8>, String>;
}

/// Fetches `req` over `link`, decoding each layer on the thread that asks for it (for runtimes without threads:
/// the link's host keeps receiving while this thread computes).
pub fn fetch_over(
    mut link: impl MessageLink + 'static,
    req: FetchRequest,
    started: Instant,
) -> Result<IncomingKv, FetchError> {
    let timeout = req.cloud.timeout;
    let (mut client, hello) = KvClient::new(req);
    link.send(hello).map_err(FetchError::Protocol)?;
    loop {
        let message = link.receive(timeout).map_err(FetchError::Protocol)?;
        match client.receive(&message)? {
            KvEvent::Reply(m) => link.send(m).map_err(FetchError::Protocol)?,
            KvEvent::Header {
                header,
                codec,
                projection,
            } => {
                let next = Box::new(move || -> Result<ArrivedLayer, String> {
                    let message = link.receive(timeout)?;
                    match client.receive(&message).map_err(|e| e.to_string())? {
                        KvEvent::Layer {
                            layer,
                            kv,
                            wire_bytes,
                        } => Ok(ArrivedLayer {
                            layer,
                            kv,
                            wire_bytes,
                        }),
                        other => Err(format!("expected a layer, got {}", other.kind())),
                    }
                });
                return Ok(IncomingKv::new(
                    header,
                    codec,
                    projection,
                    started.elapsed(),
                    next,
                ));
            }
            other => {
                return Err(FetchError::Protocol(format!(
                    "expected the context header, got {}",
                    other.kind()
                )));
            }
        }
    }
}
