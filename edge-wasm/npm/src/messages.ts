// Messages between the page, the engine worker and the KV I/O worker.

import type { EngineInfo, LoadProgress, TurnStats } from "./types.js";

/// Engine worker → KV I/O worker.
export type IoRequest =
  | { op: "open"; id: number; url: string; sab: SharedArrayBuffer }
  | { op: "send"; id: number; bytes: Uint8Array }
  | { op: "close"; id: number };

/// Page → engine worker.
export type EngineRequest =
  | {
      op: "init";
      cloudUrl: string;
      token?: string;
      model: string;
      io: MessagePort;
      backend: "auto" | "webgpu" | "wasm-cpu";
      simd: "auto" | "simd128";
      threads: number;
    }
  | { op: "chat"; id: number; request: WorkerChatRequest }
  | { op: "stop"; id: number };

/// A chat as the engine's `BrowserEngine.chat` takes it (JSON).
export interface WorkerChatRequest {
  messages: { role: string; content: string }[];
  context?: {
    cloud?: {
      url: string;
      context: string;
      codec?: string;
      kv_mode?: string;
      bandwidth_bps?: number;
      auth?: string;
      timeout_ms?: number;
    };
    text?: string;
  };
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  seed?: number;
}

/// Engine worker → page.
export type EngineEvent =
  | { type: "progress"; progress: LoadProgress }
  | { type: "ready"; info: EngineInfo }
  | { type: "failed"; error: string }
  | { type: "token"; id: number; text: string }
  | { type: "done"; id: number; stats: TurnStats; stopped: boolean }
  | { type: "error"; id: number; error: string };
