import { test } from "uvu";
import * as assert from "uvu/assert";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { readGguf } from "../lib/gguf/reader.js";
import { ROOT, fixture, haveFixtures, warnNoFixtures } from "./helpers.js";

const weft = (...args: string[]) => spawnSync(process.execPath, [join(ROOT, "bin/weft.js"), ...args], { encoding: "utf8" });
const dir = mkdtempSync(join(tmpdir(), "weft-cli-"));

test("weft --help lists the commands that exist", () => {
  const r = weft("--help");
  assert.is(r.status, 0);
  for (const c of ["quantize", "info", "cpu"]) assert.match(r.stdout, new RegExp(`\\n  ${c} `));
});

test("every command explains its flags with --help", () => {
  for (const c of ["quantize", "info", "cpu"]) {
    const r = weft(c, "--help");
    assert.is(r.status, 0, c);
    assert.match(r.stdout, new RegExp(`weft ${c}`));
  }
});

test("unknown command: exit 2 with the help text", () => {
  const r = weft("frobnicate");
  assert.is(r.status, 2);
  assert.match(r.stderr, /unknown command 'frobnicate'/);
});

test("weft quantize writes a loadable file; errors name the problem", () => {
  if (!haveFixtures) return warnNoFixtures("weft quantize CLI");
  const out = join(dir, "q.gguf");
  const ok = weft("quantize", fixture("nano-f32.gguf"), out, "q8_0");
  assert.is(ok.status, 0, ok.stderr);
  assert.match(ok.stderr, /16× q8_0, 5× f32/);
  assert.is(readGguf(out).tensors.length, 21);
  const bad = weft("quantize", join(dir, "missing.gguf"), out, "q8_0");
  assert.is(bad.status, 1);
  assert.match(bad.stderr, /missing\.gguf.*\[IO\]/);
  const badType = weft("quantize", fixture("nano-f32.gguf"), out, "q2_xs");
  assert.is(badType.status, 1);
  assert.match(badType.stderr, /unknown quantization type 'q2_xs'/);
});

test("weft info prints metadata and tensors", () => {
  if (!haveFixtures) return warnNoFixtures("weft info CLI");
  const r = weft("info", fixture("stories260K.gguf"), "--tensors");
  assert.is(r.status, 0, r.stderr);
  assert.match(r.stdout, /general\.architecture = "llama"/);
  assert.match(r.stdout, /token_embd\.weight/);
});

test.after(() => rmSync(dir, { recursive: true, force: true }));
test.run();
