/**
 * A device of another machine (DESIGN §6): `rpc:N` implements the backend interface over
 * an RpcConnection. Its memory is remote: writes are posted (queued on the socket, their
 * failures reported at the queue's next synchronize), reads go through a backend
 * (getTensorAsync), never synchronously. Tensors placed together (weights, KV cache) get
 * one server allocation each, made when first used: a weight can then be an mmap of the
 * server's cache file instead of a copy, and a tensor is restored after a reconnect.
 */
import { createHash } from "node:crypto";
import { closeSync, fstatSync, openSync, realpathSync, readFileSync } from "node:fs";
import { basename, join } from "node:path";
import { weftError, WeftError } from "../core/errors.js";
import { Tensor, bytesOf } from "../core/tensor.js";
import { readFileRange } from "../backend/fallback.js";
import type {
  AllocTensorsOptions, Backend, Buffer, BufferType, BufferUsage, CollectiveGroup, CollectiveOptions, Device, DeviceCaps, DeviceMemory, FileTensor,
} from "../backend/interface.js";
import { ensureDir, writeFileAtomicallySync } from "../core/files.js";
import { cacheDir } from "../model/default.js";
import { canRepack, repackedBytes } from "../cpu/repack.js";
import { RpcBackend } from "./backend.js";
import { RemoteDeviceInfo, RpcConnection } from "./client.js";
import { Layout, Status, WEIGHT_CHUNK, WeightSource, Writer } from "./protocol.js";
import { rpcCollectiveGroup } from "./peer.js";

const ALIGNMENT = 64;
/** weight bytes on their way to a server at once while loading */
const LOAD_WINDOW = 512 << 20;

/** Where a byte of remote memory is on the server: its allocation and the offset there. */
export interface RemotePlace { readonly id: number; readonly offset: number }

/** Remote memory: both kinds of RPC buffer. */
export abstract class RpcMemory implements Buffer {
  usage: BufferUsage = 0;
  abstract readonly size: number;
  abstract readonly disposed: boolean;
  constructor(readonly bufferType: RpcBufferType) {}
  get device(): RpcDevice { return this.bufferType.device; }
  get conn(): RpcConnection { return this.bufferType.device.conn; }
  /** the allocation and offset of byte `offset` (allocating it on first use) */
  abstract locate(offset: number, length: number): RemotePlace;
  /** the body of a SET writing bytes [offset, …) of tensor t */
  abstract setBody(t: Tensor | null, data: Uint8Array, offset: number): Uint8Array[];

