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

export function isKnownType(t: number): t is GgmlType {
  return Object.prototype.hasOwnProperty.call(TYPES, t);
}

export function typeTraits(t: number): TypeTraits {
  const tr = (TYPES as Record<number, TypeTraits>)[t];
  if (!tr) throw new Error(`unknown tensor type id ${t}`);
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
