/**
 * The backend object model (DESIGN §2), as in ggml-backend: Device, BufferType, Buffer,
 * Backend (an execution queue) and Event. Members marked optional are capabilities a
 * device may lack; each one's comment says what happens without it, and
 * lib/backend/fallback.ts (with alloc.ts for placement) is the only code that checks for
 * them, so callers never branch on them. Devices, buffer types and backends are canonical
 * objects compared by identity. Every failure is a WeftError.
 */
import type { Graph } from "../core/graph.js";
import type { Tensor } from "../core/tensor.js";

export type DeviceType = "CPU" | "GPU" | "REMOTE" | "META";

export interface DeviceCaps {
  /** set/get/copy can be queued (else: synchronize, then a blocking call) */
  readonly async: boolean;
  /** recordEvent/waitEvent are native (else: waiting means awaiting the other queue) */
  readonly events: boolean;
  /** the device can run ALL_REDUCE itself, with devices that share a communicator */
  readonly collectives: boolean;
}

export const BufferUsage = { ANY: 0, WEIGHTS: 1, COMPUTE: 2 } as const;
export type BufferUsage = (typeof BufferUsage)[keyof typeof BufferUsage];

export interface Buffer {
  readonly size: number;
  readonly bufferType: BufferType;
  usage: BufferUsage;
  readonly disposed: boolean;
  /** raw bytes at a byte offset of this allocation */
  set(offset: number, data: ArrayBufferView): void;
  get(offset: number, length: number): Uint8Array;
  memset(offset: number, length: number, value: number): void;
  /** (optional) rows of rowBytes at a byte stride; default: a loop over set/get */
  set2d?(offset: number, data: ArrayBufferView, rows: number, rowBytes: number, stride: number): void;
  get2d?(offset: number, rows: number, rowBytes: number, stride: number): Uint8Array;
  /** (optional) prepares a tensor just placed in this buffer; default: nothing to do */
  initTensor?(t: Tensor): void;
  /** (optional) writes bytes [offset, offset + data.byteLength) of tensor t (placed in this
   * buffer, as seen through its shape); default: set() at the tensor's byte position */
  setTensor?(t: Tensor, data: ArrayBufferView, offset: number): void;
  /** (optional) writes the whole of tensor t from bytes that `read` can produce again (from
   * a file): remote memory keeps `read` to restore the tensor after its server restarts;
   * default: setTensor(t, read(), 0) */
  setTensorFrom?(t: Tensor, read: () => Uint8Array): void;
  /** (optional) reads bytes [offset, offset + size) of tensor t; default: get() at its position */
  getTensor?(t: Tensor, offset: number, size: number): Uint8Array;
  /** (optional) device-side copy from another buffer; false if it cannot (the caller then
   * copies through the host); default: always through the host */
  copyFrom?(src: Buffer, srcOffset: number, dstOffset: number, length: number): boolean;
  /** (optional) bytes held on each device (a meta buffer spreads over several);
   * default: all `size` bytes on bufferType.device */
  deviceBytes?(): ReadonlyArray<readonly [Device, number]>;
  /** (optional) fills tensors placed in this buffer from a file, where the device can find
   * the bytes without them crossing from here (a remote server's weight cache or its own
   * copy of the file); `step` runs after each tensor with its bytes and may throw to stop;
   * default: each tensor read here and written with setTensor */
  loadFromFile?(file: string, tensors: readonly FileTensor[], step: (bytes: number) => Promise<void>): Promise<void>;
  clear(value: number): void;
  dispose(): void;
}

/** A tensor's bytes in a file: [offset, offset + size) (loadFromFile). */
export interface FileTensor { readonly t: Tensor; readonly offset: number; readonly size: number }

export interface AllocTensorsOptions {
  /** tensors that only MUL_MAT reads as its weight: a device may keep them in its faster
   * layout (Device.weightBufferType) */
  readonly matmulWeights?: ReadonlySet<Tensor>;
  /** split state of each tensor, for buffers that spread tensors over devices (meta) */
  readonly splitState?: (t: Tensor) => unknown;
  /** padding bytes around each tensor (tests catch stray writes with it) */
  readonly guard?: number;
}

export interface BufferType {
  readonly name: string;
  readonly device: Device;
  readonly alignment: number;
  /** largest single allocation */
  readonly maxSize: number;
  /** host memory (the JS thread can read it without the device) */
  readonly isHost: boolean;
  /** (optional) bytes a tensor needs in this memory; default: its extent */
  allocSize?(t: Tensor): number;
  alloc(size: number): Buffer;
  /** (optional) places `tensors` (unplaced roots) in one new buffer; default: a linear
   * layout by alignment and allocSize, then alloc and initTensor (lib/backend/alloc.ts) */
  allocTensors?(tensors: readonly Tensor[], opts: AllocTensorsOptions): Buffer;
  /** (optional) places every unplaced tensor of a graph (its compute memory) in one new
   * buffer; default: planGraphAllocation with this type's alignment and allocSize */
  allocGraph?(graph: Graph): Buffer;
  /** (optional) maps a file read-only as a buffer (weights used where they lie);
   * default: none, weights are uploaded */
  mapFile?(path: string): Buffer;
}

