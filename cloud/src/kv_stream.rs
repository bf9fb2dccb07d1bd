//! `GET /v1/kv`: the WebSocket that streams a context's KV to an edge, layer by layer (protocol: [`tandem_common::wire`]).
//!
//! Layer l+1 is encoded while layer l is on the wire. Anything malformed ends in an `Error` frame naming it; the
//! session then closes (or, for a request it merely cannot serve, waits for the next request).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use futures_util::{SinkExt, StreamExt};
use tandem_common::codec::{Codec, KvShape};
use tandem_common::wire::{self, ErrorCode, Frame, KvMode, PROTOCOL_VERSION};
use warp::ws::{Message, WebSocket};

use crate::metrics::ActiveSession;
use crate::server::{App, Served};
use crate::store::StoredContext;

/// Transfer time below which a more faithful codec than the quality floor costs the edge nothing noticeable.
const LINK_BUDGET_S: f64 = 0.25;

/// Who made a request, before its token is checked: the bearer token of its `Authorization` header and its IP
/// address. (A KV socket's token may come in `Hello` instead, and is checked there.)
pub struct Unchecked {
    pub token: Option<String>,
    pub ip: String,
}

pub async fn serve(app: Arc<App>, socket: WebSocket, caller: Unchecked) {
    let metrics = app.clone();
    let _active = ActiveSession::start(&metrics.metrics);
    let mut s = Session {
        socket,
        app,
        caller,
        slot: None,
    };
    if let Err(frame) = s.run().await {
        if let Frame::Error { code, message } = &frame {
            tracing::info!(?code, %message, "KV session refused");
        }
        s.app.metrics.kv_errors.fetch_add(1, Relaxed);
        let _ = s.send(&frame).await;
    }
    let _ = s.socket.close().await;
}

struct Session {
    socket: WebSocket,
    app: Arc<App>,
    caller: Unchecked,
    /// The client's stream slot, once its Hello is accepted.
    slot: Option<crate::limits::Slot>,
}

/// What a `Request` frame asks for.
struct Asked {
    layers: (u32, u32),
    tokens: Option<(u32, u32)>,
    codec: Option<Codec>,
    edge_prefill_tps: Option<f32>,
    mode: KvMode,
}

struct Edge<'a> {
    served: &'a Served,
    codecs: Vec<Codec>,
    bandwidth_bps: Option<u64>,
}

impl Session {
    /// Sends `f`, waiting while the edge's socket is full (so a slow edge holds at most this frame here), and gives
    /// up on an edge that has not read anything for the idle limit.
    async fn send(&mut self, f: &Frame) -> Result<(), Frame> {
        let idle = self.app.clients.limits().idle;
        match tokio::time::timeout(idle, self.socket.send(Message::binary(wire::encode(f)))).await {
            Ok(sent) => {
                sent.map_err(|e| Frame::error(ErrorCode::Internal, format!("send failed: {e}")))
            }
            Err(_) => {
                self.app.metrics.stalled_sessions.fetch_add(1, Relaxed);
                Err(Frame::error(
                    ErrorCode::Busy,
                    format!("the edge read nothing for {} s", idle.as_secs_f32()),
                ))
            }
        }
    }

    /// The next frame; `None` when the edge closed the connection.
    async fn next(&mut self) -> Result<Option<Frame>, Frame> {
        let idle = self.app.clients.limits().idle;
        loop {
            let msg = match tokio::time::timeout(idle, self.socket.next()).await {
                Err(_) => {
                    return Err(Frame::error(
                        ErrorCode::BadFrame,
                        format!("idle for {} s", idle.as_secs_f32()),
                    ));
                }
                Ok(None) | Ok(Some(Err(_))) => return Ok(None),
                Ok(Some(Ok(m))) => m,
            };
            if msg.is_close() {
                return Ok(None);
            }
            if msg.is_ping() || msg.is_pong() {
                continue;
            }
            if !msg.is_binary() {
                return Err(Frame::error(
                    ErrorCode::BadFrame,
                    "expected a binary frame, got a text message",
                ));
            }
            return wire::decode(msg.as_bytes())
                .map(Some)
                .map_err(|e| Frame::error(ErrorCode::BadFrame, e.to_string()));
        }
    }

