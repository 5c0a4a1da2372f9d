/**
 * Weight repacking for the CPU backend, as llama.cpp's CPU_REPACK buffers: Q4_0, Q8_0 and
 * Q4_K matrices are stored in eight-row groups (csrc/common.h block_q4_0x8, block_q8_0x8,
 * block_q4_Kx8), which one-token MUL_MAT reads with 1.5-1.8x the speed of row-by-row
 * products in cache (one scale conversion and FMA serve eight rows). A device offers this
 * memory as its weight buffer type (CpuDevice.weightBufferType): the loader places matrices
 * there and writing a matrix repacks it (RepackedBuffer); the native plan decoder lets
 * only MUL_MAT read such a tensor.
 */
import { Tensor } from "../core/tensor.js";
import { GgmlType } from "../core/types.js";

/** Types MUL_MAT can read repacked (csrc/common.h type_is_repackable). */
const REPACKABLE: ReadonlySet<GgmlType> = new Set([GgmlType.Q4_0, GgmlType.Q8_0, GgmlType.Q4_K]);

/** Bytes a repacked matrix takes (csrc/common.h repacked_row_bytes): Q4_K stores its
 * six-bit scales and mins as bytes, 148 bytes per row and super-block instead of 144. */
export function repackedBytes(t: Tensor): number {
  return t.type === GgmlType.Q4_K ? t.ne[1] * (t.ne[0] / 256) * 148 : t.nbytes;
}

/** A whole, non-empty 2-D matrix of a repackable type with a multiple of 8 rows. */
export function canRepack(t: Tensor): boolean {
  return REPACKABLE.has(t.type) && t.viewSrc === null && t.isContiguous && t.ne[1] % 8 === 0 && t.ne[1] > 0 && t.ne[0] > 0 &&
    t.ne[2] === 1 && t.ne[3] === 1;
}
