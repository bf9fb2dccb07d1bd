//! A generation session: the session's own KV, an optional shared-context KV segment, prefill and decode.

use super::{Logits, Model, QueryEnergy};
use crate::kv::{Blend, DeviceKv, KvError, KvState, LayerContext, LayerKv};
use crate::quant::Precision;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SessionError {
    #[error(
        "prompt of {tokens} tokens plus {used} already in the session exceeds the model's context length of {limit}"
    )]
    TooLong {
        tokens: usize,
        used: usize,
        limit: usize,
    },
    #[error("nothing to run: the token list is empty")]
    Empty,
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("a shared context can only be attached before the session has tokens of its own")]
    ContextAfterTokens,
    #[error("the session already has a shared context")]
    HasContext,
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("shared context stream failed at layer {layer}: {reason}")]
    Stream { layer: usize, reason: String },
    #[error("reading the logits from the device failed: {0}")]
    Device(String),
}

/// One context layer as a streamed prefill receives it: the context's KV, and optionally a second reading of the
/// same tokens with its gate (see [`Session::attach_gated`]).
pub struct ContextLayer {
    pub kv: LayerKvAt,
    pub gated: Option<(LayerKv, f32)>,
}

/// A context layer's KV as it comes: received (on the host), or computed here (already on the device, so a GPU
/// never has to read it back).
pub enum LayerKvAt {
    Host(LayerKv),
    Device(DeviceKv),
}

impl From<LayerKv> for ContextLayer {
    fn from(kv: LayerKv) -> Self {
        ContextLayer {
            kv: LayerKvAt::Host(kv),
            gated: None,
        }
    }
}

impl From<DeviceKv> for ContextLayer {
    fn from(kv: DeviceKv) -> Self {
        ContextLayer {
            kv: LayerKvAt::Device(kv),
            gated: None,
        }
    }
}

/// Tokens run through the model at once by a prefill; longer inputs go in chunks of this size.
pub const PREFILL_CHUNK: usize = 128;

