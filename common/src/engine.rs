//! A loaded model with its tokenizer, and the generation loop every front end (CLI, cloud, edge) drives.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use burn::tensor::Device;

use crate::gguf::{Gguf, GgufError};
use crate::kv::KvState;
use crate::model::{Logits, Model, QueryEnergy, Session, SessionError, has_quantized_kernels};
use crate::sample::{Sampler, SamplingParams};
use crate::tokenizer::{TextStream, Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// Model + tokenizer.
pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The last measured context-prefill speed, tokens per second through every layer, as f64 bits (0: none yet).
    prefill_rate: AtomicU64,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at the model's end-of-turn tokens (off for raw continuations that must run to `max_tokens`).
    pub stop_at_eos: bool,
    /// Set by another thread to stop after the current token (a client that went away).
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop_at_eos: true,
            cancel: None,
        }
    }
}

/// Timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Time to first token: prefill of the prompt and the first sampling.
    pub ttft: Duration,
    /// Time spent decoding after the first token.
    pub decode_time: Duration,
}

impl GenerateStats {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.ttft.as_secs_f64().max(1e-9)
    }

    /// Decode rate over the tokens after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

impl Engine {
    pub fn load(g: &Gguf, device: &Device) -> Result<Self, EngineError> {
        Ok(Engine {
            model: Model::load(g, device)?,
            tokenizer: Tokenizer::from_gguf(g)?,
            prefill_rate: AtomicU64::new(0),
        })
    }

    /// Loads a GGUF file from disk.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path, device: &Device) -> Result<Self, EngineError> {
        let engine = Self::load(&Gguf::open(path)?, device)?;
        release_freed_heap();
        Ok(engine)
    }

    pub fn session(&self) -> Session<'_> {
        Session::new(&self.model)
    }

    /// Prefills `tokens` in a fresh session and returns its KV (to share as context).
    pub fn prefill_kv(&self, tokens: &[u32]) -> Result<KvState, EngineError> {
        Ok(self.prefill_export(tokens, false)?.0)
    }

    /// [`prefill_kv`](Self::prefill_kv), also measuring how strongly the context's queries read each key channel
    /// pair (what the `pca` KV codecs weight their errors by).
    pub fn prefill_context(&self, tokens: &[u32]) -> Result<(KvState, QueryEnergy), EngineError> {
        let (kv, energy) = self.prefill_export(tokens, true)?;
        Ok((kv, energy.expect("recording was switched on")))
    }

    fn prefill_export(
        &self,
        tokens: &[u32],
        query_energy: bool,
    ) -> Result<(KvState, Option<QueryEnergy>), EngineError> {
        let t0 = web_time::Instant::now();
        let mut s = self.session();
        if query_energy {
            s.record_query_energy();
        }
        s.prefill(tokens)?;
        self.record_prefill(tokens.len(), t0.elapsed());
        Ok((s.export(), s.query_energy().cloned()))
    }

    /// This machine's speed at prefilling a context, tokens per second through every layer, as last measured (by
    /// [`prefill_kv`](Self::prefill_kv) or [`record_prefill`](Self::record_prefill)); `None` before any.
    pub fn prefill_tokens_per_s(&self) -> Option<f64> {
        Some(f64::from_bits(self.prefill_rate.load(Relaxed))).filter(|&r| r > 0.0)
    }

    /// Records that `tokens` went through every layer in `took` (runs under 64 tokens say little and are ignored,
    /// and so do a GPU's: its calls return before the work is done).
    pub fn record_prefill(&self, tokens: usize, took: Duration) {
        if tokens >= 64 && !took.is_zero() && has_quantized_kernels(self.model.device()) {
            let rate = tokens as f64 / took.as_secs_f64();
            self.prefill_rate.store(rate.to_bits(), Relaxed);
        }
    }

    /// Generates after `prompt` in `session`, calling `on_token(id, text)` for each token; returns the ids.
    pub fn generate(
        &self,
        session: &mut Session<'_>,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: impl FnMut(u32, &str),
    ) -> Result<(Vec<u32>, GenerateStats), EngineError> {
        let t0 = web_time::Instant::now();
        let logits = session.prefill(prompt)?;
        self.continue_generation(session, logits, prompt.len(), t0, opts, on_token)
    }

    /// Generates from `logits`, the output of a prefill of `prompt_tokens` tokens (done by the caller, e.g. against
    /// a streamed context) that started at `t0`.
    pub fn continue_generation(
        &self,
        session: &mut Session<'_>,
        logits: Vec<f32>,
        prompt_tokens: usize,
        t0: web_time::Instant,
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32, &str),
    ) -> Result<(Vec<u32>, GenerateStats), EngineError> {
        let mut g = Generation::new(self, session, logits, prompt_tokens, t0, opts.clone());
        while let Some((id, text)) = g.next_token()? {
            on_token(id, &text);
        }
        Ok(g.finish())
    }
}

