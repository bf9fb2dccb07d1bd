//! tandem's edge runtime: answers on this machine, with the shared context's KV streamed from the cloud.
//!
//! - [`protocol`]: the edge's side of the KV protocol, without I/O ([`protocol::KvClient`]).
//! - [`incoming`]: a context's KV as it arrives, over any transport ([`incoming::fetch_over`] a blocking link).
//! - [`chat`]: one chat turn, the prompt prefilled while the context's layers arrive ([`chat::start_turn`]).
//! - [`fetch`] (native): the transport over a background WebSocket thread.
//! - `component` (`wasm32-wasip2`): the runtime as a component of `wit/tandem.wit`'s `edge` world, for wasmtime
//!   hosts such as `tandem-gateway`; build it with `just component`.
//! - `browser` (`wasm32-unknown-unknown`): the runtime for a Web Worker, through wasm-bindgen; the npm package in
//!   `edge-wasm/npm` wraps it (`just npm`).

pub use tandem_common as common;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
mod browser;
pub mod chat;
#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod component;
#[cfg(not(target_arch = "wasm32"))]
pub mod fetch;
pub mod incoming;
pub mod protocol;
#[cfg(not(target_arch = "wasm32"))]
pub mod tls;
