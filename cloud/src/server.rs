//! The cloud server's HTTP routes: contexts, health, metrics, weights and static files. The WebSocket KV stream is
//! in [`crate::kv_stream`], the OpenAI-style endpoint in [`crate::openai`].

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tandem_common::codec::{Codec, RopeParams, StepScales};
use tandem_common::engine::Engine;
use tandem_common::wire::MAX_FRAME_BYTES;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

use crate::kv_stream::Unchecked;
use crate::metrics::Metrics;
use crate::store::{ContextRecord, ContextStore, StoredContext, context_id};

/// Largest request body accepted (a context document, or a chat).
pub const MAX_BODY_BYTES: u64 = 8 << 20;

/// A model the server serves.
pub struct Served {
    /// Name as given on the command line (`smollm2`, a path, …).
    pub name: String,
    pub path: PathBuf,
    pub engine: Arc<Engine>,
    /// Its calibrated `pca` step scales ([`crate::kv_steps`]), when it has them.
    pub step_scales: Option<StepScales>,
}

/// Everything the handlers share.
pub struct App {
    pub models: Vec<Served>,
    pub store: Arc<dyn ContextStore>,
    pub metrics: Metrics,
    /// Who may call (every route but `/healthz` and the static page, when keys are set).
    pub auth: crate::auth::Auth,
    /// Per-client stream and byte-rate limits.
    pub clients: crate::limits::Clients,
    /// Serve over TLS with this, when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The lowest-quality codec the cloud picks on its own.
    pub quality_floor: Codec,
    pub static_dir: Option<PathBuf>,
    /// The cloud this server pulls contexts it does not hold from (a gateway's), when any.
    pub upstream: Option<crate::upstream::Upstream>,
    /// Serialises pulls from upstream (see [`App::context_or_pull`]).
    pub upstream_lock: tokio::sync::Mutex<()>,
    /// Alignments for the projected KV modes, and the lock that makes each projection once.
    pub alignments: Vec<crate::projection::Aligned>,
    pub projection_lock: tokio::sync::Mutex<()>,
}

impl App {
    /// The served model called `name`, or the first one when `name` is absent.
    pub fn model(&self, name: Option<&str>) -> Result<&Served, HttpError> {
        match name {
            None => self.models.first(),
            Some(n) => self.models.iter().find(|m| m.name == n),
        }
        .ok_or_else(|| {
            let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
            error(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "model {name:?} is not served here (serving: {})",
                    names.join(", ")
                ),
            )
        })
    }

    /// Looks a context up, counting hits and misses.
    pub async fn context(&self, id: &str) -> Option<Arc<StoredContext>> {
        let found = self.stored(id).await;
        let counter = if found.is_some() {
            &self.metrics.store_hits
        } else {
            &self.metrics.store_misses
        };
        counter.fetch_add(1, Relaxed);
        found
    }

    /// The store's copy of context `id`, read off the async threads (it may come from disk or Redis).
    pub async fn stored(&self, id: &str) -> Option<Arc<StoredContext>> {
        let (store, id) = (self.store.clone(), id.to_string());
        tokio::task::spawn_blocking(move || store.get(&id))
            .await
            .ok()
            .flatten()
    }

    /// Keeps `ctx` in the store (off the async threads: it may go to disk or Redis).
    pub async fn keep(&self, ctx: Arc<StoredContext>) {
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.put(ctx)).await;
    }
}

/// An HTTP error, answered as OpenAI-style JSON: `{"error": {"message", "type"}}`.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl HttpError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "message": self.message, "type": self.kind } });
        warp::reply::with_status(warp::reply::json(&body), self.status).into_response()
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.kind, self.message)
    }
}

impl std::error::Error for HttpError {}

pub fn error(status: StatusCode, kind: &'static str, message: impl Into<String>) -> HttpError {
    HttpError {
        status,
        kind,
        message: message.into(),
    }
}

/// Answers a handler's result, an error included.
pub fn respond(r: Result<Response, HttpError>) -> Result<Response, Infallible> {
    Ok(r.unwrap_or_else(HttpError::into_response))
}

/// Parses a JSON body, naming what is wrong when it does not fit.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        let where_ = if at == "." {
            String::new()
        } else {
            format!(" at {at}")
        };
        HttpError::bad_request(format!("request body{where_}: {}", e.inner()))
    })
}

#[derive(Deserialize)]
struct NewContext {
    model: Option<String>,
    text: String,
}

