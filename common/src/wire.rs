//! The cloud–edge wire protocol: [`Frame`]s, each one binary WebSocket message.
//!
//! A message is the frame in postcard, then the CRC-32 of those bytes (little-endian). Messages over
//! [`MAX_FRAME_BYTES`] are refused before decoding. A session: the edge sends `Hello`, the cloud answers `Welcome` (or
//! `Error` and closes); then per `Request` the cloud sends `Context`, one `LayerChunk` per layer, and `Done`.
//!
//! Only ids, hashes, ranges and codec choices travel edge → cloud: never user text or user tokens.
//!
//! ```
//! use tandem_common::wire::{Frame, decode, encode};
//! let f = Frame::Done { context: "abc".into(), bytes: 42 };
//! assert_eq!(decode(&encode(&f)).unwrap(), f);
//! ```

use serde::{Deserialize, Serialize};

use crate::codec::Codec;

/// 7: the `pca` codecs map keys into the queries' metric and send the map's inverse; 6: they predict coordinates
/// from earlier tokens (their chunks changed); 5: they code a layer's heads on one basis; 4: they range-code their
/// codes.
pub const PROTOCOL_VERSION: u16 = 7;
/// Largest message either side accepts.
pub const MAX_FRAME_BYTES: usize = 32 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Edge → cloud, first message.
    Hello {
        version: u16,
        /// Bearer token, when the server requires one.
        auth: Option<String>,
        /// The model the edge runs, and the fingerprint of its weights: KV is only valid for identical weights.
        model: String,
        weights: String,
        /// Codecs the edge can decode.
        codecs: Vec<Codec>,
        /// The edge's measured download bandwidth, bits per second, if known (drives the codec choice).
        bandwidth_bps: Option<u64>,
    },
    /// Cloud → edge: the hello is accepted.
    Welcome {
        version: u16,
        server: String,
    },
    /// Edge → cloud: send the KV of `context` for `layers` (and `tokens`, all when `None`), in `codec` (the cloud
    /// chooses when `None`). `edge_prefill_tps`, the edge's measured prefill speed (tokens per second through all
    /// its layers), lets the cloud leave the lowest layers of a whole context to the edge when computing them there
    /// while the rest streams is faster: the `Context` answer then names the layers that will come.
    Request {
        context: String,
        layers: (u32, u32),
        tokens: Option<(u32, u32)>,
        codec: Option<Codec>,
        edge_prefill_tps: Option<f32>,
        /// Whose reading of the context the edge wants (the edge model's own, or the cloud LLM's projected).
        mode: KvMode,
    },
    /// Cloud → edge, before the chunks: the context's tokens (shared, not user data), positions and KV shape.
    Context {
        context: String,
        tokens: Vec<u32>,
        positions: Vec<u32>,
        layers: (u32, u32),
        kv_heads: u32,
        head_dim: u32,
        codec: Codec,
        /// For a projected mode: the alignment that turned the cloud LLM's KV into the chunks that follow.
        projection: Option<Projection>,
    },
    /// Cloud → edge: one layer's K and V for a token range, encoded by `codec`; `checksum` is the CRC-32 of `payload`.
    LayerChunk {
        layer: u32,
        tokens: (u32, u32),
        codec: Codec,
        checksum: u32,
        payload: Vec<u8>,
    },
    /// Cloud → edge: the request is complete.
    Done {
        context: String,
        bytes: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Frame {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Frame {
        Frame::Error {
            code,
            message: message.into(),
        }
    }

    /// The frame's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Request { .. } => "Request",
            Frame::Context { .. } => "Context",
            Frame::LayerChunk { .. } => "LayerChunk",
            Frame::Done { .. } => "Done",
            Frame::Error { .. } => "Error",
        }
    }
}

/// Which KV of a context an edge asks for (CE-LSLM's large → small modes). The projected modes need a cloud that
/// serves a larger model with an alignment to the edge's (`tandem serve --alignment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum KvMode {
    /// The edge model's own KV of the context, computed by the cloud: the same answers as a local prefill.
    #[default]
    Exact,
    /// The edge computes its lowest `own_layers` context layers itself; the layers above come from the cloud LLM's
    /// KV projected into the edge model's space.
    Split { own_layers: u32 },
    /// The edge computes every context layer itself and also attends to the projected LLM KV of the same tokens,
    /// the two blended per layer by the alignment's gate.
    Fused,
}

