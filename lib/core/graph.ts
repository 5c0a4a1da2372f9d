/**
 * Graph construction. Each function creates one node and checks its operands' shapes and
 * types immediately, so a wrong graph fails here with a message naming the operands,
 * never later inside a backend.
 */
import { weftError } from "./errors.js";
import { CollectiveMode, GluOp, Op, OPS, RopeMode, UnaryOp, VIEW_OPS, opName } from "./ops.js";
import { Shape4, Tensor, isContiguous, tensorExtent, toShape4 } from "./tensor.js";
import { GgmlType, TYPES, typeTraits } from "./types.js";

function fail(op: string, msg: string, ...ts: Tensor[]): never {
  throw weftError("SHAPE_MISMATCH", `${op}: ${msg} (${ts.map((t) => t.describe()).join(", ")})`);
}
function needF32(op: string, ...ts: Tensor[]): void {
  for (const t of ts) if (t.type !== GgmlType.F32) fail(op, "expects F32 operands", t);
}
function sameShape(a: Tensor, b: Tensor): boolean {
  return a.ne.every((v, i) => v === b.ne[i]);
}
function canRepeat(small: Tensor, big: Tensor): boolean {
  return small.ne.every((v, i) => (v === 0 ? big.ne[i] === 0 : big.ne[i]! % v === 0));
}

/** A new leaf tensor (weights, inputs, KV cache). */
export function newTensor(type: GgmlType, ne: readonly number[], name = ""): Tensor {
  const s = toShape4(ne);
  const tr = typeTraits(type);
  if (s[0] % tr.blockSize !== 0)
    throw weftError("SHAPE_MISMATCH", `tensor '${name}': row length ${s[0]} is not a multiple of ${tr.name}'s block size ${tr.blockSize}`);
  return new Tensor({ type, ne: s, name });
}

function node(op: Op, type: GgmlType, ne: Shape4, src: Tensor[], params: number[] = [], view?: { of: Tensor; offs: number; nb: Shape4 }): Tensor {
  return new Tensor({ type, ne, op, src, params, viewSrc: view?.of ?? null, viewOffs: view?.offs ?? 0, nb: view?.nb });
}

/** rows of `a` selected by I32 `idx` [n, ne2?, ne3?] → F32 [a.ne0, n, ...] */
export function getRows(a: Tensor, idx: Tensor): Tensor {
  if (idx.type !== GgmlType.I32) fail("GET_ROWS", "indices must be I32", idx);
  if (idx.ne[1] !== a.ne[2] || idx.ne[2] !== a.ne[3] || idx.ne[3] !== 1) fail("GET_ROWS", "index batch dims must match the source's dims 2,3", a, idx);
  return node(Op.GET_ROWS, GgmlType.F32, [a.ne[0], idx.ne[0], idx.ne[1], idx.ne[2]], [a, idx]);
}

/** a: weights [K, N, ...] (any type), b: activations F32 [K, M, ...] → F32 [N, M, ...] (broadcast a over b's dims 2,3). */
export function mulMat(a: Tensor, b: Tensor): Tensor {
  if (a.ne[0] !== b.ne[0]) fail("MUL_MAT", `inner dimensions differ (${a.ne[0]} vs ${b.ne[0]})`, a, b);
  // a batch dimension of a may be empty only together with b's (a device's empty share of heads)
  const bcast = (na: number, nb: number) => (na === 0 ? nb === 0 : nb % na === 0);
  if (!bcast(a.ne[2], b.ne[2]) || !bcast(a.ne[3], b.ne[3])) fail("MUL_MAT", "cannot broadcast over dims 2,3", a, b);
  if (b.type !== GgmlType.F32) fail("MUL_MAT", "activations (second operand) must be F32", b);
  if (a.nb[0] !== TYPES[a.type].typeSize) fail("MUL_MAT", "weight rows must be contiguous", a);
  return node(Op.MUL_MAT, GgmlType.F32, [a.ne[1], b.ne[1], b.ne[2], b.ne[3]], [a, b]);
}