/// State of one conversation with a model.
pub struct Session<'m> {
    model: &'m Model,
    /// Shared-context KV per layer (imported), and its token count.
    ctx: Vec<Option<DeviceKv>>,
    ctx_tokens: Vec<u32>,
    ctx_positions: Vec<u32>,
    /// Per layer, a second reading of the context's tokens with its gate ([`attach_gated`](Self::attach_gated)).
    gated: Vec<Option<Blend>>,
    /// The session's own KV per layer, and its tokens.
    own: Vec<DeviceKv>,
    own_tokens: Vec<u32>,
    precision: Precision,
    /// Query energies of what this session runs, once asked for ([`record_query_energy`](Self::record_query_energy)).
    energy: Option<QueryEnergy>,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model) -> Self {
        let c = model.config();
        Session {
            model,
            ctx: vec![None; c.n_layers],
            ctx_tokens: Vec::new(),
            ctx_positions: Vec::new(),
            gated: vec![None; c.n_layers],
            own: vec![DeviceKv::empty(c.n_kv_heads, c.head_dim, model.device()); c.n_layers],
            own_tokens: Vec::new(),
            precision: Precision::default(),
            energy: None,
        }
    }

    /// Chooses the mat-mul precision for this session's computations (default: 8-bit activations).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// Tokens in the session: shared context plus own.
    pub fn len(&self) -> usize {
        self.ctx_tokens.len() + self.own_tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses KV that cannot be this session's shared context: once the session has tokens of its own, or of
    /// other weights or shape, or inconsistent.
    fn check_context(&self, kv: &KvState) -> Result<(), SessionError> {
        if !self.own_tokens.is_empty() {
            return Err(SessionError::ContextAfterTokens);
        }
        let c = self.model.config();
        if kv.model != self.model.fingerprint() {
            return Err(KvError::WrongModel {
                found: kv.model.clone(),
                expected: self.model.fingerprint().to_string(),
            }
            .into());
        }
        if kv.kv_heads != c.n_kv_heads
            || kv.head_dim != c.head_dim
            || kv.first_layer + kv.layers.len() > c.n_layers
        {
            return Err(KvError::WrongShape {
                found: format!(
                    "{} layers from {}, {} heads × {}",
                    kv.layers.len(),
                    kv.first_layer,
                    kv.kv_heads,
                    kv.head_dim
                ),
                expected: format!(
                    "{} layers, {} heads × {}",
                    c.n_layers, c.n_kv_heads, c.head_dim
                ),
            }
            .into());
        }
        kv.validate()?;
        Ok(())
    }

    /// Imports a shared-context KV (all layers, or the first of a layer-by-layer stream). Its tokens become positions
    /// `0..n` of this session.
    pub fn attach_context(&mut self, kv: &KvState) -> Result<(), SessionError> {
        self.check_context(kv)?;
        let c = self.model.config();
        if kv.len() + 1 > c.context_length {
            return Err(SessionError::TooLong {
                tokens: kv.len(),
                used: 0,
                limit: c.context_length,
            });
        }
        if !self.ctx_tokens.is_empty()
            && (self.ctx_tokens != kv.tokens || self.ctx_positions != kv.positions)
        {
            return Err(KvError::Corrupt(
                "layers of one context must cover the same tokens".into(),
            )
            .into());
        }
        for (i, l) in kv.layers.iter().enumerate() {
            self.ctx[kv.first_layer + i] = Some(DeviceKv::upload(
                l,
                kv.kv_heads,
                kv.len(),
                kv.head_dim,
                self.model.device(),
            ));
        }
        self.ctx_tokens = kv.tokens.clone();
        self.ctx_positions = kv.positions.clone();
        Ok(())
    }

    /// Adds, next to the attached context, a second reading of the same tokens: `kv` (another model's KV of the
    /// context, projected into this model's space), whose attention in layer l is blended with the context's own
    /// with weight `gates[l]` in [0, 1] (CE-LSLM's fused mode; 0 leaves a layer's out).
    pub fn attach_gated(&mut self, kv: &KvState, gates: &[f32]) -> Result<(), SessionError> {
        self.check_context(kv)?;
        let layers = self.model.config().n_layers;
        if gates.len() != layers || !gates.iter().copied().all(usable_gate) {
            return Err(KvError::WrongShape {
                found: format!("{} gates {gates:?}", gates.len()),
                expected: format!("a gate in [0, 1] for each of {layers} layers"),
            }
            .into());
        }
        if kv.tokens != self.ctx_tokens || kv.positions != self.ctx_positions {
            return Err(KvError::Corrupt(
                "a gated reading must cover the attached context's tokens".into(),
            )
            .into());
        }
        for (i, l) in kv.layers.iter().enumerate() {
            let at = kv.first_layer + i;
            self.gated[at] = Some(self.gated_segment(l, gates[at]));
        }
        Ok(())
    }

    fn gated_segment(&self, l: &LayerKv, gate: f32) -> Blend {
        let c = self.model.config();
        let kv = DeviceKv::upload(
            l,
            c.n_kv_heads,
            self.ctx_tokens.len(),
            c.head_dim,
            self.model.device(),
        );
        Blend { kv, weight: gate }
    }

    /// From now on, measures how strongly this session's queries read each key channel pair (for the KV codec).
    pub fn record_query_energy(&mut self) {
        let c = self.model.config();
        self.energy = Some(QueryEnergy::new(c.n_layers, c.n_kv_heads, c.head_dim));
    }

    /// What [`record_query_energy`](Self::record_query_energy) measured.
    pub fn query_energy(&self) -> Option<&QueryEnergy> {
        self.energy.as_ref()
    }

    /// Runs `tokens` through the model, extending the session; returns the next-token logits.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SessionError> {
        self.advance(tokens)?.read()
    }

    /// [`prefill`](Self::prefill), leaving the logits on the device until the caller reads them.
    pub fn advance(&mut self, tokens: &[u32]) -> Result<Logits, SessionError> {
        let (ctx, gated) = (&self.ctx, &self.gated);
        run(
            self.model,
            (&mut self.own[..], &mut self.own_tokens),
            self.energy.as_mut(),
            self.precision,
            tokens,
            self.ctx_tokens.len(),
            &mut |l| Ok(layer_context(&ctx[l], &gated[l])),
        )
    }

    /// Prefills `tokens` after a shared context whose layers are still arriving: `header` describes the context
    /// (as [`attach_context`](Self::attach_context) would check it), and `next_layer(l)` is called just before
    /// layer l runs, for layers not attached yet, and may block until that layer is there. So loading layer l+1
    /// overlaps computing layer l. On an error the session is left as it was before the call.
    pub fn prefill_streamed(
        &mut self,
        header: &KvState,
        tokens: &[u32],
        next_layer: &mut dyn FnMut(usize) -> Result<ContextLayer, String>,
    ) -> Result<Logits, SessionError> {
        let before = (
            self.ctx.clone(),
            self.ctx_tokens.clone(),
            self.ctx_positions.clone(),
            self.gated.clone(),
        );
        self.attach_context(&KvState {
            layers: Vec::new(),
            ..header.clone()
        })?;
        let (model, n) = (self.model, header.len());
        let c = model.config();
        let (ctx, gated) = (&mut self.ctx, &mut self.gated);
        let own = (&mut self.own[..], &mut self.own_tokens);
        let result = run(
            model,
            own,
            self.energy.as_mut(),
            self.precision,
            tokens,
            n,
            &mut |l| {
                if ctx[l].is_none() {
                    let layer = next_layer(l)
                        .map_err(|reason| SessionError::Stream { layer: l, reason })?;
                    let want = c.n_kv_heads * n * c.head_dim;
                    let upload = |kv: &LayerKv| {
                        if kv.k.len() != want || kv.v.len() != want {
                            return Err(SessionError::Stream {
                                layer: l,
                                reason: format!(
                                    "layer holds {} values, the context needs {want}",
                                    kv.k.len()
                                ),
                            });
                        }
                        Ok(DeviceKv::upload(
                            kv,
                            c.n_kv_heads,
                            n,
                            c.head_dim,
                            model.device(),
                        ))
                    };
                    ctx[l] = Some(match layer.kv {
                        LayerKvAt::Host(kv) => upload(&kv)?,
                        LayerKvAt::Device(kv) if kv.len() == n => kv,
                        LayerKvAt::Device(kv) => {
                            return Err(SessionError::Stream {
                                layer: l,
                                reason: format!(
                                    "layer holds {} tokens, the context has {n}",
                                    kv.len()
                                ),
                            });
                        }
                    });
                    if let Some((kv, gate)) = &layer.gated {
                        gated[l] = Some(Blend {
                            kv: upload(kv)?,
                            weight: *gate,
                        });
                    }
                }
                Ok(layer_context(&ctx[l], &gated[l]))
            },
        );
        if result.is_err() {
            (self.ctx, self.ctx_tokens, self.ctx_positions, self.gated) = before;
        }
        result
    }

    /// One decoding step.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, SessionError> {
        self.prefill(&[token])
    }

    /// Makes the tokens run so far this session's shared context, as if their KV had been exported and attached
    /// ([`attach_context`](Self::attach_context)), without it leaving the device: a context prefilled here.
    pub fn own_as_context(&mut self) -> Result<(), SessionError> {
        if !self.ctx_tokens.is_empty() {
            return Err(SessionError::HasContext);
        }
        for (ctx, own) in self.ctx.iter_mut().zip(&mut self.own) {
            *ctx = Some(own.clone());
            own.truncate(0);
        }
        self.ctx_tokens = std::mem::take(&mut self.own_tokens);
        self.ctx_positions = (0..self.ctx_tokens.len() as u32).collect();
        Ok(())
    }

    /// The KV of everything in the session (context then own tokens), all layers; a gated reading is not part of it.
    pub fn export(&self) -> KvState {
        let c = self.model.config();
        let n = self.len();
        let layers = (0..c.n_layers)
            .map(|l| {
                let own = self.own[l].download();
                match &self.ctx[l] {
                    None => own,
                    Some(ctx) => {
                        let ctx = ctx.download();
                        let (a, b, d) = (self.ctx_tokens.len(), self.own_tokens.len(), c.head_dim);
                        let join = |x: &[f32], y: &[f32]| {
                            let mut out = Vec::with_capacity(c.n_kv_heads * n * d);
                            for h in 0..c.n_kv_heads {
                                out.extend_from_slice(&x[h * a * d..(h + 1) * a * d]);
                                out.extend_from_slice(&y[h * b * d..(h + 1) * b * d]);
                            }
                            out
                        };
                        LayerKv {
                            k: join(&ctx.k, &own.k),
                            v: join(&ctx.v, &own.v),
                        }
                    }
                }
            })
            .collect();
        let mut positions = self.ctx_positions.clone();
        positions.extend((self.ctx_tokens.len()..n).map(|p| p as u32));
        KvState {
            model: self.model.fingerprint().to_string(),
            first_layer: 0,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            tokens: self
                .ctx_tokens
                .iter()
                .chain(&self.own_tokens)
                .copied()
                .collect(),
            positions,
            layers,
        }
    }
}

