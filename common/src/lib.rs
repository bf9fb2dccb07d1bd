//! tandem's shared core: everything the cloud, the browser, the wasmtime gateway and the tests share.
//!
//! - [`gguf`]: bounds-checked GGUF reader; weights stay in their quantized blocks.
//! - [`quant`]: GGML block formats and the quantized mat-mul kernels.
//! - [`tokenizer`]: byte-level BPE from the GGUF vocabulary, ChatML.
//! - [`model`]: the one model definition (burn), sessions with prefill / decode.
//! - [`kv`]: KV state as a value: export, slice, serialise, import.
//! - [`attention`]: attention over KV segments merged by log-sum-exp.
//! - [`engine`]: a loaded model + tokenizer, and the generation loop.
//! - [`models`]: the pinned model registry and cache.

pub mod attention;
pub mod codec;
pub mod engine;
pub mod gguf;
pub mod kv;
pub mod model;
pub mod models;
pub mod parallel;
pub mod quant;
pub mod sample;
pub mod tokenizer;
pub mod wire;
