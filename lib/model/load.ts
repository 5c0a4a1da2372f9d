/**
 * Weights onto a device, through the backend interface. Where the device's memory can map
 * the file (host memory), a tensor is used where it lies in the file, without a copy,
 * unless the device keeps matrices in a faster layout of its own (the CPU's repacked
 * groups); everything else is allocated on the device (allocateWeights: a meta device
 * gives each of its devices its slices) and written from the file, a tensor at a time,
 * with progress.
 */
import { closeSync, openSync, readSync } from "node:fs";
import { weftError } from "../core/errors.js";
import { Tensor } from "../core/tensor.js";
import type { Buffer, Device } from "../backend/interface.js";
import { BufferUsage } from "../backend/interface.js";
import { allocateWeights, weightMemory } from "../backend/alloc.js";
import { canMapFiles, mapFile, setTensorData } from "../backend/fallback.js";
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

/** Reads a tensor's bytes from the file. */
function readTensor(fd: number, file: GgufFile, info: GgufTensorInfo): Uint8Array {
  const out = Buffer.allocUnsafe(info.nbytes);
  let got = 0;
  while (got < info.nbytes) {
    const r = readSync(fd, out, got, info.nbytes - got, file.dataOffset + info.offset + got);
    if (r <= 0) throw weftError("BAD_GGUF", `${file.path}: tensor '${info.name}' ends past the end of the file`);
    got += r;
  }
  return out;
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
  let fd = -1;
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
      fd = openSync(file.path, "r");
      for (const { t, info } of upload) {
        setTensorData(t, readTensor(fd, file, info));
        await step(info.nbytes);
      }
    }
    return { buffers, used };
  } catch (e) {
    for (const b of buffers) b.dispose();
    throw e;
  } finally {
    if (fd >= 0) closeSync(fd);
  }
}
