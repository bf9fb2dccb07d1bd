//! Fetching a context's KV from the cloud natively: a background thread speaks the protocol over
//! tokio-tungstenite and decodes each layer as it arrives (checksum, then codec), so the compute thread only ever
//! waits for a layer that has not arrived yet.

use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tandem_common::codec::Codec;
use tandem_common::kv::KvState;
use tandem_common::wire::Projection;
use tokio_tungstenite::tungstenite::Message;
use web_time::Instant;

use crate::incoming::{ArrivedLayer, IncomingKv};
use crate::protocol::{FetchError, FetchRequest, KvClient, KvEvent};

/// Connects, says hello, asks for the context's KV (all layers, all tokens) and waits for its header; the layers
/// keep arriving in the background.
pub fn start(req: FetchRequest, started: Instant) -> Result<IncomingKv, FetchError> {
    let (header_tx, header_rx) = mpsc::channel();
    let (layer_tx, layer_rx) = mpsc::channel();
    let timeout = req.cloud.timeout;
    let failed = header_tx.clone();
    spawn_io_thread(
        "tandem-kv-fetch",
        move |e| {
            let _ = failed.send(Err(FetchError::Protocol(e)));
        },
        move || run(req, header_tx, layer_tx),
    )
    .map_err(|e| FetchError::Protocol(e.to_string()))?;
    let (header, codec, projection) = header_rx
        .recv_timeout(timeout)
        .map_err(|_| FetchError::Timeout(timeout))??;
    let next = Box::new(move || {
        layer_rx.recv_timeout(timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                format!("no layer received within {timeout:?}")
            }
            mpsc::RecvTimeoutError::Disconnected => "the connection ended".to_string(),
        })?
    });
    Ok(IncomingKv::new(
        header,
        codec,
        projection,
        started.elapsed(),
        next,
    ))
}

/// Runs the future `task()` makes on a new thread called `name`, with its own single-threaded tokio runtime (network
/// I/O off the compute thread); if that runtime cannot be built, `failed` gets the reason instead.
pub fn spawn_io_thread<F, Fut>(
    name: &str,
    failed: impl FnOnce(String) + Send + 'static,
    task: F,
) -> std::io::Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(task()),
                Err(e) => failed(e.to_string()),
            }
        })
        .map(|_| ())
}

type HeaderTx = mpsc::Sender<Result<(KvState, Codec, Option<Projection>), FetchError>>;
type LayerTx = mpsc::Sender<Result<ArrivedLayer, String>>;

async fn run(req: FetchRequest, header_tx: HeaderTx, layer_tx: LayerTx) {
    let mut header_tx = Some(header_tx);
    if let Err(e) = converse(req, &mut header_tx, &layer_tx).await {
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
    req: FetchRequest,
    header_tx: &mut Option<HeaderTx>,
    layer_tx: &LayerTx,
) -> Result<(), FetchError> {
    let (url, timeout) = (req.cloud.kv_url(), req.cloud.timeout);
    let tls = if url.starts_with("wss://") {
        let config = crate::tls::client_config().map_err(FetchError::Protocol)?;
        Some(tokio_tungstenite::Connector::Rustls(config))
    } else {
        None
    };
    let connect = tokio_tungstenite::connect_async_tls_with_config(url.as_str(), None, false, tls);
    let (mut ws, _) = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
        .map_err(|e| FetchError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let (mut client, hello) = KvClient::new(req);
    send(&mut ws, hello).await?;
    while !client.is_finished() {
        match client.receive(&next(&mut ws, timeout).await?)? {
            KvEvent::Reply(m) => send(&mut ws, m).await?,
            KvEvent::Header {
                header,
                codec,
                projection,
            } => {
                if let Some(h) = header_tx.take() {
                    let _ = h.send(Ok((header, codec, projection)));
                }
            }
            KvEvent::Layer {
                layer,
                kv,
                wire_bytes,
            } => {
                let arrived = ArrivedLayer {
                    layer,
                    kv,
                    wire_bytes,
                };
                if layer_tx.send(Ok(arrived)).is_err() {
                    // The edge stopped listening (it fell back or finished): nothing more to do.
                    break;
                }
            }
            KvEvent::Done => {}
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send(ws: &mut Ws, message: Vec<u8>) -> Result<(), FetchError> {
    ws.send(Message::binary(message))
        .await
        .map_err(|e| FetchError::Protocol(format!("sending to the cloud: {e}")))
}

/// The next binary message from the cloud.
async fn next(ws: &mut Ws, timeout: Duration) -> Result<Vec<u8>, FetchError> {
    loop {
        let msg = tokio::time::timeout(timeout, ws.next())
            .await
            .map_err(|_| FetchError::Timeout(timeout))?
            .ok_or_else(|| FetchError::Protocol("the cloud closed the connection".into()))?
            .map_err(|e| FetchError::Protocol(e.to_string()))?;
        return match msg {
            Message::Binary(b) => Ok(b.to_vec()),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Close(_) => Err(FetchError::Protocol(
                "the cloud closed the connection".into(),
            )),
            Message::Text(_) => Err(FetchError::Protocol("unexpected text message".into())),
        };
    }
}
