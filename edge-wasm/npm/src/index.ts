// @tandem/edge: a small language model in the browser that takes the shared context's KV cache from a tandem cloud.
//
//   const engine = await createEngine({ cloudUrl: "http://127.0.0.1:8080", model: "smollm2", onProgress });
//   for await (const chunk of await engine.chat.completions.create({ messages, context: "ctx-…", stream: true }))
//     out.textContent += chunk.choices[0].delta.content ?? "";
//
// The model runs in a Web Worker; user messages never leave it (only context ids, hashes and codec choices go to
// the cloud).

import type { EngineEvent, EngineRequest, WorkerChatRequest } from "./messages.js";
import type {
  ChatCompletion,
  ChatCompletionChunk,
  ChatCompletionRequest,
  EngineInfo,
  EngineStats,
  LoadProgress,
  TurnStats,
} from "./types.js";

export type * from "./types.js";

export interface EngineOptions {
  /// The tandem cloud: weights come from `${cloudUrl}/weights/${model}`, KV from `${cloudUrl}/v1/kv`.
  cloudUrl: string;
  /// A model name the cloud serves (`smollm2`, `qwen-0.5b`).
  model?: string;
  onProgress?: (p: LoadProgress) => void;
  /// The cloud's token (`tandem auth token`), when it requires one: sent with the weights download and in the KV
  /// stream's hello.
  token?: string;
  /// `auto` (the default): WebGPU where the browser gives an adapter and the device comes up, else the wasm CPU
  /// path; `webgpu`: WebGPU or an error saying why not; `wasm-cpu`: always the CPU.
  backend?: "auto" | "webgpu" | "wasm-cpu";
  /// The CPU engine: `auto` (the default): the relaxed-SIMD engine where the browser runs it; `simd128`: always the
  /// plain one.
  simd?: "auto" | "simd128";
  /// Kernel threads, the engine's worker included (default: the machine's cores, at most 8). More than one needs a
  /// cross-origin isolated page and the threaded engine (built where a nightly Rust is available).
  threads?: number;
}

type Listener = (e: EngineEvent) => void;

export class Engine {
  readonly chat: {
    completions: {
      create(req: ChatCompletionRequest & { stream: true }): Promise<AsyncIterable<ChatCompletionChunk>>;
      create(req: ChatCompletionRequest & { stream?: false }): Promise<ChatCompletion>;
    };
  };
  private last: TurnStats | null = null;
  private nextId = 1;
  private listeners = new Map<number, Listener>();

  /** @internal */
  constructor(
    private worker: Worker,
    private io: Worker,
    private info: EngineInfo,
    private cloudUrl: string,
    private token: string | undefined,
  ) {
    worker.onmessage = (e: MessageEvent) => {
      const ev = e.data as EngineEvent;
      if ("id" in ev) this.listeners.get(ev.id)?.(ev);
    };
    const create = (req: ChatCompletionRequest) => (req.stream ? this.stream(req) : this.complete(req));
    this.chat = { completions: { create: create as Engine["chat"]["completions"]["create"] } };
  }

  /// The backend, the model, and the last answer's TTFT, tok/s, KV bytes and codec.
  stats(): EngineStats {
    return { ...this.info, last: this.last };
  }

  /// Stops both workers; the engine cannot be used afterwards.
  terminate(): void {
    this.worker.terminate();
    this.io.terminate();
  }

  private request(req: ChatCompletionRequest): WorkerChatRequest {
    const ctx = typeof req.context === "string" ? { id: req.context } : req.context;
    return {
      messages: req.messages,
      context: ctx && {
        cloud: ctx.id
          ? {
              url: this.cloudUrl,
              context: ctx.id,
              codec: ctx.codec,
              kv_mode: ctx.kvMode,
              timeout_ms: ctx.timeoutMs,
              auth: this.token,
            }
          : undefined,
        text: ctx.text,
      },
      max_tokens: req.max_tokens,
      temperature: req.temperature ?? 0,
      top_p: req.top_p ?? 1,
      seed: req.seed ?? 0,
    };
  }

