/**
 * Peer links (DESIGN §6, §7): the RPC servers of one meta device talk to each other, so a
 * tensor-parallel step is one COMPUTE per server and no partial sum passes through the
 * client. The client makes a group (RpcGroup): it tells every server its rank, the
 * servers' endpoints and a random session key (GROUP). Each server dials the servers of
 * lower rank (dialPeer: HELLO, AUTH with its own token — servers of one group share the
 * token their clients use — then PEER naming the key) and waits for those of higher rank
 * (PeerRendezvous). Once a link is up, its socket is handed to native code, which runs
 * the ALL_REDUCE nodes over it (csrc/peer.cpp); the JS thread no longer sees its bytes.
 */
import { BlockList, isIP, type Socket } from "node:net";
import { lookup } from "node:dns/promises";
import { randomBytes } from "node:crypto";
import { weftError, WeftError } from "../core/errors.js";
import type { AllReduceType, CollectiveGroup, Device } from "../backend/interface.js";
import type { Graph } from "../core/graph.js";
import { Op } from "../core/ops.js";
import { native } from "../cpu/index.js";
import { Writer } from "./protocol.js";
import { RpcConnection, parseEndpoint } from "./client.js";
import type { RpcDevice } from "./device.js";

/** How partial sums cross a peer link: as F32, F16 or Q8_0 blocks (csrc/peer.cpp WireType). */
export const WIRE: Record<AllReduceType, number> = { f32: 0, f16: 1, q8_0: 2 };

export const PEER_KEY_BYTES = 32;
/** most ranks in a group (the native group's limit) */
export const MAX_GROUP = 64;
/** how long a server waits for its peers to link up */
export const LINK_TIMEOUT_MS = 30_000;

/**
 * The descriptor behind a Node socket, duplicated for native code; nothing more is read
 * into JS (what comes next is the native side's). Destroying the Node socket afterwards
 * closes only Node's descriptor: the duplicate keeps the connection.
 */
export function takeSocket(sock: Socket): number {
  const handle = (sock as unknown as { _handle?: { fd?: number; readStop?: () => void } })._handle;
  handle?.readStop?.();
  return native().adoptPeerSocket(typeof handle?.fd === "number" ? handle.fd : -1);
}

/**
 * A server's side of a PEER request: the socket is taken over and offered to the group
 * that waits for it (or kept until that group's GROUP arrives, for LINK_TIMEOUT_MS).
 */
export class PeerRendezvous {
  readonly #slots = new Map<string, { fds: Map<number, number>; wake: (() => void) | null; since: number }>();

  #slot(key: string, rank: number) {
    const k = `${key}/${rank}`;
    let s = this.#slots.get(k);
    if (!s) {
      this.#sweep();
      if (this.#slots.size >= 256) throw weftError("RPC_LIMIT", "too many peer links waiting for their group");
      s = { fds: new Map(), wake: null, since: performance.now() };
      this.#slots.set(k, s);
    }
    return s;
  }
  /** links nobody claimed in time are closed */
  #sweep(): void {
    const now = performance.now();
    for (const [k, s] of this.#slots) {
      if (s.wake || now - s.since < 2 * LINK_TIMEOUT_MS) continue;
      for (const fd of s.fds.values()) native().closePeerSocket(fd);
      this.#slots.delete(k);
    }
  }

  /** checks a session key's length; throws what is wrong */
  static checkKey(key: Uint8Array): void {
    if (key.length !== PEER_KEY_BYTES) throw weftError("RPC_PROTOCOL", `a peer session key is ${PEER_KEY_BYTES} bytes, got ${key.length}`);
  }
  /** checks a PEER request's fields; throws what is wrong */
  static check(key: Uint8Array, from: number, to: number): void {
    PeerRendezvous.checkKey(key);
    if (!(to < from && from < MAX_GROUP)) throw weftError("BAD_ARGUMENT", `a peer of rank ${from} cannot link to rank ${to} (the higher rank dials the lower)`);
  }

  /** an adopted link from rank `from` to rank `to` of the group with this key */
  offer(key: string, to: number, from: number, fd: number): void {
    let s;
    try { s = this.#slot(key, to); } catch (e) { native().closePeerSocket(fd); throw e; }
    if (s.fds.has(from)) { native().closePeerSocket(fd); throw weftError("BAD_ARGUMENT", `rank ${from} already linked to rank ${to} of this group`); }
    s.fds.set(from, fd);
    s.wake?.();
  }

  /** waits for every rank in `from` to link to `rank`; resolves to their descriptors */
  async take(key: string, rank: number, from: readonly number[], timeoutMs: number): Promise<Map<number, number>> {
    const k = `${key}/${rank}`;
    const s = this.#slot(key, rank);
    const deadline = performance.now() + timeoutMs;
    try {
      while (!from.every((r) => s.fds.has(r))) {
        const left = deadline - performance.now();
        if (left <= 0) {
          const missing = from.filter((r) => !s.fds.has(r));
          throw weftError("RPC_CLOSED", `rank${missing.length > 1 ? "s" : ""} ${missing.join(", ")} did not link to this server within ${timeoutMs / 1000} s (can they reach it at the address the client uses?)`);
        }
        await new Promise<void>((resolve) => {
          const t = setTimeout(resolve, left);
          s.wake = () => { clearTimeout(t); resolve(); };
        });
        s.wake = null;
      }
      const out = new Map(s.fds);
      s.fds.clear();
      return out;
    } catch (e) {
      for (const fd of s.fds.values()) native().closePeerSocket(fd);
      throw e;
    } finally {
      this.#slots.delete(k);
    }
  }

  /** closes every link still waiting (the server stops) */
  close(): void {
    for (const s of this.#slots.values()) for (const fd of s.fds.values()) native().closePeerSocket(fd);
    this.#slots.clear();
  }
}

/** The networks `private` stands for: loopback, RFC 1918, CGNAT (Tailscale and the like), link-local, IPv6 ULA. */
const PRIVATE_NETS = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "::1/128", "fc00::/7", "fe80::/10"];

