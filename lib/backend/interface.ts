/**
 * The backend object model (DESIGN §2), as in ggml-backend: Device, BufferType, Buffer,
 * Backend (an execution queue) and Event. Members marked optional are capabilities a
 * device may lack; lib/backend/queue.ts holds every fallback, so callers never branch on
 * them. Devices, buffer types and backends are canonical objects compared by identity.
 */
import { Graph } from "../core/graph.js";
import { Tensor } from "../core/tensor.js";

export type DeviceType = "CPU" | "GPU" | "REMOTE" | "META";

export interface DeviceCaps {
  /** set/get/copy can be queued (else: synchronize, then a blocking call) */
  readonly async: boolean;
  /** recordEvent/waitEvent are native (else: waiting means awaiting the other queue) */
  readonly events: boolean;
  /** the device can run ALL_REDUCE itself */
  readonly collectives: boolean;
}

export const BufferUsage = { ANY: 0, WEIGHTS: 1, COMPUTE: 2 } as const;
export type BufferUsage = (typeof BufferUsage)[keyof typeof BufferUsage];

export interface Buffer {
  readonly size: number;
  readonly bufferType: BufferType;
  usage: BufferUsage;
  set(offset: number, data: ArrayBufferView): void;
  get(offset: number, length: number): Uint8Array;
  memset(offset: number, length: number, value: number): void;
  /** rows of rowBytes at a byte stride (optional: queue.ts loops over set/get) */
  set2d?(offset: number, data: ArrayBufferView, rows: number, rowBytes: number, stride: number): void;
  get2d?(offset: number, rows: number, rowBytes: number, stride: number): Uint8Array;
  /** device-side copy from a buffer of the same device kind; false if it cannot */
  copyFrom?(src: Buffer, srcOffset: number, dstOffset: number, length: number): boolean;
  clear(value: number): void;
  dispose(): void;
}

export interface BufferType {
  readonly name: string;
  readonly device: Device;
  readonly alignment: number;
  readonly maxSize: number;
  /** host memory (the JS thread can read it without the device) */
  readonly isHost: boolean;
  /** bytes a tensor needs in this memory (may pad; default: its extent) */
  allocSize?(t: Tensor): number;
  alloc(size: number): Buffer;
}

/** A point in one backend's queue; `done` resolves once the queue has passed it. */
export interface Event {
  readonly backend: Backend;
  readonly done: Promise<void>;
}

export interface Backend {
  readonly device: Device;
  readonly name: string;
  /** enqueues a graph; the promise resolves when it has run */
  computeAsync(graph: Graph): Promise<void>;
  setTensorAsync?(t: Tensor, data: ArrayBufferView): void;
  getTensorAsync?(t: Tensor): Promise<Uint8Array>;
  /** strided rows into / out of a buffer of this device, in queue order */
  set2dAsync?(b: Buffer, offset: number, data: ArrayBufferView, rows: number, rowBytes: number, stride: number): void;
  get2dAsync?(b: Buffer, offset: number, rows: number, rowBytes: number, stride: number): Promise<Uint8Array>;
  /** enqueued on this (destination) backend: runs after everything queued on `src` before the call */
  copyTensorAsync?(src: Backend, from: Tensor, to: Tensor): void;
  recordEvent?(): Event;
  /** this queue stalls until the event; the JS thread does not */
  waitEvent?(e: Event): void;
  synchronize(): Promise<void>;
  /** drops the backend's cached form of a graph */
  forget?(graph: Graph): void;
  dispose(): Promise<void>;
}

export interface DeviceMemory { free: number; total: number }

export interface Device {
  readonly name: string;
  readonly description: string;
  readonly type: DeviceType;
  readonly caps: DeviceCaps;
  memory(): DeviceMemory;
  bufferType(): BufferType;
  supportsOp(node: Tensor): boolean;
  initBackend(opts?: { threads?: number }): Backend;
}
