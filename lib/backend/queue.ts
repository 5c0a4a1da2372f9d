/**
 * Every fallback for optional backend capabilities, in one place (DESIGN §2). Callers use
 * these functions and never test capabilities themselves. The fallback for an async
 * operation is: wait for the queue to drain, then do the blocking call.
 */
import { weftError } from "../core/errors.js";
import { Tensor } from "../core/tensor.js";
import { bytesOf, getTensorData, setTensorData } from "../cpu/buffer.js";
import { copyTensor } from "./cpu.js";
import { Backend, Buffer, Event } from "./interface.js";

/** Writes a tensor after the work already queued on `be`. */
export async function setTensorAsync(be: Backend, t: Tensor, data: ArrayBufferView): Promise<void> {
  if (be.setTensorAsync) return be.setTensorAsync(t, data);
  await be.synchronize();
  setTensorData(t, data);
}

/** Reads a tensor after the work already queued on `be`. */
export async function getTensorAsync(be: Backend, t: Tensor): Promise<Uint8Array> {
  if (be.getTensorAsync) return be.getTensorAsync(t);
  await be.synchronize();
  return getTensorData(t);
}

/** Marks the current end of `be`'s queue. */
export function recordEvent(be: Backend): Event {
  return be.recordEvent ? be.recordEvent() : { backend: be, done: be.synchronize() };
}

/** `be` runs nothing queued after this until `e` has happened; without native events the caller waits. */
export async function waitEvent(be: Backend, e: Event): Promise<void> {
  if (e.backend === be) return;
  if (be.waitEvent && e.backend.recordEvent) return be.waitEvent(e);
  await e.done;
}

/**
 * Copies src (on srcBe) to dst (on dstBe): after everything queued on srcBe before the
 * call, and before anything queued on dstBe after it.
 */
export async function copyTensorAsync(srcBe: Backend, dstBe: Backend, src: Tensor, dst: Tensor): Promise<void> {
  if (src.nbytes !== dst.nbytes) throw weftError("BAD_ARGUMENT", `copy ${src.describe()} -> ${dst.describe()}: sizes differ`);
  if (dstBe.copyTensorAsync && srcBe.recordEvent) return dstBe.copyTensorAsync(srcBe, src, dst);
  await srcBe.synchronize();
  await dstBe.synchronize();
  copyTensor(src, dst);
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
