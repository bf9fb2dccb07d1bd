//! Entropy coding of the transform codecs' integer codes, axis by axis.
//!
//! Codes on one principal axis are close to independent draws from one narrow distribution (mostly 0 and ±1 at
//! the coarse steps), so a range coder with that axis's own histogram as its model spends close to the axis's
//! entropy on them: at the coarse steps well under a bit a code, where a byte-oriented coder (brotli over
//! varints) cannot go below about one. The histogram travels with the codes, so the decoder builds the same
//! model; codes beyond [`MAX_RADIUS`] are escaped and sent as they are.
//!
//! The range coder is LZMA's (32-bit range, carry propagated through a cached byte), written here because the
//! well-kept crate for this (constriction) also builds as a cdylib, which the wasm component linker crashes on.

use serde::{Deserialize, Serialize};

use super::CodecError;

/// Codes of magnitude up to this have a symbol of their own; larger ones are escaped.
pub(super) const MAX_RADIUS: u32 = 255;
/// Fixed-point precision of the models: symbol frequencies sum to 2^PRECISION.
const PRECISION: u32 = 16;
/// The range is renormalised (shifted by a byte) whenever it falls below this.
const TOP: u32 = 1 << 24;

/// Axes of codes as they travel.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CodedAxes {
    /// Per axis, the largest magnitude with a symbol of its own, R: symbols −R..=R, then the escape.
    radii: Vec<u32>,
    /// Per axis, how often each of its 2R + 2 symbols occurs.
    counts: Vec<u32>,
    /// Escaped codes, in order.
    escapes: Vec<i32>,
    /// The range coder's bytes.
    stream: Vec<u8>,
}

/// Codes `codes`, `axes` runs of equal length one after the other.
pub(super) fn encode(codes: &[i32], axes: usize) -> CodedAxes {
    let per_axis = codes.len().checked_div(axes).unwrap_or(0);
    let mut coded = CodedAxes {
        radii: Vec::with_capacity(axes),
        counts: Vec::new(),
        escapes: Vec::new(),
        stream: Vec::new(),
    };
    let mut encoder = Encoder::default();
    for a in 0..axes {
        let axis = &codes[a * per_axis..(a + 1) * per_axis];
        let radius = axis
            .iter()
            .map(|c| c.unsigned_abs())
            .max()
            .unwrap_or(0)
            .min(MAX_RADIUS);
        let symbol = |c: i32| match c.unsigned_abs() <= radius {
            true => (c + radius as i32) as usize,
            false => 2 * radius as usize + 1,
        };
        let mut counts = vec![0u32; 2 * radius as usize + 2];
        for &c in axis {
            counts[symbol(c)] += 1;
        }
        let model = model(&counts).expect("at most 2R + 2 symbols fit the precision");
        for &c in axis {
            if c.unsigned_abs() > radius {
                coded.escapes.push(c);
            }
            encoder.encode(&model, symbol(c));
        }
        coded.radii.push(radius);
        coded.counts.extend(counts);
    }
    coded.stream = encoder.finish();
    coded
}

/// Decodes `axes` axes of `per_axis` codes each; every malformed input is an error.
pub(super) fn decode(
    coded: &CodedAxes,
    axes: usize,
    per_axis: usize,
) -> Result<Vec<i32>, CodecError> {
    let bad = |what: &str| CodecError::Malformed(format!("entropy-coded codes: {what}"));
    if coded.radii.len() != axes {
        return Err(bad("one radius per axis expected"));
    }
    if coded.radii.iter().any(|&r| r > MAX_RADIUS) {
        return Err(bad("radius out of range"));
    }
    let symbols: usize = coded.radii.iter().map(|&r| 2 * r as usize + 2).sum();
    if coded.counts.len() != symbols {
        return Err(bad("histograms of the wrong length"));
    }
    let mut decoder = Decoder::new(&coded.stream).ok_or_else(|| bad("stream too short"))?;
    let mut escapes = coded.escapes.iter();
    let mut codes = Vec::with_capacity(axes * per_axis);
    let mut counts = &coded.counts[..];
    for &radius in &coded.radii {
        let (axis_counts, rest) = counts.split_at(2 * radius as usize + 2);
        counts = rest;
        let sum: u64 = axis_counts.iter().map(|&c| c as u64).sum();
        if sum != per_axis as u64 {
            return Err(bad("a histogram does not count the axis's codes"));
        }
        let model = model(axis_counts).ok_or_else(|| bad("histogram"))?;
        for _ in 0..per_axis {
            let s = decoder
                .decode(&model)
                .ok_or_else(|| bad("stream does not decode"))?;
            codes.push(match s < 2 * radius as usize + 1 {
                true => s as i32 - radius as i32,
                false => *escapes.next().ok_or_else(|| bad("escapes missing"))?,
            });
        }
    }
    if escapes.next().is_some() {
        return Err(bad("escapes left over"));
    }
    Ok(codes)
}

