//! KV state as a value: per-layer keys and values that can be exported from one session, sliced, serialised,
//! sent anywhere, and imported into another session as a shared-context segment.
//!
//! Layout per layer: `[kv_heads][tokens][head_dim]`, keys stored after rotary embedding at `positions`.

use std::ops::Range;

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KvError {
    #[error("KV state is for {found}, this model is {expected}")]
    WrongModel { found: String, expected: String },
    #[error("KV state shape {found} does not match the model's {expected}")]
    WrongShape { found: String, expected: String },
    #[error("KV slice {what} {range:?} is outside 0..{len}")]
    OutOfRange {
        what: &'static str,
        range: Range<usize>,
        len: usize,
    },
    #[error("KV state is corrupt: {0}")]
    Corrupt(String),
}

/// One layer's keys and values, `[kv_heads][tokens][head_dim]` each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// The KV of a token sequence for a range of a model's layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvState {
    /// Identifies the model (its weights' fingerprint): KV is meaningless for any other.
    pub model: String,
    /// The first layer held; `layers[i]` is layer `first_layer + i`.
    pub first_layer: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Token ids the KV was computed from.
    pub tokens: Vec<u32>,
    /// Rotary position of each token.
    pub positions: Vec<u32>,
    pub layers: Vec<LayerKv>,
}

impl KvState {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// The shape of each layer's K (and V), as the codec takes it.
    pub fn shape(&self) -> crate::codec::KvShape {
        crate::codec::KvShape {
            kv_heads: self.kv_heads,
            tokens: self.len(),
            head_dim: self.head_dim,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Checks the buffers agree with the declared shape (after deserialising untrusted bytes).
    pub fn validate(&self) -> Result<(), KvError> {
        if self.positions.len() != self.tokens.len() {
            return Err(KvError::Corrupt(format!(
                "{} positions for {} tokens",
                self.positions.len(),
                self.tokens.len()
            )));
        }
        let want = self.kv_heads * self.len() * self.head_dim;
        for (i, l) in self.layers.iter().enumerate() {
            if l.k.len() != want || l.v.len() != want {
                return Err(KvError::Corrupt(format!(
                    "layer {} holds {}/{} values, expected {want}",
                    self.first_layer + i,
                    l.k.len(),
                    l.v.len()
                )));
            }
        }
        Ok(())
    }

    /// The KV of `layers` (absolute layer indices) and `tokens` (indices into this state's tokens).
    pub fn slice(&self, layers: Range<usize>, tokens: Range<usize>) -> Result<KvState, KvError> {
        let have = self.first_layer..self.first_layer + self.layers.len();
        if layers.start < have.start || layers.end > have.end || layers.start > layers.end {
            return Err(KvError::OutOfRange {
                what: "layers",
                range: layers,
                len: have.end,
            });
        }
        if tokens.start > tokens.end || tokens.end > self.len() {
            return Err(KvError::OutOfRange {
                what: "tokens",
                range: tokens,
                len: self.len(),
            });
        }
        let (t, n, d) = (self.len(), tokens.len(), self.head_dim);
        let cut = |x: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(self.kv_heads * n * d);
            for h in 0..self.kv_heads {
                out.extend_from_slice(&x[(h * t + tokens.start) * d..(h * t + tokens.end) * d]);
            }
            out
        };
        Ok(KvState {
            model: self.model.clone(),
            first_layer: layers.start,
            kv_heads: self.kv_heads,
            head_dim: d,
            tokens: self.tokens[tokens.clone()].to_vec(),
            positions: self.positions[tokens.clone()].to_vec(),
            layers: self.layers[layers.start - have.start..layers.end - have.start]
                .iter()
                .map(|l| LayerKv {
                    k: cut(&l.k),
                    v: cut(&l.v),
                })
                .collect(),
        })
    }

    /// Postcard bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("KvState serialises")
    }

    /// Parses and validates postcard bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KvError> {
        let s: KvState =
            postcard::from_bytes(bytes).map_err(|e| KvError::Corrupt(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }
}

/// A second reading of a layer's shared context (another model's KV of the same tokens, projected into this one's
/// space) and its gate: the weight in [0, 1] its attention gets against the context's own
/// ([`crate::attention::blend`]; 0 leaves it out).
#[derive(Clone)]
pub struct Blend {
    pub kv: DeviceKv,
    pub weight: f32,
}

/// A layer's shared context as attention reads it: the context's KV (if any), and a blended second reading.
pub type LayerContext = (Option<DeviceKv>, Option<Blend>);

/// One layer's KV on a device: keys and values `[kv_heads, tokens, head_dim]`, in buffers with room for more tokens
/// (capacity doubles), so appending a decoded token writes one row in place instead of copying every earlier one
/// (a copy per layer per token that grew with the session). [`DeviceKv::k`] and [`DeviceKv::v`] are views of the
/// tokens held.
#[derive(Clone, Debug)]
pub struct DeviceKv {
    /// `[kv_heads, capacity, head_dim]`; tokens `len..` are unused.
    k: Tensor<3>,
    v: Tensor<3>,
    len: usize,
}

/// Fewest tokens a growing buffer makes room for.
const MIN_CAPACITY: usize = 64;

impl DeviceKv {
    /// The KV `k, v: [kv_heads, tokens, head_dim]`, with no spare room.
    pub fn new(k: Tensor<3>, v: Tensor<3>) -> Self {
        assert_eq!(k.dims(), v.dims(), "keys and values differ in shape");
        let len = k.dims()[1];
        DeviceKv { k, v, len }
    }

