/**
 * weft's RPC server (`weft rpc-server`, DESIGN §6): serves this machine's devices to
 * clients over TCP. Structured as porsager/postgres's connection (STYLE §4): a connection
 * is in one of a few named states (HELLO → AUTH → READY → CLOSED), inbound frames go
 * through one dispatch table keyed by command (a handler per command, named after it),
 * and every reply is written by one framing writer.
 *
 * Every byte from the network is hostile: frames are size-capped (4 KiB before
 * authentication), every field is range-checked by the Reader, buffers are checked by id
 * and bounds, graphs are decoded with op and type allow-lists and bounds checks and then
 * validated again by the native decoder, and a client may hold at most --max-memory bytes.
 * A bad request gets an error reply and the server stays up; a malformed frame ends that
 * one connection. Each client has its own buffers, graphs and device queues, freed when
 * it disconnects; requests of one client run in order, clients run independently.
 */
import { createServer, Server, Socket } from "node:net";
import { Hash, createHash, randomBytes } from "node:crypto";
import { open } from "node:fs/promises";
import { existsSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { totalmem } from "node:os";
import { ERROR_CODES, WeftError, fromNative, weftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { OP_NAMES, Op } from "../core/ops.js";
import { Tensor, toShape4 } from "../core/tensor.js";
import { GgmlType, TYPES, isKnownType, typeName } from "../core/types.js";
import { ensureDir, writeAtomically } from "../core/files.js";
import { CpuBackend, CpuBuffer, CpuDevice, cpuDevice, native, usableCores } from "../cpu/index.js";
import type { LaneListener, NativeLane } from "../cpu/native.js";
import { canRepack, repackedBytes } from "../cpu/repack.js";
import type { RepackedBuffer } from "../cpu/buffer.js";
import { decodeGraph } from "./graph.js";
import { LINK_TIMEOUT_MS, MAX_GROUP, PeerAllowList, PeerRendezvous, dialPeer, takeSocket } from "./peer.js";
import { parseEndpoint } from "./client.js";
import {
  CMD_NAMES, Cmd, CmdName, ComputeFlag, DEFAULT_MAX_FRAME, FrameReader, Kind, Layout, NONCE_BYTES, Notice, PREAUTH_MAX_BODY,
  PROTOCOL_VERSION, Reader, Status, WeightSource, Writer, authProof, frame, proofsEqual, protocolError, replyBody, tablesDigest,
} from "./protocol.js";

export const DEFAULT_RPC_PORT = 50052;

export interface RpcServerOptions {
  /** address to listen on (default 127.0.0.1); anything but loopback needs a token or `insecure` */
  host?: string;
  /** TCP port (default 50052; 0: any free port) */
  port?: number;
  /** shared secret clients must prove they hold (HMAC challenge-response); null: none */
  token?: string | null;
  /** allow a non-loopback address without a token */
  insecure?: boolean;
  /** devices to serve (default ["cpu:0"]) */
  devices?: readonly string[];
  /** threads per device queue (default: the cores this process may use) */
  threads?: number;
  /** most bytes one client may allocate (default: this machine's memory) */
  maxMemory?: number;
  /** largest frame body after authentication (default 256 MiB) */
  maxFrame?: number;
  /** content-hash cache of uploaded weights (null: none) */
  cacheDir?: string | null;
  /** folder of GGUF files clients may name instead of uploading (null: none) */
  modelsDir?: string | null;
  /** most clients at once (default 16) */
  maxClients?: number;
  /** where this server may dial the peers of a tensor split (default ["private"]: loopback
   * and private networks); entries: "private", "any", addresses, subnets (PeerAllowList) */
  peerAllow?: readonly string[];
  /** one line per client event (default: none) */
  log?: (line: string) => void;
  /** serve a client's repeated steps on a native thread once it has run one (default true;
   * WEFT_RPC_LANES=0 turns it off: every request then runs on the event loop) */
  lanes?: boolean;
  /** where every server of a tensor split runs on this host, pass their partial sums through
   * shared memory rather than the TCP links (default true; WEFT_PEER_SHM=0 turns it off) */
  sharedMemory?: boolean;
}

/** The shared token from a file (trimmed), or from WEFT_RPC_TOKEN; null when neither is set. */
export function readToken(file?: string): string | null {
  if (file) {
    let text: string;
    try { text = readFileSync(file, "utf8"); } catch (e) {
      throw weftError("IO", `cannot read the token file ${file}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (e as Error).message}`, e);
    }
    const t = text.trim();
    if (!t) throw weftError("RPC_AUTH", `the token file ${file} is empty`);
    return t;
  }
  const env = process.env.WEFT_RPC_TOKEN?.trim();
  return env ? env : null;
}

export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}


type State = "HELLO" | "AUTH" | "READY" | "CLOSED";
type Out = void | Uint8Array | { status: number; payload?: Uint8Array };
type Handler = (s: Session, r: Reader) => Out | Promise<Out>;

interface ServedBuffer { readonly cpu: CpuBuffer; readonly size: number; readonly layout: number; readonly charged: number }
/** A weight being uploaded in pieces, written straight into its place (hashed on the way where it is cached). */
interface Staging { readonly b: ServedBuffer; readonly bufferId: number; readonly offset: number; readonly t: Tensor; readonly hash: string; readonly hasher: Hash | null; got: number }
interface ServedGraph { readonly graph: Graph; readonly device: number; readonly buffers: Set<number> }
/** A collective group the client made (GROUP): its native group over the peer links, or why it has none. */
type ServedGroup = { readonly native: number; readonly device: number; readonly rank: number } | { readonly failed: string } | { readonly forming: true };

/** ops a served CPU device runs for a client (ALL_REDUCE: in a group the client made with GROUP) */
function allowedOp(d: CpuDevice, op: Op): boolean {
  return d.supportsOp(new Tensor({ type: GgmlType.F32, ne: [1, 1, 1, 1], op }));
}

const MAX_GRAPHS = 1024;
/** bytes of weights waiting to be written to the cache before a load waits for the disk */
const CACHE_BACKLOG = 512 << 20;
const MAX_INPUTS = 4096;
const MAX_READS = 64;
const MAX_BUFFERS = 1 << 16;
const MAX_GROUPS = 64;
const PREAUTH_TIMEOUT_MS = 10_000;

/** One connected client. */
class Session {
  state: State = "HELLO";
  readonly nonce = randomBytes(NONCE_BYTES);
  readonly buffers = new Map<number, ServedBuffer>();
  readonly backends = new Map<number, CpuBackend>();
  readonly graphs = new Map<number, ServedGraph>();
  readonly groups = new Map<number, ServedGroup>();
  /** weights being uploaded, by "buffer:offset" */
  readonly staging = new Map<string, Staging>();
  used = 0;
  /** requests received and not yet answered, and their bytes */
  pending = 0;
  queuedBytes = 0;
  tail: Promise<void> = Promise.resolve();
  /** when the request chain last let the event loop turn */
  turned = performance.now();
  readonly reader: FrameReader;
  readonly name: string;
  /** once it has run a step: the native lane that reads and writes its socket (csrc/lane.cpp) */
  lane: NativeLane | null = null;
  /** a step has run (the session may move to a lane) */
  stepped = false;
  constructor(readonly core: RpcServer, readonly socket: Socket) {
    this.reader = new FrameReader(() => (this.state === "READY" ? core.maxFrame : PREAUTH_MAX_BODY));
    this.name = `${socket.remoteAddress}:${socket.remotePort}`;
  }

  /**
   * Writes a frame; the replies of one turn of the event loop leave in one write, except
   * a COMPUTE's and the last one pending, which leave at once (the client waits for them).
   */
  send(kind: number, cmd: number, id: number, body: Uint8Array | Uint8Array[]): void {
    const parts = frame(kind, cmd, id, body);
    if (this.lane) return native().laneSend(this.lane, parts);
    if (this.socket.destroyed) return;
    if (!this.#corked) {
      this.#corked = true;
      this.socket.cork();
      setImmediate(() => { if (this.#corked) { this.#corked = false; this.socket.uncork(); } });
    }
    for (const p of parts) this.socket.write(p);
    // the last reply the client waits for goes now (only a burst of requests is batched)
    if (cmd === Cmd.COMPUTE || this.pending <= 1) { this.#corked = false; this.socket.uncork(); }
  }
  #corked = false;
  reply(cmd: number, id: number, out: Out): void {
    if (out instanceof Uint8Array) return this.send(Kind.REPLY, cmd, id, [replyBody(Status.OK), out]);
    if (out && typeof out === "object") return this.send(Kind.REPLY, cmd, id, [replyBody(out.status), out.payload ?? new Uint8Array(0)]);
    this.send(Kind.REPLY, cmd, id, replyBody(Status.OK));
  }
  fail(cmd: number, id: number, e: unknown): void {
    const err = e instanceof WeftError ? e : fromNative(e);
    const code = ERROR_CODES.has(err.code) ? err.code : "COMPUTE_FAILED";
    this.send(Kind.REPLY, cmd, id, replyBody(Status.ERROR, code, err.message.slice(0, 4000)));
  }

  buffer(id: number): ServedBuffer {
    const b = this.buffers.get(id);
    if (!b) throw weftError("BAD_ARGUMENT", `no buffer ${id} (never allocated, or freed)`);
    return b;
  }
  device(i: number): CpuDevice {
    const d = this.core.devices[i];
    if (!d) throw weftError("BAD_ARGUMENT", `no device ${i} (this server has ${this.core.devices.length})`);
    return d;
  }
  backend(i: number): CpuBackend {
    let be = this.backends.get(i);
    if (!be) { be = this.device(i).initBackend({ threads: this.core.threads }); this.backends.set(i, be); }
    return be;
  }
  charge(bytes: number): void {
    if (this.used + bytes > this.core.maxMemory)
      throw weftError("RPC_LIMIT", `this client would hold ${mib(this.used + bytes)} MiB, more than the server's --max-memory ${mib(this.core.maxMemory)} MiB`);
    if (this.buffers.size >= MAX_BUFFERS) throw weftError("RPC_LIMIT", `more than ${MAX_BUFFERS} buffers`);
    this.used += bytes;
  }
  newBufferId(id: number): void {
    if (this.buffers.has(id)) throw weftError("BAD_ARGUMENT", `buffer id ${id} is in use`);
  }
  addBuffer(id: number, cpu: CpuBuffer, layout: number, charged: number): void {
    this.buffers.set(id, { cpu, size: cpu.size, layout, charged });
    if (this.lane && layout === Layout.PLAIN) native().laneBindBuffer(this.lane, id, cpu.id);
  }
  /** frees a buffer and forgets the graphs that use it (a later run of them must resend) */
  freeBuffer(id: number): void {
    const b = this.buffer(id);
    if (this.lane) native().laneBindBuffer(this.lane, id, -1);
    for (const [k, st] of this.staging) if (st.bufferId === id) this.staging.delete(k);
    for (const [gid, g] of this.graphs) if (g.buffers.has(id)) this.forgetGraph(gid);
    b.cpu.dispose();
    this.buffers.delete(id);
    this.used -= b.charged;
  }
  forgetGraph(gid: number): void {
    const g = this.graphs.get(gid);
    if (!g) return;
    if (this.lane) native().laneUnbindGraph(this.lane, gid);
    this.backends.get(g.device)?.forget(g.graph);
    this.graphs.delete(gid);
  }

  /** a graph that has run: its next steps may run on the lane (its plan is cached natively now) */
  bindStep(gid: number, g: ServedGraph): void {
    const be = this.backends.get(g.device);
    if (this.lane && be && !be.disposed) native().laneBindGraph(this.lane, gid, be.nativeContext, g.graph.uid, g.device);
  }
  /**
   * Moves the session to a native lane (csrc/lane.cpp): from here a thread of its own
   * reads and writes the socket and runs the repeated steps without this event loop (in
   * JS each costs the server half a millisecond of CPU per token, taken from the compute
   * threads). Done between requests only, when nothing is half read or unsent; false
   * where the socket has no descriptor to hand over (it then stays here).
   */
  toLane(onEvent: LaneListener): boolean {
    const sock = this.socket;
    if (this.lane || this.state !== "READY" || this.pending || this.reader.buffered || sock.readableLength || sock.writableLength || sock.isPaused()) return false;
    const handle = (sock as unknown as { _handle?: { fd?: number; readStop?: () => void; readStart?: () => void } })._handle;
    if (typeof handle?.fd !== "number" || handle.fd < 0) return false;
    handle.readStop?.();
    try {
      this.lane = native().laneOpen(handle.fd, this.core.maxFrame, onEvent);
    } catch {
      handle.readStart?.();
      return false;
    }
    // Node's handle is closed (not ended: a FIN would end the client's connection too)
    for (const ev of ["data", "close", "error"]) sock.removeAllListeners(ev);
    sock.on("error", () => {});
    sock.destroy();
    for (const [id, b] of this.buffers) if (b.layout === Layout.PLAIN) native().laneBindBuffer(this.lane, id, b.cpu.id);
    for (const [gid, g] of this.graphs) this.bindStep(gid, g);
    return true;
  }
  /** ends the connection: graceful sends what is queued first */
  end(graceful: boolean): void {
    if (this.lane) native().laneClose(this.lane, graceful);
    else if (graceful) this.socket.end();
    else this.socket.destroy();
  }

  /** ends a group: a step waiting in it on the network fails at once */
  ungroup(gid: number, why: string): void {
    const g = this.groups.get(gid);
    this.groups.delete(gid);
    if (g && "native" in g) native().destroyGroup(g.native, why);
  }
  ungroupAll(why: string): void { for (const gid of [...this.groups.keys()]) this.ungroup(gid, why); }

  /** everything this client holds, freed (it disconnected); runs after its last request */
  async release(): Promise<void> {
    this.ungroupAll("the client disconnected");
    await Promise.allSettled([...this.backends.values()].map((b) => b.dispose()));
    this.backends.clear();
    this.graphs.clear();
    for (const b of this.buffers.values()) b.cpu.dispose();
    this.buffers.clear();
    this.staging.clear();
    this.used = 0;
  }
}

function mib(n: number): string { return (n / 2 ** 20).toFixed(1); }

/** A weight's place and description as WEIGHT carries it: checked against its buffer. */
function readWeightDesc(s: Session, r: Reader): { id: number; b: ServedBuffer; offset: number; t: Tensor; size: number; hash: string } {
  const id = r.u32("buffer id"), offset = r.u64("offset");
  const b = s.buffer(id);
  const layout = r.u8("layout");
  const type = r.u16("type");
  if (!isKnownType(type)) throw weftError("UNSUPPORTED_TYPE", `weight type ${typeName(type)} is not supported`);
  const ne = toShape4([0, 1, 2, 3].map((k) => r.u64(`ne[${k}]`)), "weight shape");
  const tr = TYPES[type];
  if (ne[0] % tr.blockSize) throw protocolError(`weight row length ${ne[0]} is not a multiple of ${tr.name}'s block size`);
  const t = new Tensor({ type, ne });
  if (!Number.isSafeInteger(t.nbytes) || !Number.isSafeInteger(ne[0] * ne[1] * ne[2] * ne[3])) throw protocolError("weight too large");
  if (layout !== b.layout) throw weftError("BAD_ARGUMENT", `buffer ${id} is not of layout ${layout}`);
  if (layout === Layout.REPACKED && !canRepack(t)) throw weftError("BAD_ARGUMENT", `a ${tr.name} [${ne.join(", ")}] weight cannot be repacked`);
  const size = layout === Layout.REPACKED ? repackedBytes(t) : t.nbytes;
  if (offset + size > b.size) throw weftError("OUT_OF_RANGE", `a weight of ${size} bytes at ${offset} does not fit buffer ${id} (${b.size} bytes)`);
  const hash = r.bytes("hash");
  if (hash.length !== 32) throw protocolError(`a weight hash is 32 bytes, got ${hash.length}`);
  return { id, b, offset, t, size, hash: Buffer.from(hash).toString("hex") };
}

function sha256(b: Uint8Array): string { return createHash("sha256").update(b).digest("hex"); }

/** The dispatch table: one handler per command, named after it. */
const HANDLERS: Record<Exclude<CmdName, "HELLO" | "AUTH" | "PEER">, Handler> = {
  ALLOC(s, r) {
    const id = r.u32("buffer id"), device = r.u32("device"), layout = r.u8("layout"), size = r.u64("size");
    r.end("ALLOC");
    s.device(device);
    s.newBufferId(id);
    s.charge(size);
    try {
      const bt = layout === Layout.REPACKED ? s.core.repackType(device) : layout === Layout.PLAIN ? s.device(device).bufferType() : null;
      if (!bt) throw protocolError(`unknown layout ${layout}`);
      s.addBuffer(id, bt.alloc(size), layout, size);
    } catch (e) { s.used -= size; throw e; }
  },
  FREE(s, r) {
    const id = r.u32("buffer id");
    r.end("FREE");
    s.freeBuffer(id);
  },
  FILL(s, r) {
    const id = r.u32("buffer id"), offset = r.u64("offset"), length = r.u64("length"), value = r.u8("value");
    r.end("FILL");
    const b = s.buffer(id);
    if (b.layout === Layout.REPACKED) throw weftError("BAD_ARGUMENT", "a repacked weight buffer cannot be filled");
    b.cpu.memset(offset, length, value);
  },
  SET(s, r) {
    const id = r.u32("buffer id"), offset = r.u64("offset");
    const whole = r.u8("tensor flag");
    let t: Tensor | null = null;
    if (whole) {
      const type = r.u16("type");
      if (!isKnownType(type)) throw weftError("UNSUPPORTED_TYPE", `type ${typeName(type)} is not supported`);
      t = new Tensor({ type, ne: toShape4([r.u64("ne0"), r.u64("ne1")]) });
    }
    const data = r.bytes("data");
    r.end("SET");
    const b = s.buffer(id);
    if (b.layout === Layout.REPACKED) {
      if (!t || !canRepack(t) || data.length !== t.nbytes || offset + repackedBytes(t) > b.size)
        throw weftError("BAD_ARGUMENT", "a repacked weight buffer is written a whole matrix at a time");
      b.cpu.writeTensor(t, data, 0, offset);
    } else b.cpu.set(offset, data);
  },
  GET(s, r) {
    const id = r.u32("buffer id"), offset = r.u64("offset"), length = r.u64("length", s.core.maxFrame - 64);
    r.end("GET");
    return readable(s, id).cpu.get(offset, length);
  },
  SET2D(s, r) {
    const id = r.u32("buffer id"), offset = r.u64("offset"), rows = r.u64("rows"), rowBytes = r.u64("row bytes"), stride = r.u64("stride");
    const data = r.bytes("data");
    r.end("SET2D");
    if (rows * rowBytes !== data.length) throw protocolError(`SET2D: ${rows} rows of ${rowBytes} bytes, but ${data.length} bytes sent`);
    const b = s.buffer(id);
    if (b.layout === Layout.REPACKED) throw weftError("BAD_ARGUMENT", "a repacked weight buffer is written a whole matrix at a time");
    checkStrided(b, offset, rows, rowBytes, stride);
    b.cpu.set2d(offset, data, rows, rowBytes, stride);
  },
  GET2D(s, r) {
    const id = r.u32("buffer id"), offset = r.u64("offset"), rows = r.u64("rows"), rowBytes = r.u64("row bytes"), stride = r.u64("stride");
    r.end("GET2D");
    if (rows * rowBytes > s.core.maxFrame - 64) throw weftError("RPC_LIMIT", `GET2D of ${rows * rowBytes} bytes is more than one frame`);
    const b = readable(s, id);
    checkStrided(b, offset, rows, rowBytes, stride);
    return b.cpu.get2d(offset, rows, rowBytes, stride);
  },
  COPY(s, r) {
    const src = r.u32("source buffer"), srcOff = r.u64("source offset"), dst = r.u32("destination buffer"), dstOff = r.u64("destination offset");
    const length = r.u64("length");
    r.end("COPY");
    const a = s.buffer(src), b = s.buffer(dst);
    if (length === 0) return;
    if (!b.cpu.copyFrom(a.cpu, srcOff, dstOff, length)) throw weftError("BAD_ARGUMENT", "repacked weight buffers cannot be copied");
  },
  async COMPUTE(s, r) {
    const device = r.u32("device"), gid = r.u64("graph id"), flags = r.u8("flags");
    if (flags > (ComputeFlag.GRAPH | ComputeFlag.READS)) throw protocolError(`unknown COMPUTE flags ${flags}`);
    s.device(device);
    // the step's inputs, written first
    const n = r.u32("input count");
    if (n > MAX_INPUTS) throw protocolError(`${n} inputs, at most ${MAX_INPUTS}`);
    for (let i = 0; i < n; i++) {
      const b = s.buffer(r.u32("input buffer")), offset = r.u64("input offset"), data = r.bytes("input");
      if (b.layout !== Layout.PLAIN) throw weftError("BAD_ARGUMENT", "an input cannot be written into repacked weight memory");
      b.cpu.set(offset, data);
    }
    // what the reply brings back once the step has run (checked before it runs)
    const reads: Array<{ b: ServedBuffer; offset: number; length: number }> = [];
    if (flags & ComputeFlag.READS) {
      const k = r.u32("read count");
      if (k > MAX_READS) throw protocolError(`${k} reads, at most ${MAX_READS}`);
      let total = 0;
      for (let i = 0; i < k; i++) {
        const b = readable(s, r.u32("read buffer")), offset = r.u64("read offset"), length = r.u64("read length");
        checkStrided(b, offset, 1, length, length);
        total += length;
        reads.push({ b, offset, length });
      }
      if (total > s.core.maxFrame - 64) throw weftError("RPC_LIMIT", `reads of ${total} bytes are more than one frame`);
    }
    let g = s.graphs.get(gid);
    if (flags & ComputeFlag.GRAPH) g = receiveGraph(s, r, device, gid);
    else r.end("COMPUTE");
    if (!g) throw weftError("BAD_ARGUMENT", `no graph ${gid}: send it with its first COMPUTE (it was never sent, or was forgotten)`);
    if (g.device !== device) throw weftError("BAD_ARGUMENT", `graph ${gid} was sent for device ${g.device}, not ${device}`);
    try {
      await s.backend(device).computeAsync(g.graph);
    } catch (e) {
      s.forgetGraph(gid);  // the native side may have dropped it; the client resends
      throw e;
    }
    s.stepped = true;
    s.bindStep(gid, g);
    if (!reads.length) return;
    const out = new Uint8Array(reads.reduce((n, x) => n + x.length, 0));
    let at = 0;
    for (const x of reads) { x.b.cpu.get(x.offset, x.length, out.subarray(at, at + x.length)); at += x.length; }
    return out;
  },
  PREPARE(s, r) {
    const device = r.u32("device"), gid = r.u64("graph id");
    const g = receiveGraph(s, r, device, gid);
    s.backend(device).prepare(g.graph);
  },
  FORGET(s, r) {
    const gid = r.u64("graph id");
    r.end("FORGET");
    s.forgetGraph(gid);
  },
  async WEIGHT(s, r) {
    const w = readWeightDesc(s, r);
    const hasSource = r.u8("source flag");
    const file = hasSource ? r.str("file name", 255) : null;
    const fileOffset = hasSource ? r.u64("file offset") : 0;
    r.end("WEIGHT");
    const key = `${w.id}:${w.offset}`;
    s.staging.delete(key);
    // 1. the content-hash cache: the stored device-layout bytes, read into place
    const cached = s.core.cachedWeight(w.hash, w.t, w.b.layout, w.size);
    if (cached) {
      w.b.cpu.loadLayout(w.offset, cached, 0, w.size);
      return { status: Status.OK, payload: new Writer().u8(WeightSource.CACHE).body() };
    }
    // 2. the server's own copy of the model (checked by hash), copied or repacked from where it lies
    const src = file !== null ? s.core.modelTensor(file, fileOffset, w.t.nbytes, w.hash) : null;
    if (src) {
      if (w.b.layout === Layout.REPACKED) (w.b.cpu as RepackedBuffer).repackFrom(w.t, src.buf, src.offset, w.offset);
      else w.b.cpu.copyFrom(src.buf, src.offset, w.offset, w.t.nbytes);
      await s.core.storeWeight(w.hash, w.t, w.b.layout, () => w.b.cpu.readLayout(w.offset, w.size));
      return { status: Status.OK, payload: new Writer().u8(WeightSource.FILE).body() };
    }
    // 3. the client uploads it (WEIGHT_DATA, in pieces of whole row groups), straight into place
    s.staging.set(key, { b: w.b, bufferId: w.id, offset: w.offset, t: w.t, hash: w.hash, hasher: s.core.caches ? createHash("sha256") : null, got: 0 });
    return { status: Status.MISSING };
  },
  async WEIGHT_DATA(s, r) {
    const id = r.u32("buffer id"), offset = r.u64("offset"), at = r.u64("piece offset");
    const data = r.bytes("data");
    r.end("WEIGHT_DATA");
    const key = `${id}:${offset}`;
    const st = s.staging.get(key);
    if (!st) throw weftError("BAD_ARGUMENT", `no weight at ${offset} of buffer ${id} is waiting for data (send WEIGHT first)`);
    try {
      if (at !== st.got || at + data.length > st.t.nbytes)
        throw protocolError(`weight at ${offset} of buffer ${id}: bytes at ${at} (+${data.length}), expected them at ${st.got} of ${st.t.nbytes}`);
      if (st.b.layout === Layout.REPACKED) (st.b.cpu as RepackedBuffer).writeRows(st.t, data, at / st.t.nb[1], st.offset);
      else st.b.cpu.set(st.offset + at, data);
      st.hasher?.update(data);
      st.got += data.length;
      if (st.got < st.t.nbytes) return;
      s.staging.delete(key);
      // only what goes into the cache (and is served to other clients) must be what its hash says
      if (st.hasher && st.hasher.digest("hex") !== st.hash) throw weftError("BAD_ARGUMENT", `weight at ${offset} of buffer ${id}: the bytes do not match the hash sent with WEIGHT`);
    } catch (e) {
      s.staging.delete(key);
      throw e;
    }
    const size = st.b.layout === Layout.REPACKED ? repackedBytes(st.t) : st.t.nbytes;
    await s.core.storeWeight(st.hash, st.t, st.b.layout, () => st.b.cpu.readLayout(st.offset, size));
  },
  async GROUP(s, r) {
    const g = readGroup(s, r);
    s.ungroup(g.gid, "the client made the group again");
    if (s.groups.size >= MAX_GROUPS) throw weftError("RPC_LIMIT", `more than ${MAX_GROUPS} collective groups for one client`);
    // linking runs beside the client's queue (its later requests go on; the client sends a
    // COMPUTE that needs the group only after this reply); UNGROUP meanwhile cancels it
    const entry = { forming: true } as const;
    s.groups.set(g.gid, entry);
    const current = () => s.groups.get(g.gid) === entry && s.state !== "CLOSED";
    let fds: number[];
    try {
      fds = await linkPeers(s.core, g);
    } catch (e) {
      if (current()) s.groups.set(g.gid, { failed: `${(e as Error).message} (the servers of a tensor split must reach each other at the addresses the client uses; else --no-peer-links)` });
      throw e;
    }
    if (!current()) {
      for (const fd of fds) if (fd >= 0) native().closePeerSocket(fd);
      throw weftError("RPC_CLOSED", s.state === "CLOSED" ? "the client left" : "the client ended the group");
    }
    s.groups.set(g.gid, { native: native().createPeerGroup(g.size, g.rank, fds, g.wire, s.core.sharedMemory), device: g.device, rank: g.rank });
    s.core.log(`client ${s.name}: group ${g.gid} linked (rank ${g.rank} of ${g.size})`);
  },
  UNGROUP(s, r) {
    const gid = r.u32("group id");
    r.end("UNGROUP");
    s.ungroup(gid, "the client ended the group");
  },
  PING(_s, r) { r.end("PING"); },
  MEMORY(s, r) {
    r.end("MEMORY");
    const w = new Writer().u32(s.core.devices.length);
    for (const d of s.core.devices) { const m = d.memory(); w.u64(m.free).u64(m.total); }
    // this client's bytes, then the whole server's: clients, native buffers and their bytes
    const live = native().bufferStats();
    return w.u64(s.used).u32(s.core.clients).u64(live.count).u64(live.bytes).body();
  },
};

interface GroupRequest { gid: number; device: number; rank: number; size: number; wire: number; key: Uint8Array; endpoints: string[] }

/** A GROUP request's fields, every one checked (the endpoints as host:port; dialing checks the addresses). */
function readGroup(s: Session, r: Reader): GroupRequest {
  const gid = r.u32("group id"), device = r.u32("device"), rank = r.u32("rank"), size = r.u32("group size"), wire = r.u8("wire type");
  const key = r.bytes("session key");
  if (size < 2 || size > MAX_GROUP || rank >= size) throw weftError("BAD_ARGUMENT", `rank ${rank} of a group of ${size} (2 to ${MAX_GROUP} ranks)`);
  const endpoints = Array.from({ length: size }, (_, i) => r.str(`endpoint ${i}`, 300));
  r.end("GROUP");
  s.device(device);
  if (wire > 2) throw protocolError(`unknown all-reduce wire type ${wire}`);
  PeerRendezvous.checkKey(key);
  endpoints.forEach((e) => parseEndpoint(e));
  return { gid, device, rank, size, wire, key, endpoints };
}

/**
 * This rank's links: it dials every lower rank and waits for every higher one. Resolves to
 * one descriptor per rank (-1 for its own); on any failure the links made are closed.
 */
async function linkPeers(core: RpcServer, g: GroupRequest): Promise<number[]> {
  const dials = g.endpoints.slice(0, g.rank).map((e, q) => dialPeer(e, core.token, g.key, g.rank, q, LINK_TIMEOUT_MS, core.id, core.peerAllow));
  const above = Array.from({ length: g.size - g.rank - 1 }, (_, i) => g.rank + 1 + i);
  const settled = await Promise.allSettled([...dials, core.rendezvous.take(Buffer.from(g.key).toString("hex"), g.rank, above, LINK_TIMEOUT_MS)]);
  const fds = Array<number>(g.size).fill(-1);
  settled.slice(0, g.rank).forEach((x, q) => { if (x.status === "fulfilled") fds[q] = x.value as number; });
  const last = settled[g.rank]!;
  if (last.status === "fulfilled") for (const [q, fd] of last.value as Map<number, number>) fds[q] = fd;
  const bad = settled.find((x): x is PromiseRejectedResult => x.status === "rejected");
  if (!bad) return fds;
  for (const fd of fds) if (fd >= 0) native().closePeerSocket(fd);
  throw bad.reason instanceof WeftError ? bad.reason : weftError("RPC_CLOSED", String(bad.reason));
}

/** Decodes a graph sent with COMPUTE or PREPARE and keeps it under its id (replacing one of that id). */
function receiveGraph(s: Session, r: Reader, device: number, gid: number): ServedGraph {
  const d = s.device(device);
  s.forgetGraph(gid);
  if (s.graphs.size >= MAX_GRAPHS) throw weftError("RPC_LIMIT", `more than ${MAX_GRAPHS} graphs cached for one client (FORGET old ones)`);
  const { graph, buffers } = decodeGraph(r, (id) => ({ buffer: s.buffer(id).cpu, size: s.buffer(id).size }), (op) => allowedOp(d, op),
    (op, params, what) => (op === Op.ALL_REDUCE ? groupParams(s, device, params, what) : params));
  const g = { graph, device, buffers };
  s.graphs.set(gid, g);
  return g;
}

/** An ALL_REDUCE's params with the client's group id replaced by its native group's, checked. */
function groupParams(s: Session, device: number, params: number[], what: string): number[] {
  const g = s.groups.get(params[0]!);
  if (!g) throw weftError("BAD_ARGUMENT", `${what}: no collective group ${params[0]} (the client sends GROUP first)`);
  if ("failed" in g) throw weftError("RPC_CLOSED", `${what}: collective group ${params[0]} has no peer links: ${g.failed}`);
  if ("forming" in g) throw weftError("BAD_ARGUMENT", `${what}: collective group ${params[0]} is still linking its servers (send the graph after GROUP's reply)`);
  if (params[1] !== g.rank || g.device !== device) throw weftError("BAD_ARGUMENT", `${what}: rank ${params[1]} on device ${device}, but this server is rank ${g.rank} on device ${g.device} of group ${params[0]}`);
  return [g.native, ...params.slice(1)];
}

/** a buffer a client may read back (weights in repacked memory are not) */
function readable(s: Session, id: number): ServedBuffer {
  const b = s.buffer(id);
  if (b.layout === Layout.REPACKED) throw weftError("BAD_ARGUMENT", "a repacked weight buffer cannot be read back");
  return b;
}

/** rows (rowBytes each, `stride` apart from `offset`) lie inside the buffer */
function checkStrided(b: ServedBuffer, offset: number, rows: number, rowBytes: number, stride: number): void {
  if (rows === 0) return;
  const end = offset + (rows - 1) * stride + rowBytes;
  if (!Number.isSafeInteger(end) || end > b.size) throw weftError("OUT_OF_RANGE", `rows reach byte ${end} of a ${b.size}-byte buffer`);
}

export class RpcServer {
  readonly devices: CpuDevice[];
  readonly threads: number;
  readonly maxMemory: number;
  readonly maxFrame: number;
  /** where this server may dial its peers */
  readonly peerAllow: PeerAllowList;
  readonly token: string | null;
  readonly cacheDir: string | null;
  readonly modelsDir: string | null;
  readonly #server: Server;
  readonly #sessions = new Set<Session>();
  /** @internal peer links waiting for their group */
  readonly rendezvous = new PeerRendezvous();
  /** @internal this server's random id: a server refuses to link to itself */
  readonly id = randomBytes(16);
  /** @internal one line per client event */
  readonly log: (line: string) => void;
  readonly #maxClients: number;
  readonly lanes: boolean;
  readonly sharedMemory: boolean;
  readonly #hashes = new Map<string, string>();
  readonly #mapped = new Map<string, { id: string; buf: CpuBuffer }>();
  #writes: Promise<void> = Promise.resolve();
  #backlog = 0;
  readonly #storing = new Set<string>();
  #heartbeat: NodeJS.Timeout | null = null;
  #host = "";
  #port = 0;

  /** @internal use startRpcServer */
  constructor(opts: RpcServerOptions, server: Server) {
    this.devices = (opts.devices?.length ? opts.devices : ["cpu:0"]).map((n) => cpuDevice(n));
    if (new Set(this.devices).size !== this.devices.length) throw weftError("BAD_ARGUMENT", "a device is listed twice");
    this.threads = opts.threads ?? usableCores();
    this.maxMemory = opts.maxMemory ?? totalmem();
    this.maxFrame = opts.maxFrame ?? DEFAULT_MAX_FRAME;
    this.token = opts.token ?? null;
    this.cacheDir = opts.cacheDir ?? null;
    this.modelsDir = opts.modelsDir ?? null;
    this.#maxClients = opts.maxClients ?? 16;
    this.lanes = opts.lanes ?? process.env.WEFT_RPC_LANES !== "0";
    this.sharedMemory = opts.sharedMemory ?? process.env.WEFT_PEER_SHM !== "0";
    this.peerAllow = new PeerAllowList(opts.peerAllow);
    this.log = opts.log ?? (() => {});
    this.#server = server;
    if (this.cacheDir) ensureDir(join(this.cacheDir, "weights"), "create the weight cache");
    if (this.modelsDir && !(existsSync(this.modelsDir) && statSync(this.modelsDir).isDirectory()))
      throw weftError("IO", `--models ${this.modelsDir}: no such directory`);
  }

  /** whether uploaded weights are kept (in --cache) */
  get caches(): boolean { return this.cacheDir !== null; }
  get host(): string { return this.#host; }
  get port(): number { return this.#port; }
  get endpoint(): string { return `${this.#host.includes(":") ? `[${this.#host}]` : this.#host}:${this.#port}`; }
  get clients(): number { return this.#sessions.size; }
  /** @internal how the peer groups of the connected clients pass their parts (tests) */
  get peerTransports(): string[] {
    const out: string[] = [];
    for (const s of this.#sessions) for (const g of s.groups.values()) if ("native" in g) out.push(native().peerGroupTransport(g.native) ?? "gone");
    return out;
  }
  /** bytes the connected clients hold */
  get clientBytes(): number { let n = 0; for (const s of this.#sessions) n += s.used; return n; }

  /** @internal */
  async listen(host: string, port: number): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.#server.once("error", reject);
      this.#server.listen(port, host, () => { this.#server.off("error", reject); resolve(); });
    }).catch((e: NodeJS.ErrnoException) => {
      throw weftError("IO", `cannot listen on ${host}:${port}: ${e.code === "EADDRINUSE" ? "the port is in use (another rpc-server? pick --port)" : e.code === "EADDRNOTAVAIL" ? "no such address on this machine" : e.message}`, e);
    });
    const a = this.#server.address();
    if (a && typeof a === "object") { this.#host = a.address; this.#port = a.port; }
    this.#server.on("connection", (sock) => this.#accept(sock));
    // liveness: a client with work pending hears from the server at least every second
    this.#heartbeat = setInterval(() => {
      for (const s of this.#sessions) if (s.state === "READY" && (s.pending > 0 || s.reader.buffered > 0 || (s.lane && native().laneBusy(s.lane)))) s.send(Kind.NOTICE, Notice.HEARTBEAT, 0, new Uint8Array(0));
    }, 1000);
    this.#heartbeat.unref();
  }

  /** @internal the repacked weight memory of a device */
  repackType(device: number) {
    const d = this.devices[device]!;
    return d.repackBufferType();
  }

  #cachePath(hash: string, t: Tensor, layout: number): string {
    return join(this.cacheDir!, "weights", `${hash}-${TYPES[t.type].name}-${t.ne.join("x")}-${layout === Layout.REPACKED ? "r8v1" : "rows"}.bin`);
  }
  /** @internal the cache file holding this weight in this layout, if there is a whole one */
  cachedWeight(hash: string, t: Tensor, layout: number, size: number): string | null {
    if (!this.cacheDir || size === 0) return null;
    const p = this.#cachePath(hash, t, layout);
    try { return statSync(p).size === size ? p : null; } catch { return null; }
  }
  /**
   * @internal stores verified device-layout bytes under their content hash, in the
   * background (the disk may be slower than the network: the client's load does not wait
   * for it, unless more than CACHE_BACKLOG bytes are still to be written)
   */
  async storeWeight(hash: string, t: Tensor, layout: number, bytes: () => Uint8Array): Promise<void> {
    if (!this.cacheDir || t.nbytes === 0) return;
    const p = this.#cachePath(hash, t, layout);
    if (existsSync(p) || this.#storing.has(p)) return;
    const data = bytes();
    this.#storing.add(p);
    this.#backlog += data.length;
    this.#writes = this.#writes.then(async () => {
      try {
        await writeAtomically(p, async (tmp) => { const f = await open(tmp, "w"); try { await f.writeFile(data); } finally { await f.close(); } });
      } catch (e) { this.log(`weight cache: ${(e as Error).message} (continuing without storing it)`); }
      this.#backlog -= data.length;
      this.#storing.delete(p);
    });
    while (this.#backlog > CACHE_BACKLOG) await this.#writes;
  }
  /** resolves when the weight cache has written everything it was given */
  flushCache(): Promise<void> { return this.#writes; }
  /**
   * @internal where a tensor of a GGUF in --models lies (each file mapped once, read where
   * it lies), checked against the client's hash (each tensor hashed once while the file is
   * unchanged); null where the server has no such file or other bytes there (the client
   * then uploads them)
   */
  modelTensor(name: string, offset: number, length: number, hash: string): { buf: CpuBuffer; offset: number } | null {
    if (!this.modelsDir || !/^[^/\\\0]{1,255}$/.test(name) || name === "." || name === "..") return null;
    const path = join(this.modelsDir, name);
    let st;
    try { st = statSync(path); } catch { return null; }
    if (!st.isFile() || offset + length > st.size) return null;
    const id = `${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}`;
    let m = this.#mapped.get(path);
    if (!m || m.id !== id) {
      m?.buf.dispose();
      try { m = { id, buf: this.devices[0]!.bufferType().mapFile(path) }; } catch { return null; }
      this.#mapped.set(path, m);
    }
    const key = `${id}:${offset}:${length}`;
    let h = this.#hashes.get(key);
    if (!h) { h = sha256(m.buf.get(offset, length)); this.#hashes.set(key, h); }
    if (h !== hash) { this.log(`--models ${name}: other bytes at ${offset} than the client's file (another version?); the client uploads them`); return null; }
    return { buf: m.buf, offset };
  }

  #accept(sock: Socket): void {
    sock.setNoDelay(true);
    const s = new Session(this, sock);
    if (this.#sessions.size >= this.#maxClients) {
      this.log(`client ${s.name} refused: ${this.#maxClients} clients already`);
      sock.destroy();
      return;
    }
    this.#sessions.add(s);
    const preauth = setTimeout(() => { if (s.state !== "READY") { this.log(`client ${s.name}: no handshake within ${PREAUTH_TIMEOUT_MS / 1000} s`); sock.destroy(); } }, PREAUTH_TIMEOUT_MS);
    preauth.unref();
    sock.on("data", (chunk: Buffer) => {
      s.turned = performance.now();
      if (s.state === "CLOSED") return;
      try {
        // frame by frame: a handshake step changes the size allowed for the next header
        s.reader.push(chunk, ({ h, body }) => this.#frame(s, h.kind, h.cmd, h.id, body));
      } catch (e) {
        this.#drop(s, 0, 0, e);
      }
    });
    sock.on("error", () => {});
    sock.on("close", () => { clearTimeout(preauth); this.#closed(s); });
  }

  /** A frame from a client; false: read no more of this connection. `done`: once it is answered. */
  #frame(s: Session, kind: number, cmd: number, id: number, body: Uint8Array, done?: () => void): boolean {
    if (s.state === "CLOSED") { done?.(); return false; }
    if (kind !== Kind.REQUEST) { this.#drop(s, cmd, id, protocolError(`frame kind ${kind} from a client`)); done?.(); return false; }
    const name = CMD_NAMES[cmd];
    if (s.state !== "READY") this.#handshake(s, cmd, id, body);
    else if (!name || name === "HELLO" || name === "AUTH" || (name === "PEER" && s.lane)) s.fail(cmd, id, protocolError(`unknown or repeated command ${cmd}`));
    else if (name === "PEER") return this.#peer(s, id, body);
    else if (name === "UNGROUP" || name === "GROUP") { this.#now(s, name, cmd, id, body, done); return true; }
    else { this.#enqueue(s, name, cmd, id, body, done); return true; }
    done?.();
    return true;
  }

  /** What a lane reports (csrc/lane.cpp): a frame it leaves to this side, its end, or a malformed stream. */
  #laneEvent(s: Session, type: number, kind: number, cmd: number, id: number, body: Buffer | string): void {
    try {
      if (type === 0) {
        const lane = s.lane!, bytes = (body as Buffer).length;
        s.turned = performance.now();
        this.#frame(s, kind, cmd, id, body as Buffer, () => native().laneDone(lane, bytes));
      } else if (type === 1) this.#closed(s);
      else this.#drop(s, 0, 0, protocolError(body as string));
    } catch (e) {
      this.log(`client ${s.name}: ${(e as Error)?.message ?? e}`);
    }
  }

  /** The connection is gone: a step waiting on a peer stops, then everything the client held is freed. */
  #closed(s: Session): void {
    const was = s.state;
    s.state = "CLOSED";
    s.ungroupAll("the client disconnected");  // a step waiting on a peer stops now
    // whatever is running finishes first (its memory is pinned), then everything goes
    void s.tail.then(() => s.release()).finally(() => {
      this.#sessions.delete(s);
      if (was === "READY") this.log(`client ${s.name} left`);
    });
  }

  /** HELLO, then AUTH where a token is set; anything else before that ends the connection. */
  #handshake(s: Session, cmd: number, id: number, body: Uint8Array): void {
    try {
      const r = new Reader(body);
      if (s.state === "HELLO" && cmd === Cmd.HELLO) {
        const version = r.u32("protocol version");
        const client = r.str("client name", 256);
        const digest = r.str("tables digest", 64);
        r.end("HELLO");
        if (version !== PROTOCOL_VERSION) throw weftError("RPC_PROTOCOL", `this server speaks weft RPC protocol ${PROTOCOL_VERSION}, the client ${version}: run the same weft version on both`);
        if (digest !== tablesDigest()) throw weftError("RPC_PROTOCOL", "the client's weft numbers ops or types differently: run the same weft version on both");
        const w = new Writer().u32(PROTOCOL_VERSION).str(`weft rpc-server`).u8(this.token ? 1 : 0).bytes(s.nonce)
          .u64(this.maxFrame).u64(this.maxMemory).u32(this.devices.length);
        for (const d of this.devices) {
          const m = d.memory();
          w.str(d.name).str(d.description).u64(m.total).u64(m.free).u8(1);
          const ops = OP_NAMES.map((_, i) => i).filter((i) => allowedOp(d, i as Op));
          w.u32(ops.length);
          for (const o of ops) w.u16(o);
        }
        s.state = this.token ? "AUTH" : "READY";
        s.reply(cmd, id, w.body());
        if (s.state === "READY") this.log(`client ${s.name} (${client}) connected`);
        return;
      }
      if (s.state === "AUTH" && cmd === Cmd.AUTH) {
        const clientNonce = r.bytes("client nonce");
        const proof = r.bytes("proof");
        r.end("AUTH");
        if (clientNonce.length !== NONCE_BYTES || !proofsEqual(proof, authProof(this.token!, "client", s.nonce, clientNonce))) {
          this.log(`client ${s.name}: wrong token`);
          throw weftError("RPC_AUTH", "the token does not match the server's");
        }
        s.state = "READY";
        s.reply(cmd, id, new Writer().bytes(authProof(this.token!, "server", clientNonce, s.nonce)).body());
        this.log(`client ${s.name} connected (token checked)`);
        return;
      }
      throw s.state === "AUTH" && cmd === Cmd.HELLO ? protocolError("HELLO sent twice")
        : weftError(s.state === "AUTH" ? "RPC_AUTH" : "RPC_PROTOCOL", s.state === "AUTH" ? "this server needs a token: authenticate first" : "say HELLO first");
    } catch (e) {
      this.#drop(s, cmd, id, e);
    }
  }

  /**
   * PEER: another server links to a group of this one. The connection stops being a
   * client's: its socket goes to the group's native side once the reply is written.
   */
  #peer(s: Session, id: number, body: Uint8Array): boolean {
    let fd = -1;
    try {
      const r = new Reader(body);
      const key = r.bytes("session key"), from = r.u32("from rank"), to = r.u32("to rank"), dialer = r.bytes("server id");
      r.end("PEER");
      PeerRendezvous.check(key, from, to);
      // two ranks of one group on one server would wait on each other's parts forever
      if (Buffer.compare(dialer, this.id) === 0) throw weftError("BAD_ARGUMENT", "a server cannot be a peer of itself (two ranks of the group name the same server)");
      if (s.pending > 0) throw protocolError("PEER on a connection with requests in flight");
      fd = takeSocket(s.socket);
      s.state = "CLOSED";
      this.rendezvous.offer(Buffer.from(key).toString("hex"), to, from, fd);
      this.log(`peer ${s.name} linked as rank ${from} to rank ${to}`);
      // written, then Node's handle closed (not end(): a FIN would half-close the link itself)
      s.socket.write(Buffer.concat(frame(Kind.REPLY, Cmd.PEER, id, replyBody(Status.OK))), () => s.socket.destroy());
    } catch (e) {
      if (s.state !== "CLOSED") this.#drop(s, Cmd.PEER, id, e);
      else s.socket.destroy();
    }
    return false;
  }

  /**
   * A request that runs at once, beside the client's queue: UNGROUP (it must reach a step
   * that waits on a dead peer) and GROUP (linking takes a while; it must not hold up the
   * requests behind it). Counted as pending, so the client hears heartbeats meanwhile.
   */
  #now(s: Session, name: "UNGROUP" | "GROUP", cmd: number, id: number, body: Uint8Array, done?: () => void): void {
    s.pending++;
    void (async () => {
      try { s.reply(cmd, id, await HANDLERS[name](s, new Reader(body))); } catch (e) { s.fail(cmd, id, e); } finally { s.pending--; done?.(); }
    })();
  }

  /** An error reply (where there is a request to answer), then the connection ends. */
  #drop(s: Session, cmd: number, id: number, e: unknown): void {
    if (s.state === "CLOSED") return;
    this.log(`client ${s.name} dropped: ${(e as Error)?.message ?? e}`);
    if (cmd) s.fail(cmd, id, e);
    s.state = "CLOSED";
    s.end(true);
    setTimeout(() => s.end(false), 1000).unref();
  }

  /** A READY client's request: runs after its earlier ones; the reply is sent when it is done. */
  #enqueue(s: Session, name: Exclude<CmdName, "HELLO" | "AUTH" | "PEER">, cmd: number, id: number, body: Uint8Array, done?: () => void): void {
    // the first frame of a burst (a step's inputs come before its COMPUTE): the device
    // threads wake while the rest arrives (not later: spinning then takes a core for nothing)
    if (s.pending === 0) for (const be of s.backends.values()) be.prewake();
    s.pending++;
    s.queuedBytes += body.length;
    // a client that sends faster than its work runs is paused (its frames wait in the
    // kernel; a lane holds back by itself)
    if (!s.lane && s.queuedBytes > 2 * this.maxFrame) s.socket.pause();
    const run = async () => {
      // a backlog of requests runs as one chain of promise callbacks: every 100 ms it lets
      // the event loop turn, so heartbeats and other clients' frames are not held up
      if (performance.now() - s.turned > 100) { await new Promise((r) => setImmediate(r)); s.turned = performance.now(); }
      try {
        if (s.state === "CLOSED") return;
        s.reply(cmd, id, await HANDLERS[name](s, new Reader(body)));
      } catch (e) {
        s.fail(cmd, id, e);
      } finally {
        s.pending--;
        s.queuedBytes -= body.length;
        if (!s.lane && s.queuedBytes <= this.maxFrame && s.socket.isPaused()) s.socket.resume();
        done?.();
        if (s.stepped && !s.lane && s.pending === 0 && this.lanes && s.toLane((...a) => this.#laneEvent(s, ...a)))
          this.log(`client ${s.name}: its steps now run on a thread of their own (a lane)`);
      }
    };
    s.tail = s.tail.then(run);
  }

  /** Stops listening and disconnects every client (their memory is freed). */
  async close(): Promise<void> {
    if (this.#heartbeat) clearInterval(this.#heartbeat);
    this.rendezvous.close();
    await this.#writes;
    for (const m of this.#mapped.values()) m.buf.dispose();
    this.#mapped.clear();
    const closed = new Promise<void>((r) => this.#server.close(() => r()));
    for (const s of this.#sessions) s.end(false);
    await closed;
    while (this.#sessions.size) await new Promise((r) => setTimeout(r, 5));
  }
}

/** Starts a server (see RpcServerOptions); resolves once it listens. */
export async function startRpcServer(opts: RpcServerOptions = {}): Promise<RpcServer> {
  const host = opts.host ?? "127.0.0.1";
  if (!isLoopback(host) && !opts.token && !opts.insecure)
    throw weftError("RPC_AUTH", `refusing to listen on ${host} without a token: anyone who reaches it could run work and read its memory. ` +
      "Give --token-file FILE (or WEFT_RPC_TOKEN), or --insecure on a network you trust");
  if (opts.threads !== undefined && (!Number.isInteger(opts.threads) || opts.threads < 1 || opts.threads > 256))
    throw weftError("BAD_ARGUMENT", `threads must be an integer from 1 to 256, got ${opts.threads}`);
  const srv = new RpcServer(opts, createServer({ noDelay: true }));
  await srv.listen(host, opts.port ?? DEFAULT_RPC_PORT);
  return srv;
}
