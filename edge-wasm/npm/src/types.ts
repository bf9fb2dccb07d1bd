// The public types of @tandem/edge.

export interface LoadProgress {
  /// `download`: fetching the weights from the cloud; `cache`: read from the browser's cache; `load`: checking the
  /// weights' hash and building the model.
  phase: "download" | "cache" | "load";
  loaded: number;
  total: number;
}

export interface EngineInfo {
  model: string;
  /// The weights' fingerprint (the cloud serves KV only for these weights).
  weights: string;
  layers: number;
  context_length: number;
  /// Where the model runs: `webgpu` (burn's wgpu backend on the browser's GPU, weights dequantized to f32 in GPU
  /// memory) or `wasm-cpu` (WebAssembly SIMD kernels on the quantized weights).
  backend: "webgpu" | "wasm-cpu";
  /// The engine build this browser runs: with relaxed SIMD's 8-bit dot products where it has them.
  simd: "relaxed-simd" | "simd128";
  /// Threads computing the kernels (the engine's worker and its kernel workers).
  threads: number;
  /// What `navigator.gpu` offered: an adapter's description, or null; and whether the model runs on it, or why not.
  webgpu: { adapter: string | null; note: string };
  /// Whether the page is cross-origin isolated, which streaming KV into the worker needs.
  crossOriginIsolated: boolean;
  /// Whether the weights came from the browser's cache.
  weightsCached: boolean;
  loadMs: number;
}

/// What one answer did.
export interface TurnStats {
  /// `cloud`: the context's KV streamed from the cloud; `local`: computed here (see `fallback_reason`).
  kv_source: "cloud" | "local" | "none";
  fallback_reason: string | null;
  codec: string | null;
  /// Whose reading of the context came (`exact`, `split:K`, `fused`; cloud KV only), and the alignment a projected
  /// mode used.
  kv_mode: string | null;
  alignment: string | null;
  context_tokens: number;
  prompt_tokens: number;
  generated_tokens: number;
  /// KV payload bytes received.
  kv_bytes: number;
  /// What the context's KV would be as f16: the baseline `kv_bytes` compares with.
  kv_fp16_bytes: number;
  /// The lowest context layers computed here while the cloud streamed the others (the cloud splits when the link is
  /// slow enough for that to be faster).
  kv_local_layers: number;
  /// Times the KV stream broke (dropped, stalled, a corrupt chunk) and was resumed from the layer it broke at.
  kv_resumes: number;
  ttft_ms: number;
  kv_done_ms: number;
  /// Per context layer from the cloud, from the start of the turn: when the prefill needed it and when it had it
  /// (`ready_ms > asked_ms`: the computation waited for the network).
  kv_timeline: LayerTiming[];
  decode_tokens_per_second: number;
}

export interface LayerTiming {
  layer: number;
  asked_ms: number;
  ready_ms: number;
  wire_bytes: number;
}

export interface ChatMessage {
  role: "system" | "user" | "assistant" | string;
  content: string;
}

/// A shared context: its id on the cloud, and optionally its text (for a local fallback when the cloud is away).
export interface ContextRef {
  id?: string;
  text?: string;
  /// A KV codec to insist on (`lossless`, `f16`, `q8`, `pca8`, `q4`, `pca4`, `pca3`, `pca2`, `q2`); the cloud picks by bandwidth otherwise.
  codec?: string;
  /// `exact` (default: the edge model's own KV), `split:K` (the K lowest layers computed here, the rest the cloud
  /// LLM's KV projected) or `fused` (own KV plus the projected, gated); projected modes need a cloud with an alignment.
  kvMode?: string;
  timeoutMs?: number;
}

export interface ChatCompletionRequest {
  messages: ChatMessage[];
  /// A context id on the engine's cloud, or a [`ContextRef`].
  context?: string | ContextRef;
  stream?: boolean;
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  seed?: number;
  /// Stops the answer after the current token.
  signal?: AbortSignal;
}

export interface ChatCompletionChunk {
  id: string;
  object: "chat.completion.chunk";
  created: number;
  model: string;
  choices: { index: 0; delta: { role?: "assistant"; content?: string }; finish_reason: "stop" | "length" | null }[];
  /// On the last chunk: what the answer did.
  tandem?: TurnStats;
}

export interface ChatCompletion {
  id: string;
  object: "chat.completion";
  created: number;
  model: string;
  choices: { index: 0; message: { role: "assistant"; content: string }; finish_reason: "stop" | "length" }[];
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
  tandem: TurnStats;
}

export interface EngineStats extends EngineInfo {
  /// The last answer's statistics, once there is one.
  last: TurnStats | null;
}
