/**
 * CPU devices. `cpu:0`, `cpu:1`, … are separate devices in one process, each with its own
 * thread pool and queue, so multi-device code (layer split, pipelining, later tensor
 * parallelism) runs on this machine exactly as it would across GPUs. Their memory is host
 * memory; copies between them are memcpy, done in the destination's queue.
 */
import { freemem, totalmem, availableParallelism } from "node:os";
import { weftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { Op } from "../core/ops.js";
import { Tensor } from "../core/tensor.js";
import { CpuBackend } from "../cpu/backend.js";
import { CpuBuffer, bytesOf, getTensorData, setHostBufferType, setTensorData, tensorLocation } from "../cpu/buffer.js";
import { NativeContext, native } from "../cpu/native.js";
import { Backend, BufferType, Device, DeviceCaps, Event } from "./interface.js";
import { get2d, set2d } from "./queue.js";

/** Ops the native CPU backend runs (FLASH_ATTN_EXT and ALL_REDUCE are not implemented). */
const CPU_UNSUPPORTED: ReadonlySet<number> = new Set([Op.FLASH_ATTN_EXT, Op.ALL_REDUCE]);

export class CpuBufferType implements BufferType {
  readonly alignment = 64;
  readonly maxSize = Number.MAX_SAFE_INTEGER;
  readonly isHost = true;
  constructor(readonly device: CpuDevice) {}
  get name(): string { return `${this.device.name}/host`; }
  /** `repacked`: a buffer for lib/cpu/repack.ts (weights in eight-row groups) */
  alloc(size: number, opts?: { repacked?: boolean }): CpuBuffer { return CpuBuffer.alloc(size, opts).withType(this); }
  /** maps a file read-only as a buffer of this type (weights) */
  mapFile(path: string): CpuBuffer { return CpuBuffer.mapFile(path).withType(this); }
}

export interface CpuDeviceOptions {
  /** false: pretend the queue has no async set/get/copy and no events (tests the fallbacks) */
  async?: boolean;
}

export class CpuDevice implements Device {
  readonly type = "CPU" as const;
  readonly caps: DeviceCaps;
  readonly #bt: CpuBufferType;
  constructor(readonly name: string, opts: CpuDeviceOptions = {}) {
    const a = opts.async ?? true;
    this.caps = { async: a, events: a, collectives: false };
    this.#bt = new CpuBufferType(this);
  }
  get description(): string {
    const lvl = native().kernelLevel();
    return `CPU (${availableParallelism()} cores, ${["portable", "AVX2", "AVX-512 VNNI"][lvl.current]}${lvl.bf16 ? " + BF16" : ""} kernels)`;
  }
  memory() { return { free: freemem(), total: totalmem() }; }
  bufferType(): CpuBufferType { return this.#bt; }
  supportsOp(node: Tensor): boolean { return !CPU_UNSUPPORTED.has(node.op); }
  initBackend(opts: { threads?: number } = {}): CpuQueue { return new CpuQueue(this, opts.threads); }
}

class CpuEvent implements Event {
  constructor(readonly backend: Backend, readonly done: Promise<void>,
    /** set when the point is "after the first n computes" of a native queue */
    readonly native: [NativeContext, number] | null) {}
}

/**
 * A CPU device's queue. Everything goes through CpuBackend's FIFO. Events recorded right
 * after a compute are native: another CPU queue's next compute waits for them on its
 * worker thread, so a cross-device hand-off costs no trip through the JS thread.
 */
export class CpuQueue implements Backend {
  readonly #be: CpuBackend;
  /** computes submitted so far, and whether host-side work was queued after the last one */
  #submitted = 0;
  #hostWorkSinceCompute = false;
  /** native events the next compute on this queue waits for */
  #nativeWaits: CpuEvent[] = [];
  #jsWaits: Promise<void>[] = [];
  readonly setTensorAsync?: Backend["setTensorAsync"];
  readonly getTensorAsync?: Backend["getTensorAsync"];
  readonly copyTensorAsync?: Backend["copyTensorAsync"];
  readonly set2dAsync?: Backend["set2dAsync"];
  readonly get2dAsync?: Backend["get2dAsync"];
  readonly recordEvent?: Backend["recordEvent"];
  readonly waitEvent?: Backend["waitEvent"];

  constructor(readonly device: CpuDevice, threads?: number) {
    this.#be = new CpuBackend({ threads, name: device.name });
    if (device.caps.async) {
      this.setTensorAsync = (t, data) => {
        const bytes = bytesOf(data).slice();  // the caller may reuse its array once this returns
        void this.#host(() => setTensorData(t, bytes)).catch(() => {});
      };
      this.getTensorAsync = (t) => this.#host(() => getTensorData(t));
      this.set2dAsync = (b, off, data, rows, rowBytes, stride) => {
        const bytes = bytesOf(data).slice();
        void this.#host(() => set2d(b, off, bytes, rows, rowBytes, stride)).catch(() => {});
      };
      this.get2dAsync = (b, off, rows, rowBytes, stride) => this.#host(() => get2d(b, off, rows, rowBytes, stride));
      this.copyTensorAsync = (src, from, to) => {
        // after everything queued on src so far, before anything queued here later
        const ready = src === this ? Promise.resolve() : src.synchronize();
        void this.#host(async () => { await ready; copyTensor(from, to); }).catch(() => {});
      };
    }
    if (device.caps.events) {
      this.recordEvent = () => {
        const done = this.#be.enqueue(() => undefined);
        return new CpuEvent(this, done, this.#hostWorkSinceCompute ? null : [this.#be.nativeContext, this.#submitted]);
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
    return this.#be.enqueue(fn);
  }
  #flushWaits(): void {
    const js = this.#jsWaits;
    this.#jsWaits = [];
    for (const p of js) void this.#be.enqueue(() => p).catch(() => {});
  }
  /** host work cannot wait natively: pending native waits become waits in the FIFO */
  #hostWaits(): void {
    for (const e of this.#nativeWaits) this.#jsWaits.push(e.done);
    this.#nativeWaits = [];
    this.#flushWaits();
  }

  get name(): string { return this.device.name; }
  get threads(): number { return this.#be.threads; }
  computeAsync(graph: Graph): Promise<void> {
    this.#flushWaits();
    const waits = this.#nativeWaits.map((e) => e.native!);
    this.#nativeWaits = [];
    this.#submitted++;
    this.#hostWorkSinceCompute = false;
    return this.#be.compute(graph, waits.length ? waits : undefined);
  }
  synchronize(): Promise<void> { return this.#be.synchronize(); }
  forget(graph: Graph): void { this.#be.forget(graph); }
  dispose(): Promise<void> { return this.#be.dispose(); }
}

/** Copies a contiguous tensor's bytes into another of the same size (host memory). */
export function copyTensor(from: Tensor, to: Tensor): void {
  if (from.nbytes !== to.nbytes || !from.isContiguous || !to.isContiguous)
    throw weftError("BAD_ARGUMENT", `cannot copy ${from.describe()} into ${to.describe()}: both must be contiguous and the same size`);
  if (from.nbytes === 0) return;
  const a = tensorLocation(from), b = tensorLocation(to);
  b.buffer.copyFrom(a.buffer, a.offset, b.offset, from.nbytes);
}

const devices = new Map<string, CpuDevice>();

/** The canonical CPU device `cpu:N` (`cpu` = `cpu:0`). */
export function cpuDevice(name = "cpu:0", opts: CpuDeviceOptions = {}): CpuDevice {
  const m = /^cpu(?::(\d{1,2}))?$/.exec(name);
  if (!m) throw weftError("BAD_ARGUMENT", `'${name}' is not a CPU device name (cpu, cpu:0, cpu:1, …)`);
  const key = `cpu:${m[1] ?? 0}${opts.async === false ? "/sync" : ""}`;
  let d = devices.get(key);
  if (!d) { d = new CpuDevice(key, opts); devices.set(key, d); }
  return d;
}

setHostBufferType(cpuDevice().bufferType());
