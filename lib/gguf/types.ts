/** GGUF metadata value types (spec ids). */
export const GgufValueType = {
  UINT8: 0, INT8: 1, UINT16: 2, INT16: 3, UINT32: 4, INT32: 5, FLOAT32: 6, BOOL: 7, STRING: 8, ARRAY: 9,
  UINT64: 10, INT64: 11, FLOAT64: 12,
} as const;
export type GgufValueType = (typeof GgufValueType)[keyof typeof GgufValueType];

/** fixed byte size of scalar value types (strings and arrays are variable) */
export const SCALAR_SIZE: Partial<Record<GgufValueType, number>> = {
  0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8,
};

export type GgufScalar = number | bigint | boolean | string;
export type GgufArray =
  | { elemType: GgufValueType; values: readonly GgufScalar[] | ArrayLike<number> }
  | { elemType: typeof GgufValueType.ARRAY; values: readonly GgufArray[] };

export type GgufValue =
  | { type: Exclude<GgufValueType, typeof GgufValueType.ARRAY>; value: GgufScalar }
  | { type: typeof GgufValueType.ARRAY; value: GgufArray };

export interface GgufTensorInfo {
  name: string;
  type: number;
  /** elements per dim, dim 0 fastest (1 to 4 dims as stored) */
  ne: number[];
  /** offset inside the data section */
  offset: number;
  nbytes: number;
}

export interface GgufFile {
  path: string;
  version: number;
  fileSize: number;
  alignment: number;
  /** absolute file offset of the tensor data section */
  dataOffset: number;
  metadata: Map<string, GgufValue>;
  tensors: GgufTensorInfo[];
}

export const GGUF_MAGIC = 0x46554747; // "GGUF" little-endian
export const GGUF_DEFAULT_ALIGNMENT = 32;
