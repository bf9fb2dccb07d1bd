//! The KV codec: how one layer's keys and values travel from the cloud to an edge.
//!
//! Quantized codecs follow KIVI (Liu et al. 2024): **keys per channel** (a key channel keeps its scale across
//! tokens; rotary outlier channels would ruin a per-token scale) and **values per token**, each group of
//! [`GROUP`] values with an f16 minimum and step, codes bit-packed at 8, 4 or 2 bits. Float codecs
//! (`lossless` = the exact f32 bits, `f16`) split the numbers into byte planes, which compress far better.
//! Everything is then brotli-compressed.
//!
//! ```
//! use tandem_common::codec::{Codec, KvShape, decode_layer, encode_layer};
//! use tandem_common::kv::LayerKv;
//! let shape = KvShape { kv_heads: 2, tokens: 3, head_dim: 4 };
//! let layer = LayerKv { k: (0..24).map(|i| i as f32).collect(), v: vec![0.5; 24] };
//! let bytes = encode_layer(Codec::Lossless, shape, None, &layer);
//! assert_eq!(decode_layer(Codec::Lossless, shape, None, &bytes).unwrap(), layer);
//! ```

use std::io::{Read, Write};

use half::f16;
use serde::{Deserialize, Serialize};

use crate::kv::LayerKv;

/// Values sharing one minimum and step.
pub const GROUP: usize = 32;
/// The most values (keys plus values) one encoded layer chunk may hold: bounds what a hostile peer can make us allocate.
pub const MAX_VALUES: usize = 1 << 26;
const BROTLI_QUALITY: u32 = 5;
const BROTLI_WINDOW: u32 = 22;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Codec {
    /// The exact f32 values.
    Lossless,
    F16,
    Q8,
    Q4,
    Q2,
}

impl Codec {
    pub const ALL: [Codec; 5] = [Codec::Lossless, Codec::F16, Codec::Q8, Codec::Q4, Codec::Q2];

    pub fn name(self) -> &'static str {
        match self {
            Codec::Lossless => "lossless",
            Codec::F16 => "f16",
            Codec::Q8 => "q8",
            Codec::Q4 => "q4",
            Codec::Q2 => "q2",
        }
    }

    pub fn parse(s: &str) -> Option<Codec> {
        Codec::ALL.into_iter().find(|c| c.name() == s)
    }

    /// Code width of the quantized codecs.
    fn bits(self) -> Option<u32> {
        match self {
            Codec::Q8 => Some(8),
            Codec::Q4 => Some(4),
            Codec::Q2 => Some(2),
            Codec::Lossless | Codec::F16 => None,
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Codec::parse(s).ok_or_else(|| {
            let names: Vec<_> = Codec::ALL.iter().map(|c| c.name()).collect();
            format!("unknown codec {s:?} (one of {})", names.join(", "))
        })
    }
}

/// The shape of one layer's K (and V): `[kv_heads][tokens][head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvShape {
    pub kv_heads: usize,
    pub tokens: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Values in K (or V); `None` if absurdly large.
    pub fn values(self) -> Option<usize> {
        self.kv_heads
            .checked_mul(self.tokens)?
            .checked_mul(self.head_dim)
            .filter(|&n| n <= MAX_VALUES / 2)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("KV chunk shape {0:?} is too large")]
    TooLarge(KvShape),
    #[error("KV chunk is not valid brotli data: {0}")]
    Brotli(String),
    #[error(
        "KV chunk holds {found} bytes once decompressed, {codec} needs {expected} for shape {shape:?}"
    )]
    WrongSize {
        codec: Codec,
        shape: KvShape,
        expected: usize,
        found: usize,
    },
    #[error("KV chunk decodes to a non-finite value")]
    NotFinite,
    #[error("{positions} key positions given for {tokens} tokens")]
    Positions { positions: usize, tokens: usize },
}

/// The rotary embedding on the keys. Quantized codecs take it off before grouping keys by channel and put it back
/// after decoding (pre-RoPE key quantization, as KVQuant): un-rotated, a key channel keeps one scale across tokens,
/// while rotation smears each channel pair's magnitude over both.
#[derive(Debug, Clone, Copy)]
pub struct Rotary<'a> {
    pub theta: f64,
    /// NEOX pairs channel i with i + d/2 (Qwen2); otherwise 2i with 2i + 1 (llama).
    pub neox: bool,
    /// Position of each token of the chunk.
    pub positions: &'a [u32],
}

