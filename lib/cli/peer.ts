/**
 * The benchmark peer: node-llama-cpp (llama.cpp's kernels behind a Node API), installed on
 * demand with its CPU binary only into its own folder (never a dependency of weft), and run
 * in a child process that `weft bench` drives line by line, so the two engines alternate
 * within one run and their ratio is measured under the same machine conditions.
 */
import { spawn, spawnSync, ChildProcess } from "node:child_process";
import { existsSync, renameSync, rmSync } from "node:fs";
import { join } from "node:path";
import { createInterface, Interface } from "node:readline";
import { weftError } from "../core/errors.js";
import { ensureDir, writeFileAtomicallySync } from "../core/files.js";
import { cacheDir } from "../model/default.js";

export const PEER_VERSION = "3.22.1";

export function peerDir(): string {
  return process.env.WEFT_PEER_DIR ?? join(cacheDir(), "peer");
}

// Runs inside the peer folder. Protocol: one JSON command per stdin line, one JSON reply per
// stdout line. Generation uses sequence.evaluate() (node-llama-cpp's fastest path per
// ../shared/BASELINES.md) with flash attention off, as llama-bench.
const PEER_SCRIPT = `import { getLlama } from "node-llama-cpp";
import { createInterface } from "node:readline";
const llama = await getLlama({ gpu: false, build: "never", logLevel: "error" });
let model = null, ctx = null;
const send = (o) => process.stdout.write(JSON.stringify(o) + "\\n");
for await (const line of createInterface({ input: process.stdin })) {
  const c = JSON.parse(line);
  try {
    if (c.cmd === "load") {
      if (ctx) await ctx.dispose();
      if (model) await model.dispose();
      model = await llama.loadModel({ modelPath: c.path, gpuLayers: 0 });
      ctx = await model.createContext({ contextSize: c.ctx, batchSize: c.batch, threads: c.threads, flashAttention: false });
      send({ ok: true });
    } else if (c.cmd === "pp") {
      const seq = ctx.getSequence();
      const t0 = performance.now();
      await seq.evaluateWithoutGeneratingNewTokens(c.tokens);
      const ms = performance.now() - t0;
      seq.dispose();
      send({ ms });
    } else if (c.cmd === "tg") {
      const seq = ctx.getSequence();
      const it = seq.evaluate([c.first], { temperature: 0 });
      const t0 = performance.now();
      for (let i = 0; i < c.n; i++) await it.next();
      const ms = performance.now() - t0;
      await it.return();
      seq.dispose();
      send({ ms });
    } else if (c.cmd === "quit") { break; }
  } catch (e) { send({ error: String(e && e.message || e) }); }
}
if (ctx) await ctx.dispose();
if (model) await model.dispose();
process.exit(0);
`;

/**
 * Installs node-llama-cpp (CPU binary only) into peerDir() unless it is already there. npm
 * installs into a fresh folder beside it, moved into place only when complete: a failed
 * or interrupted install leaves nothing half-installed.
 */
export function ensurePeerInstalled(log: (s: string) => void): string {
  const dir = peerDir();
  const platformPkg = `@node-llama-cpp/${process.platform}-${process.arch}`;
  if (!existsSync(join(dir, "node_modules", "node-llama-cpp", "package.json"))) {
    ensureDir(dir, "create the node-llama-cpp peer's folder", "set WEFT_PEER_DIR to a folder weft may write");
    const tmp = join(dir, `.install-${process.pid}`);
    rmSync(tmp, { recursive: true, force: true });
    try {
      ensureDir(tmp);
      writeFileAtomicallySync(join(tmp, "package.json"), JSON.stringify({ name: "weft-bench-peer", private: true, type: "module" }, null, 2));
      log(`installing node-llama-cpp@${PEER_VERSION} (${platformPkg}, CPU only) into ${dir} ...`);
      const r = spawnSync("npm", ["install", "--no-audit", "--no-fund", "--omit=optional", `node-llama-cpp@${PEER_VERSION}`, `${platformPkg}@${PEER_VERSION}`],
        { cwd: tmp, stdio: ["ignore", "inherit", "inherit"], env: { ...process.env, NODE_LLAMA_CPP_SKIP_DOWNLOAD: "true" } });
      if (r.status !== 0) throw weftError("IO", `installing the node-llama-cpp peer into ${dir} failed (npm exit ${r.status ?? r.signal}); check network access to the npm registry`);
      rmSync(join(dir, "node_modules"), { recursive: true, force: true });
      renameSync(join(tmp, "node_modules"), join(dir, "node_modules"));
      renameSync(join(tmp, "package.json"), join(dir, "package.json"));
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  }
  writeFileAtomicallySync(join(dir, "peer.mjs"), PEER_SCRIPT);
  return dir;
}

export class Peer {
  #child: ChildProcess;
  #lines: Interface;
  #it: AsyncIterator<string>;

  constructor(dir: string, threads: number) {
    this.#child = spawn(process.execPath, [join(dir, "peer.mjs")], {
      cwd: dir, stdio: ["pipe", "pipe", "inherit"],
      // one libuv worker: node-llama-cpp's 2-thread generation is fastest that way (BASELINES.md)
      env: { ...process.env, UV_THREADPOOL_SIZE: "1", OMP_NUM_THREADS: String(threads) },
    });
    this.#lines = createInterface({ input: this.#child.stdout! });
    this.#it = this.#lines[Symbol.asyncIterator]();
  }

  async call<T>(cmd: object): Promise<T> {
    this.#child.stdin!.write(JSON.stringify(cmd) + "\n");
    const r = await this.#it.next();
    if (r.done) throw weftError("IO", "the node-llama-cpp peer exited unexpectedly");
    const o = JSON.parse(r.value) as T & { error?: string };
    if (o.error) throw weftError("COMPUTE_FAILED", `node-llama-cpp peer: ${o.error}`);
    return o;
  }

  async close(): Promise<void> {
    try { this.#child.stdin!.write(JSON.stringify({ cmd: "quit" }) + "\n"); } catch { /* already gone */ }
    await new Promise((r) => { if (this.#child.exitCode !== null) r(null); else this.#child.once("exit", r); });
    this.#lines.close();
  }
}
