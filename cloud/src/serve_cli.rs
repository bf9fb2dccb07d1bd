//! The `serve` command line, shared by `tandem serve` and `tandem-gateway serve`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

use crate::{ServeOptions, load_app, serve, server, upstream};

#[derive(Parser)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,
    /// A model to serve (repeatable; the first is the default): a registry name or a .gguf path (served under its
    /// file name without `.gguf`).
    #[arg(long = "model", default_values_t = ["smollm2".to_string()])]
    pub models: Vec<String>,
    /// Register this file as a shared context of the default model at start (repeatable); its id is printed.
    #[arg(long = "context-file")]
    pub context_files: Vec<PathBuf>,
    /// Require tokens signed by one of these keys (a file of `<key id> <secret in hex>` lines; `tandem auth
    /// new-key` makes one) on every call but /healthz and the static page.
    #[arg(long, env = "TANDEM_AUTH_KEYS")]
    pub auth_keys: Option<PathBuf>,
    /// Also (or only) accept this one static bearer token.
    #[arg(long, env = "TANDEM_TOKEN")]
    pub token: Option<String>,
    /// Serve HTTPS and WSS with this certificate chain (PEM; `tandem auth dev-cert` makes a self-signed one).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Streams (KV sessions, chat completions, context registrations) one client may hold open at once. A client
    /// is the name in its token, else its IP address (edges behind one NAT share it).
    #[arg(long, default_value_t = 64)]
    pub client_streams: usize,
    /// KV bytes per second one client may be sent, MiB/s, all its streams together (default: unlimited).
    #[arg(long)]
    pub client_mib_per_s: Option<f64>,
    /// Close a KV session whose edge sends nothing, or reads nothing, for this long (seconds).
    #[arg(long, default_value_t = 60.0)]
    pub idle_timeout_s: f64,
    /// Longest shared context accepted, tokens (default and most: half the model's context length).
    #[arg(long)]
    pub max_context_tokens: Option<usize>,
    /// Context KV kept in memory, MiB; the least recently used beyond it is spilled to --spill-dir.
    #[arg(long, default_value_t = 2048)]
    pub store_mib: usize,
    #[arg(long)]
    pub spill_dir: Option<PathBuf>,
    /// Share computed contexts with other replicas through Redis, e.g. redis://127.0.0.1:6379.
    #[arg(long, env = "TANDEM_REDIS")]
    pub redis: Option<String>,
    /// Serve these static files (the chat page) at /.
    #[arg(long)]
    pub static_dir: Option<PathBuf>,
    /// The least faithful KV codec the server picks by itself (lossless, f16, q8, pca8, q4, pca4, pca3, pca2, q2).
    #[arg(long, default_value = "q8")]
    pub quality_floor: tandem_common::codec::Codec,
    /// Pull contexts this server does not hold from this cloud and keep them: a KV cache for nearby edges.
    #[arg(long)]
    pub upstream: Option<String>,
    /// Serve the projected KV modes (split, fused) with this `tandem align` artifact (repeatable); its LLM and
    /// SLM must both be served (--model).
    #[arg(long = "alignment")]
    pub alignments: Vec<PathBuf>,
    /// Token of the upstream cloud.
    #[arg(long, env = "TANDEM_UPSTREAM_TOKEN")]
    pub upstream_token: Option<String>,
    /// Also trust this certificate (PEM) for an https:// upstream.
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
}

/// Runs a server until Ctrl-C: `tandem serve`, and `tandem-gateway serve` (named `what` in its messages).
pub fn run_server(args: ServeArgs, what: &str) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(ca) = &args.upstream_ca {
        crate::trust_ca_file(ca)?;
    }
    let app = load_app(&ServeOptions {
        models: args.models,
        auth: crate::auth::Auth::load(args.auth_keys.as_deref(), args.token)?,
        limits: crate::limits::Limits {
            streams_per_client: args.client_streams.max(1),
            client_bytes_per_s: args.client_mib_per_s.map(|m| (m * (1 << 20) as f64) as u64),
            idle: std::time::Duration::from_secs_f64(args.idle_timeout_s.max(0.1)),
            max_context_tokens: args.max_context_tokens,
        },
        tls: args.tls_cert.zip(args.tls_key),
        store_bytes: args.store_mib << 20,
        spill_dir: args.spill_dir,
        redis: args.redis,
        static_dir: args.static_dir.clone(),
        quality_floor: args.quality_floor,
        upstream: args.upstream.map(|url| upstream::Upstream {
            url,
            auth: args.upstream_token,
            timeout: std::time::Duration::from_secs(30),
        }),
        alignments: args.alignments,
    })?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        for f in &args.context_files {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let (ctx, _) = server::register_context(&app, None, &text).await?;
            println!(
                "context {} ({} tokens) from {}",
                ctx.record.id,
                ctx.record.kv.len(),
                f.display()
            );
        }
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("binding {}", args.addr))?;
        let addr = listener.local_addr()?;
        let scheme = if app.tls.is_some() { "https" } else { "http" };
        println!("{what} listening on {scheme}://{addr}");
        if args.static_dir.is_some() {
            println!("open {scheme}://{addr}/ in a browser");
        }
        serve(app, listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
        Ok(())
    })
}