/// A model's rotary embedding, without positions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeParams {
    pub theta: f64,
    pub neox: bool,
}

impl RopeParams {
    pub fn of(c: &crate::model::ModelConfig) -> Self {
        RopeParams {
            theta: c.rope_theta,
            neox: c.rope_style == crate::model::RopeStyle::Neox,
        }
    }

    /// The embedding of keys at `positions`.
    pub fn at(self, positions: &[u32]) -> Rotary<'_> {
        Rotary {
            theta: self.theta,
            neox: self.neox,
            positions,
        }
    }
}

impl Rotary<'_> {
    /// Rotates keys `[heads][tokens][head_dim]` by their positions, or back (`inverse`).
    pub fn apply(&self, k: &mut [f32], s: KvShape, inverse: bool) {
        let half = s.head_dim / 2;
        let sign = if inverse { -1.0 } else { 1.0 };
        let freqs = crate::model::rope_frequencies(self.theta, s.head_dim);
        for (t, &p) in self.positions.iter().enumerate().take(s.tokens) {
            for (i, &freq) in freqs.iter().enumerate() {
                let (sin, cos) = (p as f64 * freq).sin_cos();
                let (sin, cos) = ((sign * sin) as f32, cos as f32);
                for h in 0..s.kv_heads {
                    let row = (h * s.tokens + t) * s.head_dim;
                    let (a, b) = if self.neox {
                        (row + i, row + i + half)
                    } else {
                        (row + 2 * i, row + 2 * i + 1)
                    };
                    let (x, y) = (k[a], k[b]);
                    k[a] = x * cos - y * sin;
                    k[b] = y * cos + x * sin;
                }
            }
        }
    }
}

/// Encodes one layer's K and V (each `shape`) with `codec`; `rotary` describes the keys' rotary embedding (used by
/// the quantized codecs, see [`Rotary`]; the decoder must be given the same).
pub fn encode_layer(
    codec: Codec,
    shape: KvShape,
    rotary: Option<Rotary<'_>>,
    layer: &LayerKv,
) -> Vec<u8> {
    let n = shape.values().expect("layer shape within MAX_VALUES");
    assert!(
        layer.k.len() == n && layer.v.len() == n,
        "layer does not match {shape:?}"
    );
    let layout = Layout::new(codec, shape);
    let mut raw = Vec::with_capacity(layout.raw_len(n));
    match &layout {
        Layout::Planes { width } => {
            for x in [&layer.k, &layer.v] {
                put_planes(&mut raw, x, *width);
            }
        }
        Layout::Quantized { bits, keys, values } => {
            let mut k = layer.k.clone();
            if let Some(r) = rotary {
                r.apply(&mut k, shape, true);
            }
            quantize(&mut raw, *bits, &gather(&k, keys));
            quantize(&mut raw, *bits, &gather(&layer.v, values));
        }
    }
    debug_assert_eq!(raw.len(), layout.raw_len(n));
    let mut out = Vec::with_capacity(raw.len() / 2);
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 1 << 16, BROTLI_QUALITY, BROTLI_WINDOW);
        w.write_all(&raw).expect("writing to a Vec");
    }
    out
}

/// Decodes what [`encode_layer`] made; every malformed input is an error, never a panic.
pub fn decode_layer(
    codec: Codec,
    shape: KvShape,
    rotary: Option<Rotary<'_>>,
    bytes: &[u8],
) -> Result<LayerKv, CodecError> {
    let n = shape.values().ok_or(CodecError::TooLarge(shape))?;
    let layout = Layout::new(codec, shape);
    let expected = layout.raw_len(n);
    let mut raw = Vec::with_capacity(expected);
    brotli::Decompressor::new(bytes, 1 << 16)
        .take(expected as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| CodecError::Brotli(e.to_string()))?;
    if raw.len() != expected {
        return Err(CodecError::WrongSize {
            codec,
            shape,
            expected,
            found: raw.len(),
        });
    }
    let (k, v) = match &layout {
        Layout::Planes { width } => {
            let (a, b) = raw.split_at(n * width);
            (get_planes(a, n, *width), get_planes(b, n, *width))
        }
        Layout::Quantized { bits, keys, values } => {
            let (a, b) = raw.split_at(quantized_len(*bits, keys));
            let mut k = scatter(&dequantize(a, *bits, keys), keys, n);
            if let Some(r) = rotary {
                if r.positions.len() != shape.tokens {
                    return Err(CodecError::Positions {
                        positions: r.positions.len(),
                        tokens: shape.tokens,
                    });
                }
                r.apply(&mut k, shape, false);
            }
            (k, scatter(&dequantize(b, *bits, values), values, n))
        }
    };
    if k.iter().chain(&v).any(|x| !x.is_finite()) {
        return Err(CodecError::NotFinite);
    }
    Ok(LayerKv { k, v })
}

