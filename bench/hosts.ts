/**
 * bench/hosts: weft bench across emulated hosts. Loopback hides the network; this does
 * not. It makes N network namespaces ("hosts"), each joined to a bridge in this namespace
 * by a veth pair whose both ends are limited with `tc tbf` (default 1 Gbit/s), starts a
 * `weft rpc-server` (-t 1, with a token) in each, and puts a delay relay
 * (bench/delay-relay.c, compiled on first use) in front of every server: every byte
 * between any two parties — the client and a server, or two servers over their peer
 * links — crosses one relay, which holds it DELAY µs (default 100: 0.2 ms more round
 * trip; netem, the usual tool, is not in every kernel). The relay's own wake-ups add to
 * its delay, so by default it is calibrated: the delay is adjusted until the round trip a
 * PING measures through the relay exceeds the direct one by --added-rtt-ms (default 0.2).
 * Then it runs `weft bench --rpc …` with the arguments after `--`, and removes everything
 * it made, whatever happened.
 *
 *   sudo node dist/bench/hosts.js [--hosts 2] [--rate 1gbit] [--added-rtt-ms 0.2 | --delay-us N] -- \
 *     -m model.gguf -dev rpc:0 -dev rpc:0,rpc:1 -sm none,layer,tensor -p 128 -n 64 -r 3
 *
 * Needs root (ip netns, tc) and a C compiler. It prints the round trip it measured
 * directly and through a relay, so the table can say what the link really was.
 */
