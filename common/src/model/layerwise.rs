//! A context's KV computed a layer at a time — every token through layer 0, then through layer 1, … — so an edge
//! can compute the lowest layers of a shared context itself while the cloud streams the layers above (the cloud
//! decides the split from the link and the edge's speed). Each (layer, chunk) step is the very computation
//! [`Session::prefill`](super::Session::prefill) does chunk by chunk, so the KV is the same.

use burn::tensor::Tensor;

use super::session::{PREFILL_CHUNK, SessionError, check_tokens};
use super::{Model, Rope};
use crate::kv::{DeviceKv, LayerKv};
use crate::quant::Precision;

pub struct LayerwisePrefill<'m> {
    model: &'m Model,
    /// Per chunk of tokens: its hidden states after the layers done so far, and its rotary tables.
    chunks: Vec<(Tensor<2>, Rope)>,
    done: usize,
}

impl<'m> LayerwisePrefill<'m> {
    /// Starts `tokens` at positions `start..` (nothing runs yet).
    pub fn new(model: &'m Model, tokens: &[u32], start: usize) -> Result<Self, SessionError> {
        check_tokens(model.config(), tokens, start)?;
        let chunks = tokens
            .chunks(PREFILL_CHUNK)
            .enumerate()
            .map(|(i, c)| {
                (
                    model.embed(c),
                    model.rope(start + i * PREFILL_CHUNK, c.len()),
                )
            })
            .collect();
        Ok(LayerwisePrefill {
            model,
            chunks,
            done: 0,
        })
    }

    /// Layers computed so far.
    pub fn layers_done(&self) -> usize {
        self.done
    }

    /// Runs every token through the next layer and returns that layer's KV; `None` after the last layer.
    pub fn next_layer(&mut self) -> Option<LayerKv> {
        self.next_layer_on_device().map(|kv| kv.download())
    }

    /// [`next_layer`](Self::next_layer), leaving the KV on the device.
    pub fn next_layer_on_device(&mut self) -> Option<DeviceKv> {
        let m = self.model;
        let c = m.config();
        let block = m.blocks.get(self.done)?;
        let mut kv = DeviceKv::empty(c.n_kv_heads, c.head_dim, m.device());
        for (h, rope) in &mut self.chunks {
            *h = m.block(
                block,
                h.clone(),
                rope,
                (None, None),
                &mut kv,
                Precision::default(),
                None,
            );
        }
        self.done += 1;
        Some(kv)
    }
}