/// How a codec lays a layer out before brotli: K and V as byte planes of `width`-byte floats, or quantized codes
/// by groups.
enum Layout {
    Planes {
        width: usize,
    },
    Quantized {
        bits: u32,
        keys: Groups,
        values: Groups,
    },
}

impl Layout {
    fn new(codec: Codec, shape: KvShape) -> Self {
        match codec.bits() {
            Some(bits) => Layout::Quantized {
                bits,
                keys: key_groups(shape),
                values: value_groups(shape),
            },
            None if codec == Codec::F16 => Layout::Planes { width: 2 },
            None => Layout::Planes { width: 4 },
        }
    }

    /// Bytes before brotli, for `n` values each of K and V.
    fn raw_len(&self, n: usize) -> usize {
        match self {
            Layout::Planes { width } => 2 * width * n,
            Layout::Quantized { bits, keys, values } => {
                quantized_len(*bits, keys) + quantized_len(*bits, values)
            }
        }
    }
}

/// Groups as lists of element indices into `[kv_heads][tokens][head_dim]`, in encoding order.
struct Groups {
    /// Start index, stride between members, member count.
    runs: Vec<(usize, usize, usize)>,
}

/// Keys: per head and channel, runs of up to `GROUP` consecutive tokens.
fn key_groups(s: KvShape) -> Groups {
    let mut runs = Vec::new();
    for h in 0..s.kv_heads {
        for c in 0..s.head_dim {
            for t0 in (0..s.tokens).step_by(GROUP) {
                let len = GROUP.min(s.tokens - t0);
                runs.push(((h * s.tokens + t0) * s.head_dim + c, s.head_dim, len));
            }
        }
    }
    Groups { runs }
}

/// Values: per head and token, runs of up to `GROUP` consecutive channels.
fn value_groups(s: KvShape) -> Groups {
    let mut runs = Vec::new();
    for h in 0..s.kv_heads {
        for t in 0..s.tokens {
            for c0 in (0..s.head_dim).step_by(GROUP) {
                let len = GROUP.min(s.head_dim - c0);
                runs.push(((h * s.tokens + t) * s.head_dim + c0, 1, len));
            }
        }
    }
    Groups { runs }
}

fn gather(x: &[f32], g: &Groups) -> Vec<Vec<f32>> {
    g.runs
        .iter()
        .map(|&(start, stride, len)| (0..len).map(|i| x[start + i * stride]).collect())
        .collect()
}

fn scatter(groups: &[Vec<f32>], g: &Groups, n: usize) -> Vec<f32> {
    let mut x = vec![0f32; n];
    for (vals, &(start, stride, _)) in groups.iter().zip(&g.runs) {
        for (i, &v) in vals.iter().enumerate() {
            x[start + i * stride] = v;
        }
    }
    x
}

/// Per group: f16 minimum and f16 step, then the codes of all groups bit-packed.
fn quantized_len(bits: u32, g: &Groups) -> usize {
    let codes: usize = g.runs.iter().map(|r| r.2).sum();
    4 * g.runs.len() + (codes * bits as usize).div_ceil(8)
}

