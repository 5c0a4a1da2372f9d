/**
 * weft's RPC protocol (DESIGN §6): framing, commands and statuses, one writer and one
 * reader. A frame is a 20-byte header — magic u32, kind u8, command u8, reserved u16,
 * request id u32, body length u64 — and the body. Every request gets a reply with the same
 * id: status u8, error code and message (strings), then the command's payload. Numbers
 * are little-endian; sizes and shapes are 64-bit. The reader checks every length against
 * what is left, so a hostile frame can only produce an RPC_PROTOCOL error.
 */
import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { OP_NAMES } from "../core/ops.js";
import { TYPES } from "../core/types.js";
import { weftError, WeftError } from "../core/errors.js";

export const PROTOCOL_VERSION = 2;
export const MAGIC = 0x31465457; // "WTF1"
export const HEADER_BYTES = 20;
/** largest frame body before authentication (HELLO, AUTH) */
export const PREAUTH_MAX_BODY = 4096;
/** default largest frame body (a weight is sent in pieces of at most this) */
export const DEFAULT_MAX_FRAME = 256 << 20;

export const Kind = { REQUEST: 0, REPLY: 1, NOTICE: 2 } as const;

/** Requests, by id. The server's dispatch table has one handler per name. */
export const Cmd = {
  HELLO: 1, AUTH: 2, ALLOC: 3, FREE: 4, FILL: 5, SET: 6, GET: 7, SET2D: 8, GET2D: 9, COPY: 10,
  COMPUTE: 11, FORGET: 12, WEIGHT: 13, WEIGHT_DATA: 14, PING: 15, MEMORY: 16,
  GROUP: 17, UNGROUP: 18, PEER: 19, PREPARE: 20,
} as const;
export type CmdName = keyof typeof Cmd;
export const CMD_NAMES: Record<number, CmdName> = Object.fromEntries(Object.entries(Cmd).map(([k, v]) => [v, k as CmdName]));

// COMPUTE: device u32, graph id u64, flags u8 (ComputeFlag), then the step's inputs (count
// u32, each buffer u32, offset u64, bytes), then with READS what to read back once it has
// run (count u32, each buffer u32, offset u64, length u64: the reply's payload is those
// bytes, in order), then with GRAPH the graph (sent once per id): a repeated step is one
// frame with its inputs, answered with its outputs when it has run. PREPARE:
// device u32, graph id u64, the graph: sent ahead of its first COMPUTE (which then has the
// flag 0), so that the server decodes it while it is busy with the step before.

// GROUP: group id u32, device u32, rank u32, size u32, wire u8, session key (bytes), then
// every rank's endpoint (str): answered once this server has linked to every other rank
// (peer links, lib/rpc/peer.ts). UNGROUP: group id u32 (runs at once, not in turn: it
// wakes a step waiting on a dead peer). PEER: session key, from rank u32, to rank u32, the
// dialing server's random id (a server refuses itself), sent by a server on a connection
// of its own; after the reply the connection is a link.

/** COMPUTE's flags: the graph is sent along; reads follow the inputs. */
export const ComputeFlag = { GRAPH: 1, READS: 2 } as const;

/** Buffer layouts: rows as in a GGUF file, or the CPU's eight-row repacked groups. */
export const Layout = { PLAIN: 0, REPACKED: 1 } as const;

/** Where WEIGHT found a tensor's bytes on the server. */
export const WeightSource = { CACHE: 1, FILE: 2 } as const;

/** Largest piece of a weight in one WEIGHT_DATA frame. */
export const WEIGHT_CHUNK = 64 << 20;

/** Notices the server sends on its own: still working on a request (liveness). */
export const Notice = { HEARTBEAT: 1 } as const;

export const Status = { OK: 0, ERROR: 1, MISSING: 2 } as const;

/** A malformed frame or field: names what was wrong. */
export function protocolError(what: string): WeftError {
  return weftError("RPC_PROTOCOL", what);
}

const MAX_SAFE = Number.MAX_SAFE_INTEGER;
const TWO32 = 4294967296;

/** Builds a frame body (and the frame). */
export class Writer {
  // small bodies (every request of a step) come out of Node's shared pool, not an
  // ArrayBuffer each: a client sends several per token and each would be garbage to collect
  #buf: Uint8Array = Buffer.allocUnsafe(256);
  #view = new DataView(this.#buf.buffer, this.#buf.byteOffset, this.#buf.byteLength);
  #len = 0;

