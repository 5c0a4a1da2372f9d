/**
 * The CPU backend: one CPU device's execution queue (DESIGN §2). Everything it is asked to
 * do goes through its NativeQueue in order. Events recorded right after a compute are
 * native: another CPU backend's next compute waits for them on its dispatcher thread, so
 * a cross-device hand-off costs no trip through the JS thread. Queued writes and copies
 * that fail make the next synchronize() or compute reject with that failure.
 */
import { weftError, fromNative, WeftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { bytesOf } from "../core/tensor.js";
import type { Backend, Buffer, Event } from "../backend/interface.js";
import { CpuBuffer, cpuPlace } from "./buffer.js";
import type { CpuDevice } from "./device.js";
import { NativeContext } from "./native.js";
import { NativeQueue } from "./queue.js";

class CpuEvent implements Event {
  constructor(readonly backend: Backend, readonly done: Promise<void>,
    /** set when the point is "after the first n computes" of a native queue */
    readonly native: [NativeContext, number] | null) {}
}

function cpuBuffer(b: Buffer): CpuBuffer {
  if (!(b instanceof CpuBuffer)) throw weftError("BAD_ARGUMENT", `${b.bufferType.name} memory is not a CPU buffer`);
  return b;
}

export class CpuBackend implements Backend {
  readonly #q: NativeQueue;
  /** computes submitted so far, and whether host-side work was queued after the last one */
  #submitted = 0;
  #hostWorkSinceCompute = false;
  /** native events the next compute on this queue waits for */
  #nativeWaits: CpuEvent[] = [];
  #jsWaits: Promise<void>[] = [];
  /** the first failure of fire-and-forget work since it was last reported */
  #failure: WeftError | null = null;
  readonly setTensorAsync?: Backend["setTensorAsync"];
  readonly getTensorAsync?: Backend["getTensorAsync"];
  readonly copyTensorAsync?: Backend["copyTensorAsync"];
  readonly set2dAsync?: Backend["set2dAsync"];
  readonly get2dAsync?: Backend["get2dAsync"];
  readonly recordEvent?: Backend["recordEvent"];
  readonly waitEvent?: Backend["waitEvent"];

  /** @internal use CpuDevice.initBackend */
  constructor(readonly device: CpuDevice, threads: number) {
    this.#q = new NativeQueue(threads, device.name);
    if (device.caps.async) {
      this.setTensorAsync = (t, data, offset) => {
        const { buffer, offset: at } = cpuPlace(t);
        const bytes = bytesOf(data).slice();  // the caller may reuse its array once this returns
        this.#fireAndForget(() => buffer.writeTensor(t, bytes, offset, at));
      };
      this.getTensorAsync = (t, offset, size, into) => {
        const { buffer, offset: at } = cpuPlace(t);
        return this.#host(() => buffer.readTensor(t, offset, size, at, into));
      };
      this.set2dAsync = (b, off, data, rows, rowBytes, stride) => {
        const buf = cpuBuffer(b), bytes = bytesOf(data).slice();
        this.#fireAndForget(() => buf.set2d(off, bytes, rows, rowBytes, stride));
      };
      this.get2dAsync = (b, off, rows, rowBytes, stride) => {
        const buf = cpuBuffer(b);
        return this.#host(() => buf.get2d(off, rows, rowBytes, stride));
      };
      this.copyTensorAsync = (src, from, to) => {
        const a = from.root().tensor.buffer, b = to.root().tensor.buffer;
        if (!(a instanceof CpuBuffer) || !(b instanceof CpuBuffer) || a.repacked || b.repacked) return false;
        if (!from.isContiguous || !to.isContiguous) return false;
        // after everything queued on src so far, before anything queued here later
        const ready = src === this ? Promise.resolve() : src.synchronize();
        this.#fireAndForget(async () => {
          await ready;
          if (from.nbytes === 0) return;
          const s = cpuPlace(from), d = cpuPlace(to);
          d.buffer.copyFrom(s.buffer, s.offset, d.offset, from.nbytes);
        });
        return true;
      };
    }
    if (device.caps.events) {
      this.recordEvent = () => {
        const done = this.#q.enqueue(() => undefined);
        return new CpuEvent(this, done, this.#hostWorkSinceCompute ? null : [this.#q.nativeContext, this.#submitted]);
      };
      this.waitEvent = (e) => {
        if (e instanceof CpuEvent && e.native) this.#nativeWaits.push(e);
        else this.#jsWaits.push(e.done);
      };
    }
  }

  /** host-side work: runs in the FIFO after any pending event waits */
  #host<T>(fn: () => T | Promise<T>): Promise<T> {
    this.#hostWaits();
    this.#hostWorkSinceCompute = true;
    return this.#q.enqueue(fn);
  }
  /** host work nobody awaits: its failure is kept for the next synchronize or compute */
  #fireAndForget(fn: () => unknown): void {
    void this.#host(fn).catch((e: unknown) => { this.#failure ??= fromNative(e); });
  }
  #takeFailure(): WeftError | null {
    const f = this.#failure;
    this.#failure = null;
    return f;
  }
  #flushWaits(): void {
    const js = this.#jsWaits;
    this.#jsWaits = [];
    for (const p of js) void this.#q.enqueue(() => p).catch((e: unknown) => { this.#failure ??= fromNative(e); });
  }
  /** host work cannot wait natively: pending native waits become waits in the FIFO */
  #hostWaits(): void {
    for (const e of this.#nativeWaits) this.#jsWaits.push(e.done);
    this.#nativeWaits = [];
    this.#flushWaits();
  }

  get name(): string { return this.device.name; }
  /** Work is on its way (an RPC server has its inputs arriving): the threads wake ahead of it. */
  prewake(): void { this.#q.prewake(); }
  get threads(): number { return this.#q.threads; }
  get disposed(): boolean { return this.#q.disposed; }
  /** @internal the native context (other CPU backends wait on it natively) */
  get nativeContext(): NativeContext { return this.#q.nativeContext; }

  computeAsync(graph: Graph): Promise<void> {
    this.#flushWaits();
    const waits = this.#nativeWaits.map((e) => e.native!);
    this.#nativeWaits = [];
    this.#submitted++;
    this.#hostWorkSinceCompute = false;
    // a queued write or copy before it failed: the graph ran on what was there; say so
    return this.#q.compute(graph, waits.length ? waits : undefined, () => {
      const f = this.#takeFailure();
      if (f) throw f;
    });
  }
  async synchronize(): Promise<void> {
    await this.#q.synchronize();
    const f = this.#takeFailure();
    if (f) throw f;
  }
  forget(graph: Graph): void { this.#q.forget(graph); }
  prepare(graph: Graph): void { this.#q.prepare(graph); }
  dispose(): Promise<void> { return this.#q.dispose(); }
  [Symbol.asyncDispose](): Promise<void> { return this.dispose(); }
}
