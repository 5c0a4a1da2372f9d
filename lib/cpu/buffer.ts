import { fromNative, weftError } from "../core/errors.js";
import { Tensor } from "../core/tensor.js";
import type { Buffer, BufferType, BufferUsage } from "../backend/interface.js";
import { native } from "./native.js";

/** The bytes of any typed array or view (no copy). */
export function bytesOf(v: ArrayBufferView): Uint8Array {
  return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
}

let hostBufferType: BufferType | null = null;
/** Set once by lib/backend/cpu.ts: the buffer type of plain host buffers. */
export function setHostBufferType(t: BufferType): void { hostBufferType ??= t; }

/**
 * Host memory owned by the native addon: 64-byte aligned, or a read-only file mapping.
 * A `repacked` buffer holds weight matrices in eight-row groups (lib/cpu/repack.ts):
 * MUL_MAT reads them, nothing reads or writes their elements as rows.
 */
export class CpuBuffer implements Buffer {
  readonly size: number;
  readonly readOnly: boolean;
  readonly repacked: boolean;
  usage: BufferUsage = 0;
  #id: number;
  #type: BufferType | null = null;

  /** the memory kind (the CPU host type unless a device's buffer type allocated it) */
  get bufferType(): BufferType {
    const t = this.#type ?? hostBufferType;
    if (!t) throw weftError("BAD_ARGUMENT", "the CPU device module is not loaded");
    return t;
  }
  /** @internal set by the buffer type that allocated this buffer */
  withType(t: BufferType): this { this.#type = t; return this; }

  private constructor(id: number, size: number, readOnly: boolean, repacked = false) {
    this.#id = id;
    this.size = size;
    this.readOnly = readOnly;
    this.repacked = repacked;
  }

  static alloc(size: number, opts: { repacked?: boolean } = {}): CpuBuffer {
    try { return new CpuBuffer(native().bufferAlloc(size), size, false, opts.repacked ?? false); }
    catch (e) { throw fromNative(e); }
  }

  /** Maps a file without copying it (model weights). */
  static mapFile(path: string): CpuBuffer {
    try {
      const m = native().mapFile(path);
      return new CpuBuffer(m.id, m.size, true);
    } catch (e) { throw fromNative(e); }
  }

  get id(): number {
    if (this.#id < 0) throw weftError("DISPOSED", "buffer was disposed");
    return this.#id;
  }
  get disposed(): boolean { return this.#id < 0; }

  set(offset: number, data: ArrayBufferView): void {
    try { native().bufferSet(this.id, offset, bytesOf(data)); } catch (e) { throw fromNative(e); }
  }
  get(offset: number, length: number): Uint8Array {
    try { return native().bufferGet(this.id, offset, length); } catch (e) { throw fromNative(e); }
  }
  fill(offset: number, length: number, value: number): void {
    try { native().bufferFill(this.id, offset, length, value); } catch (e) { throw fromNative(e); }
  }
  memset(offset: number, length: number, value: number): void { this.fill(offset, length, value); }
  clear(value: number): void { if (this.size) this.fill(0, this.size, value); }
  /** Faults in the pages of a range (a mapped file becomes resident). */
  touch(offset: number, length: number): void {
    try { native().bufferTouch(this.id, offset, length); } catch (e) { throw fromNative(e); }
  }
  copyFrom(src: Buffer, srcOffset: number, dstOffset: number, length: number): boolean {
    if (!(src instanceof CpuBuffer)) return false;
    try { native().bufferCopy(src.id, srcOffset, this.id, dstOffset, length); } catch (e) { throw fromNative(e); }
    return true;
  }

  dispose(): void {
    if (this.#id < 0) return;
    native().bufferFree(this.#id);
    this.#id = -1;
  }
  [Symbol.dispose](): void { this.dispose(); }
}

const ALIGN = 64;
/** n rounded up to the 64 bytes every CPU tensor placement keeps */
export const alignUp = (n: number) => Math.ceil(n / ALIGN) * ALIGN;

/** Where a tensor's bytes are: its root's buffer plus the accumulated view offset. */
export function tensorLocation(t: Tensor): { buffer: CpuBuffer; offset: number } {
  const { tensor: root, offset } = t.root();
  if (!(root.buffer instanceof CpuBuffer)) throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} is not placed in a CPU buffer`);
  return { buffer: root.buffer, offset: root.offset + offset };
}

/**
 * Places every unplaced root tensor of `tensors` in one new buffer, laid out linearly
 * (static tensors: weights, KV cache; compute graphs use lib/backend/alloc.ts).
 * `guard` bytes of padding go around each tensor so tests can detect stray writes;
 * `alloc` makes the buffer (a device's buffer type; default plain host memory).
 */
export function allocateTensors(tensors: Iterable<Tensor>, guard = 0, alloc: (size: number) => CpuBuffer = CpuBuffer.alloc): CpuBuffer {
  const roots: Tensor[] = [];
  const seen = new Set<Tensor>();
  for (const t of tensors) {
    const r = t.root().tensor;
    if (r.buffer || seen.has(r)) continue;
    seen.add(r);
    roots.push(r);
  }
  let size = 0;
  const offs: number[] = [];
  for (const r of roots) {
    size = alignUp(size + guard);
    offs.push(size);
    size += r.nbytes;
  }
  size = alignUp(size + guard);
  const buf = alloc(size);
  roots.forEach((r, i) => { r.buffer = buf; r.offset = offs[i]!; });
  return buf;
}

/** Where a tensor's elements are, as rows (not in a repacked buffer). */
function rowLocation(t: Tensor): { buffer: CpuBuffer; offset: number } {
  const loc = tensorLocation(t);
  if (loc.buffer.repacked) throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} is repacked for MUL_MAT; its rows cannot be read or written`);
  return loc;
}

/** Writes raw bytes into a contiguous tensor. */
export function setTensorData(t: Tensor, data: ArrayBufferView): void {
  if (!t.isContiguous) throw weftError("BAD_ARGUMENT", `setTensorData needs a contiguous tensor: ${t.describe()}`);
  if (data.byteLength !== t.nbytes) throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} holds ${t.nbytes} bytes, got ${data.byteLength}`);
  const { buffer, offset } = rowLocation(t);
  buffer.set(offset, data);
}

/** Reads the bytes a tensor spans (strided tensors: the whole span). */
export function getTensorData(t: Tensor): Uint8Array {
  const { buffer, offset } = rowLocation(t);
  return buffer.get(offset, t.nbytes);
}
