/** `weft rpc-server`: serve this machine's devices to weft clients on other machines. */
import { weftError } from "../core/errors.js";
import { usableCores } from "../cpu/index.js";
import { DEFAULT_RPC_PORT, readToken, startRpcServer } from "../rpc/index.js";
import { int, parse } from "./args.js";
import { Command, log } from "./common.js";

/** "8G", "512M", "1.5GiB", or bytes. */
export function parseSize(s: string, flag: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?$/i.exec(s.trim());
  if (!m) throw weftError("USAGE", `${flag} needs a size such as 8G, 512M or 1073741824, got '${s}'`);
  const mult = { "": 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[m[2]!.toLowerCase() as "" | "k" | "m" | "g" | "t"];
  return Math.floor(Number(m[1]) * mult);
}

export const RPC_SERVER_COMMAND: Command = {
  summary: "serve this machine's devices to weft on other machines (--rpc host:port there)",
  usage: `weft rpc-server [--host 127.0.0.1] [--port ${DEFAULT_RPC_PORT}] [--token-file FILE] [-t N] [--device cpu:0]
                [--max-memory SIZE] [--cache DIR] [--models DIR] [--peer-allow LIST] [--insecure]

  --host ADDR          address to listen on (default 127.0.0.1: this machine only); any other
                       address needs a token (or --insecure)
  --port N             TCP port (default ${DEFAULT_RPC_PORT}; 0: any free port, printed)
  --token-file FILE    shared token: clients must prove they hold it (HMAC challenge-response;
                       the token never crosses the wire); default: WEFT_RPC_TOKEN
  --insecure           listen on a non-loopback address without a token (a network you trust)
  -t, --threads N      threads per device (default ${usableCores()}, the cores this process may use)
  -dev, --device LIST  devices to serve, comma-separated (default cpu:0); clients see them as
                       rpc:N in this order
  --max-memory SIZE    most memory one client may allocate, e.g. 8G (default: all of it)
  --cache DIR          keep uploaded weights by content hash: a client loading the same model
                       again uploads nothing (weights are mapped from DIR)
  --models DIR         GGUF files clients may name instead of uploading them (checked by hash)
  --max-clients N      most clients at once (default 16)
  --peer-allow LIST    where this server may connect for a tensor split's peer links (the
                       client names its servers' addresses), comma-separated: private
                       (default: loopback, 10/8, 172.16/12, 192.168/16, 100.64/10, link-local,
                       fc00::/7), any, addresses or subnets (e.g. 203.0.113.7,10.1.0.0/16)
  -q, --quiet          no line per client
Prints its endpoint, devices and memory, then one line per client. Runs until Ctrl-C or
SIGTERM; a client's memory is freed when it disconnects. No encryption: the token keeps
strangers from using the server, it does not hide the traffic — use a private network or a
tunnel (ssh -L, WireGuard) across networks you do not trust. Once a client has run a step,
its connection is served by a thread of its own (its generation steps then skip this
process's event loop); WEFT_RPC_LANES=0 keeps every request on the event loop. Servers of
one tensor split that all run on this machine pass their partial sums through shared memory
(/dev/shm) instead of their TCP links; WEFT_PEER_SHM=0 keeps them on the links.`,
  async run(args, signal) {
    const { values: v } = parse(args, {
      host: { names: ["--host"] }, port: { names: ["--port"] }, tokenFile: { names: ["--token-file"] },
      insecure: { names: ["--insecure"], switch: true }, threads: { names: ["-t", "--threads"] },
      device: { names: ["-dev", "--device"] }, maxMemory: { names: ["--max-memory"] }, cache: { names: ["--cache"] },
      models: { names: ["--models"] }, peerAllow: { names: ["--peer-allow"] }, maxClients: { names: ["--max-clients"] }, quiet: { names: ["-q", "--quiet"], switch: true },
    });
    const token = readToken(v.tokenFile);
    const srv = await startRpcServer({
      host: v.host ?? "127.0.0.1", port: int(v.port, "--port", DEFAULT_RPC_PORT, 0), token, insecure: v.insecure,
      threads: int(v.threads, "--threads", usableCores(), 1), devices: v.device?.split(",").map((s) => s.trim()),
      maxMemory: v.maxMemory ? parseSize(v.maxMemory, "--max-memory") : undefined,
      cacheDir: v.cache ?? null, modelsDir: v.models ?? null, maxClients: int(v.maxClients, "--max-clients", 16, 1),
      peerAllow: v.peerAllow?.split(",").map((x) => x.trim()).filter(Boolean),
      log: v.quiet ? undefined : (s) => log(`rpc-server: ${s}`),
    });
    log(`weft rpc-server listening on ${srv.endpoint} (${token ? "token required" : "no token: loopback only"}${v.insecure && !token ? ", INSECURE" : ""})`);
    srv.devices.forEach((d, i) => {
      const m = d.memory();
      log(`  device ${i}: ${d.name}, ${d.description}, ${srv.threads} thread(s), memory ${(m.free / 2 ** 30).toFixed(1)} / ${(m.total / 2 ** 30).toFixed(1)} GiB free`);
    });
    if (v.cache) log(`  weight cache: ${v.cache}`);
    if (v.peerAllow) log(`  peer links to: ${srv.peerAllow}`);
    if (v.models) log(`  models: ${v.models}`);
    log(`  per client: at most ${(srv.maxMemory / 2 ** 30).toFixed(1)} GiB`);
    await new Promise<void>((resolve) => signal.addEventListener("abort", () => resolve(), { once: true }));
    await srv.close();
    log("rpc-server: stopped");
    return 0;
  },
};
