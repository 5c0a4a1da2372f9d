/**
 * The client end of one RPC server (DESIGN §6): a socket, the handshake, and requests
 * pipelined on it. Every request has an id and gets a reply; nothing waits for a reply it
 * does not need (a posted request's failure is kept for its queue's next synchronize).
 * A server that dies, a link that drops or a server silent for LIVENESS_MS while work is
 * pending fails every pending request with RPC_CLOSED naming the endpoint, and later
 * requests fail at once, until reconnect() opens a new session (the objects built over
 * this connection then restore what the server lost: see `onReconnect`).
 */
import { connect, Socket } from "node:net";
import { randomBytes } from "node:crypto";
import { ERROR_CODES, WeftError, WeftErrorCode, weftError } from "../core/errors.js";
import {
  Cmd, CmdName, FrameReader, Kind, NONCE_BYTES, PROTOCOL_VERSION, Reader, Reply, Status, Writer, authProof, frame,
  proofsEqual, protocolError, readReply, tablesDigest,
} from "./protocol.js";

/** how long a server with work pending may stay silent (it sends heartbeats every second) */
export const LIVENESS_MS = 5000;
const CONNECT_TIMEOUT_MS = 10_000;
/** bytes one read from the socket takes at most */
const READ_BUFFER = 256 << 10;

export interface RemoteDeviceInfo {
  readonly index: number;
  readonly name: string;
  readonly description: string;
  total: number;
  free: number;
  readonly ops: ReadonlySet<number>;
}

export interface ServerInfo {
  readonly server: string;
  readonly authRequired: boolean;
  readonly maxFrame: number;
  readonly maxMemory: number;
  readonly devices: RemoteDeviceInfo[];
}

export interface RpcConnectOptions {
  /** the shared token (default: WEFT_RPC_TOKEN) */
  token?: string | null;
  signal?: AbortSignal;
  /** how long to try to connect and shake hands (default 10 s) */
  timeoutMs?: number;
}

interface Pending { cmd: CmdName; resolve: (r: Reply) => void; reject: (e: WeftError) => void; into?: Uint8Array }

/** a payload up to this size is kept in Node's shared pool (no memory of its own to collect) */
const POOLED_PAYLOAD = 1024;

/** A reply payload in memory of its own (the frame it came in is reused once read). */
function keep(payload: Uint8Array): Reader {
  if (payload.length <= POOLED_PAYLOAD) return new Reader(Buffer.from(payload));
  const own = new Uint8Array(payload.length);
  own.set(payload);
  return new Reader(own, true);
}

/** "host:port" → its parts (IPv6 as [::1]:50052). */
export function parseEndpoint(endpoint: string): { host: string; port: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(endpoint) ?? /^([^:]+):(\d+)$/.exec(endpoint);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !(port > 0 && port < 65536)) throw weftError("BAD_ARGUMENT", `'${endpoint}' is not host:port (e.g. 10.0.0.2:50052)`);
  return { host: m[1]!, port };
}

export class RpcConnection {
  readonly endpoint: string;
  readonly host: string;
  readonly port: number;
  #token: string | null;
  #socket: Socket | null = null;
  #reader: FrameReader | null = null;
  #nextId = 1;
  #pending = new Map<number, Pending>();
  #closed: WeftError | null = null;
  #postFailure: WeftError | null = null;
  #corked = false;
  #inputs: Array<{ id: number; offset: number; data: Uint8Array }> = [];
  /** what the socket reads into (every session's): frames are copied out of it where kept */
  readonly #readBuf = Buffer.allocUnsafeSlow(READ_BUFFER);
  #lastHeard = 0;
  #timer: NodeJS.Timeout | null = null;
  #info!: ServerInfo;
  /** how many sessions this connection has had (objects compare it to know they must restore state) */
  #session = 0;
  readonly #restorers = new Set<(conn: RpcConnection) => Promise<void>>();
  /** how weights reached the server: bytes uploaded, tensors it had cached or read from its own file */
  readonly stats = { uploadedBytes: 0, fromCache: 0, fromFile: 0 };

  private constructor(endpoint: string, token: string | null) {
    const { host, port } = parseEndpoint(endpoint);
    this.endpoint = endpoint; this.host = host; this.port = port;
    this.#token = token;
  }

  /** Connects and shakes hands (HELLO, and AUTH where the server wants a token). */
  static async open(endpoint: string, opts: RpcConnectOptions = {}): Promise<RpcConnection> {
    const c = new RpcConnection(endpoint, opts.token === undefined ? (process.env.WEFT_RPC_TOKEN?.trim() || null) : opts.token);
    await c.#open(opts);
    return c;
  }

