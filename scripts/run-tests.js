#!/usr/bin/env node
// Runs every compiled test file (dist/test/**/*.test.js) with uvu, one process, and ends
// with the summary line CI reads: "N passed, N failed[, N skipped]".
// Usage: node scripts/run-tests.js [pattern]   (pattern filters test file paths)
import { spawn } from "node:child_process";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(import.meta.url);
const uvuBin = resolve(dirname(require.resolve("uvu")), "..", "bin.js");
const pattern = process.argv[2] ?? "\\.test\\.js$";
const child = spawn(process.execPath, [uvuBin, "dist/test", pattern], {
  cwd: root,
  stdio: ["ignore", "pipe", "pipe"],
});
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
  console.log(`${passed} passed, ${failed} failed` + (skipped ? `, ${skipped} skipped` : ""));
  process.exit(code === 0 && failed === 0 ? 0 : 1);
});
