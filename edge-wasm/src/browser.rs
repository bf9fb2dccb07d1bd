//! The edge runtime for browsers (`wasm32-unknown-unknown`, wasm-bindgen): the engine the npm package runs in a
//! Web Worker. The worker's JavaScript owns the network: it downloads the weights, and gives the engine a blocking
//! KV link (`globalThis.tandemKv`) over a SharedArrayBuffer that a second worker fills from the WebSocket, so the
//! context's layers arrive while this worker computes. The model runs on the wasm CPU path, or on WebGPU (burn's
//! wgpu backend) where the build has it and the worker asks for it. Everything else is the same code as native.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::Device;
use serde::Deserialize;
use tandem_common::codec::Codec;
use tandem_common::engine::{Engine, GenerateOptions, default_device};
use tandem_common::gguf::Gguf;
use tandem_common::models;
use tandem_common::sample::SamplingParams;
use tandem_common::tokenizer::Message;
use wasm_bindgen::prelude::*;
use web_time::Instant;

use crate::chat::{CloudContext, ContextSource, Turn, start_turn};
use crate::incoming::{IncomingKv, MessageLink, fetch_over, millis};
use crate::protocol::{FetchError, FetchRequest};

#[wasm_bindgen(js_namespace = tandemKv)]
extern "C" {
    /// Opens a WebSocket to `url` and waits for it to connect; gives the link's handle.
    #[wasm_bindgen(catch, js_name = open)]
    fn kv_open(url: &str, timeout_ms: u32) -> Result<u32, JsValue>;
    #[wasm_bindgen(catch, js_name = send)]
    fn kv_send(link: u32, message: &[u8]) -> Result<(), JsValue>;
    /// The next binary message, waiting at most `timeout_ms`.
    #[wasm_bindgen(catch, js_name = receive)]
    fn kv_receive(link: u32, timeout_ms: u32) -> Result<Vec<u8>, JsValue>;
    #[wasm_bindgen(js_name = close)]
    fn kv_close(link: u32);
}

/// The pinned file of `model` as JSON `{file, size, sha256}`: what a download must match.
#[wasm_bindgen]
pub fn expected_weights(model: &str) -> Result<String, JsError> {
    let m = models::lookup(model).map_err(|e| JsError::new(&e.to_string()))?;
    Ok(serde_json::json!({ "file": m.file, "size": m.size, "sha256": m.sha256 }).to_string())
}

/// A loaded model. It lives as long as the worker (chats borrow it).
#[wasm_bindgen]
pub struct BrowserEngine {
    engine: &'static Engine,
    model: String,
}

#[wasm_bindgen]
impl BrowserEngine {
    /// Checks `weights` against the pinned size and sha256 of `model` and loads them for the wasm CPU path.
    pub fn load(model: String, weights: Vec<u8>) -> Result<BrowserEngine, JsError> {
        Self::load_on(model, weights, &default_device())
    }

    /// [`load`](Self::load) onto the browser's WebGPU device (the build with the `webgpu` feature): the weights
    /// are dequantized once into GPU memory. Fails with the reason when WebGPU gives no device.
    #[cfg(feature = "webgpu")]
    pub async fn load_webgpu(model: String, weights: Vec<u8>) -> Result<BrowserEngine, JsError> {
        use burn::tensor::wgpu::WgpuBackend;
        let device = Device::wgpu_options()
            .graphics_api(WgpuBackend::WebGpu)
            .init_async()
            .await
            .map_err(|e| JsError::new(&format!("WebGPU gave no device: {e}")))?;
        Self::load_on(model, weights, &device)
    }

    fn load_on(model: String, weights: Vec<u8>, device: &Device) -> Result<BrowserEngine, JsError> {
        models::check_weights(&model, &weights).map_err(|e| JsError::new(&e.to_string()))?;
        let gguf = Gguf::parse(Arc::new(weights)).map_err(|e| JsError::new(&e.to_string()))?;
        let engine = Engine::load(&gguf, device).map_err(|e| JsError::new(&e.to_string()))?;
        Ok(BrowserEngine {
            engine: Box::leak(Box::new(engine)),
            model,
        })
    }

    /// The model's name, weights fingerprint and shape, as JSON.
    pub fn info(&self) -> String {
        let c = self.engine.model.config();
        serde_json::json!({
            "model": self.model,
            "weights": self.engine.model.fingerprint(),
            "layers": c.n_layers,
            "context_length": c.context_length,
        })
        .to_string()
    }

    /// Starts a chat turn. `request` is JSON: `{ messages: [{role, content}], context?: { cloud?: {url, model?,
    /// context, codec?, bandwidth_bps?, auth?, timeout_ms?}, text? }, max_tokens?, temperature?, top_p?, seed? }`.
    /// The context's KV is fetched and the prompt prefilled before this returns.
    pub fn chat(&self, request: &str) -> Result<BrowserChat, JsError> {
        let req: ChatRequest = serde_json::from_str(request)
            .map_err(|e| JsError::new(&format!("bad chat request: {e}")))?;
        let context = ContextSource {
            cloud: req
                .context
                .cloud
                .map(|c| c.into_cloud(&self.model))
                .transpose()
                .map_err(|e| JsError::new(&e))?,
            text: req.context.text,
        };
        let opts = GenerateOptions {
            max_tokens: req.max_tokens,
            sampling: SamplingParams {
                temperature: req.temperature,
                top_p: req.top_p,
                seed: req.seed,
            },
            ..Default::default()
        };
        let turn = start_turn(
            self.engine,
            &context,
            &req.messages,
            &opts,
            &connect_via_worker,
        )
        .map_err(|e| JsError::new(&e.to_string()))?;
        Ok(BrowserChat(Rc::new(RefCell::new(turn))))
    }
}