  set(offset: number, data: ArrayBufferView): void { this.#setPieces(null, bytesOf(data), offset); }
  setTensor(t: Tensor, data: ArrayBufferView, offset: number): void { this.#setPieces(t, bytesOf(data), tensorOffset(t) + offset); }
  /** plain memory in SETs of at most WEIGHT_CHUNK bytes (a frame has a limit); a repacked matrix whole */
  #setPieces(t: Tensor | null, bytes: Uint8Array, offset: number): void {
    if (this.bufferType.layout === Layout.REPACKED || bytes.length <= WEIGHT_CHUNK) {
      this.conn.post("SET", this.setBody(t, bytes.slice(), offset));
      return;
    }
    for (let at = 0; at < bytes.length; at += WEIGHT_CHUNK)
      this.conn.post("SET", this.setBody(null, bytes.slice(at, Math.min(bytes.length, at + WEIGHT_CHUNK)), offset + at));
  }
  get(): Uint8Array {
    throw weftError("UNSUPPORTED_OP", `${this.device.name} memory is on another machine: read it through a backend (getTensorAsync), which waits for the reply`);
  }
  getTensor(): Uint8Array { return this.get(); }
  get2d(): Uint8Array { return this.get(); }
  memset(offset: number, length: number, value: number): void {
    if (length === 0) return;
    const p = this.locate(offset, length);
    this.conn.post("FILL", new Writer().u32(p.id).u64(p.offset).u64(length).u8(value).body());
  }
  set2d(offset: number, data: ArrayBufferView, rows: number, rowBytes: number, stride: number): void {
    const p = this.locate(offset, rows ? (rows - 1) * stride + rowBytes : 0);
    const bytes = bytesOf(data).slice();
    this.conn.post("SET2D", [new Writer().u32(p.id).u64(p.offset).u64(rows).u64(rowBytes).u64(stride).u64(bytes.length).body(), bytes]);
  }
  copyFrom(src: Buffer, srcOffset: number, dstOffset: number, length: number): boolean {
    if (!(src instanceof RpcMemory) || src.conn !== this.conn) return false;
    const a = src.locate(srcOffset, length), b = this.locate(dstOffset, length);
    this.conn.post("COPY", new Writer().u32(a.id).u64(a.offset).u32(b.id).u64(b.offset).u64(length).body());
    return true;
  }
  abstract clear(value: number): void;
  abstract dispose(): void;
}

/** Byte offset of tensor t from the start of its root's placement. */
function tensorOffset(t: Tensor): number {
  const { tensor, offset } = t.root();
  return tensor.offset + offset;
}

/** One server allocation (compute memory, or a plain alloc()). */
export class RpcBuffer extends RpcMemory {
  readonly #id: number;
  #live = true;
  #fill: number | null = null;
  readonly #unregister: () => void;
  constructor(bt: RpcBufferType, readonly size: number) {
    super(bt);
    this.#id = bt.device.newBufferId();
    this.#alloc();
    this.#unregister = this.conn.onReconnect(async () => {
      this.#alloc();
      if (this.#fill !== null) this.memset(0, this.size, this.#fill);
    });
  }
  #alloc(): void {
    this.conn.post("ALLOC", new Writer().u32(this.#id).u32(this.device.index).u8(this.bufferType.layout).u64(this.size).body());
  }
  get disposed(): boolean { return !this.#live; }
  locate(offset: number, length: number): RemotePlace {
    if (!this.#live) throw weftError("DISPOSED", `a ${this.bufferType.name} buffer was used after dispose()`);
    if (offset < 0 || offset + length > this.size) throw weftError("OUT_OF_RANGE", `bytes [${offset}, +${length}) are outside a ${this.size}-byte ${this.bufferType.name} buffer`);
    return { id: this.#id, offset };
  }
  setBody(t: Tensor | null, data: Uint8Array, offset: number): Uint8Array[] {
    const p = this.locate(offset, data.length);
    return setFrame(p, t, data, this.bufferType.layout);
  }
  clear(value: number): void { this.#fill = value; this.memset(0, this.size, value); }
  dispose(): void {
    if (!this.#live) return;
    this.#live = false;
    this.#unregister();
    if (!this.conn.closed) this.conn.post("FREE", new Writer().u32(this.#id).body());
  }
}

function setFrame(p: RemotePlace, t: Tensor | null, data: Uint8Array, layout: number): Uint8Array[] {
  const w = new Writer().u32(p.id).u64(p.offset);
  if (layout === Layout.REPACKED && t) w.u8(1).u16(t.type).u64(t.ne[0]).u64(t.ne[1]);
  else w.u8(0);
  return [w.u64(data.length).body(), data];
}

/** A tensor of an RpcTensors buffer: where it lies, and what it holds (to restore it after a reconnect). */
interface Entry {
  readonly t: Tensor;
  readonly at: number;
  readonly size: number;
  /** where a weight came from (to place it again after a reconnect) */
  source: { file: string; offset: number; hash: string } | null;
  /** or how to produce its bytes again (a slice of a file's tensor: setTensorFrom) */
  restore: (() => Uint8Array) | null;
}

/**
 * Tensors placed together (weights, KV cache) in one server allocation, made when first
 * used. Weights from a file are placed by content hash (the server's cache or its own copy
 * of the file), so after a reconnect they are placed again the same way.
 */
export class RpcTensors extends RpcMemory {
  readonly size: number;
  readonly #entries: Entry[];
  readonly #id: number;
  #allocated = false;
  #fill: number | null = null;
  #live = true;
  readonly #unregister: () => void;
  constructor(bt: RpcBufferType, tensors: readonly Tensor[]) {
    super(bt);
    let at = 0;
    this.#entries = tensors.map((t) => {
      const size = bt.allocSize(t);
      const e: Entry = { t, at, size, source: null, restore: null };
      at += Math.ceil(Math.max(size, 1) / ALIGNMENT) * ALIGNMENT;
      return e;
    });
    this.size = at;
    this.#id = bt.device.newBufferId();
    for (const e of this.#entries) { e.t.buffer = this; e.t.offset = e.at; }
    this.#unregister = this.conn.onReconnect(() => this.#restore());
  }
  get disposed(): boolean { return !this.#live; }

  #entry(offset: number, length: number): Entry {
    let lo = 0, hi = this.#entries.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.#entries[mid]!.at <= offset) lo = mid; else hi = mid - 1;
    }
    const e = this.#entries[lo];
    if (!e || offset < e.at || offset + length > e.at + e.size)
      throw weftError("OUT_OF_RANGE", `bytes [${offset}, +${length}) are not within one tensor of this ${this.bufferType.name} buffer`);
    return e;
  }
  #ensure(): void {
    if (!this.#live) throw weftError("DISPOSED", `a ${this.bufferType.name} buffer was used after dispose()`);
    if (this.#allocated) return;
    this.#allocated = true;
    this.conn.post("ALLOC", new Writer().u32(this.#id).u32(this.device.index).u8(this.bufferType.layout).u64(this.size).body());
  }
  locate(offset: number, length: number): RemotePlace {
    this.#ensure();
    if (offset < 0 || offset + length > this.size) throw weftError("OUT_OF_RANGE", `bytes [${offset}, +${length}) are outside a ${this.size}-byte ${this.bufferType.name} buffer`);
    return { id: this.#id, offset };
  }
  setBody(t: Tensor | null, data: Uint8Array, offset: number): Uint8Array[] {
    const e = this.#entry(offset, data.length);
    if (this.bufferType.layout === Layout.REPACKED && (!t || offset !== e.at || data.length !== t.nbytes))
      throw weftError("BAD_ARGUMENT", `${this.bufferType.name}: a repacked matrix is written whole (setTensorData)`);
    return setFrame(this.locate(offset, data.length), t, data, this.bufferType.layout);
  }
  /** writes a whole tensor and keeps `read`, to write it again after a reconnect */
  setTensorFrom(t: Tensor, read: () => Uint8Array): void {
    const e = this.#entry(tensorOffset(t), t.nbytes);
    if (e.t !== t) throw weftError("BAD_ARGUMENT", `${t.describe()} is not a whole tensor of this buffer`);
    e.restore = read;
    this.setTensor(t, read(), 0);
  }
  clear(value: number): void {
    if (this.bufferType.layout === Layout.REPACKED) throw weftError("BAD_ARGUMENT", `${this.bufferType.name} memory holds repacked matrices: it cannot be filled`);
    this.#fill = value;
    this.memset(0, this.size, value);
  }

  /**
   * Weights from a GGUF: the server is asked for each by content hash first (its cache,
   * or its own copy of the file under --models); only what it lacks is uploaded, in
   * pieces, and it checks the hash before keeping it.
   */
  async loadFromFile(file: string, tensors: readonly FileTensor[], step: (bytes: number) => Promise<void>): Promise<void> {
    this.#ensure();
    const hashes = new FileHashes(file);
    const fd = openSync(file, "r");
    // tensors in flight: the next is read and hashed while the server places the last ones
    const window: Array<{ done: Promise<void>; size: number }> = [];
    let inFlight = 0;
    const settle = async () => {
      const w = window.shift()!;
      inFlight -= w.size;
      await w.done;
      await step(w.size);
    };
    try {
      for (const x of tensors) {
        const e = this.#entry(tensorOffset(x.t), x.size);
        if (e.t !== x.t.root().tensor) throw weftError("BAD_ARGUMENT", `${x.t.describe()} is not a tensor of this buffer`);
        let bytes: Uint8Array | null = null;
        const read = () => (bytes ??= readFileRange(fd, file, x.offset, x.size));
        e.source = { file, offset: x.offset, hash: hashes.get(x.offset, x.size, read) };
        const done = this.#placeWeight(e, read);
        done.catch(() => {});
        window.push({ done, size: x.size });
        inFlight += x.size;
        while (inFlight > LOAD_WINDOW) await settle();
      }
      while (window.length) await settle();
    } finally {
      await Promise.allSettled(window.map((w) => w.done));
      closeSync(fd);
      hashes.save();
    }
  }

  async #placeWeight(e: Entry, read: () => Uint8Array): Promise<void> {
    const src = e.source!;
    const w = new Writer().u32(this.#id).u64(e.at).u8(this.bufferType.layout).u16(e.t.type);
    for (const n of e.t.ne) w.u64(n);
    w.bytes(Buffer.from(src.hash, "hex")).u8(1).str(basename(src.file)).u64(src.offset);
    const reply = await this.conn.request("WEIGHT", w.body());
    if (reply.status !== Status.MISSING) {
      if (reply.r.u8("weight source") === WeightSource.CACHE) this.conn.stats.fromCache++; else this.conn.stats.fromFile++;
      return;
    }
    const bytes = read();
    this.conn.stats.uploadedBytes += bytes.length;
    // pieces of whole eight-row groups (the server repacks each as it comes), about
    // WEIGHT_CHUNK bytes, all sent at once; the last one's reply says it was placed
    const group = 8 * e.t.nb[1];
    const chunk = Math.max(1, Math.floor(WEIGHT_CHUNK / group)) * group;
    const pieces: Promise<unknown>[] = [];
    for (let at = 0; at === 0 || at < bytes.length; at += chunk) {
      const piece = bytes.subarray(at, Math.min(bytes.length, at + chunk));
      pieces.push(this.conn.request("WEIGHT_DATA", [new Writer().u32(this.#id).u64(e.at).u64(at).u64(piece.length).body(), piece]));
    }
    await Promise.all(pieces);
  }

  async #restore(): Promise<void> {
    if (!this.#live || !this.#allocated) return;
    this.#allocated = false;
    this.#ensure();
    if (this.#fill !== null) this.memset(0, this.size, this.#fill);
    for (const e of this.#entries) {
      if (e.restore) { this.setTensor(e.t, e.restore(), 0); continue; }
      if (!e.source) continue;
      const fd = openSync(e.source.file, "r");
      try { await this.#placeWeight(e, () => readFileRange(fd, e.source!.file, e.source!.offset, e.t.nbytes)); } finally { closeSync(fd); }
    }
  }

  dispose(): void {
    if (!this.#live) return;
    this.#live = false;
    this.#unregister();
    if (this.#allocated && !this.conn.closed) this.conn.post("FREE", new Writer().u32(this.#id).body());
  }
}

/**
 * Content hashes of a file's tensors, kept on disk (cacheDir()/rpc-hashes) by the file's
 * identity (path, size, mtime, inode): a second load hashes nothing.
 */
class FileHashes {
  readonly #path: string;
  readonly #id: string;
  #map: Record<string, string> = {};
  #dirty = false;
  constructor(file: string) {
    const real = realpathSync(file);
    const fd = openSync(real, "r");
    let st;
    try { st = fstatSync(fd); } finally { closeSync(fd); }
    this.#id = `${st.size}:${st.mtimeMs}:${st.ino}`;
    this.#path = join(cacheDir(), "rpc-hashes", `${createHash("sha1").update(real).digest("hex")}.json`);
    try {
      const j = JSON.parse(readFileSync(this.#path, "utf8")) as { id: string; hashes: Record<string, string> };
      if (j.id === this.#id) this.#map = j.hashes;
    } catch { /* none yet */ }
  }
  get(offset: number, size: number, read: () => Uint8Array): string {
    const key = `${offset}:${size}`;
    let h = this.#map[key];
    if (!h) { h = createHash("sha256").update(read()).digest("hex"); this.#map[key] = h; this.#dirty = true; }
    return h;
  }
  save(): void {
    if (!this.#dirty) return;
    try {
      ensureDir(join(cacheDir(), "rpc-hashes"));
      writeFileAtomicallySync(this.#path, JSON.stringify({ id: this.#id, hashes: this.#map }));
    } catch { /* a cache that cannot be written only costs hashing again */ }
  }
}

export class RpcBufferType implements BufferType {
  readonly alignment = ALIGNMENT;
  readonly isHost = false;
  constructor(readonly device: RpcDevice, readonly layout: number) {}
  get name(): string { return `${this.device.name}/${this.layout === Layout.REPACKED ? "repacked" : "memory"}`; }
  get maxSize(): number { return this.device.conn.info.maxMemory; }
  allocSize(t: Tensor): number { return this.layout === Layout.REPACKED ? repackedBytes(t) : t.nbytes; }
  alloc(size: number): RpcBuffer { return new RpcBuffer(this, size); }
  allocTensors(tensors: readonly Tensor[], _opts: AllocTensorsOptions): RpcTensors { return new RpcTensors(this, tensors); }
}

export class RpcDevice implements Device {
  readonly type = "REMOTE" as const;
  readonly caps: DeviceCaps = { async: true, events: true, collectives: true };
  readonly #plain: RpcBufferType;
  readonly #repacked: RpcBufferType;
  constructor(readonly name: string, readonly conn: RpcConnection, readonly index: number, readonly repack: boolean) {
    this.#plain = new RpcBufferType(this, Layout.PLAIN);
    this.#repacked = new RpcBufferType(this, Layout.REPACKED);
  }
  get #info(): RemoteDeviceInfo { return this.conn.info.devices[this.index]!; }
  get description(): string { return `${this.#info.name} of ${this.conn.endpoint}: ${this.#info.description}`; }
  /** as the server last said (refresh with updateMemory) */
  memory(): DeviceMemory { return { free: this.#info.free, total: this.#info.total }; }
  async updateMemory(): Promise<DeviceMemory> {
    const r = (await this.conn.request("MEMORY", new Uint8Array(0))).r;
    const n = r.u32("devices");
    for (let i = 0; i < n; i++) {
      const free = r.u64("free"), total = r.u64("total");
      const d = this.conn.info.devices[i];
      if (d) { d.free = free; d.total = total; }
    }
    return this.memory();
  }
  bufferType(): RpcBufferType { return this.#plain; }
  weightBufferType(t: Tensor): BufferType | null { return this.repack && canRepack(t) ? this.#repacked : null; }
  supportsOp(node: Tensor): boolean { return this.#info.ops.has(node.op); }
  initBackend(): Backend { return new RpcBackend(this); }
  /** devices of distinct servers: the servers link to each other (peer links) and exchange partials themselves */
  collectiveGroup(devices: readonly Device[], opts: CollectiveOptions = {}): CollectiveGroup | null {
    return devices.includes(this) ? rpcCollectiveGroup(devices, (d): d is RpcDevice => d instanceof RpcDevice, opts.allReduceType) : null;
  }
  /** @internal a new client-side buffer id on this connection */
  newBufferId(): number { return nextBufferId(this.conn); }
}

const bufferIds = new WeakMap<RpcConnection, number>();
function nextBufferId(conn: RpcConnection): number {
  const id = (bufferIds.get(conn) ?? 0) + 1;
  if (id > 0xffffffff) throw weftError("RPC_LIMIT", `more than 2^32 buffers on ${conn.endpoint}`);
  bufferIds.set(conn, id);
  return id;
}

export { WeftError };
