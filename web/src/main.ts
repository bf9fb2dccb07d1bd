// tandem's chat page: a local chat (the model runs in this browser) whose shared context's KV comes from the cloud.

import { createEngine, type Engine, type LoadProgress, type TurnStats } from "@tandem/edge";
import { contextText, listContexts, registerContext, token, type ContextInfo } from "./cloud.js";
import { deleteChat, listChats, saveChat, type Chat, type StoredMessage } from "./history.js";
import { formatBytes, showStats } from "./panel.js";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const params = new URLSearchParams(location.search);
const MODEL = params.get("model") ?? "smollm2";
const MAX_TOKENS = Number(params.get("max_tokens") ?? 256);

let engine: Engine | null = null;
let chat: Chat = newChat();
let contexts: ContextInfo[] = [];
/// Context texts by id, for a local prefill when the cloud cannot serve the KV.
const texts = new Map<string, string>();
let answering: AbortController | null = null;

function newChat(): Chat {
  return { title: "New chat", contextId: null, createdAt: Date.now(), messages: [] };
}

function notice(text: string, kind: "info" | "warn" | "error" = "info"): void {
  const el = $("notice");
  el.textContent = text;
  el.dataset.kind = kind;
  el.hidden = text === "";
}

/// What went wrong, in words a user can act on.
function explain(err: unknown): string {
  const m = err instanceof Error ? err.message : String(err);
  if (/sha256|pinned/.test(m)) return `The downloaded model does not match its pinned hash, so it was not used: ${m}`;
  if (/memory|allocation|RangeError/i.test(m)) return `The browser ran out of memory loading or running the model: ${m}`;
  if (/fetch|HTTP|download/i.test(m)) return `The cloud could not be reached for the model weights: ${m}`;
  return m;
}

function progress(p: LoadProgress): void {
  const bar = $<HTMLProgressElement>("progress");
  bar.max = p.total;
  bar.value = p.loaded;
  const what = { download: "Downloading the model", cache: "Model found in this browser's cache", load: "Checking and loading the model" }[p.phase];
  $("model-status").textContent = p.phase === "download" ? `${what}: ${formatBytes(p.loaded)} of ${formatBytes(p.total)}` : `${what}…`;
}

async function start(): Promise<void> {
  $("model-status").textContent = `Loading ${MODEL}…`;
  try {
    engine = await createEngine({ cloudUrl: location.origin, model: MODEL, token: token(), onProgress: progress });
  } catch (err) {
    $("model-status").textContent = "The model could not be loaded.";
    notice(explain(err), "error");
    return;
  }
  const info = engine.stats();
  $("progress").hidden = true;
  $("model-status").textContent = `${info.model} ready (${info.weightsCached ? "from this browser's cache" : "downloaded"}, ${(info.loadMs / 1000).toFixed(1)} s)`;
  $("backend").textContent = info.backend;
  $("app").dataset.ready = "true";
  if (!info.webgpu.adapter) notice(`No WebGPU here (${info.webgpu.note}): the model runs on the CPU.`, "info");
  else if (info.backend !== "webgpu") notice(`WebGPU is not used: ${info.webgpu.note}.`, "info");
  setBusy(false);
  $("prompt").focus();
}

async function refreshContexts(select?: string): Promise<void> {
  const picker = $<HTMLSelectElement>("context");
  try {
    contexts = await listContexts(MODEL);
  } catch (err) {
    notice(`The cloud's contexts could not be listed (${explain(err)}); answers use no shared context.`, "warn");
  }
  const keep = select ?? picker.value;
  picker.replaceChildren(new Option("No shared context", ""));
  for (const c of contexts) picker.append(new Option(`${c.title ?? c.id} (${c.tokens} tokens)`, c.id));
  picker.value = contexts.some((c) => c.id === keep) ? keep : "";
  $("context-empty").hidden = contexts.length > 0;
  await pickContext(picker.value);
}

async function pickContext(id: string): Promise<void> {
  chat.contextId = id || null;
  const picker = $("context");
  picker.dataset.text = "loading";
  if (id && !texts.has(id)) {
    const text = await contextText(id).catch(() => undefined);
    if (text !== undefined) texts.set(id, text);
  }
  // Whether a local fallback is possible for this context (the tests wait for this too).
  picker.dataset.text = !id || texts.has(id) ? "ready" : "unknown";
}

function contextRef(localOnly = false) {
  const id = chat.contextId;
  if (!id) return undefined;
  const codec = $<HTMLSelectElement>("codec").value || undefined;
  const kvMode = $<HTMLSelectElement>("kv-mode").value || undefined;
  const text = texts.get(id);
  return localOnly ? { text } : { id, text, codec, kvMode, timeoutMs: 10_000 };
}

function renderMessages(): void {
  const list = $("messages");
  list.replaceChildren();
  for (const m of chat.messages) list.append(bubble(m));
  $("chat-empty").hidden = chat.messages.length > 0;
  list.scrollTop = list.scrollHeight;
}

function bubble(m: StoredMessage): HTMLElement {
  const el = document.createElement("div");
  el.className = `message ${m.role}`;
  el.textContent = m.content;
  return el;
}

