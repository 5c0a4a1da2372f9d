/** The whole native surface (build/Release/weft.node), typed in one place. */
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { dirname, resolve } from "node:path";
import { weftError } from "../core/errors.js";
import { OP_NAMES } from "../core/ops.js";
import { PLAN_LAYOUT } from "./layout.js";

export interface NativeContext { readonly __brand: "NativeContext" }
export interface NativeLane { readonly __brand: "NativeLane" }
/** a lane's event: 0 a frame for JS (kind, cmd, id, body), 1 the connection is gone (why), 2 a malformed stream (what) */
export type LaneListener = (type: number, kind: number, cmd: number, id: number, body: Buffer | string) => void;

export interface NativeAddon {
  bufferAlloc(size: number): number;
  bufferFree(id: number): void;
  /** buffers alive now (allocations and mappings, including ones freed while a run still uses them) */
  bufferStats(): { count: number; bytes: number };
  /** reads bytes [fileOffset, +length) of a file into a buffer at offset (any layout) */
  bufferLoadFile(id: number, offset: number, path: string, fileOffset: number, length: number): void;
  bufferSet(id: number, offset: number, data: Uint8Array): void;
  bufferGet(id: number, offset: number, length: number, into?: Uint8Array): Uint8Array;
  bufferFill(id: number, offset: number, length: number, value: number): void;
  /** reads one byte per page (prefaults a mapping); returns a checksum */
  bufferTouch(id: number, offset: number, length: number): number;
  /** with WEFT_PROFILE=1: time per op ("MUL_MAT/<weight type id>" → [ms, calls]); true resets */
  profileReport(reset?: boolean): Record<string, [number, number]>;
  bufferCopy(srcId: number, srcOffset: number, dstId: number, dstOffset: number, length: number): void;
  /** `rows` (a multiple of 8) weight rows of n elements, srcStride bytes apart, from a
   * buffer (id) or bytes, into eight-row repacked groups */
  repackRows(type: number, src: number | Uint8Array, srcOffset: number, srcStride: number, dstId: number, dstOffset: number, n: number, rows: number): void;
  /** read-only private mapping of a whole file */
  mapFile(path: string): { id: number; size: number };
  createContext(threads: number): NativeContext;
  /**
   * runs the cached plan for uid (pass the encoded plan the first time), after each
   * [otherContext, n] in `waits` has completed n computes (waited on the worker thread)
   */
  compute(ctx: NativeContext, uid: number, plan?: Float64Array, waits?: Array<[NativeContext, number]>): Promise<void>;
  forgetPlan(ctx: NativeContext, uid: number): void;
  /** a communicator for n CPU devices of this process (ALL_REDUCE nodes name its id) */
  createGroup(n: number): number;
  /** fails whatever waits in the group (with `why`) and forgets it */
  destroyGroup(id: number, why?: string): void;
  /** a private duplicate of a connected socket's descriptor (peer links; the caller then closes its own) */
  adoptPeerSocket(fd: number): number;
  closePeerSocket(fd: number): void;
  /** a group whose other ranks are processes behind the adopted sockets (fds[self] = -1; it owns them
   * from here); wire: 0 F32, 1 F16, 2 Q8_0 partial sums */
  createPeerGroup(size: number, self: number, fds: readonly number[], wire: number, sharedMemory: boolean): number;
  /** how a peer group's parts travel: "pending" until its first collective (null: no such group) */
  peerGroupTransport(id: number): "pending" | "tcp" | "shared memory" | null;
  /**
   * An RPC server session's native lane (csrc/lane.cpp): takes a duplicate of the socket
   * `fd` (the caller closes its own handle) and serves the repeated steps on a thread of
   * its own; other frames reach `listener`, which must not throw.
   */
  laneOpen(fd: number, maxFrame: number, listener: LaneListener): NativeLane;
  /** queues one whole frame (its parts) for the client */
  laneSend(lane: NativeLane, parts: readonly Uint8Array[]): void;
  /** a forwarded frame of `bytes` body bytes is finished (answered) */
  laneDone(lane: NativeLane, bytes: number): void;
  /** the client's graph gid (this context's plan uid) may run on the lane; false: no plan cached */
  laneBindGraph(lane: NativeLane, gid: number, ctx: NativeContext, uid: number, device: number): boolean;
  laneUnbindGraph(lane: NativeLane, gid: number): void;
  /** the client's plain buffer id is native buffer nativeId (-1: no longer) */
  laneBindBuffer(lane: NativeLane, id: number, nativeId: number): void;
  /** whether a step runs on the lane now (its client is owed heartbeats) */
  laneBusy(lane: NativeLane): boolean;
  /** closes the connection (graceful: once what is queued is sent); event 1 follows */
  laneClose(lane: NativeLane, graceful: boolean): void;
  /** op names in id order (must equal lib/core/ops.ts) */
  readonly opNames: readonly string[];
  /** the plan record layout (must equal lib/cpu/layout.ts) */
  readonly planLayout: Readonly<Record<string, number>>;
  /** joins the context's threads and frees its plans now (not at GC); later computes fail */
  destroyContext(ctx: NativeContext): void;
  /** wakes the context's sleeping worker threads (work is about to arrive) */
  wake(ctx: NativeContext): void;
  /** rows are split across `threads` (default: all cores); the bytes do not depend on it */
  quantize(type: number, src: Float32Array, nPerRow: number, threads?: number): Uint8Array;
  dequantize(type: number, src: Uint8Array, n: number): Float32Array;
  /**
   * get (and with an argument, force) the kernel level: 0 scalar, 1 AVX2, 2 AVX-512 VNNI;
   * bf16: the level also uses AVX512-BF16, so BF16 weights meet activations rounded to BF16
   */
  kernelLevel(force?: number): { current: number; detected: number; bf16: boolean };
  readBandwidth(bytes: number, threads: number, reps: number): number;
}