/// The model of one axis: its counts in fixed point, every symbol at least one unit (integer arithmetic only, so
/// encoder and decoder build the same model on any machine), as cumulative frequencies `cum[s]..cum[s + 1]`.
fn model(counts: &[u32]) -> Option<Vec<u32>> {
    let total = counts.iter().map(|&c| c as u64).sum::<u64>().max(1);
    let free = (1u64 << PRECISION).checked_sub(counts.len() as u64)?;
    let mut p: Vec<u32> = counts
        .iter()
        .map(|&c| 1 + (c as u64 * free / total) as u32)
        .collect();
    let short = (1u32 << PRECISION) - p.iter().sum::<u32>();
    let top = (0..counts.len()).max_by_key(|&i| counts[i])?;
    p[top] += short;
    let mut cum = Vec::with_capacity(p.len() + 1);
    cum.push(0);
    for f in p {
        cum.push(cum.last().copied().unwrap_or(0) + f);
    }
    Some(cum)
}

/// LZMA's range encoder: `low` holds 33 bits (the 33rd a carry), bytes leave through a one-byte cache so that a
/// carry can still reach them (`pending` 0xFF bytes wait behind it).
struct Encoder {
    low: u64,
    range: u32,
    cache: u8,
    pending: u64,
    out: Vec<u8>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder {
            low: 0,
            range: u32::MAX,
            cache: 0,
            pending: 1,
            out: Vec::new(),
        }
    }
}

impl Encoder {
    fn encode(&mut self, cum: &[u32], s: usize) {
        let r = self.range >> PRECISION;
        self.low += r as u64 * cum[s] as u64;
        self.range = r * (cum[s + 1] - cum[s]);
        while self.range < TOP {
            self.range <<= 8;
            self.shift_low();
        }
    }

    fn shift_low(&mut self) {
        if self.low < 0xFF00_0000 || self.low >= 1 << 32 {
            let carry = (self.low >> 32) as u8;
            let mut byte = self.cache;
            while self.pending > 0 {
                self.out.push(byte.wrapping_add(carry));
                byte = 0xFF;
                self.pending -= 1;
            }
            self.cache = (self.low >> 24) as u8;
        }
        self.pending += 1;
        self.low = (self.low & 0x00FF_FFFF) << 8;
    }

    fn finish(mut self) -> Vec<u8> {
        for _ in 0..5 {
            self.shift_low();
        }
        self.out
    }
}

/// The matching decoder; bytes past the end read as zeros, and a point outside the model's range is an error.
struct Decoder<'a> {
    code: u32,
    range: u32,
    bytes: std::slice::Iter<'a, u8>,
}

impl<'a> Decoder<'a> {
    /// `None` if the stream cannot even hold its start (the encoder always writes at least 5 bytes).
    fn new(stream: &'a [u8]) -> Option<Self> {
        if stream.len() < 5 {
            return None;
        }
        let mut bytes = stream[1..].iter();
        let code = (0..4).fold(0u32, |c, _| (c << 8) | *bytes.next().unwrap_or(&0) as u32);
        Some(Decoder {
            code,
            range: u32::MAX,
            bytes,
        })
    }

    fn decode(&mut self, cum: &[u32]) -> Option<usize> {
        let r = self.range >> PRECISION;
        let v = self.code / r;
        if v >= 1 << PRECISION {
            return None;
        }
        let s = cum.partition_point(|&c| c <= v).checked_sub(1)?;
        let f = cum.get(s + 1)? - cum[s];
        self.code -= r * cum[s];
        self.range = r * f;
        while self.range < TOP {
            self.range <<= 8;
            self.code = (self.code << 8) | *self.bytes.next().unwrap_or(&0) as u32;
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_with_escapes_and_empty_axes() {
        let mut codes: Vec<i32> = (0..600).map(|i| ((i * 7919) % 11) as i32 - 5).collect();
        codes.extend([0; 300]);
        codes.extend((0..300).map(|i| if i == 17 { -100_000 } else { i % 3 }));
        let coded = encode(&codes, 4);
        assert_eq!(coded.escapes, vec![-100_000]);
        assert_eq!(decode(&coded, 4, 300).unwrap(), codes);
    }

    #[test]
    fn skewed_codes_cost_well_under_a_bit_each() {
        let codes: Vec<i32> = (0..10_000)
            .map(|i| match i % 50 {
                0 => 1,
                1 => -1,
                _ => 0,
            })
            .collect();
        let coded = encode(&codes, 1);
        // Entropy: 0.28 bits a code, 353 bytes for these 10,000.
        assert!(coded.stream.len() < 375, "{} bytes", coded.stream.len());
    }

    #[test]
    fn malformed_histograms_and_streams_are_errors() {
        let codes: Vec<i32> = (0..64).map(|i| i % 5 - 2).collect();
        let good = || encode(&codes, 2);
        let mut c = good();
        c.counts[0] += 1;
        assert!(decode(&c, 2, 32).is_err());
        let mut c = good();
        c.radii[1] = MAX_RADIUS + 1;
        assert!(decode(&c, 2, 32).is_err());
        let mut c = good();
        c.stream.truncate(4);
        assert!(decode(&c, 2, 32).is_err());
        assert!(decode(&good(), 3, 32).is_err());
        // Corrupted words decode to some codes or an error, never a panic.
        for seed in 0..500u32 {
            let mut c = good();
            let n = c.stream.len();
            let at = (seed as usize * 7) % n;
            c.stream[at] ^= (seed % 255 + 1) as u8;
            if seed % 3 == 0 {
                c.stream.truncate(n - seed as usize % n);
            }
            let _ = decode(&c, 2, 32);
        }
    }
}
