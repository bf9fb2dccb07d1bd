//! The KV codec: how one layer's keys and values travel from the cloud to an edge.
//!
//! Quantized codecs follow KIVI (Liu et al. 2024): **keys per channel** (a key channel keeps its scale across
//! tokens; rotary outlier channels would ruin a per-token scale) and **values per token**, each group of
//! [`GROUP`] values with an f16 minimum and step, codes bit-packed at 8, 4 or 2 bits. Float codecs
//! (`lossless` = the exact f32 bits, `f16`) split the numbers into byte planes, which compress far better.
//! The `pca` codecs code the layer by transform coding instead ([`transform`]): principal axes over every head's
//! keys and values at once, each tensor rounded to its own step, axes without a code dropped, codes range-coded.
//! Everything is then brotli-compressed.
//!
//! ```
//! use tandem_common::codec::{Codec, KvShape, decode_layer, encode_layer};
//! use tandem_common::kv::LayerKv;
//! let shape = KvShape { kv_heads: 2, tokens: 3, head_dim: 4 };
//! let layer = LayerKv { k: (0..24).map(|i| i as f32).collect(), v: vec![0.5; 24] };
//! let bytes = encode_layer(Codec::Lossless, shape, None, &layer);
//! assert_eq!(decode_layer(Codec::Lossless, shape, None, &[], &bytes).unwrap(), layer);
//! ```

use std::io::{Read, Write};

use half::f16;
use serde::{Deserialize, Serialize};

use crate::kv::LayerKv;

mod entropy;
mod metric;
mod predict;
mod steps;
mod transform;

pub use steps::{LayerStep, StepScales};

/// Values sharing one minimum and step.
pub const GROUP: usize = 32;
/// The most values (keys plus values) one encoded layer chunk may hold: bounds what a hostile peer can make us allocate.
pub const MAX_VALUES: usize = 1 << 26;
const BROTLI_QUALITY: u32 = 5;
const BROTLI_WINDOW: u32 = 22;

/// A way to put KV on the wire. Codecs compare by faithfulness: `a < b` when `a` keeps more (the order of
/// [`Codec::ALL`]), not by their order on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Codec {
    /// The exact f32 values.
    Lossless,
    F16,
    Q8,
    Q4,
    Q2,
    /// Transform coding with a step of 0.15 of each tensor's RMS.
    Pca8,
    /// Transform coding with a step of half a tensor's RMS: about 2 bits a value, 8× smaller than f16.
    Pca4,
    /// Transform coding with a step of one RMS: about 1.25 bits a value, far better than q2 at half its size.
    Pca2,
    /// Transform coding with a step of 0.7 of a tensor's RMS: about 1.6 bits a value, 10× smaller than f16.
    Pca3,
}

impl Codec {
    /// Every codec, most faithful first.
    pub const ALL: [Codec; 9] = [
        Codec::Lossless,
        Codec::F16,
        Codec::Q8,
        Codec::Pca8,
        Codec::Q4,
        Codec::Pca4,
        Codec::Pca3,
        Codec::Pca2,
        Codec::Q2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Codec::Lossless => "lossless",
            Codec::F16 => "f16",
            Codec::Q8 => "q8",
            Codec::Q4 => "q4",
            Codec::Q2 => "q2",
            Codec::Pca8 => "pca8",
            Codec::Pca4 => "pca4",
            Codec::Pca3 => "pca3",
            Codec::Pca2 => "pca2",
        }
    }

    /// Place in [`Codec::ALL`]: 0 is the most faithful.
    fn rank(self) -> usize {
        Codec::ALL
            .iter()
            .position(|&c| c == self)
            .unwrap_or(usize::MAX)
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
            Codec::Lossless
            | Codec::F16
            | Codec::Pca8
            | Codec::Pca4
            | Codec::Pca3
            | Codec::Pca2 => None,
        }
    }

    /// Rounding step of the transform codecs, as a share of a head's RMS.
    fn relative_step(self) -> Option<f64> {
        match self {
            Codec::Pca8 => Some(0.15),
            Codec::Pca4 => Some(0.5),
            Codec::Pca3 => Some(0.7),
            Codec::Pca2 => Some(1.0),
            _ => None,
        }
    }
}