fn quantize(out: &mut Vec<u8>, bits: u32, groups: &[Vec<f32>]) {
    let top = ((1u32 << bits) - 1) as f32;
    let mut params = Vec::with_capacity(4 * groups.len());
    let mut packer = BitPacker::new(bits);
    for vals in groups {
        let (lo, hi) = vals
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        // Quantize against the f16-rounded parameters, so the decoder reproduces exactly these levels.
        let min = f16::from_f32(lo);
        let step = f16::from_f32((hi - lo) / top);
        let (m, s) = (min.to_f32(), step.to_f32());
        params.extend_from_slice(&min.to_le_bytes());
        params.extend_from_slice(&step.to_le_bytes());
        for &v in vals {
            let q = if s > 0.0 {
                ((v - m) / s).round().clamp(0.0, top)
            } else {
                0.0
            };
            packer.push(q as u32);
        }
    }
    out.extend_from_slice(&params);
    out.extend_from_slice(&packer.finish());
}

fn dequantize(raw: &[u8], bits: u32, g: &Groups) -> Vec<Vec<f32>> {
    let (params, codes) = raw.split_at(4 * g.runs.len());
    let mut unpacker = BitUnpacker::new(codes, bits);
    g.runs
        .iter()
        .zip(params.chunks_exact(4))
        .map(|(&(_, _, len), p)| {
            let m = f16::from_le_bytes([p[0], p[1]]).to_f32();
            let s = f16::from_le_bytes([p[2], p[3]]).to_f32();
            (0..len).map(|_| m + s * unpacker.next() as f32).collect()
        })
        .collect()
}

/// Byte planes: all first bytes, then all second bytes, … (little-endian f32 or f16).
fn put_planes(out: &mut Vec<u8>, x: &[f32], width: usize) {
    let bytes: Vec<[u8; 4]> = x
        .iter()
        .map(|&v| match width {
            2 => {
                let b = f16::from_f32(v).to_le_bytes();
                [b[0], b[1], 0, 0]
            }
            _ => v.to_le_bytes(),
        })
        .collect();
    for plane in 0..width {
        out.extend(bytes.iter().map(|b| b[plane]));
    }
}

fn get_planes(raw: &[u8], n: usize, width: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match width {
            2 => f16::from_le_bytes([raw[i], raw[n + i]]).to_f32(),
            _ => f32::from_le_bytes([raw[i], raw[n + i], raw[2 * n + i], raw[3 * n + i]]),
        })
        .collect()
}

struct BitPacker {
    bits: u32,
    acc: u64,
    filled: u32,
    out: Vec<u8>,
}

impl BitPacker {
    fn new(bits: u32) -> Self {
        BitPacker {
            bits,
            acc: 0,
            filled: 0,
            out: Vec::new(),
        }
    }

    fn push(&mut self, code: u32) {
        self.acc |= (code as u64) << self.filled;
        self.filled += self.bits;
        while self.filled >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.filled -= 8;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.filled > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

struct BitUnpacker<'a> {
    bytes: &'a [u8],
    bits: u32,
    pos: usize,
}

impl<'a> BitUnpacker<'a> {
    fn new(bytes: &'a [u8], bits: u32) -> Self {
        BitUnpacker {
            bytes,
            bits,
            pos: 0,
        }
    }

