// The cloud's shared contexts: list, register, and their text (kept for a local fallback).

export interface ContextInfo {
  id: string;
  model: string;
  tokens: number;
  title?: string;
}

/// The cloud's token, from the page's `?token=` (the cloud's `--auth-keys` asks for one).
const TOKEN = new URLSearchParams(location.search).get("token") ?? undefined;
const AUTH: Record<string, string> = TOKEN ? { authorization: `Bearer ${TOKEN}` } : {};

export function token(): string | undefined {
  return TOKEN;
}

async function json<T>(res: Response): Promise<T> {
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body?.error?.message ?? `HTTP ${res.status}`);
  return body as T;
}

/// The contexts the cloud holds for `model`.
export async function listContexts(model: string): Promise<ContextInfo[]> {
  const { data } = await json<{ data: string[] }>(await fetch("/v1/contexts", { headers: AUTH }));
  const infos = await Promise.all(
    data.map((id) =>
      fetch(`/v1/contexts/${id}`, { headers: AUTH })
        .then((r) => json<ContextInfo>(r))
        .catch(() => null),
    ),
  );
  return infos.filter((c): c is ContextInfo => c !== null && c.model === model);
}

/// Registers `text` as a shared context: the cloud prefills it once.
export async function registerContext(model: string, text: string): Promise<ContextInfo> {
  const res = await fetch("/v1/contexts", {
    method: "POST",
    headers: { "content-type": "application/json", ...AUTH },
    body: JSON.stringify({ model, text }),
  });
  return json<ContextInfo>(res);
}

export async function contextText(id: string): Promise<string | undefined> {
  const res = await fetch(`/v1/contexts/${id}/text`, { headers: AUTH });
  return res.ok ? res.text() : undefined;
}