  #room(n: number): void {
    if (this.#len + n <= this.#buf.length) return;
    let cap = this.#buf.length * 2;
    while (cap < this.#len + n) cap *= 2;
    const b = Buffer.allocUnsafe(cap);
    b.set(this.#buf.subarray(0, this.#len));
    this.#buf = b;
    this.#view = new DataView(b.buffer, b.byteOffset, b.byteLength);
  }
  u8(v: number): this { this.#room(1); this.#view.setUint8(this.#len, v); this.#len += 1; return this; }
  u16(v: number): this { this.#room(2); this.#view.setUint16(this.#len, v, true); this.#len += 2; return this; }
  u32(v: number): this { this.#room(4); this.#view.setUint32(this.#len, v >>> 0, true); this.#len += 4; return this; }
  i32(v: number): this { this.#room(4); this.#view.setInt32(this.#len, v, true); this.#len += 4; return this; }
  // 64-bit fields as two 32-bit halves: a safe integer needs no BigInt (a graph has thousands
  // of these, and a BigInt is an allocation); anything else takes the BigInt path, which
  // throws for what is not an integer in range, as before
  u64(v: number): this {
    this.#room(8);
    if (Number.isSafeInteger(v) && v >= 0) {
      this.#view.setUint32(this.#len, v % TWO32, true);
      this.#view.setUint32(this.#len + 4, Math.floor(v / TWO32), true);
    } else this.#view.setBigUint64(this.#len, BigInt(v), true);
    this.#len += 8;
    return this;
  }
  i64(v: number): this {
    if (Number.isSafeInteger(v) && v >= 0) return this.u64(v);
    this.#room(8); this.#view.setBigInt64(this.#len, BigInt(v), true); this.#len += 8; return this;
  }
  f64(v: number): this { this.#room(8); this.#view.setFloat64(this.#len, v, true); this.#len += 8; return this; }
  str(s: string): this { const b = Buffer.from(s, "utf8"); this.u32(b.length); this.#room(b.length); this.#buf.set(b, this.#len); this.#len += b.length; return this; }
  /** a byte string: u64 length, then the bytes */
  bytes(b: Uint8Array): this { this.u64(b.length); this.#room(b.length); this.#buf.set(b, this.#len); this.#len += b.length; return this; }
  get length(): number { return this.#len; }
  /** a view of the bytes written (a plain Uint8Array: its slice() copies) */
  body(): Uint8Array { return new Uint8Array(this.#buf.buffer, this.#buf.byteOffset, this.#len); }
}

/** The header of a frame around `body` (a separate buffer: a big body is not copied). */
export function frameHeader(kind: number, cmd: number, id: number, bodyLength: number): Buffer {
  const h = Buffer.allocUnsafe(HEADER_BYTES);
  h.writeUInt32LE(MAGIC, 0);
  h.writeUInt8(kind, 4);
  h.writeUInt8(cmd, 5);
  h.writeUInt16LE(0, 6);
  h.writeUInt32LE(id >>> 0, 8);
  h.writeBigUInt64LE(BigInt(bodyLength), 12);
  return h;
}

export interface FrameHeader { kind: number; cmd: number; id: number; length: number }

/** Parses a header; throws RPC_PROTOCOL for a bad magic or a body longer than `maxBody`. */
export function parseHeader(h: Uint8Array, maxBody: number): FrameHeader {
  const v = new DataView(h.buffer, h.byteOffset, HEADER_BYTES);
  if (v.getUint32(0, true) !== MAGIC) throw protocolError("not a weft RPC frame (bad magic): is this a weft rpc-server / client?");
  const kind = v.getUint8(4), cmd = v.getUint8(5);
  const length = v.getBigUint64(12, true);
  if (length > BigInt(maxBody)) throw weftError("RPC_LIMIT", `frame of ${length} bytes is larger than the ${maxBody} allowed`);
  return { kind, cmd, id: v.getUint32(8, true), length: Number(length) };
}

/** Reads a frame body; every read is checked against what is left. */
export class Reader {
  #v: DataView;
  #at = 0;
  /** `owned`: buf is memory of this frame's alone (restView may hand out views of it) */
  constructor(readonly buf: Uint8Array, private readonly owned = false) { this.#v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength); }
  #need(n: number, what: string): void {
    if (this.#at + n > this.buf.length) throw protocolError(`${what}: the frame ends ${this.buf.length - this.#at} bytes short of ${n}`);
  }
  get left(): number { return this.buf.length - this.#at; }
  u8(what: string): number { this.#need(1, what); return this.#v.getUint8(this.#at++); }
  u16(what: string): number { this.#need(2, what); const x = this.#v.getUint16(this.#at, true); this.#at += 2; return x; }
  u32(what: string): number { this.#need(4, what); const x = this.#v.getUint32(this.#at, true); this.#at += 4; return x; }
  i32(what: string): number { this.#need(4, what); const x = this.#v.getInt32(this.#at, true); this.#at += 4; return x; }
  u64(what: string, max = MAX_SAFE): number {
    this.#need(8, what);
    const hi = this.#v.getUint32(this.#at + 4, true);
    // below 2^53 the halves give the value exactly; at or above it, it is over any max
    const x = hi < 0x200000 ? hi * TWO32 + this.#v.getUint32(this.#at, true) : Infinity;
    if (x > max) throw protocolError(`${what} is ${this.#v.getBigUint64(this.#at, true)}, more than ${max}`);
    this.#at += 8;
    return x;
  }
  i64(what: string): number {
    this.#need(8, what);
    const hi = this.#v.getInt32(this.#at + 4, true);
    const x = hi * TWO32 + this.#v.getUint32(this.#at, true);
    // exact while |x| < 2^53; hi beyond ±2^21 is out of range whatever the low half
    if (hi >= 0x200000 || hi < -0x200000 || x > MAX_SAFE || x < -MAX_SAFE) throw protocolError(`${what} is out of range`);
    this.#at += 8;
    return x;
  }
  f64(what: string): number { this.#need(8, what); const x = this.#v.getFloat64(this.#at, true); this.#at += 8; return x; }
  str(what: string, max = 1 << 16): string {
    const n = this.u32(`${what} length`);
    if (n > max) throw protocolError(`${what} is ${n} bytes, more than ${max}`);
    this.#need(n, what);
    const s = Buffer.from(this.buf.buffer, this.buf.byteOffset + this.#at, n).toString("utf8");
    this.#at += n;
    return s;
  }
  /** a byte string (a view into the frame, not a copy) */
  bytes(what: string): Uint8Array {
    const n = this.u64(`${what} length`);
    this.#need(n, what);
    const b = this.buf.subarray(this.#at, this.#at + n);
    this.#at += n;
    return b;
  }
  /** the bytes left, copied into their own ArrayBuffer (safe to view as any typed array) */
  rest(): Uint8Array {
    const out = new Uint8Array(this.left);
    out.set(this.buf.subarray(this.#at));
    this.#at = this.buf.length;
    return out;
  }
  /** the bytes left as a view where they start 8-byte aligned in memory the frame owns (the
   * caller may view them as floats), else copied */
  restView(): Uint8Array {
    const at = this.#at;
    if (!this.owned || (this.buf.byteOffset + at) % 8 !== 0) return this.rest();
    this.#at = this.buf.length;
    return this.buf.subarray(at);
  }
  end(what: string): void { if (this.left !== 0) throw protocolError(`${what}: ${this.left} unexpected bytes at the end`); }
}

/** A reply body: status, error code and message, then the payload. */
export function replyBody(status: number, code = "", message = "", payload?: Uint8Array): Uint8Array {
  const w = new Writer().u8(status).str(code).str(message);
  const head = w.body();
  if (!payload?.length) return head;
  const out = new Uint8Array(head.length + payload.length);
  out.set(head);
  out.set(payload, head.length);
  return out;
}

/** Bytes of a frame: header, then the body's pieces (big data is not copied into one buffer). */
export function frame(kind: number, cmd: number, id: number, body: Uint8Array | readonly Uint8Array[]): Uint8Array[] {
  const parts = body instanceof Uint8Array ? [body] : [...body];
  return [frameHeader(kind, cmd, id, parts.reduce((n, p) => n + p.length, 0)), ...parts];
}

/** bodies up to this size reuse a transient reader's scratch memory (larger ones get their own) */
const SCRATCH_MAX = 4 << 20;

/**
 * Cuts a byte stream into frames. A body that arrives whole in one chunk is handed out as
 * a view of it; a longer one is copied once, chunk by chunk, into its own buffer (made
 * when its header arrives, at most `maxBody` bytes). `maxBody` is asked for each header,
 * so the limit can tighten before authentication.
 *
 * `transient`: the bodies handed out are valid only until the caller of push() returns
 * (a socket that reads into one buffer of its own reuses it for the next chunk, and a
 * body longer than a chunk is assembled in scratch memory reused for the next such body):
 * the caller copies what it keeps. No memory is allocated per frame then.
 */
export class FrameReader {
  readonly #head = new Uint8Array(HEADER_BYTES);
  #headLen = 0;
  #header: FrameHeader | null = null;
  #body: Uint8Array | null = null;
  #bodyLen = 0;
  #scratch: Uint8Array | null = null;
  constructor(private readonly maxBody: () => number, private readonly transient = false) {}

  /** bytes received of a frame not yet complete */
  get buffered(): number { return this.#headLen + this.#bodyLen; }

  /** where a body longer than its chunk is assembled */
  #bodyMemory(n: number): Uint8Array {
    if (!this.transient || n > SCRATCH_MAX) return Buffer.allocUnsafeSlow(n);
    if (!this.#scratch || this.#scratch.length < n) this.#scratch = new Uint8Array(Math.max(n, 2 * (this.#scratch?.length ?? 0)));
    return this.#scratch.subarray(0, n);
  }

  /**
   * Adds bytes; returns the frames they complete (throws RPC_PROTOCOL / RPC_LIMIT for a bad
   * header). With `each`, every frame goes to it as soon as it is complete, before the next
   * header is read (so what it does, e.g. a handshake step, can change `maxBody` for that
   * header); `each` returning false stops reading.
   */
  push(chunk: Uint8Array, each?: (f: { h: FrameHeader; body: Uint8Array }) => boolean | void): Array<{ h: FrameHeader; body: Uint8Array }> {
    const out: Array<{ h: FrameHeader; body: Uint8Array }> = [];
    const emit = (f: { h: FrameHeader; body: Uint8Array }): boolean => {
      if (!each) { out.push(f); return true; }
      return each(f) !== false;
    };
    let at = 0;
    while (at < chunk.length) {
      if (this.#body) {
        const k = Math.min(chunk.length - at, this.#body.length - this.#bodyLen);
        this.#body.set(chunk.subarray(at, at + k), this.#bodyLen);
        this.#bodyLen += k;
        at += k;
        if (this.#bodyLen === this.#body.length) {
          const f = { h: this.#header!, body: this.#body };
          this.#header = null; this.#body = null; this.#bodyLen = 0;
          if (!emit(f)) return out;
        }
        continue;
      }
      const k = Math.min(HEADER_BYTES - this.#headLen, chunk.length - at);
      this.#head.set(chunk.subarray(at, at + k), this.#headLen);
      this.#headLen += k;
      at += k;
      if (this.#headLen < HEADER_BYTES) break;
      this.#headLen = 0;
      const h = parseHeader(this.#head, this.maxBody());
      if (chunk.length - at >= h.length) {
        const body = chunk.subarray(at, at + h.length);
        at += h.length;
        if (!emit({ h, body })) return out;
      } else {
        this.#header = h;
        this.#body = this.#bodyMemory(h.length);
      }
    }
    return out;
  }
}

/** A reply as the client sees it: its status, and the payload to read. */
export interface Reply { status: number; r: Reader }

/** Reads a reply body's head; the reader is left at the payload. */
export function readReply(body: Uint8Array): { status: number; code: string; message: string; r: Reader } {
  const r = new Reader(body);
  const status = r.u8("reply status");
  const code = r.str("error code", 64);
  const message = r.str("error message", 1 << 16);
  return { status, code, message, r };
}

// Authentication: HMAC-SHA256 over both sides' random nonces with the shared token as the
// key. The client proves it knows the token first; the server's proof then shows the client
// that it talks to a holder of the token too. The token itself never crosses the wire.
export const NONCE_BYTES = 32;
export function authProof(token: string, who: "client" | "server", first: Uint8Array, second: Uint8Array): Uint8Array {
  return createHmac("sha256", Buffer.from(token, "utf8")).update(`weft-rpc-${who}`).update(first).update(second).digest();
}
export function proofsEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

/** A fingerprint of the op and type tables: both sides must number ops and types alike. */
export function tablesDigest(): string {
  return createHash("sha256").update(OP_NAMES.join(",")).update(Object.keys(TYPES).join(",")).digest("hex").slice(0, 16);
}