impl PartialOrd for Codec {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Codec {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
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
    #[error("{ids} token ids given for {tokens} tokens")]
    TokenIds { ids: usize, tokens: usize },
    #[error("KV chunk is malformed: {0}")]
    Malformed(String),
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

/// How the model's queries will read one layer's keys ([`QueryEnergy`](crate::model::QueryEnergy) measures it).
#[derive(Debug, Clone, Copy)]
pub struct KeyQueries<'a> {
    /// Per KV head, the second moment of the pre-rotary queries: `[kv_heads][head_dim][head_dim]`.
    pub moments: &'a [f32],
    /// The position the queries to come start at (the context's end).
    pub from: u32,
}

/// Encodes one layer's K and V (each `shape`) with `codec`; `rotary` describes the keys' rotary embedding (used by
/// the quantized and transform codecs, see [`Rotary`]; the decoder must be given the same).
pub fn encode_layer(
    codec: Codec,
    shape: KvShape,
    rotary: Option<Rotary<'_>>,
    layer: &LayerKv,
) -> Vec<u8> {
    encode_layer_weighted(codec, shape, rotary, &[], None, LayerStep::default(), layer)
}

/// [`encode_layer`], told the tokens' ids (`tokens`: the transform codecs predict a token's coordinates from the
/// same token's earlier occurrences; the decoder must be given the same ids), and how the model's queries read
/// this layer's keys (`queries`): the transform codecs then measure a key's error by the attention logits it
/// moves ([`metric`]), spending their bits where attention looks.
/// `step` scales their rounding step for this layer's keys and values ([`StepScales`]). Other codecs ignore all
/// three; the decoder needs only the ids.
pub fn encode_layer_weighted(
    codec: Codec,
    shape: KvShape,
    rotary: Option<Rotary<'_>>,
    tokens: &[u32],
    queries: Option<KeyQueries<'_>>,
    step: LayerStep,
    layer: &LayerKv,
) -> Vec<u8> {
    let n = shape.values().expect("layer shape within MAX_VALUES");
    assert!(
        layer.k.len() == n && layer.v.len() == n,
        "layer does not match {shape:?}"
    );
    assert!(
        tokens.is_empty() || tokens.len() == shape.tokens,
        "{} token ids for {shape:?}",
        tokens.len()
    );
    let layout = Layout::new(codec, shape);
    let mut raw = Vec::with_capacity(layout.raw_len(n));
    let unrotated_keys = || {
        let mut k = layer.k.clone();
        if let Some(r) = rotary {
            r.apply(&mut k, shape, true);
        }
        k
    };
    match &layout {
        Layout::Planes { width } => {
            for x in [&layer.k, &layer.v] {
                put_planes(&mut raw, x, *width);
            }
        }
        Layout::Quantized { bits, keys, values } => {
            quantize(&mut raw, *bits, &gather(&unrotated_keys(), keys));
            quantize(&mut raw, *bits, &gather(&layer.v, values));
        }
        Layout::Transform { step: base, .. } => {
            let d = shape.head_dim;
            let per_head = shape.tokens * d;
            let mut k = unrotated_keys();
            let maps = key_maps(shape, rotary, queries);
            for (map, keys) in maps.iter().zip(k.chunks_exact_mut(per_head.max(1))) {
                map.apply(keys, d);
            }
            let unwhiten: Vec<&metric::Unwhiten> = maps.iter().map(|m| &m.unwhiten).collect();
            raw.extend(postcard::to_allocvec(&unwhiten).expect("key maps serialise"));
            let keys = (0..shape.kv_heads).map(|h| transform::Part {
                x: &k[h * per_head..(h + 1) * per_head],
                rel_step: base * step.keys,
            });
            let values = (0..shape.kv_heads).map(|h| transform::Part {
                x: &layer.v[h * per_head..(h + 1) * per_head],
                rel_step: base * step.values,
            });
            let parts: Vec<_> = keys.chain(values).collect();
            for group in parts.chunks(transform::group(parts.len(), shape.tokens, d)) {
                transform::encode(&mut raw, group, tokens, shape.tokens, d);
            }
        }
    }
    debug_assert!(raw.len() <= layout.raw_len(n));
    let mut out = Vec::with_capacity(raw.len() / 2);
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 1 << 16, BROTLI_QUALITY, BROTLI_WINDOW);
        w.write_all(&raw).expect("writing to a Vec");
    }
    out
}

