/**
 * The queue of a remote device (DESIGN §6). Work is sent as it is enqueued and the server
 * runs one client's requests in order, so the socket is the queue: nothing waits for a
 * reply it does not need. Events are native: recordEvent sends a PING whose reply marks
 * the point. Waiting on another queue's event holds back what is enqueued here after it
 * (on this side, without blocking the caller) until that event is done; a copy from
 * another device is relayed the same way: its bytes are read from the source queue and
 * sent on here when they arrive. The scheduler therefore pipelines micro-batches across
 * RPC devices as across local ones.
 */
import { WeftError, weftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { Tensor, bytesOf } from "../core/tensor.js";
import { getTensorAsync } from "../backend/fallback.js";
import type { Backend, Buffer, Event } from "../backend/interface.js";
import type { RpcConnection } from "./client.js";
import type { RpcDevice, RpcMemory } from "./device.js";
import { encodeGraph } from "./graph.js";
import { groupsLinking } from "./peer.js";
import { CmdName, ComputeFlag, Layout, Reply, Writer } from "./protocol.js";

/** writes up to this size are carried by the next COMPUTE instead of a SET of their own */
const INPUT_MAX = 1 << 20;

/** the most reads a step's reply brings (the server's limit) and their bytes at most: beyond, they stay GETs */
const MAX_READS = 64;
const READS_MAX_BYTES = 4 << 20;

interface Read { id: number; offset: number; size: number }
/** The reads a graph's step asks for, as COMPUTE carries them (encoded once, not per token). */
interface Reads { list: Read[]; body: Uint8Array; total: number }
function encodeReads(list: Read[]): Reads {
  const w = new Writer().u32(list.length);
  for (const x of list) w.u32(x.id).u64(x.offset).u64(x.size);
  return { list, body: w.body(), total: list.reduce((n, x) => n + x.size, 0) };
}
function sameReads(a: readonly Read[], b: readonly Read[]): boolean {
  return a.length === b.length && a.every((x, i) => x.id === b[i]!.id && x.offset === b[i]!.offset && x.size === b[i]!.size);
}
/** A step of this queue: the reads its reply brings (into `bytes`), and those that follow it. */
interface Step {
  uid: number;
  reads: Read[];
  bytes: Uint8Array | null;
  ready: Promise<void>;
  /** the connection's sentCount once its COMPUTE left (-1: not yet) */
  sentAt: number;
  /** reads waiting on its reply (its bytes are not reused meanwhile) */
  claims: number;
  over: boolean;
  seen: Read[];
}

class RpcEvent implements Event {
  constructor(readonly backend: RpcBackend, readonly done: Promise<void>) {}
}

/** An item of the hold-back queue: a request to send, or a wait (whose value may produce one). */
type Item = { send: () => void } | { wait: Promise<unknown>; then?: (v: unknown) => void };

/** The remote memory a tensor lies in, on this connection. */
function remoteOf(t: Tensor, conn: RpcConnection): RpcMemory | null {
  const b = t.root().tensor.buffer as (Buffer & { conn?: RpcConnection; locate?: unknown }) | null;
  return b && b.conn === conn && typeof b.locate === "function" ? (b as unknown as RpcMemory) : null;
}

function tensorAt(t: Tensor): number {
  const { tensor, offset } = t.root();
  return tensor.offset + offset;
}

export class RpcBackend implements Backend {
  readonly #conn: RpcConnection;
  /** graph uid → the connection session it was sent in */
  readonly #sent = new Map<number, number>();
  readonly #items: Item[] = [];
  #pumping = false;
  #failure: WeftError | null = null;
  #disposed = false;

  constructor(readonly device: RpcDevice) {
    this.#conn = device.conn;
    // a new session: what failed with the old one is not this queue's failure any more
    this.#unregister = this.#conn.onReconnect(async () => { this.#failure = null; this.#sent.clear(); this.#reads.clear(); this.#step = null; });
  }
  readonly #unregister: () => void;
  get name(): string { return this.device.name; }

  #check(): void {
    if (this.#disposed) throw weftError("DISPOSED", `${this.name} backend was disposed`);
  }
  /** sends now, or after what is held back */
  #submit(send: () => void): void {
    if (this.#items.length === 0) send();
    else this.#items.push({ send });
  }
  #hold(wait: Promise<unknown>, then?: (v: unknown) => void): void {
    this.#items.push({ wait, then });
    if (!this.#pumping) void this.#pump();
  }
  async #pump(): Promise<void> {
    this.#pumping = true;
    try {
      while (this.#items.length) {
        const it = this.#items[0]!;
        if ("send" in it) it.send();
        else {
          try {
            const v = await it.wait;
            it.then?.(v);
          } catch (e) {
            this.#failure ??= e instanceof WeftError ? e : weftError("COMPUTE_FAILED", String(e), e);
          }
        }
        this.#items.shift();
      }
    } finally {
      this.#pumping = false;
    }
  }
  /**
   * A request in queue order; resolves to its reply (`refuse`: checked when its turn comes;
   * an error is its answer, nothing is sent). `sent` runs once it has left.
   */
  #request(cmd: CmdName, body: Uint8Array | Uint8Array[], refuse?: () => WeftError | null, into?: Uint8Array, sent?: () => void): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => this.#submit(() => {
      const no = refuse?.();
      if (no) return reject(no);
      this.#conn.request(cmd, body, into).then(resolve, reject);
      sent?.();
    }));
  }
  /** a request in queue order whose reply nobody awaits (its failure: at the next synchronize) */
  #post(cmd: CmdName, body: Uint8Array | Uint8Array[]): void {
    this.#request(cmd, body).catch((e: WeftError) => { this.#failure ??= e; });
  }
  #takeFailure(): WeftError | null {
    const f = this.#failure ?? this.#conn.takeFailure();
    this.#failure = null;
    return f;
  }
  #memory(t: Tensor): RpcMemory {
    const m = remoteOf(t, this.#conn);
    if (!m) throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} is not in ${this.#conn.endpoint}'s memory`);
    return m;
  }

  #encode(graph: Graph): Uint8Array {
    return encodeGraph(graph, (t) => {
      const m = remoteOf(t, this.#conn);
      if (!m) throw weftError("BAD_ARGUMENT", `${this.name} cannot compute ${t.describe()}: it is not in this device's memory`);
      return m.locate(tensorAt(t), t.nbytes);
    });
  }

  /**
   * A graph naming collective groups is sent once their servers have linked; where one
   * failed to, the graph is not sent and the returned check gives that failure instead.
   */
  #awaitGroups(graph: Graph): () => WeftError | null {
    const linking = groupsLinking(graph);
    for (const g of linking) this.#hold(g.ready.catch(() => {}));
    return () => linking.find((g) => g.failure)?.failure ?? null;
  }

  /** sends a graph ahead of its first compute: the server decodes it while it runs other work */
  prepare(graph: Graph): void {
    this.#check();
    if (this.#sent.get(graph.uid) === this.#conn.session) return;
    const refuse = this.#awaitGroups(graph);
    const body = [new Writer().u32(this.device.index).u64(graph.uid).body(), this.#encode(graph)];
    this.#sent.set(graph.uid, this.#conn.session);
    this.#request("PREPARE", body, refuse).catch((e: WeftError) => {
      if (this.#sent.get(graph.uid) === this.#conn.session) this.#sent.delete(graph.uid);  // the first compute sends it again
      this.#failure ??= e;
    });
  }

  /**
   * Runs a graph. The reads that followed its last run (the logits, a layer split's
   * activations) are asked for in the same request: its reply brings them, and the
   * getTensorAsync calls that follow are answered from it, with no request of their own
   * (one round trip per step, not two).
   */
  computeAsync(graph: Graph): Promise<void> {
    try {
      this.#check();
      this.#endStep();
      const fresh = this.#sent.get(graph.uid) !== this.#conn.session;
      const refuse = fresh ? this.#awaitGroups(graph) : undefined;
      const reads = this.#reads.get(graph.uid);
      const head = new Writer().u32(this.device.index).u64(graph.uid).u8((fresh ? ComputeFlag.GRAPH : 0) | (reads ? ComputeFlag.READS : 0)).body();
      const body = [head];
      let bytes: Uint8Array | undefined;
      if (reads) {
        body.push(reads.body);
        bytes = this.#scratch(reads.total);
      }
      if (fresh) body.push(this.#encode(graph));
      if (fresh) this.#sent.set(graph.uid, this.#conn.session);
      const step: Step = { uid: graph.uid, reads: reads?.list ?? [], bytes: bytes ?? null, ready: Promise.resolve(), sentAt: -1, claims: 0, over: false, seen: [] };
      this.#step = step;
      step.ready = this.#request("COMPUTE", body, refuse, bytes, () => { step.sentAt = this.#conn.sentCount; }).then(() => {
        const f = this.#takeFailure();
        if (f) throw f;
      }, (e: WeftError) => {
        this.#sent.delete(graph.uid);  // the server dropped it: send it again next time
        this.#reads.delete(graph.uid);
        throw e;
      });
      return step.ready;
    } catch (e) {
      return Promise.reject(e);
    }
  }
  /** reads a graph's runs were followed by, by graph uid (what its next run's reply brings) */
  readonly #reads = new Map<number, Reads>();
  /** the last step: what it brings back, and the reads that follow it */
  #step: Step | null = null;
  /** memory for a step's reads that no step uses any more */
  #spare: Uint8Array | null = null;
  #scratch(n: number): Uint8Array {
    const s = this.#spare && this.#spare.length >= n ? this.#spare : new Uint8Array(n);
    if (s === this.#spare) this.#spare = null;
    return s.subarray(0, n);
  }
  /** the last step is over (another runs, or its reads were learned): what followed it is what its graph's next run brings */
  #endStep(): void {
    const st = this.#step;
    if (!st) return;
    this.#step = null;
    st.over = true;
    const had = this.#reads.get(st.uid);
    // the same reads as the last run's (every token's): kept as they were encoded
    if (!had || !sameReads(had.list, st.seen)) {
      const reads = st.seen.length && st.seen.length <= MAX_READS ? encodeReads(st.seen) : null;
      if (reads && reads.total <= READS_MAX_BYTES) this.#reads.set(st.uid, reads);
      else this.#reads.delete(st.uid);
    }
    if (st.bytes && st.claims === 0) this.#spare = st.bytes;
  }
  /**
   * The last step, where a read now comes straight after it (nothing sent or queued on the
   * connection since, nothing held back here: the server's memory is as the step left it).
   */
  #straightAfter(): Step | null {
    const st = this.#step;
    return st && st.sentAt === this.#conn.sentCount && !this.#items.length ? st : null;
  }
  /** the bytes of a read the step's reply brings (null: it does not, a GET); noted either way, for the graph's next run */
  #fromStep(st: Step, id: number, offset: number, size: number, into?: Uint8Array): Promise<Uint8Array> | null {
    st.seen.push({ id, offset, size });
    if (!st.bytes) return null;
    // where these bytes lie in the reply's payload (the reads in order), if it brings them
    let from = 0, at = 0;
    for (; at < st.reads.length; at++) {
      const x = st.reads[at]!;
      if (x.id === id && x.offset === offset && x.size === size) break;
      from += x.size;
    }
    if (at === st.reads.length) return null;
    st.claims++;
    const done = () => { if (--st.claims === 0 && st.over) this.#spare = st.bytes; };
    return st.ready.then(() => {
      const src = st.bytes!.subarray(from, from + size);
      const out = into ? (into.set(src), into) : src.slice();
      done();
      return out;
    }, (e: unknown) => { done(); throw e; });
  }


  setTensorAsync(t: Tensor, data: ArrayBufferView, offset: number): void {
    this.#check();
    const m = this.#memory(t), bytes = bytesOf(data).slice();
    if (m.bufferType.layout === Layout.PLAIN && bytes.length <= INPUT_MAX) {
      // a step's input: it rides in the next COMPUTE
      const p = m.locate(tensorAt(t) + offset, bytes.length);
      this.#submit(() => this.#conn.queueInput(p.id, p.offset, bytes));
    } else this.#post("SET", m.setBody(t, bytes, tensorAt(t) + offset));
  }
  getTensorAsync(t: Tensor, offset: number, size: number, into?: Uint8Array): Promise<Uint8Array> {
    let p;
    try {
      this.#check();
      p = this.#memory(t).locate(tensorAt(t) + offset, size);
    } catch (e) { return Promise.reject(e); }
    // decided now, not a microtask later: a GET takes its place in the queue at the call
    // (a copy relayed the other way may be queued right after it)
    const st = this.#straightAfter();
    const served = st ? this.#fromStep(st, p.id, p.offset, size, into) : null;
    if (served) return served;
    // a GET; one straight after a step keeps the step's place (the next read may follow it too)
    return this.#request("GET", new Writer().u32(p.id).u64(p.offset).u64(size).body(), undefined, into, () => {
      if (st && st === this.#step) st.sentAt = this.#conn.sentCount;
    }).then((r) => into ?? r.r.restView());
  }
  set2dAsync(b: Buffer, offset: number, data: ArrayBufferView, rows: number, rowBytes: number, stride: number): void {
    this.#check();
    const m = b as RpcMemory;
    if (m.conn !== this.#conn) throw weftError("BAD_ARGUMENT", `${b.bufferType.name} memory is not ${this.name}'s`);
    const p = m.locate(offset, rows ? (rows - 1) * stride + rowBytes : 0);
    const bytes = bytesOf(data).slice();
    this.#post("SET2D", [new Writer().u32(p.id).u64(p.offset).u64(rows).u64(rowBytes).u64(stride).u64(bytes.length).body(), bytes]);
  }
  async get2dAsync(b: Buffer, offset: number, rows: number, rowBytes: number, stride: number): Promise<Uint8Array> {
    this.#check();
    const m = b as RpcMemory;
    if (m.conn !== this.#conn) throw weftError("BAD_ARGUMENT", `${b.bufferType.name} memory is not ${this.name}'s`);
    const p = m.locate(offset, rows ? (rows - 1) * stride + rowBytes : 0);
    const r = (await this.#request("GET2D", new Writer().u32(p.id).u64(p.offset).u64(rows).u64(rowBytes).u64(stride).body())).r;
    return r.restView();
  }

  /**
   * A copy into this device: on the server when both sides are its memory, else relayed
   * (read from the source's queue, written here in this queue's order when the bytes come).
   */
  copyTensorAsync(src: Backend, from: Tensor, to: Tensor): boolean {
    if (this.#disposed || !to.isContiguous || !from.isContiguous) return false;
    const dst = remoteOf(to, this.#conn);
    if (!dst) return false;
    const local = remoteOf(from, this.#conn);
    if (local && (src === this || src instanceof RpcBackend)) {
      // same server: it runs one client's requests in order, once the source's held-back work is sent
      if (src !== this) { const sent = (src as RpcBackend).sent(); if (sent) this.#hold(sent); }
      const a = local.locate(tensorAt(from), from.nbytes), b = dst.locate(tensorAt(to), to.nbytes);
      this.#post("COPY", new Writer().u32(a.id).u64(a.offset).u32(b.id).u64(b.offset).u64(from.nbytes).body());
      return true;
    }
    const bytes = getTensorAsync(src, from);
    this.#hold(bytes, (v) => {
      this.#conn.post("SET", dst.setBody(to, v as Uint8Array, tensorAt(to)));
    });
    return true;
  }

  /** @internal resolves once everything enqueued so far has been sent (null: it has) */
  sent(): Promise<void> | null {
    if (this.#items.length === 0) return null;
    return new Promise<void>((r) => this.#items.push({ send: r }));
  }

  recordEvent(): Event {
    const done = this.#request("PING", new Uint8Array(0)).then(() => undefined);
    done.catch(() => {});
    return new RpcEvent(this, done);
  }
  waitEvent(e: Event): void {
    // this server already runs its client's requests in order
    if (e.backend instanceof RpcBackend && e.backend.#conn === this.#conn) {
      const sent = e.backend.sent();
      if (sent) this.#hold(sent);
      return;
    }
    this.#hold(e.done);
  }

  async synchronize(): Promise<void> {
    await this.#request("PING", new Uint8Array(0));
    const f = this.#takeFailure();
    if (f) throw f;
  }
  forget(graph: Graph): void {
    if (this.#sent.get(graph.uid) === this.#conn.session && !this.#conn.closed) this.#post("FORGET", new Writer().u64(graph.uid).body());
    this.#sent.delete(graph.uid);
  }
  async dispose(): Promise<void> {
    if (this.#disposed) return;
    try { if (!this.#conn.closed) await this.synchronize(); } catch { /* its failures were reported to the work's callers */ }
    this.#disposed = true;
    this.#unregister();
  }
  [Symbol.asyncDispose](): Promise<void> { return this.dispose(); }
}
