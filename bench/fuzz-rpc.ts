/**
 * bench/fuzz-rpc: a weft rpc-server (its own process, loopback) against N mutated frames
 * (default 1,000,000) from recorded valid sessions, as test/rpc.test.ts does with 20,000.
 * Prints what happened and the server's RSS along the way; then a valid client must get
 * the same logits as this machine and the server must hold no client memory. Exit code 1
 * on a crash, a hang, a leak or a wrong answer. Usage:
 *   npm run bench:fuzz-rpc -- [FRAMES] [--seed N]
 */
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { loadModel } from "../lib/model/model.js";
import { RpcDevice, openRpcServer } from "../lib/rpc/index.js";
import { fuzzServer, recordClientSessions, rssKiB } from "../test/rpc-fuzz.js";
import { writeTinyModel } from "../test/tiny-model.js";
import { FIXTURES, haveFixtures } from "../test/helpers.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const args = process.argv.slice(2);
const frames = Number(args.find((a) => /^\d+$/.test(a)) ?? 1_000_000);
const seedAt = args.indexOf("--seed");
const seed = seedAt >= 0 ? Number(args[seedAt + 1]) : 1;

const dir = mkdtempSync(join(tmpdir(), "weft-fuzz-"));
const tiny = join(dir, "tiny.gguf");
await writeTinyModel(tiny);
const proc = spawn(process.execPath, [join(ROOT, "bin/weft.js"), "rpc-server", "--port", "0", "-t", "1", "-q"], { stdio: ["ignore", "ignore", "pipe"] });
let failed = false;
try {
  const endpoint = await new Promise<string>((res, rej) => {
    let err = "";
    proc.stderr!.on("data", (d) => { err += d; const m = /listening on (\S+:\d+)/.exec(err); if (m) res(m[1]!); });
    proc.on("exit", (c) => rej(new Error(`rpc-server exited (${c}): ${err}`)));
  });
  const port = Number(endpoint.split(":").pop());
  const models = [tiny, ...(haveFixtures ? [join(FIXTURES, "nano-q8_0.gguf"), join(FIXTURES, "nano-q4_k_m.gguf")] : [])];
  const sessions = await recordClientSessions(endpoint, models, tiny);
  console.log(`server ${endpoint} (pid ${proc.pid}); ${sessions.length} recorded sessions of ${sessions.map((s) => s.length).join(", ")} frames; RSS ${rssKiB(proc.pid!)} KiB`);
  const t0 = performance.now();
  let last = 0;
  const r = await fuzzServer({
    host: "127.0.0.1", port, sessions, frames, seed, pid: proc.pid,
    onProgress: (n) => {
      if (performance.now() - last < 2000) return;
      last = performance.now();
      process.stderr.write(`\r${n} frames, ${(n / ((last - t0) / 1000)).toFixed(0)}/s, server RSS ${rssKiB(proc.pid!)} KiB   `);
    },
  });
  process.stderr.write("\n");
  console.log(`frames ${r.frames} over ${r.connections} connections in ${(r.ms / 1000).toFixed(1)} s (${(r.frames / (r.ms / 1000)).toFixed(0)}/s)`);
  console.log(`replies ${r.replies} (errors ${r.errorReplies}), connections ended by the server ${r.closedByServer}, hangs ${r.hangs}`);
  console.log(`mutations: ${Object.entries(r.kinds).map(([k, n]) => `${k} ${n}`).join(", ")}`);
  console.log(`server RSS (KiB) at each 5%: ${r.rssKiB.join(" ")}`);
  const alive = proc.exitCode === null;
  const [dev] = await openRpcServer(endpoint);
  const rd = dev as RpcDevice;
  const want = await loadModel(tiny, { threads: 1 }).then(async (m) => { try { return await m.evaluate([1, 2, 3], { allLogits: true }); } finally { await m.dispose(); } });
  const got = await loadModel(tiny, { threads: 1, devices: [dev!] }).then(async (m) => { try { return await m.evaluate([1, 2, 3], { allLogits: true }); } finally { await m.dispose(); } });
  const same = got.length === want.length && got.every((x, i) => Object.is(x, want[i]));
  await new Promise((res) => setTimeout(res, 500));
  const mem = (await rd.conn.request("MEMORY", new Uint8Array(0))).r;
  const n = mem.u32("devices");
  for (let i = 0; i < n; i++) { mem.u64("free"); mem.u64("total"); }
  mem.u64("mine");
  const clients = mem.u32("clients"), buffers = mem.u64("buffers"), bytes = mem.u64("bytes");
  rd.conn.close();
  const grown = r.rssKiB[r.rssKiB.length - 1]! - r.rssKiB[1]!;
  console.log(`after: server alive ${alive}, a valid client's logits ${same ? "equal" : "DIFFER from"} local ones, ` +
    `clients ${clients}, live buffers ${buffers} (${bytes} bytes), RSS growth after the first 5%: ${grown} KiB`);
  failed = !alive || r.hangs > 0 || !same || clients !== 1 || buffers !== 0 || grown > 64 * 1024;
  console.log(failed ? "FAILED" : "passed");
} catch (e) {
  console.error(`fuzz-rpc: ${(e as Error).message}`);
  failed = true;
} finally {
  proc.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