async function renderHistory(): Promise<void> {
  const list = $("history");
  list.replaceChildren();
  for (const c of await listChats()) {
    const li = document.createElement("li");
    const open = document.createElement("button");
    open.textContent = c.title;
    open.className = c.id === chat.id ? "current" : "";
    open.onclick = () => {
      chat = c;
      $<HTMLSelectElement>("context").value = c.contextId ?? "";
      void pickContext(c.contextId ?? "");
      renderMessages();
      void renderHistory();
    };
    const del = document.createElement("button");
    del.textContent = "×";
    del.setAttribute("aria-label", `Delete “${c.title}”`);
    del.onclick = async () => {
      await deleteChat(c.id!);
      if (c.id === chat.id) chat = newChat();
      renderMessages();
      void renderHistory();
    };
    li.append(open, del);
    list.append(li);
  }
}

function setBusy(busy: boolean): void {
  $<HTMLButtonElement>("send").disabled = busy || !engine;
  $<HTMLButtonElement>("stop").hidden = !busy;
  $<HTMLButtonElement>("compare").disabled = busy || !engine || !lastQuestion();
}

function lastQuestion(): StoredMessage[] | null {
  const i = chat.messages.map((m) => m.role).lastIndexOf("user");
  return i < 0 ? null : chat.messages.slice(0, i + 1);
}

/// Streams one answer into `target`; returns its statistics (null if it failed).
async function answer(messages: StoredMessage[], localOnly: boolean, target: HTMLElement): Promise<TurnStats | null> {
  answering = new AbortController();
  setBusy(true);
  let stats: TurnStats | null = null;
  try {
    const stream = await engine!.chat.completions.create({
      messages: messages.map(({ role, content }) => ({ role, content })),
      context: contextRef(localOnly),
      stream: true,
      max_tokens: MAX_TOKENS,
      signal: answering.signal,
    });
    for await (const chunk of stream) {
      target.textContent += chunk.choices[0].delta.content ?? "";
      $("messages").scrollTop = $("messages").scrollHeight;
      if (chunk.tandem) stats = chunk.tandem;
    }
  } catch (err) {
    notice(explain(err), "error");
  } finally {
    answering = null;
    setBusy(false);
  }
  return stats;
}

async function send(): Promise<void> {
  const input = $<HTMLTextAreaElement>("prompt");
  const text = input.value.trim();
  if (!text || !engine || answering) return;
  input.value = "";
  notice("");
  chat.messages.push({ role: "user", content: text });
  if (chat.messages.length === 1) chat.title = text.slice(0, 60);
  renderMessages();
  const reply: StoredMessage = { role: "assistant", content: "" };
  const el = bubble(reply);
  el.classList.add("streaming");
  $("messages").append(el);
  const stats = await answer(chat.messages, false, el);
  el.classList.remove("streaming");
  reply.content = el.textContent ?? "";
  if (stats) {
    reply.stats = stats;
    showStats($("panel"), engine.stats(), stats);
    $("compare-result").textContent = "";
    if (stats.kv_source === "local" && chat.contextId) {
      notice(`The cloud could not serve the context's KV, so this answer was computed here: ${stats.fallback_reason}`, "warn");
    }
  }
  chat.messages.push(reply);
  chat = await saveChat(chat);
  void renderHistory();
  input.focus();
}

/// Asks the last question again with the context prefilled here instead of streamed, to compare TTFT.
async function compare(): Promise<void> {
  const messages = lastQuestion();
  const cloud = [...chat.messages].reverse().find((m) => m.role === "assistant" && m.stats)?.stats;
  if (!messages || !engine || !cloud) return;
  const out = $("compare-result");
  out.textContent = "Prefilling the context here…";
  const scratch = document.createElement("div");
  const local = await answer(messages, true, scratch);
  if (!local) return void (out.textContent = "");
  const speedup = local.ttft_ms / Math.max(cloud.ttft_ms, 1);
  out.textContent =
    `Local prefill: TTFT ${local.ttft_ms.toFixed(0)} ms vs ${cloud.ttft_ms.toFixed(0)} ms with the cloud's KV ` +
    `(${speedup.toFixed(1)}× ${speedup >= 1 ? "slower" : "faster"} locally)`;
}

async function addDocument(ev: SubmitEvent): Promise<void> {
  ev.preventDefault();
  const dialog = $<HTMLDialogElement>("add-context");
  const area = $<HTMLTextAreaElement>("context-text");
  const file = $<HTMLInputElement>("context-file").files?.[0];
  const text = file ? await file.text() : area.value;
  if (!text.trim()) return;
  const status = $("add-status");
  status.textContent = "The cloud is computing the document's KV…";
  try {
    const info = await registerContext(MODEL, text);
    texts.set(info.id, text);
    dialog.close();
    area.value = "";
    status.textContent = "";
    await refreshContexts(info.id);
  } catch (err) {
    status.textContent = `Could not add the document: ${explain(err)}`;
  }
}

function wire(): void {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    void send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      void send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && answering) answering.abort();
  });
  $("stop").onclick = () => answering?.abort();
  $("new-chat").onclick = () => {
    chat = newChat();
    chat.contextId = $<HTMLSelectElement>("context").value || null;
    renderMessages();
    $("panel").hidden = true;
    void renderHistory();
    $("prompt").focus();
  };
  $<HTMLSelectElement>("context").onchange = (e) => void pickContext((e.target as HTMLSelectElement).value);
  $("add-context-open").onclick = () => $<HTMLDialogElement>("add-context").showModal();
  $("add-context-cancel").onclick = () => $<HTMLDialogElement>("add-context").close();
  $("add-context-form").addEventListener("submit", (e) => void addDocument(e as SubmitEvent));
  $("compare").onclick = () => void compare();
}

wire();
setBusy(false);
renderMessages();
void renderHistory();
void refreshContexts();
void start();