function binary(op: Op, a: Tensor, b: Tensor): Tensor {
  needF32(opName(op), a, b);
  if (!canRepeat(b, a)) fail(opName(op), "second operand cannot be broadcast to the first", a, b);
  return node(op, GgmlType.F32, [...a.ne] as Shape4, [a, b]);
}
export const add = (a: Tensor, b: Tensor): Tensor => binary(Op.ADD, a, b);
export const mul = (a: Tensor, b: Tensor): Tensor => binary(Op.MUL, a, b);

/** a * s + bias */
export function scale(a: Tensor, s: number, bias = 0): Tensor {
  needF32("SCALE", a);
  return node(Op.SCALE, GgmlType.F32, [...a.ne] as Shape4, [a], [s, bias]);
}

export function rmsNorm(a: Tensor, eps: number): Tensor {
  needF32("RMS_NORM", a);
  if (!(eps >= 0)) fail("RMS_NORM", `eps must be non-negative, got ${eps}`, a);
  if (a.nb[0] !== 4) fail("RMS_NORM", "rows must be contiguous", a);
  return node(Op.RMS_NORM, GgmlType.F32, [...a.ne] as Shape4, [a], [eps]);
}

export interface RopeOptions { nDims: number; mode?: number; freqBase?: number; freqScale?: number; attnFactor?: number }
/** Rotary embedding of a [headDim, heads, tokens, 1] by I32 positions [tokens]. */
export function rope(a: Tensor, pos: Tensor, o: RopeOptions): Tensor {
  needF32("ROPE", a);
  if (pos.type !== GgmlType.I32 || pos.ne[0] !== a.ne[2]) fail("ROPE", "positions must be I32 with one entry per token (dim 2)", a, pos);
  if (o.nDims <= 0 || o.nDims % 2 !== 0 || o.nDims > a.ne[0]) fail("ROPE", `nDims ${o.nDims} must be even and at most the head size`, a);
  const mode = o.mode ?? RopeMode.NORMAL;
  if (mode !== RopeMode.NORMAL && mode !== RopeMode.NEOX) fail("ROPE", `unknown mode ${mode}`, a);
  if (a.nb[0] !== 4) fail("ROPE", "rows must be contiguous", a);
  return node(Op.ROPE, GgmlType.F32, [...a.ne] as Shape4, [a, pos], [o.nDims, mode, o.freqBase ?? 10000, o.freqScale ?? 1, o.attnFactor ?? 1]);
}

/** softmax(a * scale + mask) along dim 0; mask F32/F16 [a.ne0, ≥a.ne1, broadcast, broadcast]. */
export function softMax(a: Tensor, mask: Tensor | null = null, scaleBy = 1): Tensor {
  needF32("SOFT_MAX", a);
  if (a.nb[0] !== 4) fail("SOFT_MAX", "rows must be contiguous", a);
  if (mask) {
    if (mask.type !== GgmlType.F32 && mask.type !== GgmlType.F16) fail("SOFT_MAX", "mask must be F32 or F16", mask);
    if (mask.ne[0] !== a.ne[0] || mask.ne[1] < a.ne[1] || mask.ne[2] === 0 || mask.ne[3] === 0 || a.ne[2] % mask.ne[2] !== 0 || a.ne[3] % mask.ne[3] !== 0)
      fail("SOFT_MAX", "mask shape does not cover the input", a, mask);
  }
  return node(Op.SOFT_MAX, GgmlType.F32, [...a.ne] as Shape4, mask ? [a, mask] : [a], [scaleBy, 0]);
}

function checkConvertible(op: string, from: Tensor, to: GgmlType): void {
  const ft = TYPES[from.type];
  if (ft.quantized && from.type !== to) fail(op, "cannot convert from a quantized type", from);
  if (!TYPES[to].weight) fail(op, `cannot convert to ${TYPES[to].name}`, from);
}

/** Copies a into b (converting type); the result aliases b. */
export function cpy(a: Tensor, b: Tensor): Tensor {
  if (!sameShape(a, b)) fail("CPY", "shapes differ", a, b);
  checkConvertible("CPY", a, b.type);
  if (TYPES[b.type].quantized && b.nb[0] !== TYPES[b.type].typeSize) fail("CPY", "quantized destination rows must be contiguous", b);
  return node(Op.CPY, b.type, [...b.ne] as Shape4, [a, b], [], { of: b, offs: 0, nb: [...b.nb] as Shape4 });
}