    /// No tokens yet.
    pub fn empty(kv_heads: usize, head_dim: usize, device: &Device) -> Self {
        let none = Tensor::<3>::zeros([kv_heads, 0, head_dim], device);
        DeviceKv::new(none.clone(), none)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The keys `[kv_heads, len, head_dim]` (a view: the buffer is not copied).
    pub fn k(&self) -> Tensor<3> {
        self.held(&self.k)
    }

    /// The values `[kv_heads, len, head_dim]` (a view).
    pub fn v(&self) -> Tensor<3> {
        self.held(&self.v)
    }

    fn held(&self, buf: &Tensor<3>) -> Tensor<3> {
        let [h, cap, d] = buf.dims();
        match self.len {
            n if n == cap => buf.clone(),
            // burn cannot narrow to nothing
            0 => Tensor::zeros([h, 0, d], &buf.device()),
            n => buf.clone().narrow(1, 0, n),
        }
    }

    pub fn upload(
        l: &LayerKv,
        kv_heads: usize,
        tokens: usize,
        head_dim: usize,
        device: &Device,
    ) -> Self {
        let shape = [kv_heads, tokens, head_dim];
        DeviceKv::new(
            Tensor::from_data(TensorData::new(l.k.clone(), shape), device),
            Tensor::from_data(TensorData::new(l.v.clone(), shape), device),
        )
    }

    pub fn download(&self) -> LayerKv {
        let read = |t: Tensor<3>| {
            t.to_data()
                .try_into_vec::<f32>()
                .expect("KV tensors are f32")
        };
        LayerKv {
            k: read(self.k()),
            v: read(self.v()),
        }
    }

    /// Keeps the first `len` tokens (the buffers keep their room).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends new keys and values `[kv_heads, tokens, head_dim]` along the token axis: in place where this is the
    /// buffers' only holder (views taken earlier must be dropped by then), else into a copy.
    pub fn append(&mut self, k: Tensor<3>, v: Tensor<3>) {
        let [h, t, d] = k.dims();
        let (start, end) = (self.len, self.len + t);
        if end > self.k.dims()[1] {
            let cap = end.next_power_of_two().max(MIN_CAPACITY);
            let grow = |held: Tensor<3>| {
                let spare = Tensor::zeros([h, cap - start, d], &held.device());
                Tensor::cat(vec![held, spare], 1)
            };
            (self.k, self.v) = (grow(self.k()), grow(self.v()));
        }
        let rows = [0..h, start..end, 0..d];
        // `inplace` moves the buffer out (a clone would be a second holder, and the write would copy it).
        self.k.inplace(|buf| buf.slice_assign(rows.clone(), k));
        self.v.inplace(|buf| buf.slice_assign(rows, v));
        self.len = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(from: usize, n: usize, dev: &Device) -> Tensor<3> {
        let v: Vec<f32> = (0..2 * n * 3).map(|i| (from * 100 + i) as f32).collect();
        Tensor::from_data(TensorData::new(v, [2, n, 3]), dev)
    }

    fn read(t: Tensor<3>) -> Vec<f32> {
        t.to_data().try_into_vec::<f32>().unwrap()
    }

    /// Appends past the buffers' room, truncation and appends after it keep exactly the tokens `cat` would, and a
    /// clone taken before an append does not see it (the shared buffer is copied, not written).
    #[test]
    fn growing_buffers_hold_what_cat_would() {
        let dev = Device::flex();
        let mut kv = DeviceKv::empty(2, 3, &dev);
        let mut want = tokens(0, 5, &dev);
        kv.append(tokens(0, 5, &dev), tokens(0, 5, &dev));
        let before = kv.clone();
        for step in 1..=70 {
            kv.append(tokens(step, 1, &dev), tokens(step, 1, &dev).neg());
            want = Tensor::cat(vec![want, tokens(step, 1, &dev)], 1);
        }
        assert_eq!(kv.len(), 75);
        assert_eq!(read(kv.k()), read(want.clone()));
        assert_eq!(
            read(kv.v().narrow(1, 5, 70)),
            read(want.clone().narrow(1, 5, 70).neg())
        );
        assert_eq!(
            (before.len(), read(before.k())),
            (5, read(tokens(0, 5, &dev)))
        );

        kv.truncate(3);
        kv.append(tokens(9, 2, &dev), tokens(9, 2, &dev));
        let want = Tensor::cat(vec![want.narrow(1, 0, 3), tokens(9, 2, &dev)], 1);
        assert_eq!((kv.len(), read(kv.k())), (5, read(want)));
        kv.truncate(0);
        assert!(kv.is_empty() && kv.k().dims() == [2, 0, 3]);
    }
}
