/**
 * CPU memory: native, 64-byte aligned allocations or read-only file mappings, addressed by
 * id (the addon keeps the registry and checks every access). A RepackedBuffer holds weight
 * matrices in eight-row groups (lib/cpu/repack.ts): writing a whole matrix repacks it,
 * MUL_MAT reads it, nothing reads its elements back as rows.
 */
import { fromNative, weftError } from "../core/errors.js";
import { Tensor, bytesOf } from "../core/tensor.js";
import type { Buffer, BufferType, BufferUsage } from "../backend/interface.js";
import { native } from "./native.js";
import { repackedBytes } from "./repack.js";

export class CpuBuffer implements Buffer {
  readonly size: number;
  readonly readOnly: boolean;
  usage: BufferUsage = 0;
  #id: number;

  /** @internal made by a CPU buffer type */
  constructor(readonly bufferType: BufferType, id: number, size: number, readOnly: boolean) {
    this.#id = id;
    this.size = size;
    this.readOnly = readOnly;
  }

  /** eight-row repacked weights (only MUL_MAT reads them) */
  get repacked(): boolean { return false; }

  get id(): number {
    if (this.#id < 0) throw weftError("DISPOSED", `a ${this.bufferType.name} buffer was used after dispose()`);
    return this.#id;
  }
  get disposed(): boolean { return this.#id < 0; }

  set(offset: number, data: ArrayBufferView): void {
    try { native().bufferSet(this.id, offset, bytesOf(data)); } catch (e) { throw fromNative(e); }
  }
  /** bytes [offset, offset + length), into `into` (exactly that long) where given */
  get(offset: number, length: number, into?: Uint8Array): Uint8Array {
    try { return native().bufferGet(this.id, offset, length, into); } catch (e) { throw fromNative(e); }
  }
  memset(offset: number, length: number, value: number): void {
    try { native().bufferFill(this.id, offset, length, value); } catch (e) { throw fromNative(e); }
  }
  clear(value: number): void { if (this.size) this.memset(0, this.size, value); }
  set2d(offset: number, data: ArrayBufferView, rows: number, rowBytes: number, stride: number): void {
    const bytes = bytesOf(data);
    for (let r = 0; r < rows; r++) this.set(offset + r * stride, bytes.subarray(r * rowBytes, (r + 1) * rowBytes));
  }
  get2d(offset: number, rows: number, rowBytes: number, stride: number): Uint8Array {
    const out = new Uint8Array(rows * rowBytes);
    for (let r = 0; r < rows; r++) out.set(this.get(offset + r * stride, rowBytes), r * rowBytes);
    return out;
  }
  /** Bytes as they lie in memory, whatever the layout (an RPC server caches repacked weights so). */
  readLayout(offset = 0, length = this.size - offset): Uint8Array {
    try { return native().bufferGet(this.id, offset, length); } catch (e) { throw fromNative(e); }
  }
  /** Bytes of a file, as they lie there, into memory at `offset`, whatever the layout (a cached weight). */
  loadLayout(offset: number, path: string, fileOffset: number, length: number): void {
    try { native().bufferLoadFile(this.id, offset, path, fileOffset, length); } catch (e) { throw fromNative(e); }
  }
  /** Faults in the pages of a range (a mapped file becomes resident). */
  touch(offset: number, length: number): void {
    try { native().bufferTouch(this.id, offset, length); } catch (e) { throw fromNative(e); }
  }
  copyFrom(src: Buffer, srcOffset: number, dstOffset: number, length: number): boolean {
    if (!(src instanceof CpuBuffer) || src.repacked || this.repacked) return false;
    try { native().bufferCopy(src.id, srcOffset, this.id, dstOffset, length); } catch (e) { throw fromNative(e); }
    return true;
  }
  /** @internal writes bytes [offset, …) of t, which lies at byte `at` of this buffer (the CPU backend's queued writes) */
  writeTensor(_t: Tensor, data: ArrayBufferView, offset: number, at: number): void { this.set(at + offset, data); }
  /** @internal reads bytes [offset, offset + size) of t, which lies at byte `at` */
  readTensor(_t: Tensor, offset: number, size: number, at: number, into?: Uint8Array): Uint8Array { return this.get(at + offset, size, into); }

  dispose(): void {
    if (this.#id < 0) return;
    native().bufferFree(this.#id);  // freed natively once no running graph uses it
    this.#id = -1;
  }
  [Symbol.dispose](): void { this.dispose(); }
}

/** Weight matrices in eight-row groups: a whole-matrix write repacks it, reads are refused. */
export class RepackedBuffer extends CpuBuffer {
  override get repacked(): boolean { return true; }
  override writeTensor(t: Tensor, data: ArrayBufferView, offset: number, at: number): void {
    if (offset !== 0 || data.byteLength !== t.nbytes || t.viewSrc)
      throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} is repacked for MUL_MAT: only whole-matrix writes are possible`);
    try { native().repackRows(t.type, bytesOf(data), 0, t.nb[1], this.id, at, t.ne[0], t.ne[1]); } catch (e) { throw fromNative(e); }
  }
  /** Matrix t repacked from where its rows lie in another CPU buffer (a mapped model file) into byte `at`. */
  repackFrom(t: Tensor, src: CpuBuffer, srcOffset: number, at: number): void {
    try { native().repackRows(t.type, src.id, srcOffset, t.nb[1], this.id, at, t.ne[0], t.ne[1]); } catch (e) { throw fromNative(e); }
  }
  /** Rows [firstRow, …) of matrix t (placed at byte `at`), in whole groups of eight (a weight arriving in pieces). */
  writeRows(t: Tensor, data: ArrayBufferView, firstRow: number, at: number): void {
    const rows = data.byteLength / t.nb[1];
    if (!Number.isInteger(rows) || rows % 8 || firstRow % 8 || firstRow + rows > t.ne[1])
      throw weftError("BAD_ARGUMENT", `tensor ${t.describe()}: repacked rows are written in groups of eight`);
    try { native().repackRows(t.type, bytesOf(data), 0, t.nb[1], this.id, at + firstRow * (repackedBytes(t) / t.ne[1]), t.ne[0], rows); } catch (e) { throw fromNative(e); }
  }
  override readTensor(t: Tensor): Uint8Array {
    throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} is repacked for MUL_MAT; its rows cannot be read or written`);
  }
  setTensor(t: Tensor, data: ArrayBufferView, offset: number): void { this.writeTensor(t, data, offset, cpuPlace(t).offset); }
  getTensor(t: Tensor): Uint8Array { return this.readTensor(t); }
  override set(): void { throw weftError("BAD_ARGUMENT", "a repacked weight buffer is written a tensor at a time (setTensorData)"); }
  override get(): Uint8Array { throw weftError("BAD_ARGUMENT", "a repacked weight buffer's bytes are not rows; they cannot be read"); }
}

/** Where a tensor placed in CPU memory is: its root's buffer plus the accumulated view offset. */
export function cpuPlace(t: Tensor): { buffer: CpuBuffer; offset: number } {
  const { tensor: root, offset } = t.root();
  if (!(root.buffer instanceof CpuBuffer)) {
    throw weftError("BAD_ARGUMENT", root.buffer
      ? `tensor ${t.describe()} lies in ${(root.buffer as Buffer).bufferType.name} memory, not in a CPU buffer`
      : `tensor ${t.describe()} has no memory yet (allocate it first)`);
  }
  return { buffer: root.buffer, offset: root.offset + offset };
}

/** n rounded up to the 64 bytes every CPU allocation keeps */
export const alignUp = (n: number) => Math.ceil(n / 64) * 64;