/** A contiguous copy of a (of type `type`, default a's own). */
export function cont(a: Tensor, type: GgmlType = a.type): Tensor {
  checkConvertible("CONT", a, type);
  return node(Op.CONT, type, [...a.ne] as Shape4, [a]);
}

/** A view of a with shape ne, byte strides nb (default: contiguous) and byte offset. */
export function view(a: Tensor, ne: readonly number[], offset = 0, nb?: readonly number[]): Tensor {
  const s = toShape4(ne, "VIEW shape");
  const tr = TYPES[a.type];
  if (s[0] % tr.blockSize !== 0) fail("VIEW", "row length must be a multiple of the block size", a);
  const strides: Shape4 = nb ? toShape4([a.nb[0], ...nb.slice(0, 3)], "VIEW strides") : (() => {
    const r = (s[0] / tr.blockSize) * tr.typeSize;
    return [a.nb[0], r, r * s[1], r * s[1] * s[2]] as Shape4;
  })();
  if (!Number.isSafeInteger(offset) || offset < 0 || offset + tensorExtent(a.type, s, strides) > a.nbytes)
    fail("VIEW", `view [${s.join(", ")}] at offset ${offset} runs past the source`, a);
  return node(Op.VIEW, a.type, s, [a], [], { of: a, offs: offset, nb: strides });
}

export function reshape(a: Tensor, ne: readonly number[]): Tensor {
  const s = toShape4(ne, "RESHAPE shape");
  if (!a.isContiguous) fail("RESHAPE", "source must be contiguous (use cont first)", a);
  if (s[0] * s[1] * s[2] * s[3] !== a.nelements) fail("RESHAPE", `element count changes to ${s[0] * s[1] * s[2] * s[3]}`, a);
  if (s[0] % TYPES[a.type].blockSize !== 0) fail("RESHAPE", "row length must be a multiple of the block size", a);
  return node(Op.RESHAPE, a.type, s, [a], [], { of: a, offs: 0, nb: new Tensor({ type: a.type, ne: s }).nb });
}

/** Dimension i of a becomes dimension axes[i] of the result (ggml_permute semantics). */
export function permute(a: Tensor, axes: readonly [number, number, number, number]): Tensor {
  const seen = new Set(axes);
  if (seen.size !== 4 || axes.some((x) => x < 0 || x > 3 || !Number.isInteger(x))) fail("PERMUTE", `axes ${axes.join(",")} are not a permutation of 0..3`, a);
  if (TYPES[a.type].quantized && axes[0] !== 0) fail("PERMUTE", "cannot move dim 0 of a quantized tensor", a);
  const ne: Shape4 = [1, 1, 1, 1], nb: Shape4 = [0, 0, 0, 0];
  for (let i = 0; i < 4; i++) { ne[axes[i]!] = a.ne[i]!; nb[axes[i]!] = a.nb[i]!; }
  return node(Op.PERMUTE, a.type, ne, [a], [...axes], { of: a, offs: 0, nb });
}

export function transpose(a: Tensor): Tensor {
  if (TYPES[a.type].quantized) fail("TRANSPOSE", "cannot transpose a quantized tensor", a);
  const t = node(Op.TRANSPOSE, a.type, [a.ne[1], a.ne[0], a.ne[2], a.ne[3]], [a], [], {
    of: a, offs: 0, nb: [a.nb[1], a.nb[0], a.nb[2], a.nb[3]],
  });
  return t;
}

