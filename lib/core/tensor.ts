import { weftError } from "./errors.js";
import { Op, opName } from "./ops.js";
import { GgmlType, TYPES, typeTraits } from "./types.js";

export type Shape4 = [number, number, number, number];

export const TensorFlag = { INPUT: 1, OUTPUT: 2, PARAM: 4 } as const;

/** Where a tensor's bytes live. Implemented by every backend's buffers. */
export interface Placement {
  /** identity of the memory (a backend buffer) */
  readonly buffer: object;
}

/**
 * Tensor metadata: what it is (type, shape, strides), how it is computed (op, params,
 * sources) and where it lives (buffer + offset). Data is never held here.
 */
export class Tensor {
  readonly type: GgmlType;
  readonly ne: Shape4;
  readonly nb: Shape4;
  readonly op: Op;
  readonly params: readonly number[];
  readonly src: readonly Tensor[];
  /** the tensor whose memory this one aliases (views, CPY/SET_ROWS results) */
  readonly viewSrc: Tensor | null;
  readonly viewOffs: number;
  name: string;
  flags = 0;
  buffer: Placement["buffer"] | null = null;
  offset = 0;

  constructor(init: {
    type: GgmlType; ne: Shape4; nb?: Shape4; op?: Op; params?: readonly number[]; src?: readonly Tensor[];
    viewSrc?: Tensor | null; viewOffs?: number; name?: string;
  }) {
    this.type = init.type;
    this.ne = init.ne;
    this.nb = init.nb ?? contiguousStrides(init.type, init.ne);
    this.op = init.op ?? Op.NONE;
    this.params = init.params ?? [];
    this.src = init.src ?? [];
    this.viewSrc = init.viewSrc ?? null;
    this.viewOffs = init.viewOffs ?? 0;
    this.name = init.name ?? "";
  }

  get nelements(): number { return this.ne[0] * this.ne[1] * this.ne[2] * this.ne[3]; }
  get nrows(): number { return this.ne[1] * this.ne[2] * this.ne[3]; }
  /** bytes spanned by this tensor (from its first to one past its last byte) */
  get nbytes(): number { return tensorExtent(this.type, this.ne, this.nb); }
  get isContiguous(): boolean { return isContiguous(this.type, this.ne, this.nb); }

  /** The tensor that owns the memory and the byte offset of this one inside it. */
  root(): { tensor: Tensor; offset: number } {
    let t: Tensor = this;
    let off = 0;
    while (t.viewSrc) { off += t.viewOffs; t = t.viewSrc; }
    return { tensor: t, offset: off };
  }

  setName(name: string): this { this.name = name; return this; }
  setInput(): this { this.flags |= TensorFlag.INPUT; return this; }
  setOutput(): this { this.flags |= TensorFlag.OUTPUT; return this; }

  describe(): string {
    const nm = this.name ? `'${this.name}' ` : "";
    return `${nm}(${opName(this.op)}, ${TYPES[this.type].name} [${this.ne.join(", ")}])`;
  }
}

export function contiguousStrides(type: GgmlType, ne: Shape4): Shape4 {
  const tr = typeTraits(type);
  const nb0 = tr.typeSize;
  const nb1 = (ne[0] / tr.blockSize) * tr.typeSize;
  return [nb0, nb1, nb1 * ne[1], nb1 * ne[1] * ne[2]];
}

export function isContiguous(type: GgmlType, ne: Shape4, nb: Shape4): boolean {
  const c = contiguousStrides(type, ne);
  for (let k = 0; k < 4; k++) if (ne[k]! > 1 && nb[k] !== c[k]) return false;
  return nb[0] === c[0];
}

export function tensorExtent(type: GgmlType, ne: Shape4, nb: Shape4): number {
  if (ne[0] * ne[1] * ne[2] * ne[3] === 0) return 0;
  const tr = TYPES[type];
  let e = (ne[0] / tr.blockSize - 1) * nb[0] + tr.typeSize;
  for (let k = 1; k < 4; k++) e += (ne[k]! - 1) * nb[k]!;
  return e;
}

export function toShape4(ne: readonly number[], what = "shape"): Shape4 {
  if (ne.length < 1 || ne.length > 4) throw weftError("SHAPE_MISMATCH", `${what} must have 1 to 4 dimensions, got ${ne.length}`);
  const s: Shape4 = [1, 1, 1, 1];
  ne.forEach((v, i) => {
    if (!Number.isSafeInteger(v) || v < 0) throw weftError("SHAPE_MISMATCH", `${what}: dimension ${i} is ${v}, expected a non-negative integer`);
    s[i] = v;
  });
  return s;
}

/** The bytes of any typed array or view (no copy). */
export function bytesOf(v: ArrayBufferView): Uint8Array {
  return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
}
