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

/// One layer's KV on a device: `k, v: [kv_heads, tokens, head_dim]`.
#[derive(Clone, Debug)]
pub struct DeviceKv {
    pub k: Tensor<3>,
    pub v: Tensor<3>,
}

impl DeviceKv {
    pub fn len(&self) -> usize {
        self.k.dims()[1]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn upload(
        l: &LayerKv,
        kv_heads: usize,
        tokens: usize,
        head_dim: usize,
        device: &Device,
    ) -> Self {
        let shape = [kv_heads, tokens, head_dim];
        DeviceKv {
            k: Tensor::from_data(TensorData::new(l.k.clone(), shape), device),
            v: Tensor::from_data(TensorData::new(l.v.clone(), shape), device),
        }
    }

    pub fn download(&self) -> LayerKv {
        let read = |t: &Tensor<3>| {
            t.to_data()
                .try_into_vec::<f32>()
                .expect("KV tensors are f32")
        };
        LayerKv {
            k: read(&self.k),
            v: read(&self.v),
        }
    }

    /// Keeps the first `len` tokens (burn cannot narrow to nothing, so zero gives empty tensors).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len() {
            return;
        }
        let keep = |t: &Tensor<3>| match len {
            0 => {
                let [h, _, d] = t.dims();
                Tensor::zeros([h, 0, d], &t.device())
            }
            n => t.clone().narrow(1, 0, n),
        };
        (self.k, self.v) = (keep(&self.k), keep(&self.v));
    }

    /// Appends new keys and values along the token axis.
    pub fn append(&mut self, k: Tensor<3>, v: Tensor<3>) {
        if self.is_empty() {
            self.k = k;
            self.v = v;
        } else {
            self.k = Tensor::cat(vec![self.k.clone(), k], 1);
            self.v = Tensor::cat(vec![self.v.clone(), v], 1);
        }
    }
}
