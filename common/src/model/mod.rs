//! The one model definition: decoder-only transformers of the `qwen2` and `llama` families, written once with burn
//! tensors so that the same code runs natively, in wasm on the CPU, and on WebGPU.
//!
//! Per layer: RMSNorm → Q/K/V projections (+ bias for Qwen2) → rotary embedding → grouped-query attention over the
//! shared-context KV segment and the session's own KV, merged by log-sum-exp → output projection → residual →
//! RMSNorm → SwiGLU MLP → residual. Linear layers keep the GGUF's quantized blocks ([`QMatrix`]).

mod config;
mod layerwise;
mod logits;
mod qmatrix;
mod query_energy;
mod rope;
mod session;

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor, TensorData};

pub use config::{Arch, ModelConfig, RopeStyle, rope_frequencies};
pub use layerwise::LayerwisePrefill;
pub use logits::Logits;
pub use qmatrix::{QMatrix, QuantOps, Weight, has_quantized_kernels, q_linear};
pub use query_energy::QueryEnergy;
use rope::Rope;
pub use session::{ContextLayer, LayerKvAt, Session, SessionError, usable_gate};

use crate::attention::{self, Partial};
use crate::gguf::{Gguf, GgufError};
use crate::kv::{Blend, DeviceKv, LayerContext};
use crate::quant::Precision;

/// A linear layer with quantized weight and optional float bias.
#[derive(Module, Debug)]
pub struct Linear {
    #[module(skip)]
    pub weight: Weight,
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    fn load(g: &Gguf, name: &str, device: &Device) -> Result<Self, GgufError> {
        let weight = Weight::new(QMatrix::from_gguf(g, &format!("{name}.weight"))?, device);
        let bias = match g.tensors.get(&format!("{name}.bias")) {
            Some(_) => Some(QMatrix::from_gguf(g, &format!("{name}.bias"))?.to_vector(device)),
            None => None,
        };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: Tensor<2>, p: Precision) -> Tensor<2> {
        q_linear(x, &self.weight, self.bias.as_ref(), p)
    }
}

/// Root-mean-square normalisation with a learned gain.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub gain: Tensor<1>,
    pub eps: f64,
}

impl RmsNorm {
    fn load(g: &Gguf, name: &str, eps: f64, device: &Device) -> Result<Self, GgufError> {
        Ok(RmsNorm {
            gain: QMatrix::from_gguf(g, name)?.to_vector(device),
            eps,
        })
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let inv = x
            .clone()
            .powi_scalar(2)
            .mean_dim(1)
            .add_scalar(self.eps)
            .sqrt()
            .recip();
        x * inv * self.gain.clone().unsqueeze_dim(0)
    }
}

/// One transformer block.
#[derive(Module, Debug)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: RmsNorm,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// The whole model.
#[derive(Module, Debug)]
pub struct Model {
    #[module(skip)]
    pub config: ModelConfig,
    #[module(skip)]
    pub embed: QMatrix,
    pub blocks: Vec<Block>,
    pub norm: RmsNorm,
    /// Output projection (the embedding's blocks when tied to it).
    #[module(skip)]
    pub output: Weight,
    #[module(skip)]
    pub compute_device: Device,
    /// Fingerprint of the weights, carried by exported KV so it is never imported into another model.
    #[module(skip)]
    pub fingerprint: String,
}

