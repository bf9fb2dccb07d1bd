// Conversations kept in this browser (IndexedDB): they are never sent to the cloud.

import type { TurnStats } from "@tandem/edge";

export interface StoredMessage {
  role: "user" | "assistant";
  content: string;
  stats?: TurnStats;
}

export interface Chat {
  id?: number;
  title: string;
  contextId: string | null;
  createdAt: number;
  messages: StoredMessage[];
}

const DB = "tandem-chat";
const STORE = "chats";

function open(): Promise<IDBDatabase> {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: "id", autoIncrement: true });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function run<T>(mode: IDBTransactionMode, f: (s: IDBObjectStore) => IDBRequest<T>): Promise<T> {
  return open().then(
    (db) =>
      new Promise<T>((resolve, reject) => {
        const req = f(db.transaction(STORE, mode).objectStore(STORE));
        req.onsuccess = () => resolve(req.result);
        req.onerror = () => reject(req.error);
      }),
  );
}

/// Saves `chat` (new ones get an id).
export async function saveChat(chat: Chat): Promise<Chat> {
  const id = await run("readwrite", (s) => s.put(chat));
  return { ...chat, id: id as number };
}

/// Every chat, newest first.
export async function listChats(): Promise<Chat[]> {
  const all = await run<Chat[]>("readonly", (s) => s.getAll());
  return all.sort((a, b) => b.createdAt - a.createdAt);
}

export async function deleteChat(id: number): Promise<void> {
  await run("readwrite", (s) => s.delete(id));
}
