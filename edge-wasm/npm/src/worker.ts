// The engine worker: downloads (or reads from the cache) and loads the model, and runs chat turns, so the page's
// main thread never computes. The context's KV streams in through the KV I/O worker (kv-io-worker.ts).

import { RecordKind, RingReader, newRing } from "./ring.js";
import type { EngineEvent, EngineRequest, WorkerChatRequest } from "./messages.js";
import type { EngineInfo, LoadProgress, TurnStats } from "./types.js";

/// The wasm-bindgen exports this worker uses (edge-wasm/src/browser.rs).
interface Wasm {
  default(input?: unknown): Promise<unknown>;
  BrowserEngine: {
    load(model: string, weights: Uint8Array): BrowserEngine;
    /// The build with WebGPU only (the plain simd128 one).
    load_webgpu?(model: string, weights: Uint8Array): Promise<BrowserEngine>;
  };
  expected_weights(model: string): string;
  /// The threaded build only.
  start_kernel_threads?(n: number): number;
}
interface BrowserEngine {
  info(): string;
  chat(request: string): BrowserChat;
}
interface BrowserChat {
  next(): Promise<string | undefined>;
  stats(): string;
  free(): void;
}

const scope = self as unknown as {
  postMessage(m: EngineEvent): void;
  onmessage: ((e: MessageEvent) => void) | null;
  crossOriginIsolated: boolean;
  tandemKv: unknown;
  tandemThreads: unknown;
};
const post = (m: EngineEvent) => scope.postMessage(m);
const CACHE = "tandem-weights-v1";
const CACHE_KEY_BASE = "https://tandem.invalid/weights";

let engine: BrowserEngine | null = null;
let queue: Promise<void> = Promise.resolve();
const stopped = new Set<number>();

scope.onmessage = (e: MessageEvent) => {
  const req = e.data as EngineRequest;
  switch (req.op) {
    case "init":
      init(req).catch((err) => post({ type: "failed", error: message(err) }));
      return;
    case "chat":
      // One turn at a time: the model is one.
      queue = queue.then(() => chat(req.id, req.request));
      return;
    case "stop":
      stopped.add(req.id);
      return;
  }
};

async function init(req: Extract<EngineRequest, { op: "init" }>): Promise<void> {
  const t0 = performance.now();
  installKvLink(req.io);
  const webgpu = await probeWebGpu();
  if (req.backend === "webgpu" && !webgpu.adapter) throw new Error(`WebGPU was asked for, but ${webgpu.note}`);
  // WebGPU where the browser gives an adapter (the plain simd128 build carries burn's wgpu backend), else the CPU.
  const gpu = req.backend !== "wasm-cpu" && webgpu.adapter !== null ? await importEngine("wasm") : null;
  const first = gpu ?? (await cpuEngine(req.simd, req.threads));
  const { weights, cached, drop } = await loadWeights(first.wasm, req.cloudUrl, req.model, req.token);
  progress({ phase: "load", loaded: 0, total: weights.length });
  let backend: EngineInfo["backend"] = "wasm-cpu";
  let cpu = gpu ? null : first;
  try {
    if (gpu) {
      try {
        engine = await gpu.wasm.BrowserEngine.load_webgpu!(req.model, weights);
        backend = "webgpu";
        webgpu.note = "the model runs on WebGPU";
      } catch (err) {
        if (req.backend === "webgpu") throw err;
        webgpu.note = `WebGPU failed (${message(err)}): the model runs on the wasm CPU path`;
        cpu = await cpuEngine(req.simd, req.threads);
      }
    } else if (webgpu.adapter) {
      webgpu.note = "the wasm CPU path was asked for";
    }
    if (cpu) engine = cpu.wasm.BrowserEngine.load(req.model, weights);
  } catch (err) {
    // A cached copy that no longer checks out is dropped, so the next load downloads again.
    await drop(false);
    throw err;
  }
  await drop(true);
  progress({ phase: "load", loaded: weights.length, total: weights.length });
  const info: EngineInfo = {
    ...JSON.parse(engine!.info()),
    backend,
    simd: (cpu ?? first).simd,
    threads: cpu?.threads ?? 1,
    webgpu,
    crossOriginIsolated: scope.crossOriginIsolated,
    weightsCached: cached,
    loadMs: performance.now() - t0,
  };
  post({ type: "ready", info });
}

interface EngineModule {
  wasm: Wasm;
  simd: EngineInfo["simd"];
  threads: number;
}