    /// The next code (the caller's lengths guarantee it exists; a short buffer reads zeros).
    fn next(&mut self) -> u32 {
        let (byte, shift) = (self.pos / 8, self.pos % 8);
        self.pos += self.bits as usize;
        let b = self.bytes.get(byte).copied().unwrap_or(0) as u32;
        (b >> shift) & ((1 << self.bits) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layer(shape: KvShape, seed: u32) -> LayerKv {
        let n = shape.values().unwrap();
        let make = |salt: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| {
                    let h = (i ^ seed ^ salt).wrapping_mul(2654435761) >> 8;
                    // A large-magnitude channel every 16, as real keys have.
                    let scale = if i % 16 == 3 { 40.0 } else { 2.0 };
                    (h % 2001) as f32 / 1000.0 * scale - scale
                })
                .collect()
        };
        LayerKv {
            k: make(1),
            v: make(2),
        }
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn lossless_is_exact_and_others_are_bounded() {
        let shape = KvShape {
            kv_heads: 2,
            tokens: 77,
            head_dim: 64,
        };
        let l = layer(shape, 7);
        for codec in Codec::ALL {
            let bytes = encode_layer(codec, shape, None, &l);
            let d = decode_layer(codec, shape, None, &bytes).unwrap();
            let err = max_err(&l.k, &d.k).max(max_err(&l.v, &d.v));
            // Largest range in a group is 80 (keys' outlier channel); half a step of each code width.
            let bound = match codec {
                Codec::Lossless => 0.0,
                Codec::F16 => 0.02,
                Codec::Q8 => 80.0 / 255.0 / 2.0 + 0.05,
                Codec::Q4 => 80.0 / 15.0 / 2.0 + 0.05,
                Codec::Q2 => 80.0 / 3.0 / 2.0 + 0.1,
            };
            assert!(err <= bound, "{codec}: error {err} over {bound}");
        }
    }

    #[test]
    fn smaller_codecs_are_smaller() {
        let shape = KvShape {
            kv_heads: 2,
            tokens: 256,
            head_dim: 64,
        };
        let l = layer(shape, 3);
        let sizes: Vec<usize> = Codec::ALL
            .iter()
            .map(|&c| encode_layer(c, shape, None, &l).len())
            .collect();
        assert!(sizes.windows(2).all(|w| w[0] > w[1]), "{sizes:?}");
    }

    #[test]
    fn garbage_and_wrong_shapes_are_errors() {
        let shape = KvShape {
            kv_heads: 2,
            tokens: 10,
            head_dim: 64,
        };
        let bytes = encode_layer(Codec::Q4, shape, None, &layer(shape, 1));
        let wrong = KvShape {
            tokens: 11,
            ..shape
        };
        assert!(matches!(
            decode_layer(Codec::Q4, wrong, None, &bytes),
            Err(CodecError::WrongSize { .. })
        ));
        assert!(matches!(
            decode_layer(Codec::Q8, shape, None, &bytes),
            Err(CodecError::WrongSize { .. })
        ));
        let huge = KvShape {
            kv_heads: 1 << 20,
            tokens: 1 << 20,
            head_dim: 1 << 20,
        };
        assert_eq!(
            decode_layer(Codec::Q4, huge, None, &bytes),
            Err(CodecError::TooLarge(huge))
        );
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode_layer(Codec::Q4, shape, None, &bytes[..cut]).is_err());
        }
    }

    #[test]
    fn keys_quantized_without_rotary_come_back_rotated() {
        let shape = KvShape {
            kv_heads: 2,
            tokens: 40,
            head_dim: 64,
        };
        let l = layer(shape, 5);
        let positions: Vec<u32> = (100..140).collect();
        for neox in [true, false] {
            let rope = RopeParams { theta: 1e4, neox }.at(&positions);
            // Rotating and un-rotating is the identity.
            let mut k = l.k.clone();
            rope.apply(&mut k, shape, true);
            rope.apply(&mut k, shape, false);
            assert!(max_err(&k, &l.k) < 1e-3);
            let bytes = encode_layer(Codec::Q8, shape, Some(rope), &l);
            let d = decode_layer(Codec::Q8, shape, Some(rope), &bytes).unwrap();
            // An un-rotated pair's magnitude spreads over both channels: at most √2 × the range per channel.
            assert!(max_err(&l.k, &d.k) <= 2.0 * (80.0 / 255.0 / 2.0) + 0.05);
            let short = RopeParams { theta: 1e4, neox }.at(&positions[1..]);
            assert_eq!(
                decode_layer(Codec::Q8, shape, Some(short), &bytes),
                Err(CodecError::Positions {
                    positions: 39,
                    tokens: 40
                })
            );
        }
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                              codec in 0usize..5, tokens in 0usize..40) {
            let shape = KvShape { kv_heads: 2, tokens, head_dim: 32 };
            let _ = decode_layer(Codec::ALL[codec], shape, None, &bytes);
        }

        #[test]
        fn quantized_round_trip_within_half_a_step(tokens in 1usize..70, head_dim in 1usize..70, seed in any::<u32>()) {
            let shape = KvShape { kv_heads: 1, tokens, head_dim };
            let l = layer(shape, seed);
            let d = decode_layer(Codec::Q8, shape, None, &encode_layer(Codec::Q8, shape, None, &l)).unwrap();
            prop_assert!(max_err(&l.k, &d.k) <= 80.0 / 255.0 / 2.0 + 0.05);
            prop_assert!(max_err(&l.v, &d.v) <= 80.0 / 255.0 / 2.0 + 0.05);
        }
    }
}