/// Each key head's map into the metric `queries` define (none without them).
fn key_maps(
    shape: KvShape,
    rotary: Option<Rotary<'_>>,
    queries: Option<KeyQueries<'_>>,
) -> Vec<metric::Whitening> {
    let Some(q) = queries else {
        return Vec::new();
    };
    let d = shape.head_dim;
    // Without a rotary embedding the pairs only name channels: their rotation averages out fully.
    let freqs = crate::model::rope_frequencies(rotary.map_or(1e4, |r| r.theta), d);
    let rotation = metric::Rotation {
        freqs: &freqs,
        neox: rotary.is_none_or(|r| r.neox),
        offsets: rotary.and_then(|r| metric::offsets(r.positions, q.from)),
    };
    let maps: Vec<_> = (0..shape.kv_heads)
        .map_while(|h| {
            let moment = q.moments.get(h * d * d..(h + 1) * d * d)?;
            metric::Whitening::new(moment, d, shape.tokens, &rotation)
        })
        .collect();
    // All heads or none: the decoder reads one map per head.
    match maps.len() == shape.kv_heads {
        true => maps,
        false => Vec::new(),
    }
}

/// Decodes what [`encode_layer`] made, given the ids the encoder was given (`tokens`, empty for none); every
/// malformed input is an error, never a panic.
pub fn decode_layer(
    codec: Codec,
    shape: KvShape,
    rotary: Option<Rotary<'_>>,
    tokens: &[u32],
    bytes: &[u8],
) -> Result<LayerKv, CodecError> {
    let n = shape.values().ok_or(CodecError::TooLarge(shape))?;
    if !tokens.is_empty() && tokens.len() != shape.tokens {
        return Err(CodecError::TokenIds {
            ids: tokens.len(),
            tokens: shape.tokens,
        });
    }
    let layout = Layout::new(codec, shape);
    let expected = layout.raw_len(n);
    let mut raw = Vec::with_capacity(expected.min(1 << 24));
    brotli::Decompressor::new(bytes, 1 << 16)
        .take(expected as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| CodecError::Brotli(e.to_string()))?;
    let exact = !matches!(layout, Layout::Transform { .. });
    if raw.len() > expected || (exact && raw.len() != expected) {
        return Err(CodecError::WrongSize {
            codec,
            shape,
            expected,
            found: raw.len(),
        });
    }
    let rotate_back = |k: &mut Vec<f32>| {
        if let Some(r) = rotary {
            if r.positions.len() != shape.tokens {
                return Err(CodecError::Positions {
                    positions: r.positions.len(),
                    tokens: shape.tokens,
                });
            }
            r.apply(k, shape, false);
        }
        Ok(())
    };
    let (k, v) = match &layout {
        Layout::Planes { width } => {
            let (a, b) = raw.split_at(n * width);
            (get_planes(a, n, *width), get_planes(b, n, *width))
        }
        Layout::Quantized { bits, keys, values } => {
            let (a, b) = raw.split_at(quantized_len(*bits, keys));
            let mut k = scatter(&dequantize(a, *bits, keys), keys, n);
            rotate_back(&mut k)?;
            (k, scatter(&dequantize(b, *bits, values), values, n))
        }
        Layout::Transform { .. } => {
            let (maps, mut rest) = postcard::take_from_bytes::<Vec<metric::Unwhiten>>(&raw)
                .map_err(|e| CodecError::Malformed(format!("key maps: {e}")))?;
            if !maps.is_empty() && maps.len() != shape.kv_heads {
                return Err(CodecError::Malformed(format!(
                    "{} key maps for {} KV heads",
                    maps.len(),
                    shape.kv_heads
                )));
            }
            let (parts, d) = (2 * shape.kv_heads, shape.head_dim);
            let group = transform::group(parts, shape.tokens, d);
            let mut k = Vec::with_capacity(2 * n);
            for _ in 0..parts / group {
                k.extend(transform::decode(
                    &mut rest,
                    group,
                    tokens,
                    shape.tokens,
                    d,
                )?);
            }
            let v = k.split_off(n);
            if !rest.is_empty() {
                return Err(CodecError::Malformed(format!(
                    "{} bytes after the last head",
                    rest.len()
                )));
            }
            let neox = rotary.is_none_or(|r| r.neox);
            for (map, keys) in maps
                .iter()
                .zip(k.chunks_exact_mut((shape.tokens * d).max(1)))
            {
                map.apply(keys, d, neox)?;
            }
            rotate_back(&mut k)?;
            (k, v)
        }
    };
    if k.iter().chain(&v).any(|x| !x.is_finite()) {
        return Err(CodecError::NotFinite);
    }
    Ok(LayerKv { k, v })
}