/// What `GET /v1/contexts/{id}` and `POST /v1/contexts` answer.
#[derive(Serialize, Deserialize, Debug)]
pub struct ContextInfo {
    pub id: String,
    pub model: String,
    pub status: String,
    pub tokens: usize,
    pub layers: usize,
    pub prefill_ms: u64,
    /// The text's first line, shortened: for pickers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Bytes on the wire per codec (only in `GET /v1/contexts/{id}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sizes: Vec<(Codec, usize)>,
}

fn info(c: &StoredContext, sizes: Vec<(Codec, usize)>) -> ContextInfo {
    ContextInfo {
        id: c.record.id.clone(),
        model: c.record.model.clone(),
        status: "ready".into(),
        tokens: c.record.kv.len(),
        layers: c.record.kv.layers.len(),
        prefill_ms: c.record.prefill_ms,
        title: c.record.text.as_deref().map(title),
        sizes,
    }
}

/// The first non-empty line of `text`, at most 80 characters.
fn title(text: &str) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut t: String = line.chars().take(80).collect();
    if t.len() < line.len() {
        t.push('…');
    }
    t
}

/// Registers a shared context of `model` (the default when `None`): tokenizes and prefills it once, stores it, and
/// returns it with whether it was new. Registering the same text again finds the stored one.
pub async fn register_context(
    app: &Arc<App>,
    model: Option<&str>,
    text: &str,
) -> Result<(Arc<StoredContext>, bool), HttpError> {
    let served = app.model(model)?;
    let engine = served.engine.clone();
    let id = context_id(engine.model.fingerprint(), text);
    if let Some(c) = app.context(&id).await {
        return Ok((c, false));
    }
    let tokens = engine
        .tokenizer
        .context_tokens(text)
        .map_err(|e| HttpError::bad_request(e.to_string()))?;
    // Room is left for the conversation after the context.
    let half = engine.model.config().context_length / 2;
    let limit = app
        .clients
        .limits()
        .max_context_tokens
        .map_or(half, |m| m.min(half));
    if tokens.len() > limit {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "context_too_long",
            format!(
                "context is {} tokens; this server accepts at most {limit} for {} (half its context length is {half})",
                tokens.len(),
                served.name
            ),
        ));
    }
    let t0 = Instant::now();
    let n = tokens.len();
    let (kv, energy) = tokio::task::spawn_blocking(move || engine.prefill_context(&tokens))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| HttpError::bad_request(e.to_string()))?;
    let prefill_ms = t0.elapsed().as_millis() as u64;
    let m = &app.metrics;
    m.contexts_prefilled.fetch_add(1, Relaxed);
    m.prefill_tokens.fetch_add(n as u64, Relaxed);
    m.prefill_ms.fetch_add(prefill_ms, Relaxed);
    let ctx = Arc::new(StoredContext::new(ContextRecord {
        id,
        model: served.name.clone(),
        rope: RopeParams::of(served.engine.model.config()),
        kv,
        prefill_ms,
        text: Some(text.to_string()),
        query_energy: Some(energy),
        step_scales: served.step_scales.clone(),
    }));
    app.keep(ctx.clone()).await;
    tracing::info!(id = %ctx.record.id, tokens = n, prefill_ms, "context registered");
    Ok((ctx, true))
}

async fn register(
    app: Arc<App>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Response, Infallible> {
    respond(
        async {
            let _slot = admit(&app, &caller)?;
            let req: NewContext = parse_json(&body)?;
            let (ctx, new) = register_context(&app, req.model.as_deref(), &req.text).await?;
            let status = if new {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(
                warp::reply::with_status(warp::reply::json(&info(&ctx, Vec::new())), status)
                    .into_response(),
            )
        }
        .await,
    )
}

async fn context_status(app: Arc<App>, id: String) -> Result<Response, Infallible> {
    let Some(c) = app.context(&id).await else {
        return respond(Err(error(
            StatusCode::NOT_FOUND,
            "context_not_found",
            format!("no context {id:?}"),
        )));
    };
    let sizes = tokio::task::spawn_blocking(move || {
        let sizes = Codec::ALL.iter().map(|&k| (k, c.encoded_size(k))).collect();
        info(&c, sizes)
    })
    .await;
    Ok(match sizes {
        Ok(i) => warp::reply::json(&i).into_response(),
        Err(e) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()).into_response()
        }
    })
}

