//! Running the edge runtime component under wasmtime: the host side of `wit/tandem.wit`'s `edge` world.
//!
//! The host owns the network: weights come from this machine's model cache (or a file given), KV links are
//! WebSockets a background thread keeps reading while the component computes, so loading overlaps compute.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceAny, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "edge",
    with: { "tandem:edge/network.kv-link": KvLink },
    imports: { default: trappable },
});

use exports::tandem::edge::runtime as wit;
pub use wit::{CloudContext, ContextSource, GenerateOptions, Message, TurnStats};

/// Where the host finds a model's weights.
#[derive(Debug, Clone, Default)]
pub enum Weights {
    /// The model cache (`just models`), by registry name.
    #[default]
    Cache,
    /// This file, whatever model is asked for (a host's own copy; the component checks its hash).
    File(PathBuf),
}

/// The host's state in a store.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    weights: Weights,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A compiled edge component, ready to instantiate.
pub struct Runtime {
    engine: Engine,
    component: Component,
    linker: Linker<HostState>,
}

impl Runtime {
    /// Compiles the component at `path` (the compiled code is cached beside it, `*.cwasm`, keyed by its hash).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        // For `perf`: a map from the compiled code's addresses to the component's function names.
        if std::env::var_os("TANDEM_WASM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let component = compile_cached(&engine, path)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Edge::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
        Ok(Runtime {
            engine,
            component,
            linker,
        })
    }

    /// A fresh instance of the component with the model `model` loaded.
    pub fn instance(&self, model: &str, weights: Weights) -> anyhow::Result<EdgeInstance> {
        let state = HostState {
            wasi: WasiCtx::builder().inherit_stderr().build(),
            table: ResourceTable::new(),
            weights,
        };
        let mut store = Store::new(&self.engine, state);
        let edge = Edge::instantiate(&mut store, &self.component, &self.linker)?;
        let engine = edge
            .tandem_edge_runtime()
            .engine()
            .call_load(&mut store, model)?
            .map_err(anyhow::Error::msg)?;
        Ok(EdgeInstance {
            store,
            edge,
            engine,
        })
    }
}

/// Runs a WASI command component (`wasi:cli/run`, e.g. a `cargo test` binary built for `wasm32-wasip2`) with
/// `args` and this process's stdio, environment and current directory; returns whether it succeeded.
pub fn run_command(path: &Path, args: &[String]) -> anyhow::Result<bool> {
    let engine = Engine::new(&Config::new())?;
    let component = compile_cached(&engine, path)?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    let mut wasi = WasiCtx::builder();
    wasi.inherit_stdio().inherit_env().args(args);
    wasi.preopened_dir(".", ".", wasmtime_wasi::FsPerms::ReadWrite)?;
    let state = HostState {
        wasi: wasi.build(),
        table: ResourceTable::new(),
        weights: Weights::Cache,
    };
    let mut store = Store::new(&engine, state);
    let command =
        wasmtime_wasi::p2::bindings::sync::Command::instantiate(&mut store, &component, &linker)?;
    Ok(command.wasi_cli_run().call_run(&mut store)?.is_ok())
}

/// A running component with a model loaded.
pub struct EdgeInstance {
    store: Store<HostState>,
    edge: Edge,
    engine: ResourceAny,
}

impl EdgeInstance {
    /// One chat turn: calls `on_text` with each piece of the answer as the component generates it.
    pub fn chat(
        &mut self,
        messages: &[Message],
        context: &ContextSource,
        options: GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> anyhow::Result<TurnStats> {
        let rt = self.edge.tandem_edge_runtime();
        let stream = rt
            .engine()
            .call_chat(&mut self.store, self.engine, messages, context, options)?
            .map_err(anyhow::Error::msg)?;
        let pieces = rt.chat_stream();
        let result = (|| -> anyhow::Result<TurnStats> {
            while let Some(text) = pieces
                .call_next(&mut self.store, stream)?
                .map_err(anyhow::Error::msg)?
            {
                on_text(&text);
            }
            Ok(pieces.call_stats(&mut self.store, stream)?)
        })();
        stream.resource_drop(&mut self.store)?;
        result
    }
}

/// Compiles `path`, reusing the machine code cached beside it when it was made from the same bytes by this
/// wasmtime build (compiling a model runtime takes cranelift tens of seconds).
fn compile_cached(engine: &Engine, path: &Path) -> anyhow::Result<Component> {
    let wasm = std::fs::read(path)
        .with_context(|| format!("reading the edge component {}", path.display()))?;
    let digest = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        wasm.hash(&mut h);
        h.finish()
    };
    let cached = path.with_extension(format!("{digest:016x}.cwasm"));
    if cached.exists() {
        // SAFETY: the file was written by `precompile_component` below for these very bytes; wasmtime checks that
        // it was compiled by a compatible engine and refuses it otherwise.
        if let Ok(c) = unsafe { Component::deserialize_file(engine, &cached) } {
            return Ok(c);
        }
    }
    let compiled = engine
        .precompile_component(&wasm)
        .map_err(|e| anyhow::Error::from(e).context(format!("compiling {}", path.display())))?;
    // A cache that cannot be written only costs the next start a compile.
    let tmp = cached.with_extension("tmp");
    if std::fs::write(&tmp, &compiled).is_ok() {
        let _ = std::fs::rename(&tmp, &cached);
    }
    // SAFETY: these bytes were just produced by `precompile_component` on this engine.
    Ok(unsafe { Component::deserialize(engine, &compiled)? })
}

