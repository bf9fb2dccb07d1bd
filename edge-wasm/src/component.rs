//! The edge runtime as a WebAssembly component (`wasm32-wasip2`) for wasmtime hosts: the `edge` world of
//! `wit/tandem.wit`. The host owns the network (weights and KV links); everything else is the same code as native.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tandem_common::codec::Codec;
use tandem_common::engine::{Engine, GenerateOptions, default_device};
use tandem_common::gguf::Gguf;
use tandem_common::models;
use tandem_common::sample::SamplingParams;
use tandem_common::tokenizer::Message;
use web_time::Instant;

use crate::chat::{CloudContext, ContextSource, Turn, start_turn};
use crate::incoming::{IncomingKv, MessageLink, fetch_over, millis};
use crate::protocol::{FetchError, FetchRequest};

wit_bindgen::generate!({ path: "../wit", world: "edge" });

use exports::tandem::edge::runtime as wit;
use tandem::edge::network;

struct Runtime;

export!(Runtime);

impl wit::Guest for Runtime {
    type Engine = EngineHandle;
    type ChatStream = ChatStream;
}

thread_local! {
    /// Models loaded so far, by name. An engine lives as long as the component instance (turns borrow it), so a
    /// model is loaded once and reused by every `load` of the same name.
    static LOADED: RefCell<HashMap<String, &'static Engine>> = RefCell::new(HashMap::new());
}

pub struct EngineHandle(&'static Engine);

impl wit::GuestEngine for EngineHandle {
    fn load(model: String) -> Result<wit::Engine, String> {
        if let Some(e) = LOADED.with(|l| l.borrow().get(&model).copied()) {
            return Ok(wit::Engine::new(EngineHandle(e)));
        }
        let bytes = network::fetch_weights(&model)
            .map_err(|e| format!("fetching the weights of {model}: {e}"))?;
        models::check_weights(&model, &bytes).map_err(|e| e.to_string())?;
        let gguf = Gguf::parse(Arc::new(bytes)).map_err(|e| e.to_string())?;
        let engine = Engine::load(&gguf, &default_device()).map_err(|e| e.to_string())?;
        let engine: &'static Engine = Box::leak(Box::new(engine));
        LOADED.with(|l| l.borrow_mut().insert(model, engine));
        Ok(wit::Engine::new(EngineHandle(engine)))
    }

    fn chat(
        &self,
        messages: Vec<wit::Message>,
        context: wit::ContextSource,
        options: wit::GenerateOptions,
    ) -> Result<wit::ChatStream, String> {
        let messages: Vec<Message> = messages
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect();
        let context = ContextSource {
            cloud: context.cloud.map(cloud_context).transpose()?,
            text: context.text,
        };
        let opts = GenerateOptions {
            max_tokens: options.max_tokens as usize,
            sampling: SamplingParams {
                temperature: options.temperature,
                top_p: options.top_p,
                seed: options.seed,
            },
            ..Default::default()
        };
        let turn = start_turn(self.0, &context, &messages, &opts, &connect_via_host)
            .map_err(|e| e.to_string())?;
        Ok(wit::ChatStream::new(ChatStream(RefCell::new(turn))))
    }
}

fn cloud_context(c: wit::CloudContext) -> Result<CloudContext, String> {
    let codec = c.codec.map(|name| name.parse::<Codec>()).transpose()?;
    let mode = c
        .kv_mode
        .map(|m| m.parse())
        .transpose()?
        .unwrap_or_default();
    Ok(CloudContext {
        cloud_url: c.url,
        model: c.model,
        context: c.context,
        codec,
        mode,
        bandwidth_bps: c.bandwidth_bps,
        auth: c.auth,
        timeout: Duration::from_millis(c.timeout_ms as u64),
    })
}

/// The KV of a turn's context, over a link the host opens.
fn connect_via_host(req: FetchRequest, started: Instant) -> Result<IncomingKv, FetchError> {
    let url = req.cloud.kv_url();
    let link = network::KvLink::connect(&url, millis(req.cloud.timeout))
        .map_err(|reason| FetchError::Unreachable { url, reason })?;
    fetch_over(HostLink(link), req, started)
}

struct HostLink(network::KvLink);

impl MessageLink for HostLink {
    fn send(&mut self, message: Vec<u8>) -> Result<(), String> {
        self.0.send(&message)
    }

    fn receive(&mut self, timeout: Duration) -> Result<Vec<u8>, String> {
        self.0.receive(millis(timeout))
    }
}

pub struct ChatStream(RefCell<Turn<'static>>);

impl wit::GuestChatStream for ChatStream {
    fn next(&self) -> Result<Option<String>, String> {
        let next = self.0.borrow_mut().next_token();
        next.map(|t| t.map(|(_, text)| text))
            .map_err(|e| e.to_string())
    }

    fn stats(&self) -> wit::TurnStats {
        let s = self.0.borrow().stats().summary();
        wit::TurnStats {
            kv_source: s.kv_source.into(),
            fallback_reason: s.fallback_reason,
            codec: s.codec,
            kv_mode: s.kv_mode,
            alignment: s.alignment,
            context_tokens: s.context_tokens,
            prompt_tokens: s.prompt_tokens,
            generated_tokens: s.generated_tokens,
            kv_bytes: s.kv_bytes,
            ttft_ms: s.ttft_ms,
            decode_tokens_per_second: s.decode_tokens_per_second,
        }
    }
}