fn with_app(app: Arc<App>) -> impl Filter<Extract = (Arc<App>,), Error = Infallible> + Clone {
    warp::any().map(move || app.clone())
}

/// Who made a request: the client named in its signed token, else its IP address. What the limits count.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
}

/// A refused token, answered 401.
#[derive(Debug)]
struct Unauthorized(crate::auth::Denied);
impl warp::reject::Reject for Unauthorized {}

/// A request's bearer token and address, not yet checked.
fn unchecked() -> impl Filter<Extract = (Unchecked,), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(warp::ext::optional::<crate::listen::Peer>())
        .map(
            |header: Option<String>, peer: Option<crate::listen::Peer>| Unchecked {
                token: header.map(|h| h.strip_prefix("Bearer ").unwrap_or(&h).trim().to_string()),
                ip: peer.map_or_else(|| "unknown".to_string(), |p| p.0.ip().to_string()),
            },
        )
}

/// The caller, once its token (if the server asks for one) checks out.
fn caller(app: Arc<App>) -> impl Filter<Extract = (Caller,), Error = warp::Rejection> + Clone {
    unchecked().and_then(move |u: Unchecked| {
        let app = app.clone();
        async move {
            match app.auth.check(u.token.as_deref(), crate::auth::now()) {
                Ok(name) => Ok(Caller {
                    name: name.unwrap_or(u.ip),
                }),
                Err(d) => {
                    app.metrics.unauthorized.fetch_add(1, Relaxed);
                    Err(warp::reject::custom(Unauthorized(d)))
                }
            }
        }
    })
}

/// A stream slot for `caller`, or 429.
pub fn admit(app: &App, caller: &Caller) -> Result<crate::limits::Slot, HttpError> {
    app.clients.admit(&caller.name).map_err(|busy| {
        app.metrics.busy.fetch_add(1, Relaxed);
        error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            busy.to_string(),
        )
    })
}

