/**
 * Every fallback for optional backend members, in one place (DESIGN §2): callers use these
 * functions and never test capabilities themselves. Tensor data is read and written
 * through the buffer's tensor-level members where it has them (a meta buffer scatters and
 * gathers, a repacked CPU buffer converts), else as the bytes of the tensor's span. The
 * fallback for a queued operation is: wait for the queue to drain, then the blocking call.
 */
import { closeSync, openSync, readSync } from "node:fs";
import { weftError } from "../core/errors.js";
import { Tensor, bytesOf } from "../core/tensor.js";
import type { Graph } from "../core/graph.js";
import { Backend, Buffer, BufferType, CollectiveGroup, CollectiveOptions, Device, Event, FileTensor } from "./interface.js";

/** The buffer a tensor's bytes are in and the byte position of its span there. */
export function tensorPlace(t: Tensor): { buffer: Buffer; offset: number } {
  const { tensor: root, offset } = t.root();
  if (!root.buffer) throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} has no memory yet (allocate it first)`);
  return { buffer: root.buffer as Buffer, offset: root.offset + offset };
}

function checkRange(t: Tensor, offset: number, size: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(size) || offset < 0 || size < 0 || offset + size > t.nbytes)
    throw weftError("OUT_OF_RANGE", `bytes [${offset}, +${size}) are outside tensor ${t.describe()} (${t.nbytes} bytes)`);
}

/** Writes a contiguous tensor's bytes; with `offset`, bytes [offset, offset + data.byteLength) of it. */
export function setTensorData(t: Tensor, data: ArrayBufferView, offset?: number): void {
  if (!t.isContiguous) throw weftError("BAD_ARGUMENT", `setTensorData needs a contiguous tensor: ${t.describe()}`);
  if (offset === undefined && data.byteLength !== t.nbytes)
    throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} holds ${t.nbytes} bytes, got ${data.byteLength}`);
  offset ??= 0;
  checkRange(t, offset, data.byteLength);
  const { buffer, offset: at } = tensorPlace(t);
  if (buffer.setTensor) buffer.setTensor(t, data, offset);
  else buffer.set(at + offset, data);
}

/** Reads bytes [offset, offset + size) of a tensor's span (default: all of it). */
export function getTensorData(t: Tensor, offset = 0, size = t.nbytes - offset): Uint8Array {
  checkRange(t, offset, size);
  const { buffer, offset: at } = tensorPlace(t);
  return buffer.getTensor ? buffer.getTensor(t, offset, size) : buffer.get(at + offset, size);
}

/** Copies a tensor's bytes into another of the same size, on the device where it can, else through the host. */
export function copyTensor(from: Tensor, to: Tensor): void {
  if (from.nbytes !== to.nbytes || !from.isContiguous || !to.isContiguous)
    throw weftError("BAD_ARGUMENT", `cannot copy ${from.describe()} into ${to.describe()}: both must be contiguous and the same size`);
  if (from.nbytes === 0) return;
  const a = tensorPlace(from), b = tensorPlace(to);
  const plain = !a.buffer.getTensor && !b.buffer.setTensor;
  if (plain && b.buffer.copyFrom?.(a.buffer, a.offset, b.offset, from.nbytes)) return;
  setTensorData(to, getTensorData(from));
}

