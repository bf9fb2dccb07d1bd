//! tandem's gateway: an IoT-gateway host for the edge runtime.
//!
//! - [`host`]: runs the edge component (`wit/tandem.wit`) under wasmtime, owning its network.
//! - `tandem-gateway serve --upstream URL`: a KV cache for nearby edges. It speaks the cloud's own protocol
//!   (it is the cloud server with an upstream, [`tandem_cloud::upstream`]), so an edge points at the gateway
//!   instead of the cloud and a context crosses the wide-area link once for all of them.

pub mod host;

/// The edge component built by `just component`, under `target_dir` (`$CARGO_TARGET_DIR`).
pub fn default_component(target_dir: &std::path::Path) -> std::path::PathBuf {
    target_dir.join("wasm32-wasip2/release/tandem_edge.wasm")
}