impl std::fmt::Display for KvMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvMode::Exact => write!(f, "exact"),
            KvMode::Split { own_layers } => write!(f, "split:{own_layers}"),
            KvMode::Fused => write!(f, "fused"),
        }
    }
}

impl std::str::FromStr for KvMode {
    type Err = String;

    /// `exact`, `split:K` (K own layers) or `fused`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "exact" => Ok(KvMode::Exact),
            "fused" => Ok(KvMode::Fused),
            other => other
                .strip_prefix("split:")
                .and_then(|k| k.parse().ok())
                .map(|own_layers| KvMode::Split { own_layers })
                .ok_or_else(|| {
                    format!("unknown KV mode {other:?}: use exact, split:K (K own layers) or fused")
                }),
        }
    }
}

/// How projected chunks were made: the alignment's id, the cloud model whose KV was projected, and the fused
/// mode's gate per edge layer (the weight in [0, 1] attention over the projected KV gets; 0: unused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    pub alignment: String,
    pub llm: String,
    pub gates: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The message could not be decoded (bad checksum, malformed, too large) or came out of order.
    BadFrame,
    UnsupportedVersion,
    Unauthorized,
    /// The edge's weights differ from the ones the context was computed with.
    WrongModel,
    UnknownContext,
    /// A request outside the context (layers or tokens) or over a limit.
    BadRequest,
    /// No codec both sides support.
    NoCodec,
    Busy,
    Internal,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("message of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit")]
    TooLarge(usize),
    #[error("message of {0} bytes is too short to hold a frame")]
    Truncated(usize),
    #[error("frame checksum mismatch (message corrupted)")]
    BadChecksum,
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// The message for `frame`.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut bytes = postcard::to_allocvec(frame).expect("frames serialise");
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// The frame in `message`, checked.
pub fn decode(message: &[u8]) -> Result<Frame, WireError> {
    if message.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(message.len()));
    }
    if message.len() < 5 {
        return Err(WireError::Truncated(message.len()));
    }
    let (body, crc) = message.split_at(message.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(WireError::BadChecksum);
    }
    let (frame, rest) = postcard::take_from_bytes::<Frame>(body)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} bytes after the frame",
            rest.len()
        )));
    }
    Ok(frame)
}

/// CRC-32 of a chunk payload.
pub fn checksum(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunk() -> Frame {
        Frame::LayerChunk {
            layer: 3,
            tokens: (0, 10),
            codec: Codec::Q4,
            checksum: checksum(b"abc"),
            payload: b"abc".to_vec(),
        }
    }

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let m = encode(&chunk());
        assert_eq!(decode(&m).unwrap(), chunk());
        let gates = vec![0.5, 0.0];
        let ctx = Frame::Context {
            context: "c".into(),
            tokens: vec![1],
            positions: vec![0],
            layers: (0, 2),
            kv_heads: 1,
            head_dim: 2,
            codec: Codec::F16,
            projection: Some(Projection {
                alignment: "a".into(),
                llm: "big".into(),
                gates,
            }),
        };
        assert_eq!(decode(&encode(&ctx)).unwrap(), ctx);
        for i in 0..m.len() {
            let mut bad = m.clone();
            bad[i] ^= 0x20;
            assert_eq!(decode(&bad), Err(WireError::BadChecksum), "flip at {i}");
        }
        for cut in 0..m.len() {
            assert!(decode(&m[..cut]).is_err());
        }
        assert_eq!(
            decode(&vec![0; MAX_FRAME_BYTES + 1]),
            Err(WireError::TooLarge(MAX_FRAME_BYTES + 1))
        );
    }

    #[test]
    fn valid_checksum_over_garbage_is_malformed() {
        let mut m = vec![0xff; 12];
        let crc = crc32fast::hash(&m);
        m.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&m), Err(WireError::Malformed(_))));
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [
            KvMode::Exact,
            KvMode::Split { own_layers: 12 },
            KvMode::Fused,
        ] {
            assert_eq!(m.to_string().parse::<KvMode>(), Ok(m));
        }
        assert!("split:x".parse::<KvMode>().unwrap_err().contains("split:K"));
    }

    proptest! {
        #[test]
        fn random_messages_never_panic(mut body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let crc = crc32fast::hash(&body);
            body.extend_from_slice(&crc.to_le_bytes());
            let _ = decode(&body);
        }
    }
}