/// Every route of the server.
pub fn routes(app: Arc<App>) -> BoxedFilter<(Response,)> {
    let count = {
        let app = app.clone();
        warp::any()
            .map(move || {
                app.metrics.http_requests.fetch_add(1, Relaxed);
            })
            .untuple_one()
    };
    let health = warp::path!("healthz")
        .and(warp::get())
        .map(|| "ok".into_response());
    let who = caller(app.clone());
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(who.clone())
        .and(with_app(app.clone()))
        .map(|_: Caller, app: Arc<App>| {
            warp::reply::with_header(
                app.metrics.render(),
                "content-type",
                "text/plain; version=0.0.4",
            )
            .into_response()
        });
    let body = warp::body::content_length_limit(MAX_BODY_BYTES).and(warp::body::bytes());
    let new_context = warp::path!("v1" / "contexts")
        .and(warp::post())
        .and(with_app(app.clone()))
        .and(who.clone())
        .and(body)
        .and_then(register);
    let list_contexts = warp::path!("v1" / "contexts")
        .and(warp::get())
        .and(who.clone())
        .and(with_app(app.clone()))
        .map(|_: Caller, app: Arc<App>| {
            let ids: Vec<String> = app
                .store
                .ids()
                .into_iter()
                .filter(|id| !crate::projection::is_projected(id))
                .collect();
            warp::reply::json(&serde_json::json!({ "data": ids })).into_response()
        });
    let get_context = warp::path!("v1" / "contexts" / String)
        .and(warp::get())
        .and(who.clone())
        .and(with_app(app.clone()))
        .and_then(|id, _: Caller, app| context_status(app, id));
    let context_text = warp::path!("v1" / "contexts" / String / "text")
        .and(warp::get())
        .and(who.clone())
        .and(with_app(app.clone()))
        .and_then(|id: String, _: Caller, app: Arc<App>| async move {
            Ok::<_, Infallible>(
                match app.context(&id).await.map(|c| c.record.text.clone()) {
                    Some(Some(text)) => {
                        warp::reply::with_header(text, "content-type", "text/plain; charset=utf-8")
                            .into_response()
                    }
                    Some(None) => error(
                        StatusCode::NOT_FOUND,
                        "context_text_unknown",
                        format!("context {id:?} came from an upstream cloud without its text"),
                    )
                    .into_response(),
                    None => error(
                        StatusCode::NOT_FOUND,
                        "context_not_found",
                        format!("no context {id:?}"),
                    )
                    .into_response(),
                },
            )
        });
    // Browsers cannot set headers on a WebSocket: the token may come in `Hello` instead, checked there.
    let kv = warp::path!("v1" / "kv")
        .and(warp::ws())
        .and(with_app(app.clone()))
        .and(unchecked())
        .map(|ws: warp::ws::Ws, app: Arc<App>, caller: Unchecked| {
            ws.max_message_size(MAX_FRAME_BYTES)
                .max_frame_size(MAX_FRAME_BYTES)
                .on_upgrade(move |socket| crate::kv_stream::serve(app, socket, caller))
                .into_response()
        });
    let models = warp::path!("v1" / "models")
        .and(warp::get())
        .and(who.clone())
        .and(with_app(app.clone()))
        .map(|_: Caller, app: Arc<App>| {
            let data: Vec<_> = app
                .models
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "id": m.name, "object": "model", "owned_by": "tandem",
                        "weights": m.engine.model.fingerprint(),
                        "file": m.path.file_name().map(|f| f.to_string_lossy().into_owned()),
                    })
                })
                .collect();
            warp::reply::json(&serde_json::json!({ "object": "list", "data": data }))
                .into_response()
        });
    let completions = warp::path!("v1" / "chat" / "completions")
        .and(warp::post())
        .and(with_app(app.clone()))
        .and(who.clone())
        .and(warp::body::content_length_limit(MAX_BODY_BYTES).and(warp::body::bytes()))
        .and_then(crate::openai::completions);

    // The GGUF files of the served models, for edges to download (Range requests supported).
    let mut weights = warp::any()
        .and_then(|| async { Err::<Response, _>(warp::reject::not_found()) })
        .boxed();
    for m in &app.models {
        let file = warp::path("weights")
            .and(warp::path(m.name.clone()))
            .and(warp::path::end())
            .and(who.clone())
            .and(warp::fs::file(m.path.clone()))
            .map(|_: Caller, f: warp::fs::File| f.into_response());
        weights = file.or(weights).unify().boxed();
    }
    let statics = match &app.static_dir {
        // Revalidated on every load, so a rebuilt page is never mixed with a stale cached module.
        Some(dir) => warp::fs::dir(dir.clone())
            .map(|f: warp::fs::File| {
                warp::reply::with_header(f, "cache-control", "no-cache").into_response()
            })
            .boxed(),
        None => warp::any()
            .and_then(|| async { Err::<Response, _>(warp::reject::not_found()) })
            .boxed(),
    };

    count
        .and(
            health
                .or(metrics)
                .unify()
                .or(new_context)
                .unify()
                .or(list_contexts)
                .unify()
                .or(get_context)
                .unify()
                .or(context_text)
                .unify()
                .or(kv)
                .unify()
                .or(models)
                .unify()
                .or(completions)
                .unify()
                .or(weights)
                .unify()
                .or(statics)
                .unify(),
        )
        .recover(recover)
        .unify()
        .map(with_isolation_headers)
        .boxed()
}

/// Makes pages served from here cross-origin isolated: the browser edge streams KV into its worker through a
/// SharedArrayBuffer, which only such pages have. Other origins' isolated pages may still fetch the weights.
fn with_isolation_headers(mut r: Response) -> Response {
    use warp::http::header::HeaderValue;
    let h = r.headers_mut();
    for (name, value) in [
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-embedder-policy", "require-corp"),
        ("cross-origin-resource-policy", "cross-origin"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}

/// Rejections as JSON errors that say what was wrong.
async fn recover(r: warp::Rejection) -> Result<Response, Infallible> {
    if let Some(Unauthorized(denied)) = r.find::<Unauthorized>() {
        let kind = match denied {
            crate::auth::Denied::Expired { .. } => "token_expired",
            _ => "unauthorized",
        };
        let mut response =
            error(StatusCode::UNAUTHORIZED, kind, denied.to_string()).into_response();
        response.headers_mut().insert(
            "www-authenticate",
            warp::http::HeaderValue::from_static("Bearer realm=\"tandem\""),
        );
        return Ok(response);
    }
    respond(Err(if r.is_not_found() {
        error(StatusCode::NOT_FOUND, "not_found", "no such route")
    } else if let Some(e) = r.find::<warp::reject::PayloadTooLarge>() {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("{e} (limit {MAX_BODY_BYTES} bytes)"),
        )
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        )
    } else {
        HttpError::bad_request(format!("{r:?}"))
    }))
}
