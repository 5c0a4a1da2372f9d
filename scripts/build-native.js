#!/usr/bin/env node
// Builds the native CPU backend with node-gyp, offline.
// With --emulate-avx512: a test build (g++ directly, -mavx2, SIMDe's AVX-512 intrinsics
// emulated on AVX2) into build/avx512-emulated/weft.node, whose path it prints; exits 2
// when the SIMDe headers are missing (Debian: libsimde-dev). Tests load it through
// WEFT_NATIVE_ADDON; it is never what `npm install` builds.
// node-gyp downloads Node's headers unless told where they are; every Node install that
// ships a `include/node/node_api.h` next to its binary (Debian, nvm, the official
// tarballs) has them, so we find that folder and pass --nodedir. Only if none exists do we
// fall back to node-gyp's own lookup (which may download).
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
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

if (process.argv.includes("--emulate-avx512")) {
  // WEFT_SIMDE_INCLUDE: the folder holding simde/ (default: the compiler's include path)
  const simde = process.env.WEFT_SIMDE_INCLUDE;
  const probe = simde ? { status: existsSync(join(simde, "simde", "x86", "avx512.h")) ? 0 : 1 }
    : spawnSync("g++", ["-x", "c++", "-std=c++17", "-mavx2", "-E", "-o", "/dev/null", "-"], { input: "#include <simde/x86/avx512.h>\n", encoding: "utf8" });
  if (probe.status !== 0) { console.error(`the SIMDe headers (simde/x86/avx512.h) are not installed${simde ? ` in ${simde}` : ""}; Debian: apt install libsimde-dev`); process.exit(2); }
  if (!nodeDir) { console.error("Node headers not found"); process.exit(2); }
  const out = join(root, "build", "avx512-emulated", "weft.node");
  // the same sources as node-gyp's build (binding.gyp is JSON)
  const srcs = JSON.parse(readFileSync(join(root, "binding.gyp"), "utf8")).targets[0].sources.map((f) => join(root, f));
  const flags = ["-shared", "-fPIC", "-pthread", "-O2", "-std=c++17", "-fexceptions", "-ffp-contract=off", "-fno-math-errno", "-w",
    "-mavx2", "-mfma", "-mf16c", "-DWEFT_EMULATE_AVX512", "-DNAPI_VERSION=8", "-DNAPI_CPP_EXCEPTIONS", "-DBUILDING_NODE_EXTENSION",
    `-I${join(nodeDir, "include", "node")}`, `-I${require("node-addon-api").include_dir.replace(/^"|"$/g, "")}`, ...(simde ? [`-I${simde}`] : [])];
  spawnSync("mkdir", ["-p", dirname(out)]);
  const r = spawnSync("g++", [...flags, ...srcs, "-o", out], { cwd: root, stdio: ["ignore", "inherit", "inherit"] });
  if (r.status !== 0) process.exit(1);
  console.log(out);
  process.exit(0);
}

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
