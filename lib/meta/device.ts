/**
 * The meta device (DESIGN §7): a virtual device over several devices that behaves like
 * one. Its buffers own no memory: each device holds only its slices of the tensors placed
 * there (lib/meta/buffer.ts); its backend runs each graph as per-device graphs joined by
 * all-reduces (lib/meta/compile.ts, lib/meta/backend.ts). It talks to its devices only
 * through the backend interface, so any mix of devices works.
 */
import { weftError } from "../core/errors.js";
import { Op } from "../core/ops.js";
import { Tensor } from "../core/tensor.js";
import { ALL_REDUCE_TYPES, type AllReduceType, type Device, type DeviceCaps, type DeviceMemory } from "../backend/interface.js";
import { checkShares } from "../split/plan.js";
import type { SplitState } from "../split/state.js";
import { MetaBackend } from "./backend.js";
import { MetaBufferType } from "./buffer.js";

export type AllReducePath = "auto" | "collective" | "generic";

export interface MetaOptions {
  /** share of each device (default equal), honoured at the granularity the plan allows */
  tensorSplit?: readonly number[];
  /** states of the static tensors (weights, caches) placed on this device; where it
   * returns undefined, the placing code's plan decides (the model's: the LLaMA plan) */
  splitState?: (t: Tensor) => SplitState | undefined;
  /** how partial sums are combined: "collective" (every device runs the whole step with
   * ALL_REDUCE nodes; devices must share a communicator, e.g. CPU devices of one process),
   * "generic" (per-device subgraphs, partials exchanged with copies: any devices), or
   * "auto" (collective where possible; default) */
  allReduce?: AllReducePath;
  /** how partial sums cross a network on the collective path (RPC servers' peer links):
   * "f32" (exact; default), "f16" or "q8_0" (2× / 3.8× fewer bytes, rounded: see the
   * README); devices of one process exchange F32 whatever this says */
  allReduceType?: AllReduceType;
}

export class MetaDevice implements Device {
  readonly type = "META" as const;
  readonly caps: DeviceCaps;
  /** normalized shares, one per device */
  readonly shares: readonly number[];
  readonly allReduce: AllReducePath;
  readonly allReduceType: AllReduceType;
  readonly splitState?: (t: Tensor) => SplitState | undefined;
  readonly #bt: MetaBufferType;

  /** @internal use backend.meta() */
  constructor(readonly devices: readonly Device[], opts: MetaOptions = {}) {
    if (devices.length < 1) throw weftError("BAD_ARGUMENT", "a meta device needs at least one device");
    if (new Set(devices).size !== devices.length) throw weftError("BAD_ARGUMENT", `a device is listed twice in ${devices.map((d) => d.name).join("+")}`);
    for (const d of devices) if (d.type === "META") throw weftError("BAD_ARGUMENT", `${d.name} is a meta device: meta devices do not nest`);
    this.shares = checkShares(devices.length, opts.tensorSplit);
    this.allReduce = opts.allReduce ?? "auto";
    if (!["auto", "collective", "generic"].includes(this.allReduce))
      throw weftError("BAD_ARGUMENT", `allReduce must be auto, collective or generic, got '${this.allReduce}'`);
    this.allReduceType = opts.allReduceType ?? "f32";
    if (!ALL_REDUCE_TYPES.includes(this.allReduceType))
      throw weftError("BAD_ARGUMENT", `allReduceType must be f32, f16 or q8_0, got '${this.allReduceType}'`);
    this.splitState = opts.splitState;
    this.caps = { async: true, events: true, collectives: false };
    this.#bt = new MetaBufferType(this);
  }

  get name(): string { return this.devices.map((d) => d.name).join("+"); }
  get size(): number { return this.devices.length; }
  get description(): string {
    return `tensor-parallel over ${this.devices.map((d) => d.name).join(", ")} (shares ${this.shares.map((s) => s.toFixed(2)).join(":")})`;
  }
  memory(): DeviceMemory {
    return this.devices.reduce((m, d) => { const x = d.memory(); return { free: m.free + x.free, total: m.total + x.total }; }, { free: 0, total: 0 });
  }
  bufferType(): MetaBufferType { return this.#bt; }
  supportsOp(node: Tensor): boolean {
    return node.op !== Op.FLASH_ATTN_EXT && node.op !== Op.ALL_REDUCE && this.devices.every((d) => d.supportsOp(node));
  }
  initBackend(opts: { threads?: number } = {}): MetaBackend {
    return new MetaBackend(this, this.devices.map((d) => d.initBackend(opts)));
  }
}

const canonical = new Map<string, MetaDevice>();

/**
 * A meta device over `devices` (tensor parallelism). Without a custom splitState the
 * same devices and options give the same (canonical) object.
 */
export function metaDevice(devices: readonly Device[], opts: MetaOptions = {}): MetaDevice {
  if (opts.splitState) return new MetaDevice(devices, opts);
  const shares = checkShares(devices.length, opts.tensorSplit);
  const key = `${devices.map((d) => d.name).join("+")}|${shares.join(",")}|${opts.allReduce ?? "auto"}|${opts.allReduceType ?? "f32"}`;
  let m = canonical.get(key);
  if (!m || m.devices.some((d, i) => d !== devices[i])) { m = new MetaDevice(devices, opts); canonical.set(key, m); }
  return m;
}