    async fn run(&mut self) -> Result<(), Frame> {
        let app = self.app.clone();
        let Some(hello) = self.next().await? else {
            return Ok(());
        };
        let (edge, client) = hello_check(&app, hello, &self.caller)?;
        self.slot = Some(app.clients.admit(&client).map_err(|busy| {
            app.metrics.busy.fetch_add(1, Relaxed);
            Frame::error(ErrorCode::Busy, busy.to_string())
        })?);
        self.send(&Frame::Welcome {
            version: PROTOCOL_VERSION,
            server: format!("tandem-cloud {}", env!("CARGO_PKG_VERSION")),
        })
        .await?;
        while let Some(frame) = self.next().await? {
            match frame {
                Frame::Request {
                    context,
                    layers,
                    tokens,
                    codec,
                    edge_prefill_tps,
                    mode,
                } => {
                    let asked = Asked {
                        layers,
                        tokens,
                        codec,
                        edge_prefill_tps,
                        mode,
                    };
                    if let Err(e) = self.request(&edge, &context, asked).await {
                        // A request the cloud cannot serve does not end the session.
                        app.metrics.kv_errors.fetch_add(1, Relaxed);
                        self.send(&e).await?;
                    }
                }
                other => {
                    return Err(Frame::error(
                        ErrorCode::BadFrame,
                        format!("expected Request, got {}", other.kind()),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn request(&mut self, edge: &Edge<'_>, id: &str, asked: Asked) -> Result<(), Frame> {
        let Asked {
            layers,
            tokens,
            codec,
            edge_prefill_tps,
            mode,
        } = asked;
        let exact = self
            .app
            .context_or_pull(edge.served, id)
            .await
            .map_err(|e| Frame::error(ErrorCode::Internal, e))?
            .ok_or_else(|| {
                Frame::error(
                    ErrorCode::UnknownContext,
                    format!("no context {id:?} on this server"),
                )
            })?;
        if exact.record.model != edge.served.name {
            return Err(Frame::error(
                ErrorCode::WrongModel,
                format!(
                    "context {id} was computed by {}, the edge runs {}",
                    exact.record.model, edge.served.name
                ),
            ));
        }
        let (ctx, projection) = match mode {
            KvMode::Exact => (exact, None),
            _ => {
                let aligned = crate::projection::for_edge(&self.app, &edge.served.name)
                    .ok_or_else(|| {
                        Frame::error(
                            ErrorCode::BadRequest,
                            format!(
                                "{mode} KV needs an alignment from a larger model to {}; this server has none \
                                 (tandem serve --alignment)",
                                edge.served.name
                            ),
                        )
                    })?;
                let projected = crate::projection::projected(&self.app, &exact, aligned)
                    .await
                    .map_err(|e| Frame::error(ErrorCode::Internal, e))?;
                (projected, Some(aligned.projection(&self.app)))
            }
        };
        let kv = &ctx.record.kv;
        let layers = within("layers", layers, kv.layers.len())?;
        let tokens = within("tokens", tokens.unwrap_or((0, kv.len() as u32)), kv.len())?;
        let codec = match codec {
            Some(c) if edge.codecs.contains(&c) => c,
            Some(c) => {
                return Err(Frame::error(
                    ErrorCode::NoCodec,
                    format!("codec {c} was asked for but not offered in Hello"),
                ));
            }
            None => choose_codec(
                &ctx,
                &edge.codecs,
                edge.bandwidth_bps,
                self.app.quality_floor,
            )
            .ok_or_else(|| Frame::error(ErrorCode::NoCodec, "no codec in common"))?,
        };
        // A whole context for an edge that said how fast it computes, over a link it measured: the edge may be
        // better off computing the lowest layers itself while the others stream.
        let whole = layers.start == 0 && tokens == (0..kv.len());
        let local = match (mode, edge.bandwidth_bps, edge_prefill_tps) {
            // Split mode: the edge said how many layers it computes; they must leave some to stream.
            (KvMode::Split { own_layers }, ..) => {
                let own = own_layers as usize;
                if own == 0 || own >= kv.layers.len() {
                    return Err(Frame::error(
                        ErrorCode::BadRequest,
                        format!(
                            "{mode} must leave the edge between 1 and {} of the {} layers",
                            kv.layers.len() - 1,
                            kv.layers.len()
                        ),
                    ));
                }
                own.saturating_sub(layers.start)
            }
            (KvMode::Fused, ..) => 0,
            (KvMode::Exact, Some(bps), Some(tps))
                if whole && bps > 0 && tps.is_finite() && tps > 0.0 =>
            {
                edge_layers(
                    layers.len(),
                    layer_bits(&ctx, codec),
                    bps as f64,
                    tokens.len(),
                    tps as f64,
                )
            }
            _ => 0,
        };
        let layers = layers.start + local..layers.end;
        if local > 0 {
            self.app
                .metrics
                .kv_layers_left_to_edges
                .fetch_add(local as u64, Relaxed);
        }
        // Fused: only the layers whose gate reads the projected KV are sent.
        let streamed: Vec<usize> = layers
            .clone()
            .filter(|&l| match (&projection, mode) {
                (Some(p), KvMode::Fused) => p.gates[l] > 0.0,
                _ => true,
            })
            .collect();
        if streamed.is_empty() {
            return Err(Frame::error(
                ErrorCode::BadRequest,
                format!(
                    "the alignment's gates leave layers {layers:?} to the edge's own KV: nothing to fuse (ask for \
                     exact KV)"
                ),
            ));
        }
        self.send(&Frame::Context {
            context: id.to_string(),
            tokens: kv.tokens[tokens.clone()].to_vec(),
            positions: kv.positions[tokens.clone()].to_vec(),
            layers: wire_range(&layers),
            kv_heads: kv.kv_heads as u32,
            head_dim: kv.head_dim as u32,
            codec,
            projection,
        })
        .await?;

        let encode = |l: usize| {
            let (ctx, tokens) = (ctx.clone(), tokens.clone());
            tokio::task::spawn_blocking(move || encoded(&ctx, codec, l, tokens))
        };
        let mut sent = 0u64;
        let mut next = Some(encode(streamed[0]));
        for (i, &l) in streamed.iter().enumerate() {
            let payload = next
                .take()
                .expect("one encoding in flight")
                .await
                .map_err(|e| Frame::error(ErrorCode::Internal, e.to_string()))?;
            if let Some(&after) = streamed.get(i + 1) {
                next = Some(encode(after));
            }
            sent += payload.len() as u64;
            if let Some(slot) = &self.slot {
                let waited = self.app.clients.spend(slot, payload.len()).await;
                self.app
                    .metrics
                    .rate_limited_ms
                    .fetch_add(waited.as_millis() as u64, Relaxed);
            }
            self.send(&Frame::LayerChunk {
                layer: l as u32,
                tokens: wire_range(&tokens),
                codec,
                checksum: wire::checksum(&payload),
                payload: payload.to_vec(),
            })
            .await?;
            self.app.metrics.kv_layers_streamed.fetch_add(1, Relaxed);
            self.app
                .metrics
                .kv_bytes_streamed
                .fetch_add(payload.len() as u64, Relaxed);
        }
        self.send(&Frame::Done {
            context: id.to_string(),
            bytes: sent,
        })
        .await
    }
}

/// One layer encoded: the cached whole-context encoding, or a token slice encoded on demand.
fn encoded(ctx: &StoredContext, codec: Codec, layer: usize, tokens: Range<usize>) -> Arc<Vec<u8>> {
    let kv = &ctx.record.kv;
    if tokens == (0..kv.len()) {
        return ctx.encoded_layer(codec, layer);
    }
    let part = kv
        .slice(layer..layer + 1, tokens.clone())
        .expect("ranges checked");
    let shape = KvShape {
        tokens: tokens.len(),
        ..ctx.shape()
    };
    Arc::new(ctx.encode(
        codec,
        layer,
        shape,
        &part.tokens,
        &part.positions,
        &part.layers[0],
    ))
}

/// A requested range checked against the context's `len` (non-empty, inside).
fn within(what: &str, (start, end): (u32, u32), len: usize) -> Result<Range<usize>, Frame> {
    let r = start as usize..end as usize;
    if r.is_empty() || r.end > len {
        return Err(Frame::error(
            ErrorCode::BadRequest,
            format!("{what} {start}..{end} outside the context's 0..{len}"),
        ));
    }
    Ok(r)
}

fn wire_range(r: &Range<usize>) -> (u32, u32) {
    (r.start as u32, r.end as u32)
}

/// The edge's Hello checked: what it runs and can decode, and the client it is (for the limits).
fn hello_check<'a>(
    app: &'a App,
    hello: Frame,
    caller: &Unchecked,
) -> Result<(Edge<'a>, String), Frame> {
    let Frame::Hello {
        version,
        auth,
        model,
        weights,
        codecs,
        bandwidth_bps,
    } = hello
    else {
        return Err(Frame::error(
            ErrorCode::BadFrame,
            format!("expected Hello, got {}", hello.kind()),
        ));
    };
    if version != PROTOCOL_VERSION {
        return Err(Frame::error(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
            ),
        ));
    }
    let token = auth.as_deref().or(caller.token.as_deref());
    let client = match app.auth.check(token, crate::auth::now()) {
        Ok(name) => name.unwrap_or_else(|| caller.ip.clone()),
        Err(denied) => {
            app.metrics.unauthorized.fetch_add(1, Relaxed);
            return Err(Frame::error(ErrorCode::Unauthorized, denied.to_string()));
        }
    };
    let served = app.model(Some(&model)).map_err(|_| {
        Frame::error(
            ErrorCode::WrongModel,
            format!("model {model:?} is not served here"),
        )
    })?;
    let have = served.engine.model.fingerprint();
    if weights != have {
        return Err(Frame::error(
            ErrorCode::WrongModel,
            format!("edge weights {weights} differ from the cloud's {model} weights {have}"),
        ));
    }
    if codecs.is_empty() {
        return Err(Frame::error(ErrorCode::NoCodec, "Hello offers no codec"));
    }
    Ok((
        Edge {
            served,
            codecs,
            bandwidth_bps,
        },
        client,
    ))
}

/// The codec the cloud picks: `floor` (the least faithful it allows), unless a more faithful one the edge decodes
/// would still arrive within [`LINK_BUDGET_S`] at the edge's reported bandwidth. Time to first token is bounded by the
/// transfer, so faithfulness beyond the floor is only bought when it is nearly free.
pub fn choose_codec(
    ctx: &StoredContext,
    offered: &[Codec],
    bandwidth_bps: Option<u64>,
    floor: Codec,
) -> Option<Codec> {
    // Codec::ALL runs from most to least faithful.
    let allowed: Vec<Codec> = Codec::ALL
        .into_iter()
        .filter(|c| *c <= floor && offered.contains(c))
        .collect();
    let fallback = allowed
        .last()
        .copied()
        .or_else(|| Codec::ALL.into_iter().rev().find(|c| offered.contains(c)))?;
    let Some(bps) = bandwidth_bps.filter(|&b| b > 0) else {
        return Some(fallback);
    };
    let layers = ctx.record.kv.layers.len() as f64;
    Some(
        allowed
            .into_iter()
            .find(|&c| layers * layer_bits(ctx, c) / bps as f64 <= LINK_BUDGET_S)
            .unwrap_or(fallback),
    )
}

/// About how many bits one layer of `ctx` takes on the wire in `codec` (before brotli for the fixed-width codecs).
fn layer_bits(ctx: &StoredContext, codec: Codec) -> f64 {
    let bits_per_value = match codec {
        Codec::Lossless => 32.0,
        Codec::F16 => 16.0,
        // Code bits plus a 32-bit (minimum, step) pair per group of 32.
        Codec::Q8 => 9.0,
        Codec::Q4 => 5.0,
        Codec::Q2 => 3.0,
        // Measured on real contexts (`tandem codec-report`): their size depends on the data.
        Codec::Pca8 => 4.0,
        Codec::Pca4 => 2.4,
        Codec::Pca3 => 2.0,
        Codec::Pca2 => 1.6,
    };
    2.0 * ctx.shape().values().unwrap_or(0) as f64 * bits_per_value
}

/// How many of the lowest of `layers` layers the edge should compute itself while the cloud streams the others
/// (CE-LSLM's cross-node pipeline, balanced): computing k layers of an `tokens`-token context takes the edge
/// k/layers of `tokens / edge_tps`, streaming the other layers takes their bits over `bandwidth_bps`, and both run
/// at once, so the context is ready after the longer of the two. Splits only where that beats streaming every
/// layer by 10% (the estimates are rough), and always streams at least one layer.
pub fn edge_layers(
    layers: usize,
    layer_bits: f64,
    bandwidth_bps: f64,
    tokens: usize,
    edge_tps: f64,
) -> usize {
    if layers < 2 {
        return 0;
    }
    let local = tokens as f64 / edge_tps / layers as f64;
    let wire = layer_bits / bandwidth_bps;
    let ready = |k: usize| (k as f64 * local).max((layers - k) as f64 * wire);
    let best = (0..layers)
        .min_by(|&a, &b| ready(a).total_cmp(&ready(b)))
        .unwrap_or(0);
    if ready(best) < 0.9 * ready(0) {
        best
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::edge_layers;

    #[test]
    fn the_split_balances_edge_compute_against_the_link() {
        // 24 layers, 1 Mbit each: 24 s over 1 Mb/s; the edge prefills the 1000 tokens in 24 s: half each.
        assert_eq!(edge_layers(24, 1e6, 1e6, 1000, 1000.0 / 24.0), 12);
        // A fast link: everything streams.
        assert_eq!(edge_layers(24, 1e6, 1e9, 1000, 1000.0 / 24.0), 0);
        // A link far slower than the edge: all but one layer local, never none streamed.
        assert_eq!(edge_layers(24, 1e6, 1e3, 1000, 1000.0), 23);
        // Nearly balanced at k = 0 already: not worth the split.
        assert_eq!(edge_layers(24, 1e6, 1e6, 1000, 1.0), 0);
        assert_eq!(edge_layers(1, 1e6, 1e3, 1000, 1000.0), 0);
    }
}
