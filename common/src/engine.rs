//! A loaded model with its tokenizer, and the generation loop every front end (CLI, cloud, edge) drives.

use std::time::Duration;

use burn::tensor::Device;

use crate::gguf::{Gguf, GgufError};
use crate::kv::KvState;
use crate::model::{Model, Session, SessionError};
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
        let mut s = self.session();
        s.prefill(tokens)?;
        Ok(s.export())
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
        mut logits: Vec<f32>,
        prompt_tokens: usize,
        t0: web_time::Instant,
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32, &str),
    ) -> Result<(Vec<u32>, GenerateStats), EngineError> {
        let mut sampler = Sampler::new(opts.sampling);
        let mut stream = TextStream::new(&self.tokenizer);
        let mut out = Vec::new();
        let mut stats = GenerateStats {
            prompt_tokens,
            ..Default::default()
        };
        let mut t_first = None;
        while out.len() < opts.max_tokens {
            let id = sampler.sample(&logits);
            if t_first.is_none() {
                stats.ttft = t0.elapsed();
                t_first = Some(web_time::Instant::now());
            }
            out.push(id);
            if opts.stop_at_eos && self.tokenizer.is_stop(id) {
                break;
            }
            on_token(id, &stream.push(id)?);
            let cancelled = opts
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed));
            if cancelled
                || out.len() == opts.max_tokens
                || session.len() + 1 > self.model.config().context_length
            {
                break;
            }
            logits = session.decode(id)?;
        }
        stats.generated_tokens = out.len();
        stats.decode_time = t_first.map(|t| t.elapsed()).unwrap_or_default();
        Ok((out, stats))
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
