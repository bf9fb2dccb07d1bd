//! tandem's edge runtime: answers on this machine, with the shared context's KV streamed from the cloud.
//!
//! Native for now ([`chat::chat_turn`] over [`fetch::KvFetch`]); the WebAssembly builds reuse the same turn logic
//! with a browser / host transport.

pub use tandem_common as common;

#[cfg(not(target_arch = "wasm32"))]
pub mod chat;
#[cfg(not(target_arch = "wasm32"))]
pub mod fetch;