async function importEngine(dir: string): Promise<EngineModule> {
  const wasm = (await import(new URL(`./${dir}/tandem_edge.js`, import.meta.url).href)) as Wasm;
  await wasm.default();
  return { wasm, simd: dir === "wasm" ? "simd128" : "relaxed-simd", threads: 1 };
}

/// The CPU engine for this browser: relaxed SIMD where it has it, threaded where the page is isolated and the
/// threaded build exists; else the plain simd128 one.
async function cpuEngine(want: "auto" | "simd128", threadsWanted: number): Promise<EngineModule> {
  const simd = want === "auto" && relaxedSimd() ? "relaxed-simd" : "simd128";
  if (simd === "relaxed-simd" && threadsWanted > 1 && scope.crossOriginIsolated) {
    const glue = new URL("./wasm-threads/tandem_edge.js", import.meta.url).href;
    const wasm: Wasm | null = await import(glue).catch(() => null);
    if (wasm) {
      await wasm.default();
      installThreadSpawner(glue);
      return { wasm, simd, threads: wasm.start_kernel_threads!(threadsWanted) };
    }
  }
  return importEngine(simd === "relaxed-simd" ? "wasm-relaxed" : "wasm");
}

/// The model's weights, from the browser's cache or downloaded; `drop(ok)` then keeps a download that loaded, or
/// deletes a cached copy that did not.
async function loadWeights(
  wasm: Wasm,
  cloudUrl: string,
  model: string,
  token: string | undefined,
): Promise<{ weights: Uint8Array<ArrayBuffer>; cached: boolean; drop(ok: boolean): Promise<unknown> }> {
  const expected = JSON.parse(wasm.expected_weights(model)) as { sha256: string; size: number };
  const url = `${cloudUrl.replace(/\/$/, "")}/weights/${encodeURIComponent(model)}`;
  // Keyed by model and pinned hash, not by cloud: the same weights serve whichever cloud (or none: offline) the
  // page talks to, and a new pin never reads stale weights.
  const key = `${CACHE_KEY_BASE}/${encodeURIComponent(model)}/${expected.sha256}`;
  const cache = await caches.open(CACHE);
  const hit = await cache.match(key);
  let weights: Uint8Array<ArrayBuffer>;
  if (hit) {
    weights = new Uint8Array(await hit.arrayBuffer());
    progress({ phase: "cache", loaded: weights.length, total: weights.length });
  } else {
    weights = await download(url, expected.size, token);
  }
  const drop = async (ok: boolean) => {
    if (hit && !ok) return cache.delete(key);
    if (!hit && ok) {
      return cache.put(key, new Response(weights, { headers: { "content-length": String(weights.length) } }));
    }
  };
  return { weights, cached: hit !== undefined, drop };
}

/// How the threaded engine starts a kernel thread (`globalThis.tandemThreads`, imported by browser.rs): a worker
/// that instantiates the same module on the same shared memory and runs the thread's work.
function installThreadSpawner(glue: string): void {
  scope.tandemThreads = {
    spawn(module: WebAssembly.Module, memory: WebAssembly.Memory, work: number): void {
      const w = new Worker(new URL("./kernel-worker.js", import.meta.url), { type: "module", name: "tandem-kernel" });
      w.postMessage({ glue, module, memory, work });
    },
  };
}

/// Whether this browser runs relaxed SIMD: validates a module of one function using `i8x16.relaxed_swizzle`.
function relaxedSimd(): boolean {
  const zeros = new Array(16).fill(0);
  const v128Const = [0xfd, 0x0c, ...zeros];
  // prettier-ignore
  const module = new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
    0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7b, // types: () -> v128
    0x03, 0x02, 0x01, 0x00, // functions: one of type 0
    0x0a, 0x2b, 0x01, 0x29, 0x00, ...v128Const, ...v128Const, 0xfd, 0x80, 0x02, 0x0b, // relaxed_swizzle(0, 0)
  ]);
  return WebAssembly.validate(module);
}

function progress(p: LoadProgress): void {
  post({ type: "progress", progress: p });
}

