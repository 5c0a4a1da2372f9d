/**
 * Weight repacking for the CPU backend, as llama.cpp's CPU_REPACK buffers: Q4_0, Q8_0 and
 * Q4_K matrices are copied once, at load, into eight-row groups (csrc/common.h
 * block_q4_0x8, block_q8_0x8, block_q4_Kx8), which one-token MUL_MAT reads with 1.5-1.8x
 * the speed of row-by-row products in cache (one scale conversion and FMA serve eight rows).
 * A repacked tensor lives in a buffer flagged `repacked`; the native plan decoder lets
 * only MUL_MAT read it, and setTensorData/getTensorData refuse it.
 */
import { Tensor } from "../core/tensor.js";
import { GgmlType } from "../core/types.js";
import { CpuBuffer, alignUp, tensorLocation } from "./buffer.js";
import { fromNative } from "../core/errors.js";
import { native } from "./native.js";

/** Types MUL_MAT can read repacked (csrc/common.h type_is_repackable). */
const REPACKABLE: ReadonlySet<GgmlType> = new Set([GgmlType.Q4_0, GgmlType.Q8_0, GgmlType.Q4_K]);

/** Bytes a repacked matrix takes (csrc/common.h repacked_row_bytes): Q4_K stores its
 * six-bit scales and mins as bytes, 148 bytes per row and super-block instead of 144. */
export function repackedBytes(t: Tensor): number {
  return t.type === GgmlType.Q4_K ? t.ne[1] * (t.ne[0] / 256) * 148 : t.nbytes;
}

/** A whole 2-D matrix of a repackable type, a multiple of 8 rows, placed in a CPU buffer. */
export function canRepack(t: Tensor): boolean {
  return REPACKABLE.has(t.type) && t.viewSrc === null && t.isContiguous && t.ne[1] % 8 === 0 && t.ne[1] > 0 &&
    t.ne[2] === 1 && t.ne[3] === 1 && t.buffer instanceof CpuBuffer && !t.buffer.repacked;
}

export interface RepackProgress { loaded: number; total: number }

/**
 * Moves every repackable tensor of `tensors` into one new repacked buffer made by `alloc`
 * (a device's memory), converting as it goes; the others stay where they are. Returns the
 * buffer, or null when no tensor qualifies. `step` runs after each tensor (progress; it
 * may throw to stop, e.g. on abort: the new buffer is then freed and nothing has moved).
 */
export async function repackWeights(tensors: Iterable<Tensor>, alloc: (size: number) => CpuBuffer,
  step?: (p: RepackProgress) => void | Promise<void>): Promise<CpuBuffer | null> {
  const todo = [...new Set(tensors)].filter(canRepack);
  if (!todo.length) return null;
  const offsets: number[] = [];
  let size = 0;
  for (const t of todo) { offsets.push(size); size = alignUp(size + repackedBytes(t)); }
  const total = todo.reduce((n, t) => n + repackedBytes(t), 0);
  const buf = alloc(size);
  try {
    let done = 0;
    for (const [i, t] of todo.entries()) {
      const src = tensorLocation(t);
      try { native().repackRows(t.type, src.buffer.id, src.offset, t.nb[1], buf.id, offsets[i]!, t.ne[0], t.ne[1]); }
      catch (e) { throw fromNative(e); }
      done += repackedBytes(t);
      await step?.({ loaded: done, total });
    }
  } catch (e) {
    buf.dispose();
    throw e;
  }
  todo.forEach((t, i) => { t.buffer = buf; t.offset = offsets[i]!; });
  return buf;
}