/// How a codec lays a layer out before brotli: K and V as byte planes of `width`-byte floats, quantized codes
/// by groups, or transform-coded heads (keys first, rotary taken off; together or one by one, see
/// [`transform::group`]) with a rounding `step` relative to each head's RMS.
enum Layout {
    Planes {
        width: usize,
    },
    Quantized {
        bits: u32,
        keys: Groups,
        values: Groups,
    },
    Transform {
        step: f64,
        /// Tensors coded (each head's keys and values) and their width.
        parts: usize,
        head_dim: usize,
    },
}

impl Layout {
    fn new(codec: Codec, shape: KvShape) -> Self {
        match (codec.bits(), codec.relative_step()) {
            (Some(bits), _) => Layout::Quantized {
                bits,
                keys: key_groups(shape),
                values: value_groups(shape),
            },
            (_, Some(step)) => Layout::Transform {
                step,
                parts: 2 * shape.kv_heads,
                head_dim: shape.head_dim,
            },
            _ if codec == Codec::F16 => Layout::Planes { width: 2 },
            _ => Layout::Planes { width: 4 },
        }
    }

    /// Bytes before brotli, for `n` values each of K and V (the most, for the transform codecs: each head's rank,
    /// step, mean, a full basis, and codes of at most 5 bytes).
    fn raw_len(&self, n: usize) -> usize {
        match self {
            Layout::Planes { width } => 2 * width * n,
            Layout::Quantized { bits, keys, values } => {
                quantized_len(*bits, keys) + quantized_len(*bits, values)
            }
            // Per block of width W: W channel scales, steps and means, eight length prefixes, the range coder's 5
            // flushed bytes, a full basis of 5-byte integers, and per axis a radius and a histogram of 5-byte
            // counts; per value: up to 3 bytes of stream (2 at 16-bit precision) and a 5-byte escape, or 2 bytes as
            // an outlier row plus up to 5 for its gap. Bounded for both groupings: one joint block, or one per part.
            Layout::Transform {
                parts, head_dim, ..
            } => {
                let histogram = 5 + 5 * (2 * entropy::MAX_RADIUS as usize + 2);
                let block = |w: usize| 60 + 12 * w + 5 * w * w + w * histogram;
                // Each key head's map: a scale per channel and a dense triangle at most.
                let key_maps = 5 + parts / 2 * (15 + 4 * head_dim + head_dim * (head_dim + 1));
                key_maps + block(parts * head_dim) + parts * block(*head_dim) + 2 * 8 * n
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
            let d = decode_layer(codec, shape, None, &[], &bytes).unwrap();
            let err = max_err(&l.k, &d.k).max(max_err(&l.v, &d.v));
            // Largest range in a group is 80 (keys' outlier channel); half a step of each code width.
            let bound = match codec {
                Codec::Lossless => 0.0,
                Codec::F16 => 0.02,
                Codec::Q8 => 80.0 / 255.0 / 2.0 + 0.05,
                Codec::Q4 => 80.0 / 15.0 / 2.0 + 0.05,
                Codec::Q2 => 80.0 / 3.0 / 2.0 + 0.1,
                // Transform codecs bound the error per head vector, not per value: see below.
                Codec::Pca8 | Codec::Pca4 | Codec::Pca3 | Codec::Pca2 => f32::INFINITY,
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
        for family in [
            &[Codec::Lossless, Codec::F16, Codec::Q8, Codec::Q4, Codec::Q2][..],
            &[
                Codec::Q8,
                Codec::Pca8,
                Codec::Pca4,
                Codec::Pca3,
                Codec::Pca2,
            ],
        ] {
            let sizes: Vec<usize> = family
                .iter()
                .map(|&c| encode_layer(c, shape, None, &l).len())
                .collect();
            assert!(
                sizes.windows(2).all(|w| w[0] > w[1]),
                "{family:?}: {sizes:?}"
            );
        }
    }

    /// Root mean square of `a - b` over that of `a`'s deviation from its channel means.
    fn relative_rms_error(a: &[f32], b: &[f32]) -> f32 {
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let err: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let var: f32 = a.iter().map(|x| (x - mean) * (x - mean)).sum();
        (err / var).sqrt()
    }

    #[test]
    fn transform_codecs_round_each_axis_to_their_step() {
        // 300 tokens go on principal axes, 100 stay on their channels.
        for tokens in [300, 100] {
            let shape = KvShape {
                kv_heads: 2,
                tokens,
                head_dim: 64,
            };
            let l = layer(shape, 11);
            let positions: Vec<u32> = (0..tokens as u32).collect();
            let rope = RopeParams {
                theta: 1e6,
                neox: true,
            }
            .at(&positions);
            for (codec, step) in [
                (Codec::Pca8, 0.15),
                (Codec::Pca4, 0.5),
                (Codec::Pca3, 0.7),
                (Codec::Pca2, 1.0),
            ] {
                let bytes = encode_layer(codec, shape, Some(rope), &l);
                let d = decode_layer(codec, shape, Some(rope), &[], &bytes).unwrap();
                // Uniform rounding leaves step / √12 of error per axis; allow the f16 basis and head-to-head spread.
                let (ek, ev) = (
                    relative_rms_error(&l.k, &d.k),
                    relative_rms_error(&l.v, &d.v),
                );
                assert!(ek < 0.4 * step && ev < 0.4 * step, "{codec}: {ek} {ev}");
            }
        }
    }

    #[test]
    fn low_rank_heads_cost_only_their_rank() {
        // Every head vector a mix of 4 fixed directions: a transform codec keeps 4 axes, q2 pays for all 64.
        let shape = KvShape {
            kv_heads: 2,
            tokens: 512,
            head_dim: 64,
        };
        let n = shape.values().unwrap();
        let noise = layer(shape, 5);
        let x: Vec<f32> = (0..n)
            .map(|i| {
                let (t, c) = (i / 64, i % 64);
                (0..4)
                    .map(|j| noise.k[t * 64 + j] * ((c * (j + 1)) as f32).sin())
                    .sum()
            })
            .collect();
        let l = LayerKv { k: x.clone(), v: x };
        let pca = encode_layer(Codec::Pca2, shape, None, &l);
        let q2 = encode_layer(Codec::Q2, shape, None, &l);
        assert!(
            pca.len() * 3 < q2.len(),
            "pca2 {} bytes, q2 {}",
            pca.len(),
            q2.len()
        );
        let d = decode_layer(Codec::Pca2, shape, None, &[], &pca).unwrap();
        assert!(relative_rms_error(&l.k, &d.k) < 0.4);
    }

    #[test]
    fn heads_projected_from_one_state_share_its_bits() {
        // K and V of both heads mix one 8-value state per token (as the model's projections of one hidden state
        // do): coded together, the layer's codes and basis cost what one head's would; with a state per head (so
        // nothing to share), four times that. The means and the sinks' rows cost both the same.
        let shape = KvShape {
            kv_heads: 2,
            tokens: 1200,
            head_dim: 64,
        };
        let noise = layer(shape, 8);
        let project = |state: &dyn Fn(usize, usize) -> f32, part: usize| -> Vec<f32> {
            (0..shape.tokens * 64)
                .map(|i| {
                    let (t, c) = (i / 64, i % 64);
                    (0..8)
                        .map(|j| state(t, j) * ((c * (j + 1) + 7 * part) as f32).sin())
                        .sum()
                })
                .collect()
        };
        let layer_of = |state: &dyn Fn(usize, usize, usize) -> f32| {
            let part = |p: usize| project(&|t, j| state(p, t, j), p);
            LayerKv {
                k: [part(0), part(1)].concat(),
                v: [part(2), part(3)].concat(),
            }
        };
        let shared = layer_of(&|_, t, j| noise.k[t * 64 + j]);
        let separate = layer_of(&|p, t, j| noise.k[t * 64 + 8 * p + j]);
        let size = |l: &LayerKv| {
            let bytes = encode_layer(Codec::Pca4, shape, None, l);
            let d = decode_layer(Codec::Pca4, shape, None, &[], &bytes).unwrap();
            assert!(relative_rms_error(&l.k, &d.k) < 0.2 && relative_rms_error(&l.v, &d.v) < 0.2);
            bytes.len()
        };
        let (shared, separate) = (size(&shared), size(&separate));
        assert!(
            shared * 2 < separate,
            "one state {shared} bytes, one per head {separate}"
        );
    }

    #[test]
    fn repeated_and_neighbouring_tokens_are_predicted() {
        // Half of each token's channels are its id's pattern (20 ids, repeating), half a slowly drifting state: with
        // the ids the decoder predicts the pattern from the id's earlier occurrences and the drift from the token
        // before, so the codes shrink; the rounding error stays where it was.
        let shape = KvShape {
            kv_heads: 1,
            tokens: 2000,
            head_dim: 64,
        };
        let noise = layer(shape, 11);
        let ids: Vec<u32> = (0..shape.tokens as u32)
            .map(|t| (t * 7919 >> 3) % 20)
            .collect();
        let value = |salt: usize, i: usize| {
            let (t, c) = (i / 64, i % 64);
            let signal = match c < 32 {
                true => 3.0 * ((ids[t] as usize * 64 + c + salt) as f32).sin(),
                false => 1.5 * ((t as f32 / 50.0) + c as f32).cos(),
            };
            signal + 0.02 * noise.k[i]
        };
        let n = shape.values().unwrap();
        let l = LayerKv {
            k: (0..n).map(|i| value(1, i)).collect(),
            v: (0..n).map(|i| value(2, i)).collect(),
        };
        let with_ids = encode_layer_weighted(
            Codec::Pca4,
            shape,
            None,
            &ids,
            None,
            LayerStep::default(),
            &l,
        );
        let without = encode_layer(Codec::Pca4, shape, None, &l);
        assert!(
            with_ids.len() * 10 < without.len() * 8,
            "{} bytes with the ids, {} without",
            with_ids.len(),
            without.len()
        );
        let a = decode_layer(Codec::Pca4, shape, None, &ids, &with_ids).unwrap();
        let b = decode_layer(Codec::Pca4, shape, None, &[], &without).unwrap();
        let (ea, eb) = (
            relative_rms_error(&l.v, &a.v),
            relative_rms_error(&l.v, &b.v),
        );
        assert!(
            ea < 1.2 * eb && ea < 0.1,
            "error {ea} with the ids, {eb} without"
        );
        // Without the ids (or with the wrong number of them) the chunk cannot be decoded, and says why.
        assert!(matches!(
            decode_layer(Codec::Pca4, shape, None, &[], &with_ids),
            Err(CodecError::Malformed(m)) if m.contains("token ids")
        ));
        assert_eq!(
            decode_layer(Codec::Pca4, shape, None, &ids[1..], &with_ids),
            Err(CodecError::TokenIds {
                ids: 1999,
                tokens: 2000
            })
        );
    }

    #[test]
    fn an_outlier_token_travels_apart_and_costs_the_others_nothing() {
        let shape = KvShape {
            kv_heads: 1,
            tokens: 200,
            head_dim: 64,
        };
        let plain = layer(shape, 4);
        let mut spiked = plain.clone();
        let spike = 100 * 64..101 * 64;
        for x in &mut spiked.v[spike.clone()] {
            *x *= 100.0;
        }
        let code = |l: &LayerKv| {
            decode_layer(
                Codec::Pca4,
                shape,
                None,
                &[],
                &encode_layer(Codec::Pca4, shape, None, l),
            )
        };
        let (a, b) = (code(&plain).unwrap(), code(&spiked).unwrap());
        // The outlier comes back to f16 precision; the other tokens as precisely as without it.
        assert!(max_err(&spiked.v[spike.clone()], &b.v[spike.clone()]) < 0.5);
        let others = |v: &[f32]| [&v[..spike.start], &v[spike.end..]].concat();
        let (with, without) = (
            relative_rms_error(&others(&spiked.v), &others(&b.v)),
            relative_rms_error(&others(&plain.v), &others(&a.v)),
        );
        assert!(
            with < 1.1 * without,
            "{with} with the outlier, {without} without"
        );
    }

    #[test]
    fn the_query_metric_moves_key_error_away_from_what_queries_read() {
        let shape = KvShape {
            kv_heads: 1,
            tokens: 400,
            head_dim: 64,
        };
        let l = layer(shape, 9);
        let positions: Vec<u32> = (0..400).collect();
        let rope = RopeParams {
            theta: 1e4,
            neox: true,
        };
        // Every query is one direction (pre-rotary), read at the 256 positions after the context; it reads the
        // small channels, not the large ones that set a plain coder's step.
        let u: Vec<f32> = (0..64)
            .map(|i| {
                if i % 16 == 3 {
                    0.0
                } else {
                    ((i * 7 + 3) as f32).sin()
                }
            })
            .collect();
        let moments: Vec<f32> = (0..64 * 64)
            .map(|i| u[i / 64] * u[i % 64] + if i / 64 == i % 64 { 0.01 } else { 0.0 })
            .collect();
        let logit_error = |queries: Option<KeyQueries>| {
            let at = rope.at(&positions);
            let bytes = encode_layer_weighted(
                Codec::Pca2,
                shape,
                Some(at),
                &[],
                queries,
                LayerStep::default(),
                &l,
            );
            let d = decode_layer(Codec::Pca2, shape, Some(at), &[], &bytes).unwrap();
            let mut sum = 0.0;
            for t in (400..656).step_by(15) {
                let mut q = u.clone();
                let one = KvShape {
                    kv_heads: 1,
                    tokens: 1,
                    head_dim: 64,
                };
                rope.at(&[t]).apply(&mut q, one, false);
                for (k, kd) in l.k.chunks(64).zip(d.k.chunks(64)) {
                    let e: f32 = q
                        .iter()
                        .zip(k.iter().zip(kd))
                        .map(|(q, (a, b))| q * (a - b))
                        .sum();
                    sum += (e as f64).powi(2);
                }
            }
            sum
        };
        let queries = KeyQueries {
            moments: &moments,
            from: 400,
        };
        let (plain, measured) = (logit_error(None), logit_error(Some(queries)));
        assert!(
            measured * 4.0 < plain,
            "logit error {measured} with the queries' metric, {plain} without"
        );
    }

    #[test]
    fn layer_steps_trade_keys_against_values() {
        let shape = KvShape {
            kv_heads: 2,
            tokens: 400,
            head_dim: 64,
        };
        let l = layer(shape, 5);
        let code = |keys, values| {
            let bytes = encode_layer_weighted(
                Codec::Pca4,
                shape,
                None,
                &[],
                None,
                LayerStep { keys, values },
                &l,
            );
            let d = decode_layer(Codec::Pca4, shape, None, &[], &bytes).unwrap();
            let sq =
                |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>();
            (bytes.len(), sq(&l.k, &d.k), sq(&l.v, &d.v))
        };
        let (even_bytes, even_k, even_v) = code(1.0, 1.0);
        let (bytes, k, v) = code(4.0, 0.25);
        assert!(
            k > 4.0 * even_k && v * 4.0 < even_v,
            "keys {even_k} → {k}, values {even_v} → {v}"
        );
        let (coarse_bytes, _, _) = code(4.0, 4.0);
        assert!(
            coarse_bytes * 2 < even_bytes && bytes > coarse_bytes,
            "{coarse_bytes} {even_bytes} {bytes}"
        );
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
            decode_layer(Codec::Q4, wrong, None, &[], &bytes),
            Err(CodecError::WrongSize { .. })
        ));
        assert!(matches!(
            decode_layer(Codec::Q8, shape, None, &[], &bytes),
            Err(CodecError::WrongSize { .. })
        ));
        let huge = KvShape {
            kv_heads: 1 << 20,
            tokens: 1 << 20,
            head_dim: 1 << 20,
        };
        assert_eq!(
            decode_layer(Codec::Q4, huge, None, &[], &bytes),
            Err(CodecError::TooLarge(huge))
        );
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode_layer(Codec::Q4, shape, None, &[], &bytes[..cut]).is_err());
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
            let d = decode_layer(Codec::Q8, shape, Some(rope), &[], &bytes).unwrap();
            // An un-rotated pair's magnitude spreads over both channels: at most √2 × the range per channel.
            assert!(max_err(&l.k, &d.k) <= 2.0 * (80.0 / 255.0 / 2.0) + 0.05);
            let short = RopeParams { theta: 1e4, neox }.at(&positions[1..]);
            assert_eq!(
                decode_layer(Codec::Q8, shape, Some(short), &[], &bytes),
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
                                              codec in 0usize..Codec::ALL.len(), tokens in 0usize..40) {
            let shape = KvShape { kv_heads: 2, tokens, head_dim: 32 };
            let _ = decode_layer(Codec::ALL[codec], shape, None, &[], &bytes);
            let ids: Vec<u32> = (0..tokens as u32).map(|t| t % 3).collect();
            let _ = decode_layer(Codec::ALL[codec], shape, None, &ids, &bytes);
        }

        #[test]
        fn quantized_round_trip_within_half_a_step(tokens in 1usize..70, head_dim in 1usize..70, seed in any::<u32>()) {
            let shape = KvShape { kv_heads: 1, tokens, head_dim };
            let l = layer(shape, seed);
            let d = decode_layer(Codec::Q8, shape, None, &[], &encode_layer(Codec::Q8, shape, None, &l)).unwrap();
            prop_assert!(max_err(&l.k, &d.k) <= 80.0 / 255.0 / 2.0 + 0.05);
            prop_assert!(max_err(&l.v, &d.v) <= 80.0 / 255.0 / 2.0 + 0.05);
        }

        #[test]
        fn transform_round_trip_keeps_shape_and_stays_close(tokens in 1usize..70, head_dim in 1usize..40,
                                                            seed in any::<u32>()) {
            let shape = KvShape { kv_heads: 2, tokens, head_dim };
            let l = layer(shape, seed);
            // Queries along one direction per head, and a little in every other.
            let u = |h: usize, i: usize| ((seed as usize + 7 * h + 3 * i) as f32).sin();
            let moments: Vec<f32> = (0..2 * head_dim * head_dim)
                .map(|i| {
                    let (h, r, c) = (i / (head_dim * head_dim), i / head_dim % head_dim, i % head_dim);
                    u(h, r) * u(h, c) + if r == c { 0.1 } else { 0.0 }
                })
                .collect();
            let queries = KeyQueries { moments: &moments, from: tokens as u32 };
            let positions: Vec<u32> = (0..tokens as u32).collect();
            let rope = Some(RopeParams { theta: 1e4, neox: seed % 2 == 0 }.at(&positions));
            let ids: Vec<u32> = (0..tokens as u32).map(|t| t % 5).collect();
            let bytes = encode_layer_weighted(Codec::Pca4, shape, rope, &ids, Some(queries), LayerStep::default(), &l);
            let d = decode_layer(Codec::Pca4, shape, rope, &ids, &bytes).unwrap();
            prop_assert_eq!(d.k.len(), l.k.len());
            // No value strays by more than the head's whole spread.
            prop_assert!(max_err(&l.k, &d.k) <= 80.0 && max_err(&l.v, &d.v) <= 80.0);
        }
    }
}