  private async stream(req: ChatCompletionRequest): Promise<AsyncIterable<ChatCompletionChunk>> {
    const id = this.nextId++;
    const base = { id: `chatcmpl-${id}`, object: "chat.completion.chunk" as const, created: now(), model: this.info.model };
    const chunks: (ChatCompletionChunk | Error | null)[] = [];
    let wake: (() => void) | null = null;
    const push = (c: ChatCompletionChunk | Error | null) => {
      chunks.push(c);
      wake?.();
    };
    let first = true;
    this.listeners.set(id, (ev) => {
      if (ev.type === "token") {
        const delta = first ? { role: "assistant" as const, content: ev.text } : { content: ev.text };
        first = false;
        push({ ...base, choices: [{ index: 0, delta, finish_reason: null }] });
      } else if (ev.type === "done") {
        this.last = ev.stats;
        push({ ...base, choices: [{ index: 0, delta: {}, finish_reason: finishReason(ev.stats, req) }], tandem: ev.stats });
        push(null);
      } else if (ev.type === "error") {
        push(new Error(ev.error));
      }
    });
    const stop = () => this.post({ op: "stop", id });
    req.signal?.addEventListener("abort", stop, { once: true });
    this.post({ op: "chat", id, request: this.request(req) });
    const listeners = this.listeners;
    let finished = false;
    return {
      async *[Symbol.asyncIterator]() {
        try {
          for (;;) {
            while (chunks.length === 0) await new Promise<void>((r) => (wake = r));
            const c = chunks.shift()!;
            if (c === null || c instanceof Error) finished = true;
            if (c === null) return;
            if (c instanceof Error) throw c;
            yield c;
          }
        } finally {
          // A consumer that breaks out early stops the answer.
          if (!finished) stop();
          listeners.delete(id);
          req.signal?.removeEventListener("abort", stop);
        }
      },
    };
  }

  private async complete(req: ChatCompletionRequest): Promise<ChatCompletion> {
    let content = "";
    let done: ChatCompletionChunk | null = null;
    for await (const c of await this.stream(req)) {
      content += c.choices[0].delta.content ?? "";
      if (c.tandem) done = c;
    }
    const stats = done!.tandem!;
    return {
      id: done!.id,
      object: "chat.completion",
      created: done!.created,
      model: done!.model,
      choices: [{ index: 0, message: { role: "assistant", content }, finish_reason: finishReason(stats, req) }],
      usage: {
        prompt_tokens: stats.prompt_tokens,
        completion_tokens: stats.generated_tokens,
        total_tokens: stats.prompt_tokens + stats.generated_tokens,
      },
      tandem: stats,
    };
  }

  private post(m: EngineRequest, transfer: Transferable[] = []): void {
    this.worker.postMessage(m, transfer);
  }
}

/// Starts the engine's workers, downloads the model (or reads it from the browser's cache), checks its hash and
/// loads it. Rejects with a message naming what went wrong (unreachable cloud, wrong hash, ...).
export async function createEngine(opts: EngineOptions): Promise<Engine> {
  const model = opts.model ?? "smollm2";
  const cloudUrl = opts.cloudUrl.replace(/\/$/, "");
  const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module", name: "tandem-engine" });
  const io = new Worker(new URL("./kv-io-worker.js", import.meta.url), { type: "module", name: "tandem-kv-io" });
  const channel = new MessageChannel();
  io.postMessage({ port: channel.port2 }, [channel.port2]);
  const info = await new Promise<EngineInfo>((resolve, reject) => {
    worker.onerror = (e) => reject(new Error(`the engine worker failed to start: ${e.message}`));
    worker.onmessage = (e: MessageEvent) => {
      const ev = e.data as EngineEvent;
      if (ev.type === "progress") opts.onProgress?.(ev.progress);
      else if (ev.type === "ready") resolve(ev.info);
      else if (ev.type === "failed") reject(new Error(ev.error));
    };
    const init: EngineRequest = { op: "init", cloudUrl, token: opts.token, model, io: channel.port1,
      backend: opts.backend ?? "auto", simd: opts.simd ?? "auto",
      threads: Math.max(1, Math.min(opts.threads ?? navigator.hardwareConcurrency ?? 1, 8)) };
    worker.postMessage(init, [channel.port1]);
  }).catch((err) => {
    worker.terminate();
    io.terminate();
    throw err;
  });
  return new Engine(worker, io, info, cloudUrl, opts.token);
}

function finishReason(s: TurnStats, req: ChatCompletionRequest): "stop" | "length" {
  return req.max_tokens !== undefined && s.generated_tokens >= req.max_tokens ? "length" : "stop";
}

function now(): number {
  return Math.floor(Date.now() / 1000);
}
