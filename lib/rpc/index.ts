/**
 * Remote devices (DESIGN §6): `addRpcServer("10.0.0.2:50052", { token })` connects to a
 * weft rpc-server and makes its devices available as rpc:0, rpc:1, … (in the order
 * servers are added and of each server's devices) to backend.device(), backend.meta()
 * and loadModel({ devices }).
 */
import { weftError } from "../core/errors.js";
import { RpcConnectOptions, RpcConnection } from "./client.js";
import { RpcDevice } from "./device.js";

export { RpcConnection, parseEndpoint, type RpcConnectOptions, type ServerInfo } from "./client.js";
export { RpcDevice, RpcBufferType, RpcBuffer, RpcTensors } from "./device.js";
export { RpcBackend } from "./backend.js";
export { startRpcServer, RpcServer, readToken, isLoopback, DEFAULT_RPC_PORT, type RpcServerOptions } from "./server.js";

const servers: Array<{ conn: RpcConnection; devices: RpcDevice[] }> = [];
const byName = new Map<string, RpcDevice>();

/**
 * Connects to an RPC server (once per endpoint) and returns its devices, named rpc:N in
 * the order servers were added. The token defaults to WEFT_RPC_TOKEN.
 */
export async function addRpcServer(endpoint: string, opts: RpcConnectOptions = {}): Promise<RpcDevice[]> {
  const known = servers.find((s) => s.conn.endpoint === endpoint);
  if (known) {
    if (known.conn.closed) await known.conn.reconnect(opts);
    return known.devices;
  }
  const conn = await RpcConnection.open(endpoint, opts);
  const devices = conn.info.devices.map((d) => {
    const dev = new RpcDevice(`rpc:${byName.size}`, conn, d.index, true);
    byName.set(dev.name, dev);
    return dev;
  });
  if (devices.length === 0) { conn.close(); throw weftError("BAD_ARGUMENT", `the RPC server ${endpoint} serves no devices`); }
  servers.push({ conn, devices });
  return devices;
}

/**
 * A session of its own with a server, outside the registry (a second client of the same
 * server in one process: tests, tools): its devices are named rpc@host:port/N.
 */
export async function openRpcServer(endpoint: string, opts: RpcConnectOptions = {}): Promise<RpcDevice[]> {
  const conn = await RpcConnection.open(endpoint, opts);
  return conn.info.devices.map((d) => new RpcDevice(`rpc@${endpoint}/${d.index}`, conn, d.index, true));
}

/** Every remote device added so far. */
export function rpcDevices(): RpcDevice[] { return [...byName.values()]; }

/** The remote device `rpc:N`. */
export function rpcDevice(name: string): RpcDevice {
  const m = /^rpc:(\d{1,4})$/.exec(name);
  const d = m ? byName.get(`rpc:${Number(m[1])}`) : undefined;
  if (d) return d;
  if (!m) throw weftError("BAD_ARGUMENT", `'${name}' is not a remote device name (rpc:0, rpc:1, …)`);
  throw weftError("BAD_ARGUMENT", byName.size
    ? `no device ${name}: the RPC servers added serve ${[...byName.keys()].join(", ")}`
    : `no device ${name}: no RPC server was added (--rpc host:port, or backend.addRpcServer)`);
}

/** Closes every connection (their servers free what this process held there). */
export function closeRpcServers(): void {
  for (const s of servers) s.conn.close();
  servers.length = 0;
  byName.clear();
}
