#!/usr/bin/env node
// Runs every compiled test file (dist/test/**/*.test.js) with uvu, one process, and ends
// with the summary line CI reads: "N passed, N failed[, N skipped]".
// Then, where the SIMDe headers are installed, the op matrix once more on a build whose
// AVX-512 level is emulated on AVX2 (scripts/build-native.js --emulate-avx512): this
// machine has no AVX-512, and that level's kernels must still be checked.
// Usage: node scripts/run-tests.js [--emulated-only] [FILTER]   (npm test -- FILTER: the
// suites whose file name contains FILTER, e.g. "meta" or "cli"; a regular expression works
// too; --emulated-only: just the op matrix on the AVX-512-emulated build)
// WEFT_STRICT=1 (CI): a suite this script would skip for a missing dependency fails instead.
import { spawn, spawnSync } from "node:child_process";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(import.meta.url);
const uvuBin = resolve(dirname(require.resolve("uvu")), "..", "bin.js");
// uvu takes a regular expression over file names: only compiled suites, never their .map files
const args = process.argv.slice(2);
const emulatedOnly = args.includes("--emulated-only");
const filter = args.find((a) => !a.startsWith("--"));
const pattern = filter ? `^(?=.*(?:${filter})).*\\.test\\.js$` : "\\.test\\.js$";

/** one uvu run; resolves to its counts */
function runUvu(pat, env) {
  return new Promise((done) => {
    const child = spawn(process.execPath, [uvuBin, "dist/test", pat], { cwd: root, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } });
    let out = "", err = "";
    child.stdout.on("data", (d) => { out += d; process.stdout.write(d); });
    child.stderr.on("data", (d) => { err += d; process.stderr.write(d); });
    child.on("close", (code) => {
      const plain = out.replace(/\x1b\[[0-9;]*m/g, "");
      const num = (label) => Number((plain.match(new RegExp(`${label}:\\s+(\\d+)`)) ?? [])[1] ?? 0);
      const total = num("Total");
      // A test whose fixtures are absent returns early after printing one "!!! SKIPPING" line
      // (test/helpers.ts warnNoFixtures): uvu saw it pass, it is counted here as skipped.
      const fixtureSkips = (err.match(/!!! SKIPPING /g) ?? []).length;
      const skipped = num("Skipped") + fixtureSkips;
      const passed = Math.max(0, num("Passed") - fixtureSkips);
      // uvu counts skipped tests in Total; a crash before the summary counts as one failure.
      let failed = Math.max(0, total - num("Passed") - num("Skipped"));
      if (code !== 0 && failed === 0) failed = 1;
      done({ passed, failed, skipped });
    });
  });
}

const sum = emulatedOnly ? { passed: 0, failed: 0, skipped: 0 } : await runUvu(pattern, {});
if (emulatedOnly || new RegExp(pattern).test("ops.test.js")) {
  const build = spawnSync(process.execPath, [resolve(root, "scripts/build-native.js"), "--emulate-avx512"], { cwd: root, encoding: "utf8" });
  if (build.status === 0) {
    console.log("\nop matrix with the AVX-512 level emulated (SIMDe on AVX2):");
    const r = await runUvu("ops\\.test\\.js$", { WEFT_NATIVE_ADDON: build.stdout.trim().split("\n").pop() });
    sum.passed += r.passed; sum.failed += r.failed; sum.skipped += r.skipped;
  } else if (build.status === 2 && process.env.WEFT_STRICT) {
    console.error(`the op matrix at the AVX-512 level cannot run: ${build.stderr.trim()} (WEFT_STRICT=1: this is a failure)`);
    sum.failed += 1;
  } else if (build.status === 2) {
    console.error(`!!! SKIPPING the op matrix at the AVX-512 level: ${build.stderr.trim()}`);
    sum.skipped += 1;
  } else {
    process.stderr.write(build.stdout + build.stderr);
    console.error("the AVX-512-emulated build failed");
    sum.failed += 1;
  }
}
console.log(`${sum.passed} passed, ${sum.failed} failed` + (sum.skipped ? `, ${sum.skipped} skipped` : ""));
process.exit(sum.failed === 0 ? 0 : 1);
