/**
 * Weights onto a device, through the backend interface. Where the device's memory can map
 * the file (host memory), a tensor is used where it lies in the file, without a copy,
 * unless the device keeps matrices in a faster layout of its own (the CPU's repacked
 * groups); everything else is allocated on the device (allocateWeights: a meta device
 * gives each of its devices its slices) and written from the file, a tensor at a time,
 * with progress.
 */
import { Tensor } from "../core/tensor.js";
import type { Buffer, Device, FileTensor } from "../backend/interface.js";
import { BufferUsage } from "../backend/interface.js";
import { allocateWeights, weightMemory } from "../backend/alloc.js";
import { canMapFiles, loadFromFile, mapFile, tensorPlace } from "../backend/fallback.js";
import type { GgufFile, GgufTensorInfo } from "../gguf/types.js";
import type { SplitState } from "../split/state.js";

export interface PlacedWeight { readonly t: Tensor; readonly info: GgufTensorInfo }

export interface PlaceOptions {
  /** matrices only MUL_MAT reads (candidates for the device's weight layout) */
  matmul: ReadonlySet<Tensor>;
  /** use the device's weight layout where it has one (false: rows as in the file) */
  repack: boolean;
  /** states of the static tensors, for a meta device */
  splitState?: (t: Tensor) => SplitState | undefined;
}

/** Whether a weight is copied onto the device (else it is used in the mapped file). */
export function isUploaded(dev: Device, t: Tensor, opts: PlaceOptions): boolean {
  if (!canMapFiles(dev.bufferType())) return true;
  return opts.repack && opts.matmul.has(t) && weightMemory(dev, t) !== dev.bufferType();
}

/** What a device holds for its weights: buffers, and how many bytes of each it uses (a
 * mapped file is counted by the tensors read from it, not its whole size). */
export interface DeviceWeights { readonly buffers: Buffer[]; readonly used: Map<Buffer, number> }

/**
 * Places `weights` on `dev` and fills them from the file; `step` runs after each uploaded
 * tensor with its bytes (progress; it may throw to stop, e.g. on abort: what was made is
 * freed).
 */
export async function placeWeights(dev: Device, weights: readonly PlacedWeight[], file: GgufFile, opts: PlaceOptions,
  step: (bytes: number) => Promise<void>): Promise<DeviceWeights> {
  const buffers: Buffer[] = [];
  const used = new Map<Buffer, number>();
  const upload = weights.filter((w) => isUploaded(dev, w.t, opts));
  const mapped = weights.filter((w) => !isUploaded(dev, w.t, opts));
  try {
    if (mapped.length) {
      const m = mapFile(dev.bufferType(), file.path);
      m.usage = BufferUsage.WEIGHTS;
      buffers.push(m);
      const seen = new Set<string>();
      for (const { t, info } of mapped) {
        t.buffer = m;
        t.offset = file.dataOffset + info.offset;
        if (!seen.has(info.name)) { seen.add(info.name); used.set(m, (used.get(m) ?? 0) + info.nbytes); }  // a tied head reads the embedding's bytes
      }
    }
    if (upload.length) {
      buffers.push(...allocateWeights(dev, upload.map((w) => w.t), {
        matmulWeights: opts.repack ? opts.matmul : undefined,
        splitState: opts.splitState ? (t) => opts.splitState!(t) : undefined,
      }));
      // per buffer, so that a device that can find the bytes itself (a remote server) does
      const byBuffer = new Map<Buffer, FileTensor[]>();
      for (const { t, info } of upload) {
        const b = tensorPlace(t).buffer;
        byBuffer.set(b, [...(byBuffer.get(b) ?? []), { t, offset: file.dataOffset + info.offset, size: info.nbytes }]);
      }
      for (const [b, ts] of byBuffer) await loadFromFile(b, file.path, ts, step);
    }
    return { buffers, used };
  } catch (e) {
    for (const b of buffers) b.dispose();
    throw e;
  }
}