import { ChildProcess, spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { RpcConnection } from "../lib/rpc/client.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = join(ROOT, "bin/weft.js");

export interface HostsOptions {
  hosts?: number;
  /** tc tbf rate of every veth end (default "1gbit") */
  rate?: string;
  /** one-way delay the relay adds, µs (default 100) */
  delayUs?: number;
  /** instead: the round trip the relay should add, ms (the delay is calibrated to it) */
  addedRttMs?: number;
  /** extra rpc-server arguments */
  serverArgs?: string[];
  log?: (line: string) => void;
}

export interface Hosts {
  /** the relay's delay each way, µs, and the round trip it added as measured (ms) */
  delayUs: number;
  addedRttMs: number;
  directRttMs: number;
  /** what a client passes to --rpc: the relays in front of the servers */
  endpoints: string[];
  /** the servers' own addresses (inside their namespaces) */
  direct: string[];
  tokenFile: string;
  token: string;
  /** stops everything and removes what was made (idempotent) */
  close(): Promise<void>;
}

const sh = (cmd: string) => spawnSync("sh", ["-c", cmd], { encoding: "utf8" });
function must(cmd: string): void {
  const r = sh(cmd);
  if (r.status !== 0) throw new Error(`${cmd}: ${r.stderr.trim() || `exit ${r.status}`}`);
}

/** The relay binary (compiled into the temp folder from bench/delay-relay.c). */
function relayBinary(dir: string): string {
  const src = join(ROOT, "bench/delay-relay.c");
  const out = join(dir, "delay-relay");
  const cc = process.env.CC ?? "cc";
  const r = spawnSync(cc, ["-O2", "-o", out, src], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`compiling ${src} with ${cc} failed: ${r.stderr || r.error?.message}`);
  return out;
}

function waitFor(proc: ChildProcess, stream: "stdout" | "stderr", re: RegExp, what: string): Promise<RegExpExecArray> {
  return new Promise((res, rej) => {
    let text = "";
    const t = setTimeout(() => rej(new Error(`${what} did not start: ${text}`)), 20_000);
    proc[stream]!.on("data", (d) => { text += d; const m = re.exec(text); if (m) { clearTimeout(t); res(m); } });
    proc.on("exit", (c) => { clearTimeout(t); rej(new Error(`${what} exited (${c}): ${text}`)); });
  });
}

/**
 * Makes the hosts; throws (after removing what it made) where namespaces are not
 * permitted. Subnet 10.233.K.0/24 with K from this process's pid.
 */
export async function makeHosts(opts: HostsOptions = {}): Promise<Hosts> {
  const n = opts.hosts ?? 2, rate = opts.rate ?? "1gbit", delay = opts.delayUs ?? 100;
  const log = opts.log ?? (() => {});
  const tag = `${process.pid % 100000}`;
  const net = `10.233.${process.pid % 250}`;
  const bridge = `wbr${tag}`;
  const dir = mkdtempSync(join(tmpdir(), "weft-hosts-"));
  const procs: ChildProcess[] = [];
  const namespaces: string[] = [];
  let bridgeMade = false;
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    for (const p of procs) if (p.exitCode === null && p.signalCode === null) { p.kill("SIGKILL"); await new Promise((r) => p.once("exit", r)); }
    for (const ns of namespaces) sh(`ip netns del ${ns}`);
    if (bridgeMade) sh(`ip link del ${bridge}`);
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const relay = relayBinary(dir);
    const token = `hosts-${process.pid}-${Date.now()}`;
    const tokenFile = join(dir, "token");
    writeFileSync(tokenFile, token);
    must(`ip link add ${bridge} type bridge && ip addr add ${net}.1/24 dev ${bridge} && ip link set ${bridge} up`);
    bridgeMade = true;
    const direct: string[] = [];
    for (let i = 0; i < n; i++) {
      const ns = `weft-h${tag}-${i}`, a = `wh${tag}${i}a`, b = `wh${tag}${i}b`, ip = `${net}.${10 + i}`;
      must(`ip netns add ${ns}`);
      namespaces.push(ns);
      must(`ip link add ${a} type veth peer name ${b} && ip link set ${b} netns ${ns} && ip link set ${a} master ${bridge} && ip link set ${a} up`);
      must(`ip netns exec ${ns} ip addr add ${ip}/24 dev ${b} && ip netns exec ${ns} ip link set ${b} up && ip netns exec ${ns} ip link set lo up`);
      // both directions of the host's link limited (burst: a few GSO packets)
      must(`tc qdisc add dev ${a} root tbf rate ${rate} burst 256kb latency 20ms`);
      must(`ip netns exec ${ns} tc qdisc add dev ${b} root tbf rate ${rate} burst 256kb latency 20ms`);
      // hosts share no memory: the servers' partial sums must cross the emulated network,
      // not the shared mapping that servers on one machine use (they all see this /dev/shm)
      const srv = spawn("ip", ["netns", "exec", ns, process.execPath, BIN, "rpc-server", "--host", ip, "--port", "50052", "-t", "1", "--token-file", tokenFile, ...(opts.serverArgs ?? [])],
        { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, WEFT_PEER_SHM: "0" } });
      procs.push(srv);
      await waitFor(srv, "stderr", /listening on/, `rpc-server in ${ns}`);
      direct.push(`${ip}:50052`);
    }
    const endpoints = direct.map((_, i) => `${net}.1:${41000 + i}`);
    const startRelay = async (us: number) => {
      const r = spawn(relay, [String(us), ...direct.map((d, i) => `${endpoints[i]}=${d}`)], { stdio: ["ignore", "pipe", "pipe"] });
      procs.push(r);
      await waitFor(r, "stdout", /ready/, "the delay relay");
      return r;
    };
    let us = opts.addedRttMs !== undefined ? (opts.addedRttMs * 1000) / 2 : delay;
    let r = await startRelay(us);
    const directRtt = await pingMs(direct[0]!, token);
    let added = (await pingMs(endpoints[0]!, token)) - directRtt;
    // calibration: the relay's wake-ups add to its delay
    for (let i = 0; opts.addedRttMs !== undefined && i < 4 && Math.abs(added - opts.addedRttMs) > 0.02; i++) {
      us = Math.max(0, us + ((opts.addedRttMs - added) * 1000) / 2);
      r.kill("SIGKILL");
      await new Promise((res) => r.once("exit", res));
      r = await startRelay(us);
      added = (await pingMs(endpoints[0]!, token)) - directRtt;
    }
    log(`hosts: ${n} namespaces on bridge ${bridge} (${net}.0/24), links ${rate} each way, relay delay ${us.toFixed(0)} µs each way: ` +
      `PING ${directRtt.toFixed(3)} ms direct, +${added.toFixed(3)} ms through the relay`);
    return { endpoints, direct, tokenFile, token, delayUs: us, addedRttMs: added, directRttMs: directRtt, close };
  } catch (e) {
    await close();
    throw e;
  }
}

