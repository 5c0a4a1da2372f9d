/**
 * The closed set of graph ops, defined once: this table is the source. The native CPU
 * backend exports its own op names in id order and lib/cpu/native.ts refuses to load an
 * addon whose table differs; the reference (test/ref), the allocator and the split rules
 * are keyed by these names (a missing op is a compile error).
 */
export const Op = {
  NONE: 0, GET_ROWS: 1, MUL_MAT: 2, ADD: 3, MUL: 4, SCALE: 5, RMS_NORM: 6, ROPE: 7, SOFT_MAX: 8,
  CPY: 9, CONT: 10, VIEW: 11, RESHAPE: 12, PERMUTE: 13, TRANSPOSE: 14, SET_ROWS: 15, UNARY: 16, GLU: 17,
  FLASH_ATTN_EXT: 18, ALL_REDUCE: 19,
} as const;
export type Op = (typeof Op)[keyof typeof Op];
export type OpName = keyof typeof Op;

export const UnaryOp = { SILU: 0, GELU: 1, RELU: 2 } as const;
export type UnaryOp = (typeof UnaryOp)[keyof typeof UnaryOp];
export const GluOp = { SWIGLU: 0, GEGLU: 1 } as const;
export type GluOp = (typeof GluOp)[keyof typeof GluOp];
export const RopeMode = { NORMAL: 0, NEOX: 2 } as const;
/** ALL_REDUCE's third parameter: sum the ranks' partials, gather their slices, or sum
 * into each rank only its own slice (reduce-scatter) */
export const CollectiveMode = { SUM: 0, GATHER: 1, REDUCE_SCATTER: 2 } as const;

export type OpGroup = "leaf" | "view" | "elementwise" | "row" | "matmul" | "copy" | "attention" | "collective";

export interface OpInfo {
  readonly group: OpGroup;
  /** number of tensor sources (min..max) */
  readonly srcs: readonly [number, number];
  /** writes into its first source's memory (result is a view of it) */
  readonly writesSource?: boolean;
  /** its kernels read each element of the first source before writing the same position,
   * so the allocator may give the result that source's memory */
  readonly inPlace?: boolean;
}

export const OPS = {
  NONE: { group: "leaf", srcs: [0, 0] },
  GET_ROWS: { group: "row", srcs: [2, 2] },
  MUL_MAT: { group: "matmul", srcs: [2, 2] },
  ADD: { group: "elementwise", srcs: [2, 2], inPlace: true },
  MUL: { group: "elementwise", srcs: [2, 2], inPlace: true },
  SCALE: { group: "elementwise", srcs: [1, 1], inPlace: true },
  RMS_NORM: { group: "row", srcs: [1, 1], inPlace: true },
  ROPE: { group: "row", srcs: [2, 2], inPlace: true },
  SOFT_MAX: { group: "row", srcs: [1, 2], inPlace: true },
  CPY: { group: "copy", srcs: [2, 2], writesSource: true },
  CONT: { group: "copy", srcs: [1, 1] },
  VIEW: { group: "view", srcs: [1, 1] },
  RESHAPE: { group: "view", srcs: [1, 1] },
  PERMUTE: { group: "view", srcs: [1, 1] },
  TRANSPOSE: { group: "view", srcs: [1, 1] },
  SET_ROWS: { group: "copy", srcs: [3, 3], writesSource: true },
  UNARY: { group: "elementwise", srcs: [1, 1], inPlace: true },
  GLU: { group: "elementwise", srcs: [1, 2], inPlace: true },
  FLASH_ATTN_EXT: { group: "attention", srcs: [3, 4] },
  ALL_REDUCE: { group: "collective", srcs: [1, 1], inPlace: true },
} as const satisfies Record<OpName, OpInfo>;

export const OP_NAMES: readonly OpName[] = Object.keys(Op) as OpName[];
export function opName(op: Op): OpName {
  return OP_NAMES[op]!;
}
export function opInfo(op: Op): OpInfo {
  return OPS[OP_NAMES[op]!];
}

const opsWhere = (f: (i: OpInfo) => boolean): ReadonlySet<Op> => new Set(OP_NAMES.filter((n) => f(OPS[n])).map((n) => Op[n]));
/** Ops whose result shares memory with a source (no compute, no allocation). */
export const VIEW_OPS = opsWhere((i) => i.group === "view");
/** Ops the allocator may run in place (result in the first source's memory). */
export const IN_PLACE_OPS = opsWhere((i) => i.inPlace === true);
