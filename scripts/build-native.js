#!/usr/bin/env node
// Builds the native CPU backend with node-gyp, offline.
// node-gyp downloads Node's headers unless told where they are; every Node install that
// ships a `include/node/node_api.h` next to its binary (Debian, nvm, the official
// tarballs) has them, so we find that folder and pass --nodedir. Only if none exists do we
// fall back to node-gyp's own lookup (which may download).
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(import.meta.url);

function findNodeDir() {
  const candidates = [];
  if (process.env.npm_config_nodedir) candidates.push(process.env.npm_config_nodedir);
  candidates.push(resolve(dirname(process.execPath), ".."));
  candidates.push("/usr", "/usr/local");
  for (const dir of candidates) {
    if (existsSync(join(dir, "include", "node", "node_api.h"))) return dir;
  }
  return null;
}

const nodeDir = findNodeDir();
const gypBin = require.resolve("node-gyp/bin/node-gyp.js");
const args = [gypBin, "rebuild", "--release"];
if (nodeDir) args.push(`--nodedir=${nodeDir}`);
else console.warn("weft: Node headers not found locally; node-gyp may try to download them");
const jobs = process.env.JOBS ?? "max";
args.push(`--jobs=${jobs}`);
const r = spawnSync(process.execPath, args, { cwd: root, stdio: "inherit" });
if (r.status !== 0) {
  console.error("weft: building the native CPU backend failed (see the compiler output above)");
  process.exit(r.status ?? 1);
}
