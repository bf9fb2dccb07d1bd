//! tandem's cloud: computes the KV of shared contexts once, keeps it, and streams it compressed to edges.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use tandem_cloud::{ServeOptions, load_app, serve};
//! let app = load_app(&ServeOptions { models: vec!["smollm2".into()], ..Default::default() })?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! serve(app, listener, std::future::pending()).await;
//! # Ok(()) }
//! ```

pub mod align;
pub mod auth;
pub mod auth_cli;
pub mod codec_report;
pub mod kv_steps;
pub mod kv_stream;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod openai;
pub mod projection;
pub mod redis_store;
pub mod serve_cli;
pub mod server;
pub mod store;
pub mod upstream;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tandem_common::codec::Codec;
use tandem_common::engine::{Engine, default_device};
use tandem_common::models;

pub use serve_cli::{ServeArgs, run_server};
pub use server::{App, Served, routes};

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Models to serve, by registry name or GGUF path; the first is the default.
    pub models: Vec<String>,
    /// Who may call; open to all when it has no keys.
    pub auth: auth::Auth,
    pub limits: limits::Limits,
    /// TLS certificate chain and private key (PEM files): serve HTTPS and WSS instead of plain HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Context KV kept in memory, bytes.
    pub store_bytes: usize,
    /// Where contexts evicted from memory go.
    pub spill_dir: Option<PathBuf>,
    /// Share computed contexts with other replicas through this Redis (`redis://host:port`).
    pub redis: Option<String>,
    pub static_dir: Option<PathBuf>,
    pub quality_floor: Codec,
    /// Pull contexts this server does not hold from another cloud (and keep them): a gateway for nearby edges.
    pub upstream: Option<upstream::Upstream>,
    /// Alignments (`tandem align` artifacts) to serve the projected KV modes with; both models of each must be
    /// among `models`.
    pub alignments: Vec<PathBuf>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            models: vec!["smollm2".into()],
            auth: Default::default(),
            limits: Default::default(),
            tls: None,
            store_bytes: 2 << 30,
            spill_dir: None,
            redis: None,
            static_dir: None,
            quality_floor: Codec::Q8,
            upstream: None,
            alignments: Vec::new(),
        }
    }
}

/// Trusts the certificates in a PEM file for this process's `wss://` connections (to an upstream or a cloud).
pub fn trust_ca_file(path: &std::path::Path) -> anyhow::Result<()> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    tandem_edge::tls::trust_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(())
}

/// What edges call a model given as `given`: a registry name as it is, a path by its file name without `.gguf`
/// (a name that fits in a URL segment, as the weights route needs).
fn served_name(given: &str, path: &std::path::Path) -> String {
    match models::lookup(given) {
        Ok(_) => given.to_string(),
        Err(_) => (path.file_stem())
            .map_or_else(|| given.to_string(), |s| s.to_string_lossy().into_owned()),
    }
}

/// Loads the models and builds the shared state.
pub fn load_app(o: &ServeOptions) -> anyhow::Result<Arc<App>> {
    anyhow::ensure!(!o.models.is_empty(), "no model to serve");
    let mut served = Vec::new();
    for given in &o.models {
        let path = models::resolve(given)?;
        let name = &served_name(given, &path);
        anyhow::ensure!(
            !served.iter().any(|m: &Served| &m.name == name),
            "two models would be served as {name:?}"
        );
        let engine = Engine::open(&path, &default_device())
            .with_context(|| format!("loading {}", path.display()))?;
        let step_scales = match kv_steps::StepProfile::load_for(&path, &engine)? {
            Some(p) => {
                tracing::info!(model = %name, "pca codecs use the calibrated steps in {}", kv_steps::path_for(&path).display());
                Some(p.scales)
            }
            None => {
                tracing::info!(model = %name, "pca codecs use uniform steps (`tandem calibrate --model {name}` measures per-layer ones)");
                None
            }
        };
        served.push(Served {
            name: name.clone(),
            path,
            engine: Arc::new(engine),
            step_scales,
        });
    }
    let local = store::LruStore::new(o.store_bytes, o.spill_dir.clone())
        .context("creating the context spill directory")?;
    let store: Arc<dyn store::ContextStore> = match &o.redis {
        Some(url) => Arc::new(redis_store::RedisStore::open(url, local)?),
        None => Arc::new(local),
    };
    let alignments = o
        .alignments
        .iter()
        .map(|p| projection::load(p, &served))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Arc::new(App {
        alignments,
        projection_lock: Default::default(),
        models: served,
        store,
        metrics: Default::default(),
        auth: o.auth.clone(),
        clients: limits::Clients::new(o.limits),
        tls: match &o.tls {
            Some((cert, key)) => Some(listen::tls_acceptor(cert, key)?),
            None => None,
        },
        quality_floor: o.quality_floor,
        static_dir: o.static_dir.clone(),
        upstream: o.upstream.clone(),
        upstream_lock: Default::default(),
    }))
}

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let tls = app.tls.clone();
    listen::serve(routes(app), listener, tls, shutdown).await;
}