/**
 * The addresses a server may dial for its peer links (rpc-server --peer-allow). A client
 * names the endpoints of a group, so without a limit an authenticated client could make
 * the server open connections (and send a HELLO) anywhere it can reach. Entries: "private"
 * (the default), "any", an address or a subnet (10.0.0.0/24, fd00::/8). A name is resolved
 * before the check and the link goes to the address that was checked.
 */
export class PeerAllowList {
  readonly #nets = new BlockList();
  readonly any: boolean;
  constructor(readonly entries: readonly string[] = ["private"]) {
    if (entries.length === 0) throw weftError("BAD_ARGUMENT", "--peer-allow needs at least one entry (private, any, an address or a subnet)");
    this.any = entries.includes("any");
    for (const raw of entries) {
      const e = raw.trim();
      if (e === "any") continue;
      if (e === "private") { for (const n of PRIVATE_NETS) this.#addSubnet(n, raw); continue; }
      if (e.includes("/")) this.#addSubnet(e, raw);
      else if (isIP(e)) this.#nets.addAddress(e, isIP(e) === 6 ? "ipv6" : "ipv4");
      else throw weftError("BAD_ARGUMENT", `--peer-allow: '${raw}' is not private, any, an IP address or a subnet such as 10.0.0.0/24`);
    }
  }
  #addSubnet(net: string, raw: string): void {
    const [addr, bits] = net.split("/");
    const kind = isIP(addr ?? ""), prefix = Number(bits);
    if (!kind || !/^\d+$/.test(bits ?? "") || prefix > (kind === 6 ? 128 : 32))
      throw weftError("BAD_ARGUMENT", `--peer-allow: '${raw}' is not a subnet such as 10.0.0.0/24 or fd00::/8`);
    this.#nets.addSubnet(addr!, prefix, kind === 6 ? "ipv6" : "ipv4");
  }
  /** whether an IP address may be dialed (an IPv4-mapped IPv6 address counts as its IPv4 one) */
  allows(address: string): boolean {
    if (this.any) return true;
    const v4 = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address)?.[1];
    if (v4) return this.#nets.check(v4, "ipv4");
    const kind = isIP(address);
    return kind !== 0 && this.#nets.check(address, kind === 6 ? "ipv6" : "ipv4");
  }
  toString(): string { return this.entries.join(","); }
}

/**
 * Dials the server of a lower rank and links to it: its name resolved and checked against
 * the server's allow-list, then a client connection to that address (HELLO, and AUTH with
 * this server's token where it asks for one), then PEER; resolves to the adopted descriptor.
 */
