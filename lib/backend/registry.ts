/**
 * The registry of devices (DESIGN §2): `device(name)` and `devices()`. Each kind of device
 * is one entry of KINDS, keyed by the prefix of its names. The CPU backend (lib/cpu) is
 * always there: it is the fallback for ops other devices refuse. Kinds with costly
 * dependencies (RPC sockets, CUDA through FFI) are loaded with import() when first asked
 * for, never at startup.
 */
import { weftError } from "../core/errors.js";
import { cpuDevice, cpuDevices } from "../cpu/index.js";
import { Device } from "./interface.js";

interface DeviceKind {
  /** devices of this kind that exist now */
  list(): Device[];
  /** the canonical device of that name (throws a WeftError naming what is available) */
  get(name: string): Device;
}

const KINDS: Record<string, DeviceKind> = {
  cpu: { list: cpuDevices, get: (name) => cpuDevice(name) },
};

/** Every device weft can use now (more appear as RPC servers are added). */
export function devices(): Device[] {
  return Object.values(KINDS).flatMap((k) => k.list());
}

/** The canonical device named `name` ("cpu:0", "cpu:1", …). */
export function device(name: string): Device {
  const kind = KINDS[name.split(":")[0]!.toLowerCase()];
  if (!kind) {
    throw weftError("BAD_ARGUMENT", `unknown device '${name}': this build has ${Object.keys(KINDS).map((k) => `${k}:N`).join(", ")} devices` +
      ` (weft devices lists them; CUDA and RPC devices are not available yet)`);
  }
  return kind.get(name);
}
