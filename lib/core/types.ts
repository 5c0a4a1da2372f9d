import { weftError } from "./errors.js";

/** Tensor element types. Ids equal GGUF's / ggml's. */
export const GgmlType = {
  F32: 0, F16: 1, Q4_0: 2, Q8_0: 8, Q4_K: 12, Q6_K: 14, Q8_K: 15,
  I8: 24, I16: 25, I32: 26, I64: 27, F64: 28, BF16: 30,
} as const;
export type GgmlType = (typeof GgmlType)[keyof typeof GgmlType];

export interface TypeTraits {
  readonly name: string;
  /** elements per block (1 for plain types) */
  readonly blockSize: number;
  /** bytes per block */
  readonly typeSize: number;
  readonly quantized: boolean;
  /** may hold model weights (GGUF tensors weft loads) */
  readonly weight: boolean;
}

export const TYPES: Readonly<Record<GgmlType, TypeTraits>> = {
  [GgmlType.F32]: { name: "f32", blockSize: 1, typeSize: 4, quantized: false, weight: true },
  [GgmlType.F16]: { name: "f16", blockSize: 1, typeSize: 2, quantized: false, weight: true },
  [GgmlType.BF16]: { name: "bf16", blockSize: 1, typeSize: 2, quantized: false, weight: true },
  [GgmlType.Q4_0]: { name: "q4_0", blockSize: 32, typeSize: 18, quantized: true, weight: true },
  [GgmlType.Q8_0]: { name: "q8_0", blockSize: 32, typeSize: 34, quantized: true, weight: true },
  [GgmlType.Q4_K]: { name: "q4_K", blockSize: 256, typeSize: 144, quantized: true, weight: true },
  [GgmlType.Q6_K]: { name: "q6_K", blockSize: 256, typeSize: 210, quantized: true, weight: true },
  // Q8_K is internal: the activation format of K-quant dot products, never in a file.
  [GgmlType.Q8_K]: { name: "q8_K", blockSize: 256, typeSize: 292, quantized: true, weight: false },
  [GgmlType.I8]: { name: "i8", blockSize: 1, typeSize: 1, quantized: false, weight: false },
  [GgmlType.I16]: { name: "i16", blockSize: 1, typeSize: 2, quantized: false, weight: false },
  [GgmlType.I32]: { name: "i32", blockSize: 1, typeSize: 4, quantized: false, weight: false },
  [GgmlType.I64]: { name: "i64", blockSize: 1, typeSize: 8, quantized: false, weight: false },
  [GgmlType.F64]: { name: "f64", blockSize: 1, typeSize: 8, quantized: false, weight: false },
};

/**
 * Every tensor type a GGUF file may hold (ggml's type table: id → name, elements per block,
 * bytes per block), weft's own and the ones it cannot run, so that any file can be read,
 * listed and refused by name. Only TYPES' types are computed with.
 */
export const GGML_TYPES: Readonly<Record<number, { name: string; blockSize: number; typeSize: number }>> = {
  0: { name: "f32", blockSize: 1, typeSize: 4 }, 1: { name: "f16", blockSize: 1, typeSize: 2 },
  2: { name: "q4_0", blockSize: 32, typeSize: 18 }, 3: { name: "q4_1", blockSize: 32, typeSize: 20 },
  6: { name: "q5_0", blockSize: 32, typeSize: 22 }, 7: { name: "q5_1", blockSize: 32, typeSize: 24 },
  8: { name: "q8_0", blockSize: 32, typeSize: 34 }, 9: { name: "q8_1", blockSize: 32, typeSize: 36 },
  10: { name: "q2_K", blockSize: 256, typeSize: 84 }, 11: { name: "q3_K", blockSize: 256, typeSize: 110 },
  12: { name: "q4_K", blockSize: 256, typeSize: 144 }, 13: { name: "q5_K", blockSize: 256, typeSize: 176 },
  14: { name: "q6_K", blockSize: 256, typeSize: 210 }, 15: { name: "q8_K", blockSize: 256, typeSize: 292 },
  16: { name: "iq2_xxs", blockSize: 256, typeSize: 66 }, 17: { name: "iq2_xs", blockSize: 256, typeSize: 74 },
  18: { name: "iq3_xxs", blockSize: 256, typeSize: 98 }, 19: { name: "iq1_s", blockSize: 256, typeSize: 50 },
  20: { name: "iq4_nl", blockSize: 32, typeSize: 18 }, 21: { name: "iq3_s", blockSize: 256, typeSize: 110 },
  22: { name: "iq2_s", blockSize: 256, typeSize: 82 }, 23: { name: "iq4_xs", blockSize: 256, typeSize: 136 },
  24: { name: "i8", blockSize: 1, typeSize: 1 }, 25: { name: "i16", blockSize: 1, typeSize: 2 },
  26: { name: "i32", blockSize: 1, typeSize: 4 }, 27: { name: "i64", blockSize: 1, typeSize: 8 },
  28: { name: "f64", blockSize: 1, typeSize: 8 }, 29: { name: "iq1_m", blockSize: 256, typeSize: 56 },
  30: { name: "bf16", blockSize: 1, typeSize: 2 }, 34: { name: "tq1_0", blockSize: 256, typeSize: 54 },
  35: { name: "tq2_0", blockSize: 256, typeSize: 66 }, 39: { name: "mxfp4", blockSize: 32, typeSize: 17 },
};

/** A type's name as llama.cpp prints it (Q5_K, IQ4_XS, BF16), or "type N" for an id ggml does not know. */
export function typeName(t: number): string {
  const g = GGML_TYPES[t];
  return g ? g.name.toUpperCase() : `type ${t}`;
}

export function isKnownType(t: number): t is GgmlType {
  return Object.prototype.hasOwnProperty.call(TYPES, t);
}

export function typeTraits(t: number): TypeTraits {
  const tr = (TYPES as Record<number, TypeTraits>)[t];
  if (!tr) throw weftError("UNSUPPORTED_TYPE", `tensor type ${typeName(t)} is not supported (weft computes with ${Object.values(TYPES).filter((x) => x.weight).map((x) => x.name.toUpperCase()).join(", ")})`);
  return tr;
}

export function typeByName(name: string): GgmlType | undefined {
  const n = name.toLowerCase();
  for (const [id, tr] of Object.entries(TYPES)) if (tr.name.toLowerCase() === n) return Number(id) as GgmlType;
  return undefined;
}

/** Bytes of one row of n elements (n must be a multiple of the block size). */
export function rowSize(t: GgmlType, n: number): number {
  const tr = TYPES[t];
  return (n / tr.blockSize) * tr.typeSize;
}