/** Writes a tensor (or bytes [offset, …) of it) after the work already queued on `be`. */
export async function setTensorAsync(be: Backend, t: Tensor, data: ArrayBufferView, offset?: number): Promise<void> {
  if (be.setTensorAsync) {
    if (!t.isContiguous) throw weftError("BAD_ARGUMENT", `setTensorAsync needs a contiguous tensor: ${t.describe()}`);
    if (offset === undefined && data.byteLength !== t.nbytes)
      throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} holds ${t.nbytes} bytes, got ${data.byteLength}`);
    checkRange(t, offset ?? 0, data.byteLength);
    return be.setTensorAsync(t, data, offset ?? 0);
  }
  await be.synchronize();
  setTensorData(t, data, offset);
}

/**
 * Reads a tensor (or bytes [offset, offset + size) of it) after the work already queued on
 * `be`; with `into` (size bytes), into that array, which is returned.
 */
export async function getTensorAsync(be: Backend, t: Tensor, offset = 0, size = t.nbytes - offset, into?: Uint8Array): Promise<Uint8Array> {
  checkRange(t, offset, size);
  if (into && into.length !== size) throw weftError("BAD_ARGUMENT", `reading ${size} bytes of ${t.describe()} into an array of ${into.length}`);
  let bytes: Uint8Array;
  if (be.getTensorAsync) bytes = await be.getTensorAsync(t, offset, size, into);
  else {
    await be.synchronize();
    bytes = getTensorData(t, offset, size);
  }
  if (!into || bytes === into) return bytes;
  into.set(bytes);
  return into;
}

/** Marks the current end of `be`'s queue. */
export function recordEvent(be: Backend): Event {
  return be.recordEvent ? be.recordEvent() : { backend: be, done: be.synchronize() };
}

/**
 * `be` runs nothing queued after this until `e` (each of its parts) has happened: natively
 * where both queues have events (registered before this returns its promise), else the
 * caller waits.
 */
export async function waitEvent(be: Backend, e: Event): Promise<void> {
  const pending: Promise<void>[] = [];
  for (const p of e.parts ?? [e]) {
    if (p.backend === be) continue;
    if (be.waitEvent && p.backend.recordEvent) be.waitEvent(p);
    else pending.push(p.done);
  }
  if (pending.length) await Promise.all(pending);
}

/**
 * Queues a copy of src (on srcBe) to dst (on dstBe) on the devices themselves, if they can:
 * true when it is queued (after everything queued on srcBe, before anything queued on
 * dstBe later), false when it must go through the host (copyTensorAsync does that).
 */
export function enqueueCopy(srcBe: Backend, dstBe: Backend, src: Tensor, dst: Tensor): boolean {
  if (src.nbytes !== dst.nbytes) throw weftError("BAD_ARGUMENT", `copy ${src.describe()} -> ${dst.describe()}: sizes differ`);
  const from = srcBe.sourceOf?.(src) ?? { backend: srcBe, tensor: src };
  return !!(dstBe.copyTensorAsync && from.backend.recordEvent && dstBe.copyTensorAsync(from.backend, from.tensor, dst));
}

/**
 * Copies src (on srcBe) to dst (on dstBe): after everything queued on srcBe before the
 * call, and before anything queued on dstBe after the returned promise resolves (at once
 * where the devices copy themselves; through the host otherwise).
 */
export async function copyTensorAsync(srcBe: Backend, dstBe: Backend, src: Tensor, dst: Tensor): Promise<void> {
  if (enqueueCopy(srcBe, dstBe, src, dst)) return;
  const from = srcBe.sourceOf?.(src) ?? { backend: srcBe, tensor: src };
  const bytes = await getTensorAsync(from.backend, from.tensor);
  await setTensorAsync(dstBe, dst, bytes);
}

/** 2-D strided writes/reads on any buffer. */
export function set2d(b: Buffer, offset: number, data: ArrayBufferView, rows: number, rowBytes: number, stride: number): void {
  if (b.set2d) return b.set2d(offset, data, rows, rowBytes, stride);
  const bytes = bytesOf(data);
  for (let r = 0; r < rows; r++) b.set(offset + r * stride, bytes.subarray(r * rowBytes, (r + 1) * rowBytes));
}
export function get2d(b: Buffer, offset: number, rows: number, rowBytes: number, stride: number): Uint8Array {
  if (b.get2d) return b.get2d(offset, rows, rowBytes, stride);
  const out = new Uint8Array(rows * rowBytes);
  for (let r = 0; r < rows; r++) out.set(b.get(offset + r * stride, rowBytes), r * rowBytes);
  return out;
}

/** 2-D strided writes/reads in a backend's queue order. */
export async function set2dAsync(be: Backend, b: Buffer, offset: number, data: ArrayBufferView, rows: number, rowBytes: number, stride: number): Promise<void> {
  if (be.set2dAsync) return be.set2dAsync(b, offset, data, rows, rowBytes, stride);
  await be.synchronize();
  set2d(b, offset, data, rows, rowBytes, stride);
}
export async function get2dAsync(be: Backend, b: Buffer, offset: number, rows: number, rowBytes: number, stride: number): Promise<Uint8Array> {
  if (be.get2dAsync) return be.get2dAsync(b, offset, rows, rowBytes, stride);
  await be.synchronize();
  return get2d(b, offset, rows, rowBytes, stride);
}

/** Bytes a buffer holds on each device (a meta buffer spreads over several). */
export function deviceBytes(b: Buffer): ReadonlyArray<readonly [Device, number]> {
  return b.deviceBytes?.() ?? [[b.bufferType.device, b.size]];
}

/** Whether this memory can map a file (weights then need no copy). */
export function canMapFiles(bt: BufferType): boolean {
  return !!bt.mapFile;
}

/** A file mapped read-only as a buffer of this memory (only where canMapFiles). */
export function mapFile(bt: BufferType, path: string): Buffer {
  if (!bt.mapFile) throw weftError("UNSUPPORTED_OP", `${bt.name} memory cannot map files`);
  return bt.mapFile(path);
}

/** Writes the whole of a tensor from bytes `read` can produce again (see Buffer.setTensorFrom). */
export function setTensorFrom(t: Tensor, read: () => Uint8Array): void {
  const { tensor } = t.root();
  const b = tensor.buffer as Buffer | null;
  if (b?.setTensorFrom && t === tensor) b.setTensorFrom(t, read);
  else setTensorData(t, read());
}

/** Gets a graph ready ahead of its first compute, where the backend can (else nothing). */
export function prepareGraph(be: Backend, graph: Graph): void {
  be.prepare?.(graph);
}

/** Drops a backend's cached form of a graph (where it keeps one). */
export function forgetGraph(be: Backend, graph: Graph): void {
  be.forget?.(graph);
}

/** A communicator among `devices` for in-graph all-reduces, or null where they share none. */
export function collectiveGroup(devices: readonly Device[], opts: CollectiveOptions = {}): CollectiveGroup | null {
  return devices[0]?.collectiveGroup?.(devices, opts) ?? null;
}

/** Reads bytes [offset, offset + size) of an open file. */
export function readFileRange(fd: number, path: string, offset: number, size: number): Uint8Array {
  const out = globalThis.Buffer.allocUnsafe(size);
  let got = 0;
  while (got < size) {
    const r = readSync(fd, out, got, size - got, offset + got);
    if (r <= 0) throw weftError("BAD_GGUF", `${path}: bytes [${offset}, +${size}) run past the end of the file`);
    got += r;
  }
  return out;
}

/**
 * Fills tensors of one buffer from a file: the buffer's own way where it has one (a remote
 * device may find the bytes on its side), else read here and written a tensor at a time.
 */
export async function loadFromFile(b: Buffer, file: string, tensors: readonly FileTensor[], step: (bytes: number) => Promise<void>): Promise<void> {
  if (b.loadFromFile) return b.loadFromFile(file, tensors, step);
  const fd = openSync(file, "r");
  try {
    for (const x of tensors) {
      setTensorData(x.t, readFileRange(fd, file, x.offset, x.size));
      await step(x.size);
    }
  } finally {
    closeSync(fd);
  }
}