/** dst[idx[i]] = src[i] (rows; converted to dst's type). The result aliases dst. */
export function setRows(dst: Tensor, src: Tensor, idx: Tensor): Tensor {
  needF32("SET_ROWS", src);
  if (idx.type !== GgmlType.I64 && idx.type !== GgmlType.I32) fail("SET_ROWS", "indices must be I32 or I64", idx);
  if (src.ne[0] !== dst.ne[0] || src.ne[2] !== dst.ne[2] || src.ne[3] !== dst.ne[3]) fail("SET_ROWS", "row length / batch dims differ", dst, src);
  if (idx.ne[0] !== src.ne[1] || idx.ne[1] === 0 || idx.ne[2] === 0 || src.ne[2] % idx.ne[1] !== 0 || src.ne[3] % idx.ne[2] !== 0)
    fail("SET_ROWS", "need one index per source row", src, idx);
  if (src.nb[0] !== 4 || dst.nb[0] !== TYPES[dst.type].typeSize) fail("SET_ROWS", "rows must be contiguous", dst, src);
  if (!TYPES[dst.type].weight) fail("SET_ROWS", "unsupported destination type", dst);
  return node(Op.SET_ROWS, dst.type, [...dst.ne] as Shape4, [src, idx, dst], [], { of: dst, offs: 0, nb: [...dst.nb] as Shape4 });
}

export function unary(a: Tensor, kind: UnaryOp): Tensor {
  needF32("UNARY", a);
  return node(Op.UNARY, GgmlType.F32, [...a.ne] as Shape4, [a], [kind]);
}
export const silu = (a: Tensor): Tensor => unary(a, UnaryOp.SILU);
export const gelu = (a: Tensor): Tensor => unary(a, UnaryOp.GELU);

/**
 * Gated linear unit: act(gate) * up. With b: gate = a, up = b (same shape). Without b: a's
 * rows hold [gate | up] halves (swapped = [up | gate]).
 */
export function glu(a: Tensor, b: Tensor | null, kind: GluOp = GluOp.SWIGLU, swapped = false): Tensor {
  needF32("GLU", a);
  if (b) {
    needF32("GLU", b);
    if (!sameShape(a, b)) fail("GLU", "gate and up shapes differ", a, b);
    return node(Op.GLU, GgmlType.F32, [...a.ne] as Shape4, [a, b], [kind, 0]);
  }
  if (a.ne[0] % 2 !== 0) fail("GLU", "fused input needs an even row length", a);
  return node(Op.GLU, GgmlType.F32, [a.ne[0] / 2, a.ne[1], a.ne[2], a.ne[3]], [a], [kind, swapped ? 1 : 0]);
}
export const swiglu = (gate: Tensor, up: Tensor): Tensor => glu(gate, up, GluOp.SWIGLU);

/**
 * Sums `a` across the ranks of a collective group (CPU devices of one process, lib/meta);
 * every rank gets the same bits. `group` is a native group id (Device.collectiveGroup).
 */
export function allReduce(a: Tensor, group: number, rank: number): Tensor {
  needF32("ALL_REDUCE", a);
  if (!a.isContiguous) fail("ALL_REDUCE", "needs a contiguous tensor", a);
  return node(Op.ALL_REDUCE, GgmlType.F32, [...a.ne] as Shape4, [a], [group, rank, CollectiveMode.SUM, 0, 0, 0, 0]);
}

/**
 * Gathers slices along `axis` from every rank of a group into a tensor of shape `full`:
 * this rank's slice `a` covers [offset, offset + a.ne[axis]) of that axis.
 */
export function allGather(a: Tensor, full: readonly number[], axis: number, offset: number, group: number, rank: number): Tensor {
  needF32("ALL_REDUCE", a);
  const ne = toShape4(full, "all-gather shape");
  if (!a.isContiguous) fail("ALL_REDUCE", "needs a contiguous tensor", a);
  if (ne.some((v, k) => k !== axis && v !== a.ne[k]) || offset < 0 || offset + a.ne[axis]! > ne[axis]!)
    fail("ALL_REDUCE", `slice at ${offset} of axis ${axis} does not fit [${ne.join(", ")}]`, a);
  const inner = ne.slice(0, axis).reduce((x, y) => x * y, 1);
  return node(Op.ALL_REDUCE, GgmlType.F32, ne, [a], [group, rank, CollectiveMode.GATHER, inner, ne[axis]!, offset, a.ne[axis]!]);
}

/**
 * Sums `a` across the ranks of a group and keeps this rank's slice of the sum along
 * `axis`: [offset, offset + size). `bounds` (optional): every rank's first index along the
 * axis, then the axis length; with them, ranks in other processes send each other only
 * the slice each keeps.
 */
