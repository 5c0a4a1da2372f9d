/**
 * Meta memory. A meta buffer owns no bytes: for every tensor placed in it, it knows its
 * split state and the tensor each device holds for it (its "locals", in that device's own
 * buffers, allocated compactly: a device holds only its slices). Writing a tensor scatters
 * it into the slices, reading gathers them (or sums the partials).
 */
import { weftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { Tensor, TensorFlag, contiguousStrides } from "../core/tensor.js";
import { TYPES } from "../core/types.js";
import type { AllocTensorsOptions, Buffer, BufferType, BufferUsage, Device } from "../backend/interface.js";
import { allocateWeights } from "../backend/alloc.js";
import { closeSync, openSync } from "node:fs";
import type { FileTensor } from "../backend/interface.js";
import { getTensorData, readFileRange, setTensorData, setTensorFrom } from "../backend/fallback.js";
import { SplitState, axisOffset, axisSize, axisTotal, describeState, isAxis, localShape } from "../split/state.js";
import type { MetaDevice } from "./device.js";
import { Program, compileGraph } from "./compile.js";

/** What a meta tensor is on the devices: its state and each device's tensor for it. */
export interface Part {
  readonly state: SplitState;
  readonly locals: readonly Tensor[];
}

export class MetaBufferType implements BufferType {
  readonly maxSize = Number.POSITIVE_INFINITY;
  readonly isHost = false;
  constructor(readonly device: MetaDevice) {}
  get name(): string { return `${this.device.name}/meta`; }
  get alignment(): number { return Math.max(...this.device.devices.map((d) => d.bufferType().alignment)); }

  alloc(): Buffer {
    throw weftError("BAD_ARGUMENT", `${this.name} memory is made for tensors: place them with allocateTensors or allocGraph`);
  }

  /** Each device gets its slices of `tensors` in its own memory (weights in its weight layout). */
  allocTensors(tensors: readonly Tensor[], opts: AllocTensorsOptions): MetaBuffer {
    const meta = this.device, n = meta.size;
    const buf = new MetaBuffer(this);
    const locals: Tensor[][] = meta.devices.map(() => []);
    const weights: Array<Set<Tensor>> = meta.devices.map(() => new Set());
    for (const t of tensors) {
      const state = meta.splitState?.(t) ?? (opts.splitState?.(t) as SplitState | undefined);
      if (!state) throw weftError("BAD_ARGUMENT", `no split state for tensor ${t.describe()} on ${meta.name}: give backend.meta() a splitState for it`);
      checkState(t, state, n);
      const parts: Tensor[] = [];
      for (let d = 0; d < n; d++) {
        const l = new Tensor({ type: t.type, ne: localShape(t.ne, state, d), name: t.name });
        parts.push(l);
        locals[d]!.push(l);
        if (opts.matmulWeights?.has(t)) weights[d]!.add(l);
      }
      buf.register(t, { state, locals: parts });
    }
    meta.devices.forEach((dev, d) => {
      try {
        for (const b of allocateWeights(dev, locals[d]!, { matmulWeights: weights[d], guard: opts.guard })) buf.own(b);
      } catch (e) { buf.dispose(); throw e; }
    });
    return buf;
  }

  /** Compiles the graph into per-device graphs and gives each device its own compute memory. */
  allocGraph(graph: Graph): MetaBuffer {
    const buf = new MetaBuffer(this);
    try { buf.program = compileGraph(graph, this.device, buf); }
    catch (e) { buf.dispose(); throw e; }
    return buf;
  }
}

/** Checks a state against a tensor's shape (sizes add up, quant blocks stay whole). */
function checkState(t: Tensor, s: SplitState, n: number): void {
  if (!isAxis(s)) return;
  const bad = (why: string) => weftError("BAD_ARGUMENT", `split state ${describeState(s)} does not fit ${t.describe()}: ${why}`);
  if (s.segments[0]!.length !== n) throw bad(`it has ${s.segments[0]!.length} sizes for ${n} devices`);
  if (axisTotal(s) !== t.ne[s.axis]) throw bad(`its sizes add up to ${axisTotal(s)}, not ${t.ne[s.axis]}`);
  const blk = TYPES[t.type].blockSize;
  if (s.axis === 0 && s.segments.some((seg) => seg.some((v) => v % blk !== 0))) throw bad(`${TYPES[t.type].name} rows cut inside a block of ${blk}`);
}

/** Bytes per step of the cut axis of a contiguous tensor, and steps per device slice. */
function axisBytes(t: Tensor, axis: number): number {
  const tr = TYPES[t.type];
  return axis === 0 ? tr.typeSize / tr.blockSize : t.nb[axis]!;
}

/**
 * Device d's bytes of a whole contiguous tensor in state `s`: its slice (AXIS), the whole
 * (MIRRORED), or the whole on device 0 and zeros elsewhere (PARTIAL: the sum is the value).
 */
export function sliceBytes(t: Tensor, s: SplitState, d: number, full: Uint8Array): Uint8Array {
  if (s.kind === "PARTIAL") return d === 0 ? full : new Uint8Array(full.length);
  if (!isAxis(s)) return full;
  const unit = axisBytes(t, s.axis), along = t.ne[s.axis]! * unit;
  const outer = along ? full.length / along : 0;
  const mine = axisSize(s, d) * unit;
  const out = new Uint8Array(outer * mine);
  for (let o = 0; o < outer; o++) {
    let at = o * mine;
    s.segments.forEach((seg, i) => {
      const from = o * along + axisOffset(s, d, i) * unit, len = seg[d]! * unit;
      out.set(full.subarray(from, from + len), at);
      at += len;
    });
  }
  return out;
}

/**
 * Where each device's slice (AXIS) lies in the whole tensor's bytes, where every slice is
 * one range of them (the cut axis is the outermost and cut once): the slices can then be
 * read straight into their places. Null otherwise.
 */
export function sliceRanges(t: Tensor, s: SplitState, n: number): Array<[number, number]> | null {
  if (!isAxis(s) || s.segments.length !== 1) return null;
  const unit = axisBytes(t, s.axis), along = t.ne[s.axis]! * unit;
  if (along !== t.nbytes) return null;
  return Array.from({ length: n }, (_, d) => [axisOffset(s, d, 0) * unit, axisSize(s, d) * unit]);
}

/** The whole tensor's bytes from each device's slice (AXIS), in `into` where given. */
export function joinSlices(t: Tensor, s: SplitState, slices: readonly Uint8Array[], into?: Uint8Array): Uint8Array {
  if (!isAxis(s)) return slices[0]!;
  const unit = axisBytes(t, s.axis), along = t.ne[s.axis]! * unit;
  const full = into ?? new Uint8Array(t.nbytes);
  const outer = along ? full.length / along : 0;
  slices.forEach((sl, d) => {
    const mine = axisSize(s, d) * unit;
    for (let o = 0; o < outer; o++) {
      let at = o * mine;
      s.segments.forEach((seg, i) => {
        const len = seg[d]! * unit;
        full.set(sl.subarray(at, at + len), o * along + axisOffset(s, d, i) * unit);
        at += len;
      });
    }
  });
  return full;
}

/** Sums F32 partials in the canonical tree order of the ranks (csrc/graph.cpp tree_sum). */
export function sumPartials(parts: readonly Uint8Array[]): Uint8Array {
  const f = parts.map((p) => new Float32Array(p.slice().buffer));
  const tree = (lo: number, hi: number): Float32Array => {
    if (hi - lo === 1) return f[lo]!;
    let h = 1;
    while (h * 2 < hi - lo) h *= 2;
    const a = tree(lo, lo + h), b = tree(lo + h, hi), out = new Float32Array(a.length);
    for (let i = 0; i < a.length; i++) out[i] = a[i]! + b[i]!;
    return out;
  };
  const r = tree(0, f.length);
  return new Uint8Array(r.buffer, r.byteOffset, r.byteLength);
}

export class MetaBuffer implements Buffer {
  usage: BufferUsage = 0;
  /** the compiled graph whose compute memory this is (allocGraph) */
  program: Program | null = null;
  readonly #parts = new Map<Tensor, Part>();
  readonly #owned: Buffer[] = [];
  #disposed = false;

  constructor(readonly bufferType: MetaBufferType) {}

  get disposed(): boolean { return this.#disposed; }
  /** bytes on all devices */
  get size(): number { return this.#owned.reduce((s, b) => s + b.size, 0); }

  /** @internal records what a tensor placed here is on the devices */
  register(t: Tensor, p: Part): void {
    this.#parts.set(t, p);
    t.buffer = this;
    t.offset = 0;
  }
  /** @internal takes ownership of a device buffer */
  own(b: Buffer): void { this.#owned.push(b); }

  part(t: Tensor): Part {
    const p = this.#parts.get(t);
    if (!p) throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} is not one of ${this.bufferType.name}'s tensors (a view of one cannot be read or written directly)`);
    return p;
  }

  setTensor(t: Tensor, data: ArrayBufferView, offset: number): void {
    const { state, locals } = this.part(t);
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    if (state.kind === "MIRRORED") { for (const l of locals) setTensorData(l, bytes, offset); return; }
    wholeOnly(t, offset, bytes.length);
    locals.forEach((l, d) => setTensorData(l, sliceBytes(t, state, d, bytes)));
  }

  /**
   * Weights from a file: each tensor read once and each device's slice written; a slice
   * can be read from the file again (a remote device restores it after its server restarts).
   */
  async loadFromFile(file: string, tensors: readonly FileTensor[], step: (bytes: number) => Promise<void>): Promise<void> {
    const fd = openSync(file, "r");
    try {
      for (const x of tensors) {
        const { state, locals } = this.part(x.t);
        let bytes: Uint8Array | null = readFileRange(fd, file, x.offset, x.size);
        const read = () => {
          if (bytes) return bytes;
          const f = openSync(file, "r");
          try { return readFileRange(f, file, x.offset, x.size); } finally { closeSync(f); }
        };
        locals.forEach((l, d) => setTensorFrom(l, () => sliceBytes(x.t, state, d, read())));
        bytes = null;  // from here on (a restore), read again from the file
        await step(x.size);
      }
    } finally {
      closeSync(fd);
    }
  }

  getTensor(t: Tensor, offset: number, size: number): Uint8Array {
    const { state, locals } = this.part(t);
    if (state.kind === "MIRRORED") return getTensorData(locals[0]!, offset, size);
    const all = state.kind === "PARTIAL" ? sumPartials(locals.map((l) => getTensorData(l))) : joinSlices(t, state, locals.map((l) => getTensorData(l)));
    return all.subarray(offset, offset + size);
  }

  set(): void { throw weftError("BAD_ARGUMENT", `${this.bufferType.name} memory has no flat bytes: write tensors (setTensorData)`); }
  get(): Uint8Array { throw weftError("BAD_ARGUMENT", `${this.bufferType.name} memory has no flat bytes: read tensors (getTensorData)`); }
  memset(): void { throw weftError("BAD_ARGUMENT", `${this.bufferType.name} memory has no flat bytes: use clear()`); }
  clear(value: number): void { for (const b of this.#owned) b.clear(value); }

  deviceBytes(): ReadonlyArray<readonly [Device, number]> {
    const m = new Map<Device, number>(this.bufferType.device.devices.map((d) => [d, 0]));
    for (const b of this.#owned) m.set(b.bufferType.device, (m.get(b.bufferType.device) ?? 0) + b.size);
    return [...m];
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.program?.dispose();
    for (const b of this.#owned) b.dispose();
  }
}

export function wholeOnly(t: Tensor, offset: number, size: number): void {
  if (offset !== 0 || size !== t.nbytes)
    throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} is cut across devices: only whole-tensor reads and writes are possible`);
}

/** A fresh contiguous tensor like `t` on one device (inputs and collective results). */
export function likeTensor(t: Tensor, name = t.name): Tensor {
  const l = new Tensor({ type: t.type, ne: [...t.ne], nb: contiguousStrides(t.type, [...t.ne]), name });
  l.flags = t.flags & TensorFlag.INPUT;
  return l;
}
