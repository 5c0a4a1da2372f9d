/**
 * bench/rpc-load: how long loading a model onto a weft rpc-server (its own process,
 * loopback) takes — the first time (everything uploaded, the client hashing the file), a
 * second time with the server's --cache warm, and from the server's own copy of the file
 * (--models; the client's hashes cached). Each load is `weft run -n 1` in a fresh process,
 * timed by its "loaded in" line. Usage: npm run bench:rpc-load -- MODEL.gguf [-t 1]
 */
import { spawn, spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = join(ROOT, "bin/weft.js");
const model = process.argv[2];
if (!model) { console.error("usage: npm run bench:rpc-load -- MODEL.gguf [-t N]"); process.exit(2); }
const t = process.argv.includes("-t") ? process.argv[process.argv.indexOf("-t") + 1]! : "1";
const dir = mkdtempSync(join(tmpdir(), "weft-rpc-load-"));
const env = { ...process.env, WEFT_CACHE_DIR: join(dir, "client") };

async function withServer<T>(args: string[], fn: (endpoint: string) => T): Promise<T> {
  const p = spawn(process.execPath, [BIN, "rpc-server", "--port", "0", "-t", t, "-q", ...args], { stdio: ["ignore", "ignore", "pipe"] });
  try {
    const endpoint = await new Promise<string>((res, rej) => {
      let err = "";
      p.stderr!.on("data", (d) => { err += d; const m = /listening on (\S+:\d+)/.exec(err); if (m) res(m[1]!); });
      p.on("exit", (c) => rej(new Error(`rpc-server exited (${c}): ${err}`)));
    });
    return fn(endpoint);
  } finally {
    p.kill("SIGKILL");
  }
}
function load(endpoint: string): number {
  const r = spawnSync(process.execPath, [BIN, "run", "-m", model!, "--rpc", endpoint, "--device", "rpc:0", "-t", t, "-n", "1", "-p", "Hi"], { encoding: "utf8", env });
  const m = /loaded in (\d+) ms/.exec(r.stderr);
  if (!m) throw new Error(`weft run failed: ${r.stderr}`);
  return Number(m[1]);
}

try {
  const cache = join(dir, "server-cache");
  const [first, warm] = await withServer(["--cache", cache], (e) => [load(e), load(e)]);
  const models = join(dir, "models");
  mkdirSync(models);
  copyFileSync(model, join(models, basename(model)));
  spawnSync("sh", ["-c", `cat "${join(models, basename(model))}" > /dev/null`]);  // the server's copy in the page cache, as a machine that has used it
  // the server hashes a file's tensors once while it runs (to check them against the client's hashes)
  const [fromFile1, fromFile] = await withServer(["--models", models], (e) => [load(e), load(e)]);
  const local = /loaded in (\d+) ms/.exec(spawnSync(process.execPath, [BIN, "run", "-m", model, "-t", t, "-n", "1", "-p", "Hi"], { encoding: "utf8", env }).stderr)?.[1];
  console.log(`| load of ${basename(model)} | ms | vs first |\n|---|---|---|`);
  console.log(`| first (uploaded, client hashes the file, server --cache cold) | ${first} | 1.0× |`);
  console.log(`| second, server --cache warm | ${warm} | ${(first! / warm!).toFixed(1)}× faster |`);
  console.log(`| from the server's --models copy, first time (the server hashes it) | ${fromFile1} | ${(first! / fromFile1!).toFixed(1)}× faster |`);
  console.log(`| from the server's --models copy, again | ${fromFile} | ${(first! / fromFile!).toFixed(1)}× faster |`);
  console.log(`| local (this process, for reference) | ${local} | |`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
