/** The CPU backend (DESIGN §3): what the registry and the rest of weft use of it. */
export { CpuDevice, CpuBufferType, CpuRepackBufferType, cpuDevice, cpuDevices, type CpuDeviceOptions } from "./device.js";
export { CpuBackend } from "./backend.js";
export { CpuBuffer } from "./buffer.js";
export { usableCores } from "./cores.js";
export { native, KERNEL_LEVELS } from "./native.js";