export const KERNEL_LEVELS = ["scalar", "avx2", "avx512"] as const;

let addon: NativeAddon | null = null;

export function native(): NativeAddon {
  if (addon) return addon;
  const here = dirname(fileURLToPath(import.meta.url));
  // WEFT_NATIVE_ADDON: another build of the addon (the tests' AVX-512-emulated one)
  const path = process.env.WEFT_NATIVE_ADDON ? resolve(process.env.WEFT_NATIVE_ADDON) : resolve(here, "../../../build/Release/weft.node");
  let loaded: NativeAddon;
  try {
    loaded = createRequire(import.meta.url)(path) as NativeAddon;
  } catch (e) {
    throw weftError("NATIVE_MISSING", `the native CPU backend is not built (${path}); run "npm run build" or reinstall`, e);
  }
  // the op table and plan layout are defined in TS; an addon built from other sources is refused
  if (loaded.opNames?.join(",") !== OP_NAMES.join(","))
    throw weftError("NATIVE_MISSING", `the native addon at ${path} has ops [${loaded.opNames?.join(", ")}], not lib/core/ops.ts's [${OP_NAMES.join(", ")}]; rebuild it (npm run build)`);
  for (const [k, v] of Object.entries(PLAN_LAYOUT))
    if (loaded.planLayout?.[k] !== v)
      throw weftError("NATIVE_MISSING", `the native addon at ${path} lays out plans differently (${k} = ${loaded.planLayout?.[k]}, lib/cpu/layout.ts says ${v}); rebuild it (npm run build)`);
  addon = loaded;
  const forced = process.env.WEFT_CPU_KERNELS;
  if (forced) {
    const lvl = KERNEL_LEVELS.indexOf(forced as (typeof KERNEL_LEVELS)[number]);
    if (lvl < 0) throw weftError("BAD_ARGUMENT", `WEFT_CPU_KERNELS must be one of ${KERNEL_LEVELS.join(", ")}`);
    addon.kernelLevel(lvl);
  }
  return addon;
}