impl Model {
    /// Builds the model from a parsed GGUF file on `device`.
    pub fn load(g: &Gguf, device: &Device) -> Result<Self, GgufError> {
        let c = ModelConfig::from_gguf(g)?;
        let p = c.arch.prefix();
        let mut blocks = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let b = format!("blk.{i}");
            blocks.push(Block {
                attn_norm: RmsNorm::load(g, &format!("{b}.attn_norm.weight"), c.rms_eps, device)?,
                q: Linear::load(g, &format!("{b}.attn_q"), device)?,
                k: Linear::load(g, &format!("{b}.attn_k"), device)?,
                v: Linear::load(g, &format!("{b}.attn_v"), device)?,
                o: Linear::load(g, &format!("{b}.attn_output"), device)?,
                ffn_norm: RmsNorm::load(g, &format!("{b}.ffn_norm.weight"), c.rms_eps, device)?,
                gate: Linear::load(g, &format!("{b}.ffn_gate"), device)?,
                up: Linear::load(g, &format!("{b}.ffn_up"), device)?,
                down: Linear::load(g, &format!("{b}.ffn_down"), device)?,
            });
            let blk = &blocks[i];
            let expect = |name: &str, m: &Weight, rows: usize, cols: usize| {
                if m.q.rows != rows || m.q.cols != cols {
                    return Err(GgufError::BadTensor {
                        name: format!("{b}.{name}"),
                        problem: format!(
                            "shape [{}, {}] does not match {p} config [{rows}, {cols}]",
                            m.q.rows, m.q.cols
                        ),
                    });
                }
                Ok(())
            };
            let (d, qd, kvd) = (c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
            expect("attn_q", &blk.q.weight, qd, d)?;
            expect("attn_k", &blk.k.weight, kvd, d)?;
            expect("attn_v", &blk.v.weight, kvd, d)?;
            expect("attn_output", &blk.o.weight, d, qd)?;
            expect("ffn_gate", &blk.gate.weight, c.ffn, d)?;
            expect("ffn_up", &blk.up.weight, c.ffn, d)?;
            expect("ffn_down", &blk.down.weight, d, c.ffn)?;
        }
        let embed = QMatrix::from_gguf(g, "token_embd.weight")?;
        let output = match g.tensors.get("output.weight") {
            Some(_) => QMatrix::from_gguf(g, "output.weight")?,
            None => embed.clone(),
        };
        if embed.cols != c.d_model || output.cols != c.d_model || output.rows != c.vocab {
            return Err(GgufError::BadTensor {
                name: "token_embd.weight / output.weight".into(),
                problem: format!(
                    "shapes do not match d_model {} and vocabulary {}",
                    c.d_model, c.vocab
                ),
            });
        }
        let fingerprint = config::fingerprint(g, &c);
        let output = Weight::new(output, device);
        Ok(Model {
            norm: RmsNorm::load(g, "output_norm.weight", c.rms_eps, device)?,
            config: c,
            embed,
            blocks,
            output,
            compute_device: device.clone(),
            fingerprint,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.compute_device
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Runs `tokens` at positions `start..` through all layers. `ctx(l)` gives layer l's shared context (maybe none;
    /// it is asked for just before layer l runs, so it may still be arriving); `own[l]` is the session's KV, which
    /// this call extends. Returns the logits of the last token, still on the device.
    pub(crate) fn forward<E>(
        &self,
        tokens: &[u32],
        start: usize,
        ctx: &mut dyn FnMut(usize) -> Result<LayerContext, E>,
        own: &mut [DeviceKv],
        p: Precision,
        mut energy: Option<&mut QueryEnergy>,
    ) -> Result<Logits, E> {
        let mut h = self.embed(tokens);
        let rope = self.rope(start, tokens.len());
        for (l, block) in self.blocks.iter().enumerate() {
            let energy = energy.as_deref_mut().map(|e| (l, e));
            let (ctx, blend) = ctx(l)?;
            let ctx = (ctx.as_ref(), blend.as_ref());
            h = self.block(block, h, &rope, ctx, &mut own[l], p, energy);
        }
        if let Some(e) = energy {
            e.end = e.end.max((start + tokens.len()) as u32);
        }
        let last = h.narrow(0, tokens.len() - 1, 1);
        Ok(Logits::Device(q_linear(
            self.norm.forward(last),
            &self.output,
            None,
            p,
        )))
    }

    fn embed(&self, tokens: &[u32]) -> Tensor<2> {
        let rows = self.embed.dequantize_rows(tokens);
        Tensor::from_data(
            TensorData::new(rows, [tokens.len(), self.config().d_model]),
            self.device(),
        )
    }

    fn rope(&self, start: usize, n: usize) -> Rope {
        Rope::new(self.config(), start, n, self.device())
    }

    fn block(
        &self,
        b: &Block,
        h: Tensor<2>,
        rope: &Rope,
        (ctx, blend): (Option<&DeviceKv>, Option<&Blend>),
        own: &mut DeviceKv,
        p: Precision,
        energy: Option<(usize, &mut QueryEnergy)>,
    ) -> Tensor<2> {
        let c = self.config();
        let t = h.dims()[0];
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let g = nh / nkv;

        let x = b.attn_norm.forward(h.clone());
        let q = b.q.forward(x.clone(), p).reshape([t, nh, hd]);
        if let Some((l, e)) = energy {
            e.add(l, q.clone());
        }
        let q = rope.apply(q);
        let k = rope.apply(b.k.forward(x.clone(), p).reshape([t, nkv, hd]));
        let v = b.v.forward(x, p).reshape([t, nkv, hd]);

        // Group query heads by their KV head: [nkv, g·t, hd], so GQA needs no repeated keys.
        let q = q
            .reshape([t, nkv, g, hd])
            .permute([1, 2, 0, 3])
            .reshape([nkv, g * t, hd]);
        let q = q.mul_scalar(1.0 / (hd as f64).sqrt());
        let (k, v) = (k.swap_dims(0, 1), v.swap_dims(0, 1));
        let mut att: Partial = if t == 1 {
            own.append(k, v);
            attention::attend(q.clone(), own.k(), own.v(), None)
        } else {
            // Several tokens attend to themselves causally and to the session's earlier tokens without a mask,
            // merged like any two segments: the mask stays t × t however long the session is.
            let fresh = attention::attend(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(self.causal_mask(g, t)),
            );
            let att = if own.is_empty() {
                fresh
            } else {
                attention::merge(attention::attend(q.clone(), own.k(), own.v(), None), fresh)
            };
            own.append(k, v);
            att
        };
        if let Some(ctx) = ctx.filter(|c| !c.is_empty()) {
            let mut part = attention::attend(q.clone(), ctx.k(), ctx.v(), None);
            if let Some(b) = blend.filter(|b| b.weight > 0.0) {
                let other = attention::attend(q, b.kv.k(), b.kv.v(), None);
                part = attention::blend(part, other, b.weight);
            }
            att = attention::merge(part, att);
        }
        let o = att
            .out
            .reshape([nkv, g, t, hd])
            .permute([2, 0, 1, 3])
            .reshape([t, nh * hd]);
        let h = h + b.o.forward(o, p);

        let x = b.ffn_norm.forward(h.clone());
        let ff = silu(b.gate.forward(x.clone(), p)) * b.up.forward(x, p);
        h + b.down.forward(ff, p)
    }

    /// Additive causal mask `[g·t, t]`: query row `j·t + i` sees keys `0..=i`.
    fn causal_mask(&self, g: usize, t: usize) -> Tensor<2> {
        let mut m = vec![0f32; g * t * t];
        for r in 0..g * t {
            m[r * t + r % t + 1..(r + 1) * t].fill(f32::NEG_INFINITY);
        }
        Tensor::from_data(TensorData::new(m, [g * t, t]), self.device())
    }
}
