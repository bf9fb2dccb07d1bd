//! `tandem-gateway`: the edge runtime component under wasmtime on an IoT gateway, and a KV cache for nearby edges.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use tandem_gateway::host::{
    CloudContext, ContextSource, GenerateOptions, Message, Runtime, Weights,
};

#[derive(Parser)]
#[command(
    name = "tandem-gateway",
    version,
    about = "tandem's gateway: the edge runtime under wasmtime, and a KV cache for nearby edges"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chat through the edge component: the context's KV streams from a cloud (or this gateway's cache).
    Chat(ChatArgs),
    /// Serve nearby edges the cloud's KV protocol, pulling each context from `--upstream` once and keeping it.
    Serve(Box<tandem_cloud::ServeArgs>),
    /// Run a WASI command component (`wasi:cli/run`), e.g. a test binary built for wasm32-wasip2: this is the
    /// cargo runner of `just test-wasm`.
    Run {
        component: PathBuf,
        /// Arguments passed to it.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Parser)]
struct ChatArgs {
    /// The edge component (`just component` builds it).
    #[arg(long, env = "TANDEM_COMPONENT")]
    component: Option<PathBuf>,
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// A GGUF file to hand the component instead of the model cache's (its hash is still checked).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// The cloud (or gateway) holding the context, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    cloud: Option<String>,
    /// The context's id there.
    #[arg(long)]
    context: Option<String>,
    /// The context's text, for a local fallback.
    #[arg(long)]
    context_file: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Whose reading of the context: exact, split:K or fused (see `tandem chat --help`).
    #[arg(long)]
    kv_mode: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Seconds to wait for the cloud before falling back.
    #[arg(long, default_value_t = 10)]
    timeout: u32,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Chat(args) => chat(args),
        Command::Serve(args) => {
            if args.upstream.is_none() {
                bail!("a gateway needs --upstream: the cloud it caches contexts from");
            }
            tandem_cloud::run_server(*args, "tandem gateway")
        }
        Command::Run { component, args } => {
            let name = component.display().to_string();
            let argv: Vec<String> = std::iter::once(name).chain(args).collect();
            if !tandem_gateway::host::run_command(&component, &argv)? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn chat(args: ChatArgs) -> Result<()> {
    let component = match args.component {
        Some(c) => c,
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| PathBuf::from("target"), PathBuf::from);
            tandem_gateway::default_component(&target)
        }
    };
    let cloud = match (args.cloud, args.context) {
        (Some(url), Some(context)) => Some(CloudContext {
            url,
            model: args.model.clone(),
            context,
            codec: None,
            kv_mode: args.kv_mode,
            bandwidth_bps: None,
            auth: None,
            timeout_ms: args.timeout * 1000,
        }),
        (None, None) => None,
        _ => bail!("--cloud and --context go together"),
    };
    let text = args.context_file.map(std::fs::read_to_string).transpose()?;
    let weights = args.weights.map_or(Weights::Cache, Weights::File);
    let mut edge = Runtime::load(&component)?.instance(&args.model, weights)?;
    let stats = edge.chat(
        &[Message {
            role: "user".into(),
            content: args.prompt,
        }],
        &ContextSource { cloud, text },
        GenerateOptions {
            max_tokens: args.max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        },
        |piece| {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        },
    )?;
    println!();
    eprintln!(
        "[context: {} tokens from {}{}{} · {} KV bytes · TTFT {:.0} ms · {:.1} tok/s]",
        stats.context_tokens,
        stats.kv_source,
        stats
            .codec
            .map(|c| format!(
                " ({}{c})",
                stats.kv_mode.map(|m| m + ", ").unwrap_or_default()
            ))
            .unwrap_or_default(),
        stats
            .fallback_reason
            .map(|r| format!(": {r}"))
            .unwrap_or_default(),
        stats.kv_bytes,
        stats.ttft_ms,
        stats.decode_tokens_per_second
    );
    Ok(())
}