impl tandem::edge::network::Host for HostState {
    fn fetch_weights(&mut self, model: String) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let path = match &self.weights {
            Weights::File(p) => Ok(p.clone()),
            Weights::Cache => tandem_common::models::resolve(&model).map_err(|e| e.to_string()),
        };
        Ok(path
            .and_then(|p| std::fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))))
    }
}

/// A KV link: a WebSocket read by a background thread into a queue, so messages arrive while the guest computes.
pub struct KvLink {
    outgoing: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    incoming: mpsc::Receiver<Result<Vec<u8>, String>>,
}

impl KvLink {
    fn connect(url: String, timeout: Duration) -> Result<KvLink, String> {
        let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let (in_tx, in_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let failed = ready_tx.clone();
        tandem_edge::fetch::spawn_io_thread(
            "tandem-kv-link",
            move |e| {
                let _ = failed.send(Err(e));
            },
            move || async move {
                let connected =
                    tokio::time::timeout(timeout, tokio_tungstenite::connect_async(&url)).await;
                let ws = match connected {
                    Ok(Ok((ws, _))) => ws,
                    Ok(Err(e)) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                    Err(_) => {
                        let _ = ready_tx.send(Err(format!("no connection within {timeout:?}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let (mut sink, mut source) = ws.split();
                loop {
                    tokio::select! {
                        out = out_rx.recv() => match out {
                            Some(m) => {
                                if let Err(e) = sink.send(WsMessage::binary(m)).await {
                                    let _ = in_tx.send(Err(format!("sending: {e}")));
                                    return;
                                }
                            }
                            // The guest dropped the link.
                            None => {
                                let _ = sink.close().await;
                                return;
                            }
                        },
                        msg = source.next() => {
                            let got = match msg {
                                Some(Ok(WsMessage::Binary(b))) => Ok(b.to_vec()),
                                Some(Ok(WsMessage::Text(_))) => Err("unexpected text message".to_string()),
                                Some(Ok(WsMessage::Close(_))) | None => Err("the connection was closed".to_string()),
                                Some(Ok(_)) => continue,
                                Some(Err(e)) => Err(e.to_string()),
                            };
                            let end = got.is_err();
                            if in_tx.send(got).is_err() || end {
                                return;
                            }
                        }
                    }
                }
            },
        )
        .map_err(|e| e.to_string())?;
        ready_rx
            .recv()
            .map_err(|_| "the link thread ended".to_string())??;
        Ok(KvLink {
            outgoing: out_tx,
            incoming: in_rx,
        })
    }
}

impl tandem::edge::network::HostKvLink for HostState {
    fn connect(
        &mut self,
        url: String,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<Resource<KvLink>, String>> {
        Ok(
            match KvLink::connect(url, Duration::from_millis(timeout_ms as u64)) {
                Ok(link) => Ok(self.table.push(link)?),
                Err(e) => Err(e),
            },
        )
    }

    fn send(
        &mut self,
        link: Resource<KvLink>,
        message: Vec<u8>,
    ) -> wasmtime::Result<Result<(), String>> {
        let link = self.table.get(&link)?;
        Ok(link
            .outgoing
            .send(message)
            .map_err(|_| "the connection was closed".to_string()))
    }

    fn receive(
        &mut self,
        link: Resource<KvLink>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let link = self.table.get(&link)?;
        let timeout = Duration::from_millis(timeout_ms as u64);
        Ok(match link.incoming.recv_timeout(timeout) {
            Ok(got) => got,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("nothing received within {timeout:?}"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("the connection was closed".into()),
        })
    }

    fn drop(&mut self, link: Resource<KvLink>) -> wasmtime::Result<()> {
        self.table.delete(link)?;
        Ok(())
    }
}
