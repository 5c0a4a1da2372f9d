/**
 * Memory placement (DESIGN §4), honouring each buffer type's alignment, allocSize and
 * maxSize:
 *  - static tensors (weights, KV cache) are laid out linearly (allocateTensors); weight
 *    matrices go to the device's faster weight memory where it has one (allocateWeights);
 *  - a graph's compute memory is planned once per graph (planGraphAllocation): inputs
 *    (unplaced leaves) come first and stay; a node's memory is released once its last
 *    consumer has run; a node of an in-place op (ops.ts) whose parent's memory has no
 *    other pending consumer takes that memory; outputs are never released.
 * A buffer type may place tensors itself (allocTensors / allocGraph: a meta device splits
 * them over its devices); these functions are the only callers of those members.
 */
import { weftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { IN_PLACE_OPS, Op, VIEW_OPS } from "../core/ops.js";
import { Tensor, TensorFlag } from "../core/tensor.js";
import { AllocTensorsOptions, Buffer, BufferType, BufferUsage, Device } from "./interface.js";
import { device } from "./registry.js";

export const COMPUTE_ALIGNMENT = 64;

export interface GraphAllocation {
  /** bytes the compute buffer needs */
  readonly size: number;
  /** offset of every tensor this plan places (roots only; views follow their root) */
  readonly offsets: ReadonlyMap<Tensor, number>;
  /** tensors that run in place, sharing their parent's memory */
  readonly inPlace: number;
  /** sum of the sizes of everything placed (size < total means memory was reused) */
  readonly total: number;
}

interface Block { offset: number; size: number }

/** Best-fit free list over a growing arena. */
class FreeList {
  #free: Block[] = [];  // sorted by offset, never adjacent (merged)
  end = 0;
  constructor(private align: number) {}

  #round(bytes: number): number { return Math.max(this.align, Math.ceil(bytes / this.align) * this.align); }

  alloc(bytes: number): number {
    const size = this.#round(bytes);
    let best = -1;
    for (let i = 0; i < this.#free.length; i++) {
      const b = this.#free[i]!;
      if (b.size >= size && (best < 0 || b.size < this.#free[best]!.size)) best = i;
    }
    if (best >= 0) {
      const b = this.#free[best]!;
      const off = b.offset;
      if (b.size === size) this.#free.splice(best, 1);
      else { b.offset += size; b.size -= size; }
      return off;
    }
    // grow: a free block touching the end is extended rather than wasted
    const last = this.#free[this.#free.length - 1];
    if (last && last.offset + last.size === this.end) {
      this.#free.pop();
      this.end = last.offset + size;
      return last.offset;
    }
    const off = this.end;
    this.end += size;
    return off;
  }

  release(offset: number, bytes: number): void {
    const size = this.#round(bytes);
    let i = 0;
    while (i < this.#free.length && this.#free[i]!.offset < offset) i++;
    this.#free.splice(i, 0, { offset, size });
    // merge with the next, then with the previous block
    const cur = this.#free[i]!;
    const next = this.#free[i + 1];
    if (next && cur.offset + cur.size === next.offset) { cur.size += next.size; this.#free.splice(i + 1, 1); }
    const prev = this.#free[i - 1];
    if (prev && prev.offset + prev.size === cur.offset) { prev.size += cur.size; this.#free.splice(i, 1); }
  }
}

export interface PlanOptions {
  /** offset alignment (default 64) */
  alignment?: number;
  /** bytes a tensor takes (default its extent) */
  allocSize?: (t: Tensor) => number;
  /** let in-place ops reuse their source's memory (default true) */
  inPlace?: boolean;
}

/** Plans the compute buffer of `graph`. Tensors that already have a buffer are left alone. */
export function planGraphAllocation(graph: Graph, opts: PlanOptions = {}): GraphAllocation {
  const align = opts.alignment ?? COMPUTE_ALIGNMENT, inPlace = opts.inPlace ?? true;
  const bytes = opts.allocSize ?? ((t: Tensor) => t.nbytes);
  const needs = (t: Tensor) => t.root().tensor === t && t.buffer === null;
  // pending consumers per root, counted over compute nodes (views consume nothing)
  const pending = new Map<Tensor, number>();
  const pinned = new Set<Tensor>();
  for (const t of graph.order) {
    if (t.flags & TensorFlag.OUTPUT) pinned.add(t.root().tensor);
    if (t.op === Op.NONE || VIEW_OPS.has(t.op)) continue;
    for (const s of t.src) { const r = s.root().tensor; pending.set(r, (pending.get(r) ?? 0) + 1); }
  }
  const fl = new FreeList(align);
  const offsets = new Map<Tensor, number>();
  const moved = new Map<Tensor, Tensor>();  // parent -> the in-place node that took its memory
  let total = 0, shared = 0;
  for (const t of graph.leafs) {
    if (!needs(t)) continue;
    offsets.set(t, fl.alloc(bytes(t)));
    total += bytes(t);
    pinned.add(t);  // inputs are written before each run: they stay put
  }
  for (const t of graph.nodes) {
    if (VIEW_OPS.has(t.op)) continue;
    if (needs(t)) {
      let placed = false;
      if (inPlace && IN_PLACE_OPS.has(t.op) && t.isContiguous) {
        const p = t.src[0]!;
        const r = p.root().tensor;
        if (offsets.has(r) && !pinned.has(r) && pending.get(r) === 1 && p.isContiguous && p.root().offset === 0 &&
            bytes(r) === bytes(t) && p.nbytes === t.nbytes) {
          offsets.set(t, offsets.get(r)!);
          pending.set(r, 0);
          offsets.delete(r);  // ownership passes to t; r gets t's offset back at the end
          moved.set(r, t);
          placed = true;
          shared++;
        }
      }
      if (!placed) offsets.set(t, fl.alloc(bytes(t)));
      total += bytes(t);
    }
    for (const s of t.src) {
      const r = s.root().tensor;
      const left = (pending.get(r) ?? 0) - 1;
      pending.set(r, left);
      if (left === 0 && offsets.has(r) && !pinned.has(r)) fl.release(offsets.get(r)!, bytes(r));
    }
  }
  // tensors that handed their memory to an in-place successor share its offset
  for (const [from, to] of moved) {
    let last = to;
    while (moved.has(last) && !offsets.has(last)) last = moved.get(last)!;
    offsets.set(from, offsets.get(last)!);
  }
  return { size: fl.end, offsets, inPlace: shared, total };
}

/** Applies a plan: every planned tensor gets `buffer` and its offset. */
export function applyGraphAllocation(plan: GraphAllocation, buffer: Buffer): void {
  if (buffer.size < plan.size) throw weftError("BAD_ARGUMENT", `compute buffer holds ${buffer.size} bytes, the graph needs ${plan.size}`);
  for (const [t, off] of plan.offsets) { t.buffer = buffer; t.offset = off; buffer.initTensor?.(t); }
}

function allocChecked(bt: BufferType, size: number, what: string): Buffer {
  if (size > bt.maxSize)
    throw weftError("OUT_OF_MEMORY", `${what} needs ${size} bytes in one buffer, more than ${bt.name} allows (${bt.maxSize})`);
  return bt.alloc(size);
}

/** Places every unplaced tensor of a graph in one new compute buffer of type `bt`. */
export function allocGraph(bt: BufferType, graph: Graph): Buffer {
  if (bt.allocGraph) return bt.allocGraph(graph);
  const plan = planGraphAllocation(graph, { alignment: bt.alignment, allocSize: bt.allocSize?.bind(bt) });
  const buf = allocChecked(bt, plan.size, "the graph's compute memory");
  buf.usage = BufferUsage.COMPUTE;
  applyGraphAllocation(plan, buf);
  return buf;
}

export interface AllocateOptions extends AllocTensorsOptions {
  /** memory to place them in (default: cpu:0's host memory) */
  bufferType?: BufferType;
  usage?: BufferUsage;
}

/**
 * Places every unplaced root of `tensors` in one new buffer, laid out linearly (static
 * tensors: weights, KV cache; a graph's compute memory uses allocGraph).
 */
export function allocateTensors(tensors: Iterable<Tensor>, opts: AllocateOptions = {}): Buffer {
  const bt = opts.bufferType ?? device("cpu:0").bufferType();
  const roots: Tensor[] = [];
  const seen = new Set<Tensor>();
  for (const t of tensors) {
    const r = t.root().tensor;
    if (r.buffer || seen.has(r)) continue;
    seen.add(r);
    roots.push(r);
  }
  let buf: Buffer;
  if (bt.allocTensors) {
    buf = bt.allocTensors(roots, opts);
  } else {
    const guard = opts.guard ?? 0, align = bt.alignment;
    const up = (n: number) => Math.ceil(n / align) * align;
    let size = 0;
    const offs: number[] = [];
    for (const r of roots) {
      size = up(size + guard);
      offs.push(size);
      size += bt.allocSize ? bt.allocSize(r) : r.nbytes;
    }
    size = up(size + guard);
    buf = allocChecked(bt, size, `${roots.length} tensors`);
    roots.forEach((r, i) => { r.buffer = buf; r.offset = offs[i]!; buf.initTensor?.(r); });
  }
  if (opts.usage !== undefined) buf.usage = opts.usage;
  return buf;
}

/**
 * Places weights on a device: matrices in `opts.matmulWeights` go to the device's weight
 * memory where it has one for them (Device.weightBufferType), the rest to its default
 * memory. Returns the buffers made (none for an empty list).
 */
export function allocateWeights(dev: Device, tensors: Iterable<Tensor>, opts: AllocTensorsOptions = {}): Buffer[] {
  const groups = new Map<BufferType, Tensor[]>();
  for (const t of tensors) {
    const bt = (opts.matmulWeights?.has(t) ? dev.weightBufferType?.(t) : null) ?? dev.bufferType();
    groups.set(bt, [...(groups.get(bt) ?? []), t]);
  }
  return [...groups].map(([bt, ts]) => allocateTensors(ts, { ...opts, bufferType: bt, usage: BufferUsage.WEIGHTS }));
}