/** Median round trip of PING (a weft request, JS to JS) to an endpoint, ms. */
export async function pingMs(endpoint: string, token: string, count = 200): Promise<number> {
  const c = await RpcConnection.open(endpoint, { token });
  try {
    const ts: number[] = [];
    for (let i = 0; i < count; i++) { const t0 = performance.now(); await c.request("PING", new Uint8Array(0)); ts.push(performance.now() - t0); }
    ts.sort((a, b) => a - b);
    return ts[ts.length >> 1]!;
  } finally { c.close(); }
}

/**
 * This script's own options (each with a value) apart from weft bench's: everything else,
 * and all after a "--", goes to weft bench (npm run eats one "--", so
 * `npm run bench:hosts -- -m x.gguf` must reach the bench).
 */
export function splitHostsArgs(argv: readonly string[]): { own: Map<string, string>; benchArgs: string[]; help: boolean } {
  const OWN = new Set(["--hosts", "--rate", "--added-rtt-ms", "--delay-us"]);
  const own = new Map<string, string>(), benchArgs: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--") { benchArgs.push(...argv.slice(i + 1)); break; }
    if (a === "--help" || a === "-h") return { own, benchArgs, help: true };
    if (!OWN.has(a)) { benchArgs.push(a); continue; }
    if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
    own.set(a, argv[++i]!);
  }
  return { own, benchArgs, help: false };
}

async function main(argv: string[]): Promise<number> {
  let parsed: ReturnType<typeof splitHostsArgs>;
  try { parsed = splitHostsArgs(argv); } catch (e) { console.error(`bench/hosts: ${(e as Error).message}`); return 2; }
  const { own, benchArgs, help } = parsed;
  if (help) {
    console.log("usage: node dist/bench/hosts.js [--hosts 2] [--rate 1gbit] [--added-rtt-ms 0.2 | --delay-us N] [WEFT_BENCH_ARGS…]\n" +
      "(needs root: ip netns, tc; and a C compiler for the delay relay). Other arguments go to weft bench, which gets --rpc and --token-file");
    return 0;
  }
  const opt = (name: string) => own.get(name);
  if (sh("ip netns list").status !== 0 || (process.getuid && process.getuid() !== 0)) {
    console.error("bench/hosts needs root and iproute2 (ip netns, tc): run it with sudo");
    return 2;
  }
  const delayUs = opt("--delay-us");
  const hosts = await makeHosts({
    hosts: Number(opt("--hosts") ?? 2), rate: opt("--rate") ?? "1gbit", log: (l) => console.error(l),
    ...(delayUs !== undefined ? { delayUs: Number(delayUs) } : { addedRttMs: Number(opt("--added-rtt-ms") ?? 0.2) }),
  });
  const stop = () => { void hosts.close().then(() => process.exit(130)); };
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
  try {
    const args = benchArgs.length ? benchArgs : ["-dev", "rpc:0", "-dev", "rpc:0,rpc:1", "-sm", "none,layer,tensor", "-p", "128", "-n", "64", "-r", "3"];
    const b = spawn(process.execPath, [BIN, "bench", "--rpc", hosts.endpoints.join(","), "--token-file", hosts.tokenFile, ...args], { stdio: "inherit" });
    return await new Promise<number>((r) => b.on("exit", (c) => r(c ?? 1)));
  } finally {
    await hosts.close();
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).then((c) => { process.exitCode = c; }, (e) => { console.error(`bench/hosts: ${(e as Error).message}`); process.exitCode = 1; });
}