  get info(): ServerInfo { return this.#info; }
  get session(): number { return this.#session; }
  get closed(): boolean { return this.#closed !== null; }
  get maxFrame(): number { return this.#info.maxFrame; }

  #fail(e: WeftError): void {
    if (this.#closed) return;
    this.#closed = e;
    if (this.#timer) { clearInterval(this.#timer); this.#timer = null; }
    this.#socket?.destroy();
    const p = [...this.#pending.values()];
    this.#pending.clear();
    for (const x of p) x.reject(e);
  }
  #closedError(why: string): WeftError {
    return weftError("RPC_CLOSED", `RPC server ${this.endpoint}: ${why}`);
  }

  async #open(opts: RpcConnectOptions): Promise<void> {
    const timeout = opts.timeoutMs ?? CONNECT_TIMEOUT_MS;
    // replies are read into one buffer of this connection's (Node would allocate one per
    // read: with a step's output read every token, garbage that makes V8 collect often)
    const sock = connect({
      host: this.host, port: this.port, noDelay: true,
      onread: { buffer: this.#readBuf, callback: (n: number, buf: Uint8Array) => { this.#onData(buf.subarray(0, n)); return true; } },
    });
    this.#socket = sock;
    this.#closed = null;
    this.#reader = new FrameReader(() => Number.MAX_SAFE_INTEGER, true);
    const onAbort = () => this.#fail(weftError("ABORTED", `connecting to ${this.endpoint} aborted`, opts.signal?.reason));
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    const timer = setTimeout(() => this.#fail(this.#closedError(`no answer within ${timeout / 1000} s (is weft rpc-server running there, and the port open?)`)), timeout);
    try {
      await new Promise<void>((resolve, reject) => {
        sock.once("connect", resolve);
        sock.once("error", (e: NodeJS.ErrnoException) => reject(this.#closedError(e.code === "ECONNREFUSED" ? "connection refused (is weft rpc-server running there?)" : e.code === "ENOTFOUND" ? "no such host" : e.message)));
        sock.once("close", () => reject(this.#closed ?? this.#closedError("closed while connecting")));
      });
      sock.removeAllListeners("error");
      sock.removeAllListeners("close");
      sock.on("error", (e: NodeJS.ErrnoException) => this.#fail(this.#closedError(e.code === "ECONNRESET" ? "the connection was reset (the server died?)" : e.message)));
      sock.on("close", () => this.#fail(this.#closedError("the connection closed (the server stopped or the link dropped)")));
      this.#lastHeard = performance.now();
      let tick = performance.now();
      this.#timer = setInterval(() => {
        const now = performance.now();
        // this thread itself was busy (hashing a file, building a graph): what the server
        // sent meanwhile waits unread behind this timer, so silence is not counted
        if (now - tick > 1000) this.#lastHeard = Math.max(this.#lastHeard, now - 500);
        tick = now;
        if (this.#pending.size && now - this.#lastHeard > LIVENESS_MS)
          this.#fail(this.#closedError(`no reply for ${LIVENESS_MS / 1000} s (the server or the link is down)`));
      }, 500);
      this.#timer.unref();
      await this.#handshake();
      this.#session++;
    } catch (e) {
      this.#fail(e instanceof WeftError ? e : this.#closedError(String(e)));
      throw this.#closed ?? e;
    } finally {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
    }
  }

  async #handshake(): Promise<void> {
    const hello = await this.request("HELLO", new Writer().u32(PROTOCOL_VERSION).str(`weft client pid ${process.pid}`).str(tablesDigest()).body());
    const r = hello.r;
    const version = r.u32("version");
    if (version !== PROTOCOL_VERSION) throw weftError("RPC_PROTOCOL", `${this.endpoint} speaks protocol ${version}, this client ${PROTOCOL_VERSION}`);
    const server = r.str("server");
    const authRequired = r.u8("auth flag") === 1;
    const nonce = r.bytes("nonce").slice();
    const maxFrame = r.u64("max frame");
    const maxMemory = r.u64("max memory");
    const n = r.u32("device count");
    if (n > 256) throw weftError("RPC_PROTOCOL", `${this.endpoint} claims ${n} devices`);
    const devices: RemoteDeviceInfo[] = [];
    for (let i = 0; i < n; i++) {
      const name = r.str("device name", 256), description = r.str("description", 1024);
      const total = r.u64("memory total"), free = r.u64("memory free");
      r.u8("repack flag");
      const nOps = r.u32("op count");
      const ops = new Set<number>();
      for (let k = 0; k < nOps && k < 1024; k++) ops.add(r.u16("op"));
      devices.push({ index: i, name, description, total, free, ops });
    }
    this.#info = { server, authRequired, maxFrame, maxMemory, devices };
    if (!authRequired) return;
    if (!this.#token)
      throw weftError("RPC_AUTH", `the RPC server ${this.endpoint} requires a token: give --token-file FILE or set WEFT_RPC_TOKEN (the same as the server's)`);
    const mine = randomBytes(NONCE_BYTES);
    const auth = await this.request("AUTH", new Writer().bytes(mine).bytes(authProof(this.#token, "client", nonce, mine)).body())
      .catch((e: WeftError) => { throw e.code === "RPC_AUTH" ? weftError("RPC_AUTH", `the RPC server ${this.endpoint} refused the token: it is not the server's`) : e; });
    const proof = auth.r.bytes("server proof");
    if (!proofsEqual(proof, authProof(this.#token, "server", mine, nonce)))
      throw weftError("RPC_AUTH", `the RPC server ${this.endpoint} could not prove it holds the token: it is not the server you meant`);
  }

  #onData(chunk: Uint8Array): void {
    this.#lastHeard = performance.now();
    let frames;
    try { frames = this.#reader!.push(chunk); } catch (e) { return this.#fail(this.#closedError(`sent a malformed frame: ${(e as Error).message}`)); }
    for (const { h, body } of frames) {
      if (h.kind === Kind.NOTICE) continue;  // a heartbeat: the server is alive and busy
      const p = this.#pending.get(h.id);
      if (h.kind !== Kind.REPLY || !p) return this.#fail(this.#closedError(`sent a reply to no request (id ${h.id})`));
      this.#pending.delete(h.id);
      try {
        // the body is valid only until this returns (the socket reads into one buffer)
        const { status, code, message, r } = readReply(body);
        const payload = body.subarray(body.length - r.left);
        if (status === Status.ERROR) {
          const c = (ERROR_CODES.has(code) ? code : "RPC_PROTOCOL") as WeftErrorCode;
          p.reject(weftError(c, `${this.endpoint}: ${p.cmd}: ${message}`));
        } else if (p.into && status === Status.OK) {
          if (payload.length !== p.into.length) throw protocolError(`${p.cmd} answered ${payload.length} bytes, not the ${p.into.length} asked for`);
          p.into.set(payload);
          p.resolve({ status, r: new Reader(p.into) });
        } else p.resolve({ status, r: keep(payload) });
      } catch (e) {
        p.reject(e as WeftError);
      }
    }
  }

  /**
   * Sends a request now; resolves to its reply (status OK or MISSING), rejects with the
   * server's error (its code, the endpoint in the message) or RPC_CLOSED. With `into`, an
   * OK reply's payload is read into it (it must be exactly that long): no memory per reply.
   */
  request(cmd: CmdName, body: Uint8Array | Uint8Array[], into?: Uint8Array): Promise<Reply> {
    if (this.#closed) return Promise.reject(this.#closed);
    // queued inputs ride in the next COMPUTE (after its head: device, graph id, graph flag);
    // any other request sends them first, as SETs, so that the order stays
    if (cmd === "COMPUTE") {
      const parts = body instanceof Uint8Array ? [body] : body;
      body = [parts[0]!, ...this.#takeInputs(), ...parts.slice(1)];
    } else if (this.#inputs.length) this.#flushInputs();
    const id = this.#nextId;
    this.#nextId = (this.#nextId % 0xfffffffe) + 1;
    this.#sent++;
    const parts = frame(Kind.REQUEST, Cmd[cmd], id, body);
    const bytes = parts.reduce((n, p) => n + p.length, 0);
    if (bytes - 20 > this.#info?.maxFrame) return Promise.reject(weftError("RPC_LIMIT", `${cmd} of ${bytes} bytes is more than the server's ${this.#info.maxFrame}-byte frames`));
    return new Promise<Reply>((resolve, reject) => {
      if (this.#pending.size === 0) this.#lastHeard = performance.now();
      this.#pending.set(id, { cmd, resolve, reject, into });
      this.#write(parts, cmd === "COMPUTE");
    });
  }

  /**
   * Writes a frame. Frames of one turn of the event loop leave in one write (a load's
   * many small requests), except that a COMPUTE leaves as soon as the code that sent it
   * yields (a microtask later), with whatever waits before it: the server starts the step
   * a turn earlier, and a meta device's COMPUTEs to all its servers leave back to back
   * (requests after them, such as the output read, follow in the next write while the
   * step runs).
   */
  #write(parts: Uint8Array[], now = false): void {
    const s = this.#socket!;
    if (!this.#corked) {
      this.#corked = true;
      s.cork();
      setImmediate(() => { if (this.#corked) { this.#corked = false; s.uncork(); } });
    }
    for (const p of parts) s.write(p);
    // at the end of this microtask run, not now: the COMPUTEs a meta device sends every
    // server of a step leave back to back (a server that starts late holds up the others)
    if (now && !this.#flushing) {
      this.#flushing = true;
      queueMicrotask(() => { this.#flushing = false; if (this.#corked) { this.#corked = false; s.uncork(); } });
    }
  }
  #flushing = false;

  /** A small write the next COMPUTE carries (a step's inputs: one frame, one reply, for the whole step). */
  queueInput(id: number, offset: number, data: Uint8Array): void {
    this.#inputs.push({ id, offset, data });
    this.#sent++;
  }
  /** requests sent and inputs queued so far: unchanged, nothing has touched the server's memory since */
  get sentCount(): number { return this.#sent; }
  #sent = 0;
  #takeInputs(): Uint8Array[] {
    const xs = this.#inputs;
    this.#inputs = [];
    const out = [new Writer().u32(xs.length).body()];
    for (const x of xs) out.push(new Writer().u32(x.id).u64(x.offset).u64(x.data.length).body(), x.data);
    return out;
  }
  #flushInputs(): void {
    const xs = this.#inputs;
    this.#inputs = [];
    for (const x of xs) this.post("SET", [new Writer().u32(x.id).u64(x.offset).u8(0).u64(x.data.length).body(), x.data]);
  }

  /** Sends a request whose reply nobody awaits; its failure is kept for takeFailure(). */
  post(cmd: CmdName, body: Uint8Array | Uint8Array[]): void {
    this.request(cmd, body).catch((e: WeftError) => { this.#postFailure ??= e; });
  }
  /** The first failure of a posted request since the last call (a queue reports it at its next synchronize). */
  takeFailure(): WeftError | null {
    const f = this.#postFailure;
    this.#postFailure = null;
    return f;
  }

  /** Registers what must be restored on the server after a reconnect (buffers, weights). */
  onReconnect(restore: (conn: RpcConnection) => Promise<void>): () => void {
    this.#restorers.add(restore);
    return () => this.#restorers.delete(restore);
  }

  /**
   * Opens a new session after the old one died (tries until `timeoutMs`, the server may be
   * restarting), then lets every registered object restore its state there (buffers are
   * allocated again, weights come from the server's cache or are uploaded again).
   */
  async reconnect(opts: RpcConnectOptions = {}): Promise<void> {
    if (!this.#closed) return;
    const deadline = performance.now() + (opts.timeoutMs ?? 30_000);
    for (;;) {
      try {
        await this.#open({ ...opts, timeoutMs: Math.max(1000, Math.min(CONNECT_TIMEOUT_MS, deadline - performance.now())) });
        break;
      } catch (e) {
        if ((e as WeftError).code !== "RPC_CLOSED" || performance.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 250));
        opts.signal?.throwIfAborted();
      }
    }
    this.#postFailure = null;
    for (const restore of this.#restorers) await restore(this);
  }

  /**
   * @internal Hands the socket over (a server's peer link, once PEER is answered): nothing
   * more is read or checked here, and this connection counts as closed.
   */
  detach(): Socket {
    const s = this.#socket;
    if (!s || this.#closed || this.#pending.size) throw weftError("BAD_ARGUMENT", `the connection to ${this.endpoint} cannot be handed over now`);
    if (this.#timer) { clearInterval(this.#timer); this.#timer = null; }
    for (const ev of ["data", "error", "close"]) s.removeAllListeners(ev);
    s.on("error", () => {});
    this.#closed = weftError("DISPOSED", `the connection to ${this.endpoint} was handed over`);
    this.#socket = null;
    return s;
  }

  /** Ends the session: the server frees everything this client held there. */
  close(): void {
    this.#fail(weftError("DISPOSED", `the connection to ${this.endpoint} was closed`));
  }
}

export type { Reader };