export async function dialPeer(endpoint: string, token: string | null, key: Uint8Array, from: number, to: number, timeoutMs: number, self: Uint8Array, allow: PeerAllowList): Promise<number> {
  let conn: RpcConnection | null = null;
  try {
    const { host, port } = parseEndpoint(endpoint);
    let address: string;
    try { address = isIP(host) ? host : (await lookup(host)).address; } catch (e) {
      throw weftError("RPC_CLOSED", `cannot resolve ${host}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, e);
    }
    if (!allow.allows(address))
      throw weftError("RPC_AUTH", `${address} is outside this server's --peer-allow list (${allow}): start the server with --peer-allow naming that address or its subnet, or give the client --no-peer-links`);
    conn = await RpcConnection.open(isIP(address) === 6 ? `[${address}]:${port}` : `${address}:${port}`, { token, timeoutMs });
    await conn.request("PEER", new Writer().bytes(key).u32(from).u32(to).bytes(self).body());
    const sock = conn.detach();
    try { return takeSocket(sock); } finally { sock.destroy(); }
  } catch (e) {
    conn?.close();
    const err = e as WeftError;
    throw weftError(err.code === "RPC_AUTH" ? "RPC_AUTH" : "RPC_CLOSED", `linking to rank ${to} at ${endpoint}: ${err.message}`, e);
  }
}

let nextGroupId = 1;

/**
 * The client's handle on a group of servers (one RPC device per server, ranks in list
 * order). Every graph of a meta device shares one (links are made once, not per graph:
 * the servers run one client's steps in order, so the ranks meet the collectives in the
 * same order whatever graph they come from); it ends when its last graph is dropped, or
 * at its first failure.
 */
export class RpcGroup {
  readonly id = nextGroupId++;
  readonly size: number;
  #live = true;
  #refs = 0;
  /** resolves once every server has linked to the others (a graph naming the group is sent after it) */
  readonly ready: Promise<void>;
  linked = false;
  /** why linking failed (a graph naming the group is then refused with it, not sent) */
  failure: WeftError | null = null;
  constructor(readonly devices: readonly RpcDevice[], readonly wire: AllReduceType, readonly key: string) {
    this.size = devices.length;
    const secret = randomBytes(PEER_KEY_BYTES);
    const endpoints = devices.map((d) => d.conn.endpoint);
    this.ready = Promise.all(devices.map((d, rank) => {
      const w = new Writer().u32(this.id).u32(d.index).u32(rank).u32(this.size).u8(WIRE[wire]).bytes(secret);
      for (const e of endpoints) w.str(e);
      return d.conn.request("GROUP", w.body());
    })).then(() => { this.linked = true; }, (e: WeftError) => {
      // the servers that did link stop waiting for the others; the steps that name the group say why
      this.failure = e;
      this.#stop();
      throw e;
    });
    this.ready.catch(() => {});  // reported by the steps that use the group
    byId.set(this.id, this);
  }
  get live(): boolean { return this.#live && this.devices.every((d) => !d.conn.closed); }
  /** ends it on every server (a step waiting in it there fails at once) */
  end(): void {
    byId.delete(this.id);
    this.#stop();
  }
  /** ends it on the servers; a failed group stays known to its graphs (they are refused with its failure) until disposed */
  #stop(): void {
    if (!this.#live) return;
    this.#live = false;
    if (groups.get(this.key) === this) groups.delete(this.key);
    for (const d of this.devices) if (!d.conn.closed) d.conn.post("UNGROUP", new Writer().u32(this.id).body());
  }
  /** a reference for one compiled graph */
  handle(): CollectiveGroup {
    this.#refs++;
    let done = false;
    return {
      id: this.id, size: this.size,
      abort: () => this.end(),
      dispose: () => { if (!done) { done = true; if (--this.#refs === 0) this.end(); } },
    };
  }
}

const groups = new Map<string, RpcGroup>();
const byId = new Map<number, RpcGroup>();

/** The groups a graph's ALL_REDUCE nodes name that are still linking: it is sent once they have linked, or refused. */
export function groupsLinking(graph: Graph): RpcGroup[] {
  const out: RpcGroup[] = [];
  for (const t of graph.nodes) {
    if (t.op !== Op.ALL_REDUCE) continue;
    const g = byId.get(t.params[0]!);
    if (g && !g.linked && !out.includes(g)) out.push(g);
  }
  return out;
}

/** A group over `devices` where they are RPC devices of distinct servers, else null. */
export function rpcCollectiveGroup(devices: readonly Device[], isRpc: (d: Device) => d is RpcDevice, wire: AllReduceType = "f32"): CollectiveGroup | null {
  if (!devices.every(isRpc) || devices.length < 2 || devices.length > MAX_GROUP) return null;
  if (new Set(devices.map((d) => d.conn)).size !== devices.length) return null;  // two devices of one server: no link between them
  // one group per device list, wire type and connection sessions (a reconnect makes a new one)
  const key = `${devices.map((d) => `${d.name}@${d.conn.session}`).join("+")}|${wire}`;
  let g = groups.get(key);
  if (!g || !g.live) { g?.end(); g = new RpcGroup(devices, wire, key); groups.set(key, g); }
  return g.handle();
}
