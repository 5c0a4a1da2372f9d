/**
 * Float64 reference implementation of every op. A value is a window onto a root array of
 * elements (views and in-place writes share the root, exactly like backend memory).
 */
import { OpName, opName, GluOp, RopeMode, UnaryOp } from "../../lib/core/ops.js";
import { Tensor } from "../../lib/core/tensor.js";
import { GgmlType, TYPES } from "../../lib/core/types.js";
import { quantizeActivationsRef, type RefOptions } from "./quant.js";

export interface RefVal { data: Float64Array<ArrayBufferLike>; off: number; st: [number, number, number, number]; ne: readonly number[] }

export function contiguousVal(ne: readonly number[], data: Float64Array<ArrayBufferLike> = new Float64Array(ne[0]! * ne[1]! * ne[2]! * ne[3]!)): RefVal {
  return { data, off: 0, st: [1, ne[0]!, ne[0]! * ne[1]!, ne[0]! * ne[1]! * ne[2]!], ne };
}
export const at = (v: RefVal, i0: number, i1: number, i2: number, i3: number) => v.off + i0 * v.st[0] + i1 * v.st[1] + i2 * v.st[2] + i3 * v.st[3];
export function forEach(ne: readonly number[], f: (i0: number, i1: number, i2: number, i3: number) => void): void {
  for (let i3 = 0; i3 < ne[3]!; i3++) for (let i2 = 0; i2 < ne[2]!; i2++) for (let i1 = 0; i1 < ne[1]!; i1++) for (let i0 = 0; i0 < ne[0]!; i0++) f(i0, i1, i2, i3);
}
/** copies a value into a fresh contiguous array (logical order) */
export function toArray(v: RefVal): Float64Array {
  const out = new Float64Array(v.ne[0]! * v.ne[1]! * v.ne[2]! * v.ne[3]!);
  let k = 0;
  forEach(v.ne, (a, b, c, d) => { out[k++] = v.data[at(v, a, b, c, d)]!; });
  return out;
}

/** Element strides of a view of `t` relative to its root's element array. */
function viewOf(t: Tensor, root: RefVal): RefVal {
  const { tensor: r, offset } = t.root();
  const tr = TYPES[t.type];
  if (tr.quantized) {
    const rb = (r.ne[0] / tr.blockSize) * tr.typeSize;
    const el = (b: number) => (b / rb) * r.ne[0];
    return { data: root.data, off: el(offset), st: [1, el(t.nb[1]), el(t.nb[2]), el(t.nb[3])], ne: t.ne };
  }
  const es = tr.typeSize;
  return { data: root.data, off: offset / es, st: [t.nb[0] / es, t.nb[1] / es, t.nb[2] / es, t.nb[3] / es], ne: t.ne };
}

type RefFn = (t: Tensor, s: RefVal[], rootOf: (t: Tensor) => RefVal, opts: RefOptions) => RefVal;

const unaryFns: Record<number, (x: number) => number> = {
  [UnaryOp.SILU]: (x) => x / (1 + Math.exp(-x)),
  [UnaryOp.GELU]: (x) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * x * (1 + 0.044715 * x * x))),
  [UnaryOp.RELU]: (x) => (x > 0 ? x : 0),
};

function map1(t: Tensor, a: RefVal, f: (x: number) => number): RefVal {
  const o = contiguousVal(t.ne);
  forEach(t.ne, (i0, i1, i2, i3) => { o.data[at(o, i0, i1, i2, i3)] = f(a.data[at(a, i0, i1, i2, i3)]!); });
  return o;
}
function binary(t: Tensor, a: RefVal, b: RefVal, f: (x: number, y: number) => number): RefVal {
  const o = contiguousVal(t.ne);
  forEach(t.ne, (i0, i1, i2, i3) => {
    o.data[at(o, i0, i1, i2, i3)] = f(a.data[at(a, i0, i1, i2, i3)]!, b.data[at(b, i0 % b.ne[0]!, i1 % b.ne[1]!, i2 % b.ne[2]!, i3 % b.ne[3]!)]!);
  });
  return o;
}
const viewRef: RefFn = (t, _s, rootOf) => viewOf(t, rootOf(t));

