//! A hand-driven KV WebSocket client, to send what a well-behaved edge never would.

use futures_util::{SinkExt, StreamExt};
use tandem_common::wire::{self, Frame};
use tokio_tungstenite::tungstenite::Message;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn connect(addr: std::net::SocketAddr) -> Ws {
    tokio_tungstenite::connect_async(format!("ws://{addr}/v1/kv"))
        .await
        .expect("connect")
        .0
}

pub async fn send(ws: &mut Ws, bytes: Vec<u8>) {
    let _ = ws.send(Message::binary(bytes)).await;
}

/// The next frame, or `None` once the server closed the connection (within 10 s).
pub async fn next(ws: &mut Ws) -> Option<Frame> {
    loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("the server answers or closes")?;
        match m {
            Ok(Message::Binary(b)) => {
                return Some(wire::decode(&b).expect("server frames decode"));
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            _ => return None,
        }
    }
}