/// A generation in progress, one token per [`next_token`](Generation::next_token) call: for front ends that pull
/// tokens (an iterator in JavaScript, a WIT resource) rather than take callbacks.
///
/// `S` is the session, owned or borrowed.
pub struct Generation<'e, S> {
    engine: &'e Engine,
    session: S,
    /// Logits for the next token; `None` once the generation is over.
    logits: Option<Logits>,
    sampler: Sampler,
    text: TextStream<'e>,
    opts: GenerateOptions,
    ids: Vec<u32>,
    stats: GenerateStats,
    t0: web_time::Instant,
    first_token_at: Option<web_time::Instant>,
}

impl<'e, 's, S: std::borrow::BorrowMut<Session<'s>>> Generation<'e, S> {
    /// Starts from `logits`, the output of a prefill of `prompt_tokens` tokens that started at `t0`.
    pub fn new(
        engine: &'e Engine,
        session: S,
        logits: impl Into<Logits>,
        prompt_tokens: usize,
        t0: web_time::Instant,
        opts: GenerateOptions,
    ) -> Self {
        Generation {
            engine,
            session,
            logits: Some(logits.into()),
            sampler: Sampler::new(opts.sampling),
            text: TextStream::new(&engine.tokenizer),
            opts,
            ids: Vec::new(),
            stats: GenerateStats {
                prompt_tokens,
                ..Default::default()
            },
            t0,
            first_token_at: None,
        }
    }

    /// The next token and the text it completes, or `None` when the generation is over (end of turn, `max_tokens`,
    /// the context window full, or cancelled).
    pub fn next_token(&mut self) -> Result<Option<(u32, String)>, EngineError> {
        match self.logits.take() {
            Some(logits) => self.step(logits.read()?),
            None => Ok(None),
        }
    }

    /// [`next_token`](Self::next_token) for a thread that must not block on the device (a browser's): awaits the
    /// logits.
    pub async fn next_token_async(&mut self) -> Result<Option<(u32, String)>, EngineError> {
        match self.logits.take() {
            Some(logits) => self.step(logits.read_async().await?),
            None => Ok(None),
        }
    }

    /// Samples from `logits`, and starts computing the next token's unless the generation ends here.
    fn step(&mut self, logits: Vec<f32>) -> Result<Option<(u32, String)>, EngineError> {
        // Cancelled between two calls (by the consumer of the last token, or another thread).
        if self.ids.len() >= self.opts.max_tokens || self.cancelled() {
            return Ok(None);
        }
        let id = self.sampler.sample(&logits);
        if self.first_token_at.is_none() {
            self.stats.ttft = self.t0.elapsed();
            self.first_token_at = Some(web_time::Instant::now());
        }
        self.ids.push(id);
        if self.opts.stop_at_eos && self.engine.tokenizer.is_stop(id) {
            self.update_stats();
            return Ok(None);
        }
        let text = self.text.push(id)?;
        let cancelled = self.cancelled();
        let session = self.session.borrow_mut();
        let full = session.len() + 1 > self.engine.model.config().context_length;
        if !(cancelled || self.ids.len() == self.opts.max_tokens || full) {
            self.logits = Some(session.advance(&[id])?);
        }
        self.update_stats();
        Ok(Some((id, text)))
    }

    fn cancelled(&self) -> bool {
        let flag = self.opts.cancel.as_ref();
        flag.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn update_stats(&mut self) {
        self.stats.generated_tokens = self.ids.len();
        self.stats.decode_time = self.first_token_at.map(|t| t.elapsed()).unwrap_or_default();
    }

    /// Statistics so far.
    pub fn stats(&self) -> &GenerateStats {
        &self.stats
    }

    /// The session, with every generated token but the last in it.
    pub fn session(&self) -> &S {
        &self.session
    }

    /// The generated ids and the statistics.
    pub fn finish(self) -> (Vec<u32>, GenerateStats) {
        (self.ids, self.stats)
    }
}

/// The device tandem computes on by default: the CPU backend.
pub fn default_device() -> Device {
    Device::flex()
}

/// Hands the heap pages freed after loading (the parsed GGUF metadata, several MB for a 50k-token vocabulary) back
/// to the OS; glibc otherwise keeps them resident.
#[cfg(not(target_arch = "wasm32"))]
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
