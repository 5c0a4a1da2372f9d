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

export interface PlanOptions {
  /** offset alignment (default 64) */
  alignment?: number;
  /** bytes a tensor takes (default its extent) */
  allocSize?: (t: Tensor) => number;
  /** let in-place ops reuse their source's memory (default true) */
  inPlace?: boolean;
}

/** Tensors sharing one piece of memory (a node and the in-place nodes that took it over). */
interface Slot { members: Tensor[]; size: number; from: number; to: number; offset: number }

/**
 * Plans the compute buffer of `graph`; tensors that already have a buffer are left alone.
 * First the lifetimes: a tensor lives from the node that makes it to its last consumer
 * (inputs and outputs: the whole graph), and an in-place node extends its source's slot.
 * Then the offsets, largest slots first, each at the lowest offset that overlaps no slot
 * alive at the same time (greedy by size, as TFLite's arena planner): holes left by
 * short-lived tensors are filled instead of pushing the big ones past them.
 */
export function planGraphAllocation(graph: Graph, opts: PlanOptions = {}): GraphAllocation {
  const align = opts.alignment ?? COMPUTE_ALIGNMENT, inPlace = opts.inPlace ?? true;
  const bytes = opts.allocSize ?? ((t: Tensor) => t.nbytes);
  const round = (n: number) => Math.max(align, Math.ceil(n / align) * align);
  const needs = (t: Tensor) => t.root().tensor === t && t.buffer === null;
  // pending consumers per root, counted over compute nodes (views consume nothing)
  const pending = new Map<Tensor, number>();
  const pinned = new Set<Tensor>();
  for (const t of graph.order) {
    if (t.flags & TensorFlag.OUTPUT) pinned.add(t.root().tensor);
    if (t.op === Op.NONE || VIEW_OPS.has(t.op)) continue;
    for (const s of t.src) { const r = s.root().tensor; pending.set(r, (pending.get(r) ?? 0) + 1); }
  }
  const slots: Slot[] = [];
  const slotOf = new Map<Tensor, Slot>();
  const END = Number.MAX_SAFE_INTEGER;
  let total = 0, shared = 0;
  for (const t of graph.leafs) {
    if (!needs(t)) continue;
    const sl: Slot = { members: [t], size: round(bytes(t)), from: -1, to: END, offset: 0 };  // inputs are written before each run: they stay put
    slots.push(sl); slotOf.set(t, sl);
    total += bytes(t);
    pinned.add(t);
  }
  graph.nodes.forEach((t, step) => {
    if (VIEW_OPS.has(t.op)) return;
    if (needs(t)) {
      let sl: Slot | undefined;
      if (inPlace && IN_PLACE_OPS.has(t.op) && t.isContiguous) {
        const p = t.src[0]!;
        const r = p.root().tensor;
        const own = slotOf.get(r);
        if (own && !pinned.has(r) && pending.get(r) === 1 && p.isContiguous && p.root().offset === 0 &&
            bytes(r) === bytes(t) && p.nbytes === t.nbytes) {
          sl = own;  // t runs in its source's memory
          sl.members.push(t);
          pending.set(r, 0);
          shared++;
        }
      }
      if (!sl) { sl = { members: [t], size: round(bytes(t)), from: step, to: step, offset: 0 }; slots.push(sl); }
      slotOf.set(t, sl);
      if (pinned.has(t)) sl.to = END;
      total += bytes(t);
    }
    for (const s of t.src) {
      const r = s.root().tensor;
      pending.set(r, (pending.get(r) ?? 0) - 1);
      const sl = slotOf.get(r);
      if (sl && sl.to !== END) sl.to = Math.max(sl.to, step);
    }
  });
  // largest first (ties: earlier first), each at the lowest offset free for its whole life
  const order = [...slots].sort((a, b) => b.size - a.size || a.from - b.from);
  const placed: Slot[] = [];
  let end = 0;
  for (const sl of order) {
    const busy = placed.filter((o) => o.from <= sl.to && sl.from <= o.to).sort((a, b) => a.offset - b.offset);
    let at = 0;
    for (const o of busy) {
      if (o.offset >= at + sl.size) break;
      at = Math.max(at, o.offset + o.size);
    }
    sl.offset = at;
    end = Math.max(end, at + sl.size);
    placed.push(sl);
  }
  const offsets = new Map<Tensor, number>();
  for (const sl of slots) for (const t of sl.members) offsets.set(t, sl.offset);
  return { size: end, offsets, inPlace: shared, total };
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

/** The memory a matrix only MUL_MAT reads goes to on a device (its weight layout, if it has one). */
export function weightMemory(dev: Device, t: Tensor): BufferType {
  return dev.weightBufferType?.(t) ?? dev.bufferType();
}

/**
 * Places weights on a device: matrices in `opts.matmulWeights` go to the device's weight
 * memory where it has one for them (Device.weightBufferType), the rest to its default
 * memory. Returns the buffers made (none for an empty list).
 */
export function allocateWeights(dev: Device, tensors: Iterable<Tensor>, opts: AllocTensorsOptions = {}): Buffer[] {
  const groups = new Map<BufferType, Tensor[]>();
  for (const t of tensors) {
    const bt = opts.matmulWeights?.has(t) ? weightMemory(dev, t) : dev.bufferType();
    groups.set(bt, [...(groups.get(bt) ?? []), t]);
  }
  return [...groups].map(([bt, ts]) => allocateTensors(ts, { ...opts, bufferType: bt, usage: BufferUsage.WEIGHTS }));
}
