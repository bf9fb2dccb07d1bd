//! Model hyper-parameters, read from a GGUF file's metadata.

use burn::config::Config;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::gguf::{Gguf, GgufError};

/// Supported architectures (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    Qwen2,
    Llama,
}

impl Arch {
    pub fn prefix(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Llama => "llama",
        }
    }
}

/// How rotary embedding pairs the dimensions of a head: llama.cpp's `NORM` (adjacent pairs, llama GGUFs) or
/// `NEOX` (first half with second half, Qwen2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    Interleaved,
    Neox,
}

#[derive(Config, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub rope_theta: f64,
    pub rope_style: RopeStyle,
    pub rms_eps: f64,
}

impl ModelConfig {
    pub fn from_gguf(g: &Gguf) -> Result<Self, GgufError> {
        let arch_name = g.get_str("general.architecture")?;
        let arch = match arch_name {
            "qwen2" => Arch::Qwen2,
            "llama" => Arch::Llama,
            other => {
                return Err(GgufError::BadTensor {
                    name: "general.architecture".into(),
                    problem: format!(
                        "architecture {other:?} is not supported (supported: qwen2, llama)"
                    ),
                });
            }
        };
        let p = arch.prefix();
        let key = |k: &str| format!("{p}.{k}");
        let d_model = g.get_u64(&key("embedding_length"))? as usize;
        let n_heads = g.get_u64(&key("attention.head_count"))? as usize;
        let n_kv_heads = g
            .get_u64(&key("attention.head_count_kv"))
            .unwrap_or(n_heads as u64) as usize;
        let embed = g.tensor("token_embd.weight")?;
        let vocab = g
            .get_u64(&key("vocab_size"))
            .map(|v| v as usize)
            .unwrap_or(embed.dims.get(1).copied().unwrap_or(0) as usize);
        let c = ModelConfig {
            arch,
            n_layers: g.get_u64(&key("block_count"))? as usize,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim: g
                .get_u64(&key("rope.dimension_count"))
                .map(|v| v as usize)
                .unwrap_or(d_model / n_heads.max(1)),
            ffn: g.get_u64(&key("feed_forward_length"))? as usize,
            vocab,
            context_length: g.get_u64(&key("context_length"))? as usize,
            rope_theta: g.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_style: match arch {
                Arch::Qwen2 => RopeStyle::Neox,
                Arch::Llama => RopeStyle::Interleaved,
            },
            rms_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        };
        let sane = c.n_layers > 0
            && c.n_heads > 0
            && c.n_kv_heads > 0
            && c.n_heads.is_multiple_of(c.n_kv_heads)
            && c.head_dim.is_multiple_of(2)
            && c.head_dim * c.n_heads >= 1
            && c.vocab > 0;
        if !sane {
            return Err(GgufError::BadTensor {
                name: format!("{p}.*"),
                problem: format!("inconsistent hyper-parameters {c:?}"),
            });
        }
        Ok(c)
    }
}

/// A short fingerprint of the weights: hash of the config and every tensor's name, type, shape and first bytes.
/// Cheap to compute on load, and different for any two models this project ships.
pub(crate) fn fingerprint(g: &Gguf, c: &ModelConfig) -> String {
    let mut h = sha2::Sha256::new();
    h.update(format!("{c:?}").as_bytes());
    for t in g.tensors.values() {
        h.update(t.name.as_bytes());
        h.update(format!("{:?}{:?}", t.ty, t.dims).as_bytes());
        let b = g.tensor_bytes(t);
        h.update(&b[..b.len().min(64)]);
    }
    let d = h.finalize();
    format!(
        "{}-{:x}",
        c.arch.prefix(),
        u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
    )
}

/// Rotary frequencies θ^(−2i/d) of the `head_dim / 2` channel pairs: the model and the KV codec rotate with these.
pub fn rope_frequencies(theta: f64, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64))
        .collect()
}
