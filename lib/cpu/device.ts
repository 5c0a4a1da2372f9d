/**
 * CPU devices. `cpu:0`, `cpu:1`, … are separate devices in one process, each with its own
 * threads and queue, so multi-device code (layer split, pipelining, tensor parallelism)
 * runs on this machine exactly as it would across GPUs. Their memory is host memory;
 * copies between them are memcpy, done in the destination's queue; the CPU devices of one
 * process share communicators for in-graph ALL_REDUCE (shared memory).
 */
import { freemem, totalmem } from "node:os";
import { fromNative, weftError } from "../core/errors.js";
import { Op } from "../core/ops.js";
import { Tensor } from "../core/tensor.js";
import type { BufferType, CollectiveGroup, Device, DeviceCaps } from "../backend/interface.js";
import { CpuBackend } from "./backend.js";
import { CpuBuffer, RepackedBuffer } from "./buffer.js";
import { usableCores } from "./cores.js";
import { native } from "./native.js";
import { canRepack, repackedBytes } from "./repack.js";

/** Ops the native CPU backend runs (FLASH_ATTN_EXT is not implemented). */
const CPU_UNSUPPORTED: ReadonlySet<number> = new Set([Op.FLASH_ATTN_EXT]);
const ALIGNMENT = 64;

export class CpuBufferType implements BufferType {
  readonly alignment = ALIGNMENT;
  readonly maxSize = Number.MAX_SAFE_INTEGER;
  readonly isHost = true;
  constructor(readonly device: CpuDevice) {}
  get name(): string { return `${this.device.name}/host`; }
  alloc(size: number): CpuBuffer {
    try { return new CpuBuffer(this, native().bufferAlloc(size), size, false); } catch (e) { throw fromNative(e); }
  }
  /** maps a file read-only (weights are used where they lie, no copy) */
  mapFile(path: string): CpuBuffer {
    try {
      const m = native().mapFile(path);
      return new CpuBuffer(this, m.id, m.size, true);
    } catch (e) { throw fromNative(e); }
  }
}

/** Weight matrices in the eight-row repacked layout (lib/cpu/repack.ts). */
export class CpuRepackBufferType implements BufferType {
  readonly alignment = ALIGNMENT;
  readonly maxSize = Number.MAX_SAFE_INTEGER;
  readonly isHost = true;
  constructor(readonly device: CpuDevice) {}
  get name(): string { return `${this.device.name}/repacked`; }
  allocSize(t: Tensor): number { return repackedBytes(t); }
  alloc(size: number): RepackedBuffer {
    try { return new RepackedBuffer(this, native().bufferAlloc(size), size, false); } catch (e) { throw fromNative(e); }
  }
  /** maps a file of repacked groups read-only (an RPC server's weight cache) */
  mapFile(path: string): RepackedBuffer {
    try {
      const m = native().mapFile(path);
      return new RepackedBuffer(this, m.id, m.size, true);
    } catch (e) { throw fromNative(e); }
  }
}

export interface CpuDeviceOptions {
  /** false: pretend the queue has no async set/get/copy, no events and no collectives (tests the fallbacks) */
  async?: boolean;
}

/** A native communicator among CPU devices of this process. */
class CpuGroup implements CollectiveGroup {
  readonly id: number;
  #live = true;
  constructor(readonly size: number) { this.id = native().createGroup(size); }
  abort(why: string): void { if (this.#live) { this.#live = false; native().destroyGroup(this.id, why); } }
  dispose(): void { this.abort("the collective group was disposed"); }
}

export class CpuDevice implements Device {
  readonly type = "CPU" as const;
  readonly caps: DeviceCaps;
  readonly #bt: CpuBufferType;
  readonly #repack: CpuRepackBufferType;
  constructor(readonly name: string, opts: CpuDeviceOptions = {}) {
    const a = opts.async ?? true;
    this.caps = { async: a, events: a, collectives: a };
    this.#bt = new CpuBufferType(this);
    this.#repack = new CpuRepackBufferType(this);
  }
  get description(): string {
    const lvl = native().kernelLevel();
    return `CPU (${usableCores()} cores, ${["portable", "AVX2", "AVX-512 VNNI"][lvl.current]}${lvl.bf16 ? " + BF16" : ""} kernels)`;
  }
  memory() { return { free: freemem(), total: totalmem() }; }
  bufferType(): CpuBufferType { return this.#bt; }
  /** Q4_0, Q8_0 and Q4_K matrices: the repacked eight-row layout */
  weightBufferType(t: Tensor): BufferType | null { return canRepack(t) ? this.#repack : null; }
  /** the repacked weight memory itself (an RPC server places clients' weights there) */
  repackBufferType(): CpuRepackBufferType { return this.#repack; }
  collectiveGroup(devices: readonly Device[]): CollectiveGroup | null {
    const ok = devices.every((d) => d instanceof CpuDevice && d.caps.collectives) && new Set(devices).size === devices.length;
    return ok && devices.includes(this) && devices.length <= 64 ? new CpuGroup(devices.length) : null;
  }
  supportsOp(node: Tensor): boolean { return !CPU_UNSUPPORTED.has(node.op); }
  initBackend(opts: { threads?: number } = {}): CpuBackend { return new CpuBackend(this, opts.threads ?? usableCores()); }
}

const devices = new Map<string, CpuDevice>();
/** CPU devices per process: a collective group spans at most 64 devices */
const MAX_CPU_DEVICES = 64;

/** The canonical CPU device `cpu:N` (`cpu` = `cpu:0`). */
export function cpuDevice(name = "cpu:0", opts: CpuDeviceOptions = {}): CpuDevice {
  const m = /^cpu(?::(\d{1,3}))?$/.exec(name);
  if (!m) throw weftError("BAD_ARGUMENT", `'${name}' is not a CPU device name (cpu, cpu:0, cpu:1, …)`);
  if (Number(m[1] ?? 0) >= MAX_CPU_DEVICES)
    throw weftError("BAD_ARGUMENT", `${name}: CPU devices are numbered 0 to ${MAX_CPU_DEVICES - 1} (each is a queue with its own threads on this machine's ${usableCores()} core(s); see weft devices)`);
  const key = `cpu:${Number(m[1] ?? 0)}${opts.async === false ? "/sync" : ""}`;
  let d = devices.get(key);
  if (!d) { d = new CpuDevice(key, opts); devices.set(key, d); }
  return d;
}

/** The CPU devices to list: cpu:0 (more, cpu:1 …, are made on demand in the same process). */
export function cpuDevices(): CpuDevice[] {
  return [cpuDevice("cpu:0")];
}
