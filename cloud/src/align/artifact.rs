//! The fitted alignment as a small versioned file with its own hash: which LLM layer feeds each SLM layer, and the
//! affine maps of keys (without rotary) and values. The cloud loads it to project its LLM's context KV into the
//! edge SLM's space; its id names the alignment a stream uses.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tandem_common::codec::RopeParams;
use tandem_common::kv::KvState;
use tandem_common::model::usable_gate;

use super::features::{layer_from_rows, layer_rows};
use super::ridge::Affine;

const MAGIC: &[u8; 12] = b"TANDEMALIGN\0";
/// 2: fused-mode gates added.
pub const FORMAT: u32 = 2;

/// One side of the pair: the model's weights fingerprint and KV geometry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Side {
    pub fingerprint: String,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: RopeParams,
}

/// The maps for one SLM layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerMap {
    pub slm_layer: usize,
    pub llm_layer: usize,
    /// Linear CKA of the pair on the calibration tokens, keys and values.
    pub cka: (f64, f64),
    pub k: Affine,
    pub v: Affine,
    /// The ridge penalties validation chose.
    pub lambda: (f64, f64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alignment {
    pub llm: Side,
    pub slm: Side,
    pub layers: Vec<LayerMap>,
    /// The fused mode's gate per SLM layer: the weight in [0, 1] attention over the projected LLM KV gets, blended
    /// with attention over the SLM's own KV of the same context (0: not used in that layer); fitted on calibration.
    pub gates: Vec<f32>,
    /// sha256 of the calibration manifest it was fitted on.
    pub calibration: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AlignError {
    #[error("not an alignment file (bad magic)")]
    BadMagic,
    #[error("alignment format {0} is not supported (this build reads {FORMAT})")]
    Format(u32),
    #[error("alignment file is corrupt: {0}")]
    Corrupt(String),
    #[error("alignment is for {which} {expected}, this {which} is {found}")]
    WrongModel {
        which: &'static str,
        expected: String,
        found: String,
    },
    #[error("KV to project is {found}, the alignment expects {expected}")]
    WrongShape { expected: String, found: String },
}

impl Alignment {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend(postcard::to_allocvec(self).expect("alignments serialise"));
        out
    }

    /// Reads an alignment, checking its format and that every map's shape fits the models it names.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AlignError> {
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or(AlignError::BadMagic)?;
        let (version, body) = rest.split_first_chunk::<4>().ok_or(AlignError::BadMagic)?;
        let version = u32::from_le_bytes(*version);
        if version != FORMAT {
            return Err(AlignError::Format(version));
        }
        let a: Alignment =
            postcard::from_bytes(body).map_err(|e| AlignError::Corrupt(e.to_string()))?;
        let (din, dout) = (
            a.llm.kv_heads * a.llm.head_dim,
            a.slm.kv_heads * a.slm.head_dim,
        );
        let fits = |m: &Affine| m.d_in == din && m.d_out == dout && m.is_consistent();
        for (i, l) in a.layers.iter().enumerate() {
            if l.slm_layer != i || l.llm_layer >= a.llm.layers || !fits(&l.k) || !fits(&l.v) {
                return Err(AlignError::Corrupt(format!(
                    "layer map {i} does not fit the models"
                )));
            }
        }
        if a.gates.len() != a.slm.layers || !a.gates.iter().copied().all(usable_gate) {
            return Err(AlignError::Corrupt(format!(
                "{} gates for an SLM of {} layers (each in [0, 1])",
                a.gates.len(),
                a.slm.layers
            )));
        }
        if a.layers.len() != a.slm.layers {
            return Err(AlignError::Corrupt(format!(
                "{} layer maps for an SLM of {} layers",
                a.layers.len(),
                a.slm.layers
            )));
        }
        Ok(a)
    }

    pub fn load(path: &Path) -> Result<Self, AlignError> {
        let bytes = std::fs::read(path)
            .map_err(|e| AlignError::Corrupt(format!("{}: {e}", path.display())))?;
        Self::from_bytes(&bytes)
    }

    /// The alignment's id: the first 16 bytes of the sha256 of its file, hex.
    pub fn id(&self) -> String {
        Sha256::digest(self.to_bytes())[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Refuses unless this alignment is for exactly these two models' weights.
    pub fn check_models(&self, llm: &str, slm: &str) -> Result<(), AlignError> {
        for (which, side, found) in [("LLM", &self.llm, llm), ("SLM", &self.slm, slm)] {
            if side.fingerprint != found {
                return Err(AlignError::WrongModel {
                    which,
                    expected: side.fingerprint.clone(),
                    found: found.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The SLM's KV for the context the LLM computed `llm_kv` of: every SLM layer from its mapped LLM layer.
    pub fn project(&self, llm_kv: &KvState) -> Result<KvState, AlignError> {
        let (l, shape) = (
            &self.llm,
            (llm_kv.layers.len(), llm_kv.kv_heads, llm_kv.head_dim),
        );
        if llm_kv.model != l.fingerprint {
            return Err(AlignError::WrongModel {
                which: "LLM",
                expected: l.fingerprint.clone(),
                found: llm_kv.model.clone(),
            });
        }
        if llm_kv.first_layer != 0 || shape != (l.layers, l.kv_heads, l.head_dim) {
            return Err(AlignError::WrongShape {
                expected: format!(
                    "{} layers × {} heads × {}",
                    l.layers, l.kv_heads, l.head_dim
                ),
                found: format!(
                    "{} layers (from {}) × {} heads × {}",
                    shape.0, llm_kv.first_layer, shape.1, shape.2
                ),
            });
        }
        let layers = self
            .layers
            .iter()
            .map(|m| {
                let (k, v) = layer_rows(llm_kv, m.llm_layer, l.rope);
                let (k, v) = (m.k.apply(&k), m.v.apply(&v));
                layer_from_rows(
                    &k,
                    &v,
                    self.slm.kv_heads,
                    self.slm.head_dim,
                    &llm_kv.positions,
                    self.slm.rope,
                )
            })
            .collect();
        Ok(KvState {
            model: self.slm.fingerprint.clone(),
            first_layer: 0,
            kv_heads: self.slm.kv_heads,
            head_dim: self.slm.head_dim,
            tokens: llm_kv.tokens.clone(),
            positions: llm_kv.positions.clone(),
            layers,
        })
    }
}