/// The weights, with progress events (at most one per percent).
async function download(url: string, expectedSize: number, token?: string): Promise<Uint8Array<ArrayBuffer>> {
  const res = await fetch(url, token ? { headers: { authorization: `Bearer ${token}` } } : undefined);
  if (!res.ok || !res.body) throw new Error(`downloading the weights from ${url}: HTTP ${res.status}`);
  const total = Number(res.headers.get("content-length") ?? expectedSize) || expectedSize;
  if (total !== expectedSize) {
    throw new Error(`the weights at ${url} are ${total} bytes, the pinned model is ${expectedSize} bytes`);
  }
  const out = new Uint8Array(total);
  const reader = res.body.getReader();
  let loaded = 0;
  let reported = -1;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (loaded + value.length > total) throw new Error(`the weights at ${url} are longer than ${total} bytes`);
    out.set(value, loaded);
    loaded += value.length;
    const percent = Math.floor((100 * loaded) / total);
    if (percent !== reported) {
      reported = percent;
      progress({ phase: "download", loaded, total });
    }
  }
  if (loaded !== total) throw new Error(`the download of ${url} stopped after ${loaded} of ${total} bytes`);
  return out;
}

async function probeWebGpu(): Promise<EngineInfo["webgpu"]> {
  const gpu = (navigator as unknown as { gpu?: { requestAdapter(): Promise<any> } }).gpu;
  if (!gpu) return { adapter: null, note: "this browser has no WebGPU (navigator.gpu is missing)" };
  let adapter: any = null;
  try {
    adapter = await gpu.requestAdapter();
  } catch (err) {
    return { adapter: null, note: `WebGPU gave no adapter: ${message(err)}` };
  }
  if (!adapter) return { adapter: null, note: "WebGPU gave no adapter (no usable GPU, or WebGPU is disabled)" };
  const i = adapter.info ?? {};
  const name = [i.vendor, i.architecture, i.description].filter(Boolean).join(" ") || "unnamed adapter";
  return { adapter: name, note: "" };
}

/// Yields to the worker's event loop (so a `stop` can arrive) without a timer's clamping.
function yieldToEvents(): Promise<void> {
  return new Promise((resolve) => {
    const ch = new MessageChannel();
    ch.port1.onmessage = () => resolve();
    ch.port2.postMessage(null);
  });
}

async function chat(id: number, request: WorkerChatRequest): Promise<void> {
  if (!engine) return post({ type: "error", id, error: "the engine is not loaded" });
  let turn: BrowserChat | null = null;
  try {
    turn = engine.chat(JSON.stringify(request));
    for (;;) {
      if (stopped.has(id)) break;
      const piece = await turn.next();
      if (piece === undefined) break;
      post({ type: "token", id, text: piece });
      await yieldToEvents();
    }
    post({ type: "done", id, stats: JSON.parse(turn.stats()) as TurnStats, stopped: stopped.has(id) });
  } catch (err) {
    post({ type: "error", id, error: message(err) });
  } finally {
    turn?.free();
    stopped.delete(id);
  }
}

/// The engine's blocking KV link (`globalThis.tandemKv`, imported by edge-wasm/src/browser.rs).
function installKvLink(io: MessagePort): void {
  const rings = new Map<number, RingReader>();
  const text = new TextDecoder();
  let next = 1;
  const fail = (id: number, why: string): never => {
    close(id);
    throw new Error(why);
  };
  const close = (id: number) => {
    rings.get(id)?.close();
    rings.delete(id);
    io.postMessage({ op: "close", id });
  };
  scope.tandemKv = {
    open(url: string, timeoutMs: number): number {
      if (!scope.crossOriginIsolated) {
        throw new Error(
          "the page is not cross-origin isolated, so the KV cannot stream into the engine's worker " +
            "(serve it with Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp)",
        );
      }
      const id = next++;
      const sab = newRing();
      const ring = new RingReader(sab);
      rings.set(id, ring);
      io.postMessage({ op: "open", id, url, sab });
      let rec;
      try {
        rec = ring.read(timeoutMs);
      } catch (err) {
        return fail(id, `no connection to ${url} within ${timeoutMs} ms`);
      }
      if (rec.kind !== RecordKind.Open) return fail(id, text.decode(rec.payload));
      return id;
    },
    send(id: number, bytes: Uint8Array): void {
      if (!rings.has(id)) throw new Error("the KV link is closed");
      // `bytes` views the engine's memory: copy before it moves.
      io.postMessage({ op: "send", id, bytes: bytes.slice() });
    },
    receive(id: number, timeoutMs: number): Uint8Array {
      const ring = rings.get(id);
      if (!ring) throw new Error("the KV link is closed");
      const rec = ring.read(timeoutMs);
      if (rec.kind === RecordKind.Message) return rec.payload;
      return fail(id, text.decode(rec.payload));
    },
    close,
  };
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
