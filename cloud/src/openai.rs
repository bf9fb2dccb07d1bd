//! `POST /v1/chat/completions`: OpenAI-compatible, cloud-only generation (streaming by server-sent events or one JSON
//! answer). It is the baseline a user would otherwise pick, and the path for clients without an edge runtime.
//! One extension: `"context": ID` puts a registered context's KV before the messages, with no prefill.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use serde::Deserialize;
use tandem_common::engine::GenerateOptions;
use tandem_common::sample::SamplingParams;
use tandem_common::tokenizer::Message;
use tokio::sync::mpsc;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

use crate::server::{App, Caller, HttpError, admit, error, parse_json, respond};

/// Longest answer one request may ask for.
const MAX_TOKENS_LIMIT: usize = 4096;

#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    /// tandem extension: a registered context id.
    context: Option<String>,
    /// Generate `max_tokens` tokens whatever the model says (llama.cpp server's extension; for benchmarks).
    #[serde(default)]
    ignore_eos: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    /// Send one more chunk before `[DONE]` with the request's token counts (`usage`), as OpenAI does.
    #[serde(default)]
    include_usage: bool,
}

enum Event {
    Text(String),
    End {
        finish: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

pub async fn completions(
    app: Arc<App>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Response, Infallible> {
    respond(run(app, &caller, &body).await)
}

async fn run(app: Arc<App>, caller: &Caller, body: &[u8]) -> Result<Response, HttpError> {
    let bad = HttpError::bad_request;
    // Held until generation ends, even when the client leaves first.
    let slot = admit(&app, caller)?;
    let req: ChatRequest = parse_json(body)?;
    let served = app.model(req.model.as_deref())?;
    if req.messages.is_empty() {
        return Err(bad("messages must not be empty".into()));
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(256);
    if max_tokens == 0 || max_tokens > MAX_TOKENS_LIMIT {
        return Err(bad(format!(
            "max_tokens must be in 1..={MAX_TOKENS_LIMIT}, got {max_tokens}"
        )));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    let top_p = req.top_p.unwrap_or(1.0);
    if !((0.0..=2.0).contains(&temperature) && top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(format!(
            "temperature must be in [0, 2] and top_p in (0, 1]; got {temperature} and {top_p}"
        )));
    }
    let ctx = match &req.context {
        None => None,
        Some(id) => {
            let c = app.context(id).await.ok_or_else(|| {
                error(
                    StatusCode::NOT_FOUND,
                    "context_not_found",
                    format!("no context {id:?}"),
                )
            })?;
            if c.record.model != served.name {
                return Err(bad(format!(
                    "context {id} belongs to model {}, not {}",
                    c.record.model, served.name
                )));
            }
            Some(c)
        }
    };
    let engine = served.engine.clone();
    let model_name = served.name.clone();
    // Set when the client is gone (its receiver dropped): generation stops instead of running to max_tokens.
    let cancel = Arc::new(AtomicBool::new(false));
    let opts = GenerateOptions {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            seed: req.seed.unwrap_or(0),
        },
        stop_at_eos: !req.ignore_eos,
        cancel: Some(cancel.clone()),
    };
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    let messages = req.messages;
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let result = (|| -> Result<(usize, usize, bool), String> {
            let mut session = engine.session();
            if let Some(c) = &ctx {
                session
                    .attach_context(&c.record.kv)
                    .map_err(|e| e.to_string())?;
            }
            let prompt = engine
                .tokenizer
                .chat_tokens(&messages, ctx.is_some())
                .map_err(|e| e.to_string())?;
            let (ids, stats) = engine
                .generate(&mut session, &prompt, &opts, |_, text| {
                    if !text.is_empty() && tx.blocking_send(Event::Text(text.to_string())).is_err()
                    {
                        cancel.store(true, Relaxed);
                    }
                })
                .map_err(|e| e.to_string())?;
            let stopped = ids.last().is_some_and(|&t| engine.tokenizer.is_stop(t));
            Ok((stats.prompt_tokens, stats.generated_tokens, stopped))
        })();
        let _ = tx.blocking_send(match result {
            Ok((prompt_tokens, completion_tokens, stopped)) => Event::End {
                finish: if stopped { "stop" } else { "length" },
                prompt_tokens,
                completion_tokens,
            },
            Err(e) => Event::Failed(e),
        });
    });
    app.metrics.completions.fetch_add(1, Relaxed);

    let id = format!("chatcmpl-{:x}", rand_id());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if !req.stream {
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Failed(e) => return Err(bad(e)),
                Event::End {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    app.metrics
                        .completion_tokens
                        .fetch_add(completion_tokens as u64, Relaxed);
                    return Ok(warp::reply::json(&serde_json::json!({
                        "id": id, "object": "chat.completion", "created": created, "model": model_name,
                        "choices": [{ "index": 0, "message": { "role": "assistant", "content": text },
                                      "finish_reason": finish }],
                        "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens },
                    }))
                    .into_response());
                }
            }
        }
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "generation ended early",
        ));
    }

    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let chunk = move |choices: serde_json::Value| {
        serde_json::json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model_name,
            "choices": choices,
        })
    };
    let delta = |delta: serde_json::Value, finish: Option<&str>| serde_json::json!([{ "index": 0, "delta": delta, "finish_reason": finish }]);
    let first = chunk(delta(
        serde_json::json!({ "role": "assistant", "content": "" }),
        None,
    ))
    .to_string();
    let metrics_app = app.clone();
    // The state: the receiver, chunks ready to send, and whether the generation has ended.
    let events = futures_util::stream::unfold(
        (rx, VecDeque::from([first]), false),
        move |(mut rx, mut pending, done)| {
            let chunk = chunk.clone();
            let app = metrics_app.clone();
            async move {
                if let Some(p) = pending.pop_front() {
                    return Some((p, (rx, pending, done)));
                }
                if done {
                    return None;
                }
                let data = match rx.recv().await? {
                    Event::Text(t) => {
                        chunk(delta(serde_json::json!({ "content": t }), None)).to_string()
                    }
                    Event::End {
                        finish,
                        prompt_tokens,
                        completion_tokens,
                    } => {
                        app.metrics
                            .completion_tokens
                            .fetch_add(completion_tokens as u64, Relaxed);
                        if include_usage {
                            let mut usage = chunk(serde_json::json!([]));
                            usage["usage"] = serde_json::json!({ "prompt_tokens": prompt_tokens,
                                "completion_tokens": completion_tokens,
                                "total_tokens": prompt_tokens + completion_tokens });
                            pending.push_back(usage.to_string());
                        }
                        pending.push_back("[DONE]".into());
                        let last = chunk(delta(serde_json::json!({}), Some(finish))).to_string();
                        return Some((last, (rx, pending, true)));
                    }
                    Event::Failed(e) => {
                        serde_json::json!({ "error": { "message": e, "type": "generation_error" } })
                            .to_string()
                    }
                };
                Some((data, (rx, pending, false)))
            }
        },
    )
    .map(|data| Ok::<_, Infallible>(warp::sse::Event::default().data(data)));
    Ok(warp::sse::reply(warp::sse::keep_alive().stream(events)).into_response())
}

/// A request id: not a secret, only unique enough to tell responses apart.
fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