export function reduceScatter(a: Tensor, axis: number, offset: number, size: number, group: number, rank: number, bounds: readonly number[] = []): Tensor {
  needF32("ALL_REDUCE", a);
  if (!a.isContiguous) fail("ALL_REDUCE", "needs a contiguous tensor", a);
  if (offset < 0 || size < 0 || offset + size > a.ne[axis]!) fail("ALL_REDUCE", `slice [${offset}, +${size}) is outside axis ${axis}`, a);
  const ne = [...a.ne] as Shape4;
  ne[axis] = size;
  const inner = a.ne.slice(0, axis).reduce((x, y) => x * y, 1);
  if (bounds.length && (bounds.length < 2 || bounds[rank] !== offset || bounds[rank + 1] !== offset + size || bounds[0] !== 0 || bounds[bounds.length - 1] !== a.ne[axis]))
    fail("ALL_REDUCE", `bounds [${bounds.join(", ")}] do not match rank ${rank}'s slice [${offset}, +${size})`, a);
  return node(Op.ALL_REDUCE, GgmlType.F32, ne, [a], [group, rank, CollectiveMode.REDUCE_SCATTER, inner, a.ne[axis]!, offset, size, ...bounds]);
}

// ---------------------------------------------------------------- graphs

let nextGraphUid = 1;

/** Nodes in execution order plus the leaves they read. Built once per shape and reused. */
export class Graph {
  readonly uid: number;
  readonly nodes: readonly Tensor[];
  readonly leafs: readonly Tensor[];
  /** every tensor (leafs and nodes), sources before users */
  readonly order: readonly Tensor[];

  /**
   * The graph computing `outputs`. With `inOrder`, `outputs` is already every tensor in
   * execution order (as an RPC client sends a graph): it is checked (each source comes
   * before its user) and kept, and nothing is marked as an output.
   */
  constructor(outputs: readonly Tensor[], opts: { inOrder?: boolean } = {}) {
    if (opts.inOrder) {
      const seen = new Set<Tensor>();
      for (const t of outputs) {
        for (const s of t.viewSrc ? [...t.src, t.viewSrc] : t.src)
          if (!seen.has(s)) throw weftError("SHAPE_MISMATCH", `node ${t.describe()} reads a tensor that does not come before it`);
        if (seen.has(t)) throw weftError("SHAPE_MISMATCH", `tensor ${t.describe()} is listed twice`);
        seen.add(t);
      }
    }
    const order: Tensor[] = opts.inOrder ? [...outputs] : [];
    const seen = new Set<Tensor>(order);
    const stack: Array<{ t: Tensor; i: number }> = [];
    for (const out of outputs) {
      if (seen.has(out)) continue;
      stack.push({ t: out, i: 0 });
      seen.add(out);
      while (stack.length) {
        const top = stack[stack.length - 1]!;
        const deps = top.t.viewSrc && !top.t.src.includes(top.t.viewSrc) ? [...top.t.src, top.t.viewSrc] : top.t.src;
        if (top.i < deps.length) {
          const d = deps[top.i++]!;
          if (!seen.has(d)) { seen.add(d); stack.push({ t: d, i: 0 }); }
        } else {
          order.push(top.t);
          stack.pop();
        }
      }
    }
    if (!opts.inOrder) for (const o of outputs) o.flags |= 2;
    this.order = order;
    this.nodes = order.filter((t) => t.op !== Op.NONE);
    this.leafs = order.filter((t) => t.op === Op.NONE);
    this.uid = nextGraphUid++;
    for (const t of this.nodes) {
      const [lo, hi] = OPS[opName(t.op)].srcs;
      if (t.src.length < lo || t.src.length > hi) throw weftError("SHAPE_MISMATCH", `node ${t.describe()} has ${t.src.length} sources`);
    }
  }

  /** nodes that do work (views excluded) */
  get computeNodes(): Tensor[] { return this.nodes.filter((t) => !VIEW_OPS.has(t.op)); }
}

export function buildGraph(outputs: Tensor | readonly Tensor[]): Graph {
  return new Graph(Array.isArray(outputs) ? outputs : [outputs as Tensor]);
}

export { isContiguous };
