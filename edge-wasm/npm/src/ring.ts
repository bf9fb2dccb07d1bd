// A one-way channel of records over a SharedArrayBuffer: the KV I/O worker writes what its WebSocket receives, the
// engine worker reads it with blocking waits (Atomics.wait), so the engine can take layer l+1 as it arrives while it
// computes layer l, with no event loop turn in between.
//
// Layout: four i32 counters (bytes written, bytes read, reader gone), then CAPACITY data bytes. Counters wrap; a
// record is [kind u32][length u32][payload], and may be larger than the ring (it then streams through it).

export const CAPACITY = 1 << 22;
const HEADER = 16;
const WRITTEN = 0;
const READ = 1;
const READER_GONE = 2;
const MASK = CAPACITY - 1;

export const enum RecordKind {
  /// The WebSocket connected.
  Open = 1,
  /// One binary WebSocket message.
  Message = 2,
  /// The connection failed or closed; the payload says why.
  Closed = 3,
}

export interface RingRecord {
  kind: RecordKind;
  payload: Uint8Array;
}

export function newRing(): SharedArrayBuffer {
  return new SharedArrayBuffer(HEADER + CAPACITY);
}

export class RingWriter {
  private ctrl: Int32Array;
  private data: Uint8Array;

  constructor(sab: SharedArrayBuffer) {
    this.ctrl = new Int32Array(sab, 0, 4);
    this.data = new Uint8Array(sab, HEADER, CAPACITY);
  }

  /// Whether the reader has closed its end (nothing more will be read).
  get readerGone(): boolean {
    return Atomics.load(this.ctrl, READER_GONE) !== 0;
  }

  /// Appends a record, blocking while the ring is full (that is the backpressure); drops it if the reader is gone.
  write(kind: RecordKind, payload: Uint8Array): void {
    const head = new Uint8Array(8);
    new DataView(head.buffer).setUint32(0, kind, true);
    new DataView(head.buffer).setUint32(4, payload.length, true);
    if (this.put(head)) this.put(payload);
  }

  private put(src: Uint8Array): boolean {
    let off = 0;
    while (off < src.length) {
      if (this.readerGone) return false;
      const w = Atomics.load(this.ctrl, WRITTEN);
      const r = Atomics.load(this.ctrl, READ);
      const free = CAPACITY - ((w - r) | 0);
      if (free === 0) {
        Atomics.wait(this.ctrl, READ, r, 500);
        continue;
      }
      const at = w & MASK;
      const n = Math.min(free, src.length - off, CAPACITY - at);
      this.data.set(src.subarray(off, off + n), at);
      Atomics.store(this.ctrl, WRITTEN, (w + n) | 0);
      Atomics.notify(this.ctrl, WRITTEN);
      off += n;
    }
    return true;
  }
}

export class RingReader {
  private ctrl: Int32Array;
  private data: Uint8Array;

  constructor(sab: SharedArrayBuffer) {
    this.ctrl = new Int32Array(sab, 0, 4);
    this.data = new Uint8Array(sab, HEADER, CAPACITY);
  }

  /// The next record, waiting at most `timeoutMs` for all of it.
  read(timeoutMs: number): RingRecord {
    const deadline = performance.now() + timeoutMs;
    const head = new Uint8Array(8);
    this.take(head, deadline, timeoutMs);
    const view = new DataView(head.buffer);
    const payload = new Uint8Array(view.getUint32(4, true));
    this.take(payload, deadline, timeoutMs);
    return { kind: view.getUint32(0, true) as RecordKind, payload };
  }

  /// Tells the writer to stop: nothing more will be read.
  close(): void {
    Atomics.store(this.ctrl, READER_GONE, 1);
    Atomics.notify(this.ctrl, READ);
  }

  private take(dst: Uint8Array, deadline: number, timeoutMs: number): void {
    let off = 0;
    while (off < dst.length) {
      const w = Atomics.load(this.ctrl, WRITTEN);
      const r = Atomics.load(this.ctrl, READ);
      const available = (w - r) | 0;
      if (available === 0) {
        const left = deadline - performance.now();
        if (left <= 0) throw new Error(`no message from the cloud within ${timeoutMs} ms`);
        Atomics.wait(this.ctrl, WRITTEN, w, left);
        continue;
      }
      const at = r & MASK;
      const n = Math.min(available, dst.length - off, CAPACITY - at);
      dst.set(this.data.subarray(at, at + n), off);
      Atomics.store(this.ctrl, READ, (r + n) | 0);
      Atomics.notify(this.ctrl, READ);
      off += n;
    }
  }
}