/** writes logical rows of `src` (via fn) into the alias of t */
function writeInto(t: Tensor, rootOf: (t: Tensor) => RefVal, fill: (dst: RefVal) => void): RefVal {
  const dst = viewOf(t, rootOf(t));
  fill(dst);
  return dst;
}

export const REF = {
  NONE: (_t, _s, rootOf) => rootOf(_t),
  GET_ROWS: (t, [a, idx]) => {
    const o = contiguousVal(t.ne);
    forEach(t.ne, (i0, i1, i2, i3) => {
      const r = idx!.data[at(idx!, i1, i2, i3, 0)]!;
      o.data[at(o, i0, i1, i2, i3)] = a!.data[at(a!, i0, r, i2, i3)]!;
    });
    return o;
  },
  MUL_MAT: (t, [a, b], _rootOf, opts) => {
    const o = contiguousVal(t.ne);
    const K = a!.ne[0]!, r2 = b!.ne[2]! / a!.ne[2]!, r3 = b!.ne[3]! / a!.ne[3]!;
    // activation rows as the kernels see them (8-bit for quantized weights)
    const x = contiguousVal(b!.ne);
    forEach([1, b!.ne[1]!, b!.ne[2]!, b!.ne[3]!], (_, m, i2, i3) => {
      const row = new Float64Array(K);
      for (let k = 0; k < K; k++) row[k] = b!.data[at(b!, k, m, i2, i3)]!;
      x.data.set(quantizeActivationsRef(t.src[0]!.type, row, opts), at(x, 0, m, i2, i3));
    });
    forEach(t.ne, (n, m, i2, i3) => {
      let s = 0;
      for (let k = 0; k < K; k++) s += a!.data[at(a!, k, n, Math.floor(i2 / r2), Math.floor(i3 / r3))]! * x.data[at(x, k, m, i2, i3)]!;
      o.data[at(o, n, m, i2, i3)] = s;
    });
    return o;
  },
  ADD: (t, [a, b]) => binary(t, a!, b!, (x, y) => x + y),
  MUL: (t, [a, b]) => binary(t, a!, b!, (x, y) => x * y),
  SCALE: (t, [a]) => map1(t, a!, (x) => x * t.params[0]! + t.params[1]!),
  RMS_NORM: (t, [a]) => {
    const o = contiguousVal(t.ne);
    forEach([1, t.ne[1], t.ne[2], t.ne[3]], (_, i1, i2, i3) => {
      let ss = 0;
      for (let i = 0; i < t.ne[0]; i++) ss += a!.data[at(a!, i, i1, i2, i3)]! ** 2;
      const sc = 1 / Math.sqrt(ss / t.ne[0] + t.params[0]!);
      for (let i = 0; i < t.ne[0]; i++) o.data[at(o, i, i1, i2, i3)] = a!.data[at(a!, i, i1, i2, i3)]! * sc;
    });
    return o;
  },
  ROPE: (t, [a, pos]) => {
    const [nd, mode, base, fscale, attn] = t.params as number[];
    const o = contiguousVal(t.ne);
    forEach([1, t.ne[1], t.ne[2], t.ne[3]], (_, i1, i2, i3) => {
      const p = pos!.data[at(pos!, i2, 0, 0, 0)]!;
      const x = (i: number) => a!.data[at(a!, i, i1, i2, i3)]!;
      const put = (i: number, v: number) => { o.data[at(o, i, i1, i2, i3)] = v; };
      for (let i = nd!; i < t.ne[0]; i++) put(i, x(i));
      for (let i0 = 0; i0 < nd!; i0 += 2) {
        const th = fscale! * p * base! ** (-i0 / nd!);
        const c = Math.cos(th) * attn!, s = Math.sin(th) * attn!;
        const [j0, j1] = mode === RopeMode.NEOX ? [i0 / 2, i0 / 2 + nd! / 2] : [i0, i0 + 1];
        put(j0, x(j0) * c - x(j1) * s);
        put(j1, x(j0) * s + x(j1) * c);
      }
    });
    return o;
  },
  SOFT_MAX: (t, [a, mask]) => {
    const o = contiguousVal(t.ne);
    forEach([1, t.ne[1], t.ne[2], t.ne[3]], (_, i1, i2, i3) => {
      const w: number[] = [];
      for (let i = 0; i < t.ne[0]; i++) {
        let v = a!.data[at(a!, i, i1, i2, i3)]! * t.params[0]!;
        if (mask) v += mask.data[at(mask, i, i1, i2 % mask.ne[2]!, i3 % mask.ne[3]!)]!;
        w.push(v);
      }
      const mx = Math.max(...w);
      if (mx === -Infinity) { for (let i = 0; i < t.ne[0]; i++) o.data[at(o, i, i1, i2, i3)] = 0; return; }
      const e = w.map((v) => Math.exp(v - mx));
      const sum = e.reduce((p, q) => p + q, 0);
      for (let i = 0; i < t.ne[0]; i++) o.data[at(o, i, i1, i2, i3)] = e[i]! / sum;
    });
    return o;
  },
  CPY: (t, [a], rootOf) => writeInto(t, rootOf, (d) => forEach(t.ne, (i0, i1, i2, i3) => { d.data[at(d, i0, i1, i2, i3)] = a!.data[at(a!, i0, i1, i2, i3)]!; })),
  CONT: (t, [a]) => map1(t, a!, (x) => x),
  VIEW: viewRef, RESHAPE: viewRef, PERMUTE: viewRef, TRANSPOSE: viewRef,
  SET_ROWS: (t, [src, idx], rootOf) => writeInto(t, rootOf, (d) => forEach(src!.ne, (i0, i1, i2, i3) => {
    const r = idx!.data[at(idx!, i1, i2 % idx!.ne[1]!, i3 % idx!.ne[2]!, 0)]!;
    d.data[at(d, i0, r, i2, i3)] = src!.data[at(src!, i0, i1, i2, i3)]!;
  })),
  UNARY: (t, [a]) => map1(t, a!, unaryFns[t.params[0]!]!),
  GLU: (t, [a, b]) => {
    const act = t.params[0] === GluOp.SWIGLU ? unaryFns[UnaryOp.SILU]! : unaryFns[UnaryOp.GELU]!;
    const o = contiguousVal(t.ne);
    const n = t.ne[0], sw = t.params[1] === 1;
    forEach(t.ne, (i0, i1, i2, i3) => {
      const g = b ? a!.data[at(a!, i0, i1, i2, i3)]! : a!.data[at(a!, sw ? i0 + n : i0, i1, i2, i3)]!;
      const u = b ? b.data[at(b, i0, i1, i2, i3)]! : a!.data[at(a!, sw ? i0 : i0 + n, i1, i2, i3)]!;
      o.data[at(o, i0, i1, i2, i3)] = act(g) * u;
    });
    return o;
  },
  FLASH_ATTN_EXT: (t) => { throw new Error(`no reference for ${opName(t.op)} yet`); },
  ALL_REDUCE: (t) => { throw new Error(`no reference for ${opName(t.op)} on one device`); },
} satisfies Record<OpName, RefFn>;

/**
 * Runs a graph's nodes in order on the reference; `leaf` gives each leaf's values, `opts`
 * how the kernels in use treat activations.
 */
export function runReference(order: readonly Tensor[], leaf: (t: Tensor) => Float64Array, opts: RefOptions = {}): Map<Tensor, RefVal> {
  const vals = new Map<Tensor, RefVal>();
  const roots = new Map<Tensor, RefVal>();
  const rootOf = (t: Tensor): RefVal => {
    const r = t.root().tensor;
    let v = roots.get(r);
    if (!v) { v = contiguousVal(r.ne, r.op === 0 ? leaf(r) : undefined); roots.set(r, v); }
    return v;
  };
  for (const t of order) {
    const fn = REF[opName(t.op)] as RefFn;
    const v = fn(t, t.src.map((s) => vals.get(s)!), rootOf, opts);
    if (t.op !== 0 && !t.viewSrc) roots.set(t, v);
    vals.set(t, v);
  }
  return vals;
}

export function nmse(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0, den = 0;
  for (let i = 0; i < b.length; i++) { num += (a[i]! - b[i]!) ** 2; den += b[i]! ** 2; }
  return den === 0 ? (num === 0 ? 0 : Infinity) : num / den;
}

export { GgmlType };
