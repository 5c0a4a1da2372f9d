/**
 * Graph allocator (DESIGN §4): plans offsets in one compute buffer for every tensor of a
 * graph that has no memory yet. Inputs (unplaced leaves) come first and stay; a node's
 * memory is released once its last consumer has run; an elementwise node whose parent's
 * memory has no other pending consumer runs in place; outputs are never released.
 * The plan is made once per graph and kept with it: the graph is the unit of reuse.
 */
import { weftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { Op, VIEW_OPS } from "../core/ops.js";
import { Tensor, TensorFlag } from "../core/tensor.js";

export const COMPUTE_ALIGNMENT = 64;

/** Ops whose kernels read each element before writing the same position (CPU backend). */
const IN_PLACE_OPS: ReadonlySet<Op> = new Set([Op.ADD, Op.MUL, Op.SCALE, Op.UNARY, Op.RMS_NORM, Op.ROPE, Op.SOFT_MAX, Op.GLU]);

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

/** Plans the compute buffer of `graph`. Tensors that already have a buffer are left alone. */
export function planGraphAllocation(graph: Graph, align = COMPUTE_ALIGNMENT, inPlace = true): GraphAllocation {
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
    offsets.set(t, fl.alloc(t.nbytes));
    total += t.nbytes;
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
            r.nbytes === t.nbytes && p.nbytes === t.nbytes) {
          offsets.set(t, offsets.get(r)!);
          pending.set(r, 0);
          offsets.delete(r);  // ownership passes to t; r gets t's offset back at the end
          moved.set(r, t);
          placed = true;
          shared++;
        }
      }
      if (!placed) offsets.set(t, fl.alloc(t.nbytes));
      total += t.nbytes;
    }
    for (const s of t.src) {
      const r = s.root().tensor;
      const left = (pending.get(r) ?? 0) - 1;
      pending.set(r, left);
      if (left === 0 && offsets.has(r) && !pinned.has(r)) fl.release(offsets.get(r)!, r.nbytes);
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
export function applyGraphAllocation(plan: GraphAllocation, buffer: object & { size: number }): void {
  if (buffer.size < plan.size) throw weftError("BAD_ARGUMENT", `compute buffer holds ${buffer.size} bytes, the graph needs ${plan.size}`);
  for (const [t, off] of plan.offsets) { t.buffer = buffer; t.offset = off; }
}