/// A gate attention can use: a weight in [0, 1].
pub fn usable_gate(g: f32) -> bool {
    (0.0..=1.0).contains(&g)
}

fn layer_context(ctx: &Option<DeviceKv>, gated: &Option<Blend>) -> LayerContext {
    (ctx.clone(), gated.clone())
}

/// Refuses an empty token list, ids outside the vocabulary, and `tokens` that would not fit after `used` others.
pub(super) fn check_tokens(
    c: &super::ModelConfig,
    tokens: &[u32],
    used: usize,
) -> Result<(), SessionError> {
    if tokens.is_empty() {
        return Err(SessionError::Empty);
    }
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
        return Err(SessionError::BadToken { id, vocab: c.vocab });
    }
    if used + tokens.len() > c.context_length {
        return Err(SessionError::TooLong {
            tokens: tokens.len(),
            used,
            limit: c.context_length,
        });
    }
    Ok(())
}

/// Checks `tokens`, runs them after `ctx_len` context tokens and the session's own, and keeps their KV; on an
/// error from `ctx`, drops whatever KV the run had appended.
fn run(
    model: &Model,
    (own, own_tokens): (&mut [DeviceKv], &mut Vec<u32>),
    mut energy: Option<&mut QueryEnergy>,
    precision: Precision,
    tokens: &[u32],
    ctx_len: usize,
    ctx: &mut dyn FnMut(usize) -> Result<LayerContext, SessionError>,
) -> Result<Logits, SessionError> {
    check_tokens(model.config(), tokens, ctx_len + own_tokens.len())?;
    let own_before = own_tokens.len();
    let mut logits = Logits::Host(Vec::new());
    // Long inputs run in chunks: attention scores and masks grow with chunk × keys, not tokens × keys.
    for chunk in tokens.chunks(PREFILL_CHUNK) {
        let at = ctx_len + own_tokens.len();
        match model.forward(chunk, at, ctx, own, precision, energy.as_deref_mut()) {
            Ok(l) => {
                own_tokens.extend_from_slice(chunk);
                logits = l;
            }
            Err(e) => {
                own_tokens.truncate(own_before);
                for kv in own.iter_mut() {
                    kv.truncate(own_before);
                }
                return Err(e);
            }
        }
    }
    Ok(logits)
}
