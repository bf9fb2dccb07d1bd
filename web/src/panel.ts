// The live panel: what the cloud–edge split did for the last answer, and the KV layers' timeline.

import type { EngineStats, TurnStats } from "@tandem/edge";

const SVG = "http://www.w3.org/2000/svg";

export function formatBytes(n: number): string {
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}

function field(root: HTMLElement, name: string, value: string): void {
  const el = root.querySelector<HTMLElement>(`[data-field="${name}"]`);
  if (el) el.textContent = value;
}

/// Fills the panel with one answer's statistics.
export function showStats(root: HTMLElement, engine: EngineStats, s: TurnStats): void {
  root.hidden = false;
  const backend =
    engine.backend === "webgpu"
      ? `webgpu (${engine.webgpu.adapter})`
      : `${engine.backend}, ${engine.simd}${engine.webgpu.adapter ? ` (WebGPU: ${engine.webgpu.note})` : ""}`;
  field(root, "backend", backend);
  const source =
    s.kv_source === "cloud"
      ? `cloud, ${s.kv_mode && s.kv_mode !== "exact" ? `${s.kv_mode} (alignment ${s.alignment?.slice(0, 8)}), ` : ""}codec ${s.codec}${s.kv_local_layers > 0 ? `; ${s.kv_local_layers} context layers computed here` : ""}`
      : s.kv_source === "local"
        ? `computed here: ${s.fallback_reason}`
        : "no context";
  field(root, "source", source);
  field(root, "ttft", `${s.ttft_ms.toFixed(0)} ms`);
  field(root, "tps", `${s.decode_tokens_per_second.toFixed(1)} tok/s`);
  field(root, "tokens", `${s.context_tokens} context + ${s.prompt_tokens} prompt → ${s.generated_tokens}`);
  const ratio = s.kv_bytes > 0 ? ` (${(s.kv_fp16_bytes / s.kv_bytes).toFixed(1)}× smaller)` : "";
  field(root, "kv_bytes", s.kv_source === "cloud" ? `${formatBytes(s.kv_bytes)} of ${formatBytes(s.kv_fp16_bytes)} f16${ratio}` : "0 B");
  drawTimeline(root.querySelector("[data-field=timeline]")!, s);
}

/// One row per context layer: when the prefill asked for it, how long it waited for the network (amber), and the
/// compute until it asked for the next (teal). Mostly teal means loading hid behind computing.
function drawTimeline(host: Element, s: TurnStats): void {
  host.replaceChildren();
  const t = s.kv_timeline;
  if (t.length === 0) {
    host.textContent = s.kv_source === "cloud" ? "" : "No layers streamed for this answer.";
    return;
  }
  const end = Math.max(s.ttft_ms, ...t.map((l) => l.ready_ms));
  const width = 300;
  const row = 4;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${t.length * row}`);
  svg.setAttribute("role", "img");
  const waited = t.reduce((a, l) => a + Math.max(0, l.ready_ms - l.asked_ms), 0);
  svg.setAttribute("aria-label", `${t.length} layers; the prefill waited ${waited.toFixed(0)} ms for the network in all`);
  const x = (ms: number) => (ms / end) * width;
  const bar = (from: number, to: number, y: number, cls: string) => {
    const r = document.createElementNS(SVG, "rect");
    r.setAttribute("x", x(from).toFixed(2));
    r.setAttribute("y", String(y * row + 0.5));
    r.setAttribute("width", Math.max(0.6, x(to) - x(from)).toFixed(2));
    r.setAttribute("height", String(row - 1));
    r.setAttribute("class", cls);
    svg.append(r);
  };
  t.forEach((l, i) => {
    bar(l.asked_ms, l.ready_ms, i, "wait");
    const next = i + 1 < t.length ? t[i + 1].asked_ms : l.ready_ms;
    bar(l.ready_ms, Math.max(next, l.ready_ms), i, "compute");
  });
  host.append(svg);
  const caption = document.createElement("p");
  caption.className = "caption";
  caption.textContent = `${t.length} layers in ${t[t.length - 1].ready_ms.toFixed(0)} ms; waited for the network ${waited.toFixed(0)} ms`;
  host.append(caption);
}
