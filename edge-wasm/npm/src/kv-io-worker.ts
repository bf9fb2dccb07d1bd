// The KV I/O worker: owns the WebSockets of the engine's KV links and writes what they receive into each link's
// ring (ring.ts), so the engine worker can block on them while this one keeps receiving.

import { RecordKind, RingWriter } from "./ring.js";
import type { IoRequest } from "./messages.js";

const links = new Map<number, { ws: WebSocket; ring: RingWriter }>();
const text = new TextEncoder();

function open(id: number, url: string, sab: SharedArrayBuffer): void {
  const ring = new RingWriter(sab);
  let ws: WebSocket;
  try {
    ws = new WebSocket(url);
  } catch (e) {
    ring.write(RecordKind.Closed, text.encode(`bad KV URL ${url}: ${(e as Error).message}`));
    return;
  }
  ws.binaryType = "arraybuffer";
  links.set(id, { ws, ring });
  ws.onopen = () => ring.write(RecordKind.Open, new Uint8Array());
  ws.onmessage = (e: MessageEvent) => {
    if (ring.readerGone) return ws.close();
    if (typeof e.data === "string") {
      ring.write(RecordKind.Closed, text.encode("the cloud sent a text message on the KV socket"));
      return ws.close();
    }
    ring.write(RecordKind.Message, new Uint8Array(e.data as ArrayBuffer));
  };
  ws.onclose = (e: CloseEvent) => {
    links.delete(id);
    const why = e.reason ? `: ${e.reason}` : "";
    ring.write(RecordKind.Closed, text.encode(`the connection to ${url} closed (code ${e.code}${why})`));
  };
}

function handle(req: IoRequest): void {
  switch (req.op) {
    case "open":
      return open(req.id, req.url, req.sab);
    case "send":
      links.get(req.id)?.ws.send(req.bytes);
      return;
    case "close": {
      const link = links.get(req.id);
      links.delete(req.id);
      link?.ws.close();
      return;
    }
  }
}

// The page hands over the engine worker's port first; requests then come through it.
self.onmessage = (e: MessageEvent) => {
  const port = e.data.port as MessagePort;
  port.onmessage = (m: MessageEvent) => handle(m.data as IoRequest);
};