/// A turn generating: pull its text piece by piece.
#[wasm_bindgen]
pub struct BrowserChat(Rc<RefCell<Turn<'static>>>);

#[wasm_bindgen]
impl BrowserChat {
    /// A promise of the next piece of the answer, or of `undefined` when it is complete. On WebGPU it resolves when
    /// the GPU has computed the token; one piece at a time.
    pub fn next(&self) -> js_sys::Promise {
        let turn = self.0.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut turn = turn.try_borrow_mut().map_err(|_| {
                JsError::new("the previous piece of this answer is still being computed")
            })?;
            let next = turn
                .next_token_async()
                .await
                .map_err(|e| JsError::new(&e.to_string()))?;
            Ok(next.map_or(JsValue::UNDEFINED, |(_, text)| JsValue::from(text)))
        })
    }

    /// What the turn did so far, as JSON (see `TurnStats::summary`).
    pub fn stats(&self) -> Result<String, JsError> {
        let turn = self
            .0
            .try_borrow()
            .map_err(|_| JsError::new("the answer's next piece is still being computed"))?;
        Ok(serde_json::to_string(&turn.stats().summary()).expect("stats serialise"))
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(default)]
    context: ContextRequest,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default)]
    temperature: f32,
    #[serde(default = "one")]
    top_p: f32,
    #[serde(default)]
    seed: u64,
}

fn default_max_tokens() -> usize {
    GenerateOptions::default().max_tokens
}

fn one() -> f32 {
    1.0
}

#[derive(Deserialize, Default)]
struct ContextRequest {
    cloud: Option<CloudRequest>,
    text: Option<String>,
}

#[derive(Deserialize)]
struct CloudRequest {
    url: String,
    /// The model's name on the cloud; the engine's own by default.
    model: Option<String>,
    context: String,
    codec: Option<String>,
    /// `exact` (default), `split:K` or `fused`.
    kv_mode: Option<String>,
    bandwidth_bps: Option<u64>,
    auth: Option<String>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    30_000
}

impl CloudRequest {
    fn into_cloud(self, engine_model: &str) -> Result<CloudContext, String> {
        let codec = self.codec.map(|name| name.parse::<Codec>()).transpose()?;
        let mode = self
            .kv_mode
            .map(|m| m.parse())
            .transpose()?
            .unwrap_or_default();
        Ok(CloudContext {
            cloud_url: self.url,
            model: self.model.unwrap_or_else(|| engine_model.to_string()),
            context: self.context,
            codec,
            mode,
            bandwidth_bps: self.bandwidth_bps,
            auth: self.auth,
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }
}

/// The KV of a turn's context, over the worker's link.
fn connect_via_worker(req: FetchRequest, started: Instant) -> Result<IncomingKv, FetchError> {
    let url = req.cloud.kv_url();
    let link = kv_open(&url, millis(req.cloud.timeout)).map_err(|e| FetchError::Unreachable {
        url,
        reason: js_error(e),
    })?;
    fetch_over(WorkerLink(link), req, started)
}

struct WorkerLink(u32);

impl MessageLink for WorkerLink {
    fn send(&mut self, message: Vec<u8>) -> Result<(), String> {
        kv_send(self.0, &message).map_err(js_error)
    }

    fn receive(&mut self, timeout: Duration) -> Result<Vec<u8>, String> {
        kv_receive(self.0, millis(timeout)).map_err(js_error)
    }
}

impl Drop for WorkerLink {
    fn drop(&mut self) {
        kv_close(self.0);
    }
}

/// A thrown JavaScript value as text (an `Error`'s message, or the value itself).
fn js_error(e: JsValue) -> String {
    if let Some(s) = e.as_string() {
        return s;
    }
    js_sys::Reflect::get(&e, &JsValue::from_str("message"))
        .ok()
        .and_then(|m| m.as_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

/// Kernel threads for the threaded build (atomics, shared memory): the worker starts them as Web Workers.
#[cfg(target_feature = "atomics")]
mod threads {
    use tandem_common::parallel;
    use wasm_bindgen::prelude::*;

    #[wasm_bindgen(js_namespace = tandemThreads)]
    extern "C" {
        /// Starts a Web Worker that instantiates `module` on `memory` and calls [`run_kernel_thread`]`(work)`.
        #[wasm_bindgen(js_name = spawn)]
        fn js_spawn(module: JsValue, memory: JsValue, work: usize);
    }

    /// Starts the kernel threads, `n` in all with the calling one; gives how many there are.
    #[wasm_bindgen]
    pub fn start_kernel_threads(n: usize) -> usize {
        parallel::set_host_threads(n, |f| {
            let work = Box::into_raw(Box::new(f)) as usize;
            js_spawn(wasm_bindgen::module(), wasm_bindgen::memory(), work)
        });
        parallel::threads()
    }

    /// A kernel thread's body, called by its worker with what [`start_kernel_threads`] handed it; never returns.
    #[wasm_bindgen]
    pub fn run_kernel_thread(work: usize) {
        // SAFETY: `work` is the pointer `start_kernel_threads` leaked for this one thread.
        let f = unsafe { Box::from_raw(work as *mut Box<dyn FnOnce() + Send>) };
        f()
    }
}
