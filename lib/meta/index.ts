/** The meta backend (DESIGN §7): tensor parallelism over any devices. */
import { weftError } from "../core/errors.js";
import type { Device } from "../backend/interface.js";
import { device } from "../backend/registry.js";
import { MetaDevice, MetaOptions, metaDevice } from "./device.js";

export { MetaDevice, metaDevice, type MetaOptions, type AllReducePath } from "./device.js";
export { MetaBackend } from "./backend.js";
export { MetaBuffer, type Part } from "./buffer.js";

/**
 * A device from its command-line spelling: a name ("cpu:1") or a "+"-joined group, which is
 * one meta device over those devices ("cpu:0+cpu:1"); device objects pass through.
 */
export function deviceFromSpec(spec: string | Device, opts: MetaOptions = {}): Device {
  if (typeof spec !== "string") return spec;
  const names = spec.split("+").map((s) => s.trim());
  if (names.some((s) => !s)) throw weftError("BAD_ARGUMENT", `device '${spec}': an empty name in a + group`);
  return names.length === 1 ? device(names[0]!) : metaDevice(names.map(device), opts);
}

export function isMeta(d: Device): d is MetaDevice { return d instanceof MetaDevice; }
