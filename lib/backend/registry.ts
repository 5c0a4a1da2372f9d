/**
 * The registry of devices (DESIGN §2): `device(name)` and `devices()`. Each kind of device
 * is one entry of KINDS, keyed by the prefix of its names. The CPU backend (lib/cpu) is
 * always there: it is the fallback for ops other devices refuse. Remote devices appear
 * as RPC servers are added (lib/rpc: addRpcServer).
 */
import { weftError } from "../core/errors.js";
import { cpuDevice, cpuDevices } from "../cpu/index.js";
import { rpcDevice, rpcDevices } from "../rpc/index.js";
import { Device } from "./interface.js";

interface DeviceKind {
  /** devices of this kind that exist now */
  list(): Device[];
  /** the canonical device of that name (throws a WeftError naming what is available) */
  get(name: string): Device;
}

const KINDS: Record<string, DeviceKind> = {
  cpu: { list: cpuDevices, get: (name) => cpuDevice(name) },
  rpc: { list: rpcDevices, get: rpcDevice },
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
      ` (weft devices lists them; CUDA devices are not available yet)`);
  }
  return kind.get(name);
}