/** A point in one backend's queue; `done` resolves once the queue has passed it. */
export interface Event {
  readonly backend: Backend;
  readonly done: Promise<void>;
  /** (optional) events on other queues this one stands for (a meta device's, one per
   * sub-device): waiting on it waits on each of them; default: none */
  readonly parts?: readonly Event[];
}

export interface Backend {
  readonly device: Device;
  readonly name: string;
  /** enqueues a graph; the promise resolves when it has run */
  computeAsync(graph: Graph): Promise<void>;
  /** (optional) queued write of bytes [offset, …) of t (the data is copied at once); a
   * failure surfaces at the next synchronize or compute; default: synchronize, then write */
  setTensorAsync?(t: Tensor, data: ArrayBufferView, offset: number): void;
  /** (optional) queued read; default: synchronize, then read. With `into` (size bytes) the
   * bytes may be read into it, and it is returned: a step's output read every token then
   * allocates nothing (a backend that ignores it has its answer copied there) */
  getTensorAsync?(t: Tensor, offset: number, size: number, into?: Uint8Array): Promise<Uint8Array>;
  /** (optional) strided rows into / out of a buffer of this device, in queue order */
  set2dAsync?(b: Buffer, offset: number, data: ArrayBufferView, rows: number, rowBytes: number, stride: number): void;
  get2dAsync?(b: Buffer, offset: number, rows: number, rowBytes: number, stride: number): Promise<Uint8Array>;
  /** (optional) enqueued on this (destination) backend: runs after everything queued on
   * `src` before the call; false if it cannot (the fallback copies through the host) */
  copyTensorAsync?(src: Backend, from: Tensor, to: Tensor): boolean;
  /** (optional) where a full, readable copy of t lives (a meta backend's mirrored tensor
   * lies on each sub-device): copies out of this backend read it there; default: t here */
  sourceOf?(t: Tensor): { backend: Backend; tensor: Tensor } | null;
  /** (optional) marks the current end of the queue; default: an event that is done when
   * the queue has drained */
  recordEvent?(): Event;
  /** (optional) this queue stalls until the event; the JS thread does not; default: the
   * caller awaits the event before queueing more */
  waitEvent?(e: Event): void;
  /** resolves when the queue is empty; rejects with the first failure of queued work
   * (an async set or copy) since the last synchronize */
  synchronize(): Promise<void>;
  /** (optional) drops the backend's cached form of a graph; default: nothing cached */
  forget?(graph: Graph): void;
  /** (optional) gets a graph ready ahead of its first computeAsync (a remote device sends
   * it, so the server decodes it while other work runs); default: the first compute does it */
  prepare?(graph: Graph): void;
  dispose(): Promise<void>;
}

export interface DeviceMemory { free: number; total: number }

/** How partial sums travel between processes (peer links): F32, or F16 / Q8_0 blocks. */
export const ALL_REDUCE_TYPES = ["f32", "f16", "q8_0"] as const;
export type AllReduceType = (typeof ALL_REDUCE_TYPES)[number];

export interface CollectiveOptions {
  /** the wire type of partial sums where they cross a network (default f32) */
  allReduceType?: AllReduceType;
}

/** A communicator among devices for in-graph ALL_REDUCE nodes (lib/meta's collective path). */
export interface CollectiveGroup {
  /** the id ALL_REDUCE nodes name */
  readonly id: number;
  readonly size: number;
  /** wakes every rank waiting in it with this failure; the group is unusable after */
  abort(why: string): void;
  dispose(): void;
}

export interface Device {
  readonly name: string;
  readonly description: string;
  readonly type: DeviceType;
  readonly caps: DeviceCaps;
  memory(): DeviceMemory;
  bufferType(): BufferType;
  /** (optional) memory for a weight matrix that only MUL_MAT reads, in the layout this
   * device multiplies fastest (the CPU's repacked eight-row groups), or null where it has
   * none for that tensor; default: bufferType() */
  weightBufferType?(t: Tensor): BufferType | null;
  /** (optional) a communicator among `devices` (this one included, ranks in list order),
   * or null if they cannot share one; default: none (the meta backend then exchanges
   * partials through copies) */
  collectiveGroup?(devices: readonly Device[], opts?: CollectiveOptions): CollectiveGroup | null;
  supportsOp(node: Tensor): boolean;
  initBackend(opts?: { threads?: number }): Backend;
}
