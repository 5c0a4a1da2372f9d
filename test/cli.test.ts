import { test } from "uvu";
import * as assert from "uvu/assert";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { readGguf } from "../lib/gguf/reader.js";
import { GgmlType } from "../lib/core/types.js";
import { ROOT, fixture, haveFixtures, warnNoFixtures } from "./helpers.js";

const dir = mkdtempSync(join(tmpdir(), "weft-cli-"));
// the embedded default model is synthesized into this cache on first use
const env = { ...process.env, WEFT_CACHE_DIR: join(dir, "cache") };
const weft = (...args: string[]) => spawnSync(process.execPath, [join(ROOT, "bin/weft.js"), ...args], { encoding: "utf8", env, maxBuffer: 1 << 28 });
const COMMANDS = ["run", "tokenize", "logits", "synth", "bench", "devices", "quantize", "info", "cpu"];

test("weft --help lists the commands that exist", () => {
  const r = weft("--help");
  assert.is(r.status, 0);
  for (const c of COMMANDS) assert.match(r.stdout, new RegExp(`\\n  ${c} `));
});

test("every command explains its flags with --help", () => {
  for (const c of COMMANDS) {
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
  assert.match(bad.stderr, /missing\.gguf: no such file/);
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

test("weft run with no model: synthesizes the default once, streams only the generation to stdout", () => {
  const r = weft("run", "-p", "Once upon a time", "-n", "12", "-t", "2", "--seed", "1");
  assert.is(r.status, 0, r.stderr);
  assert.match(r.stderr, /synthesizing the default model/);
  assert.match(r.stderr, /prompt: \d+ tokens in .* t\/s/);
  assert.match(r.stderr, /generation: 12 tokens/);
  assert.not.match(r.stdout, /Once upon a time/);  // no echo unless --echo
  assert.ok(r.stdout.trim().length > 0);
  const again = weft("run", "-p", "Once upon a time", "-n", "12", "-t", "2", "--seed", "1");
  assert.not.match(again.stderr, /synthesizing/);
  assert.is(again.stdout, r.stdout, "same seed, same text");
  const echo = weft("run", "-p", "Hello", "-n", "2", "--temp", "0", "--echo");
  assert.match(echo.stdout, /^Hello/);
  const prof = spawnSync(process.execPath, [join(ROOT, "bin/weft.js"), "run", "-n", "2", "-t", "1"], { encoding: "utf8", env: { ...env, WEFT_PROFILE: "1" } });
  assert.match(prof.stderr, /profile \(prompt \+ generation\): [\d.]+ ms in native ops/);
  assert.match(prof.stderr, /MUL_MAT q8_0 +[\d.]+ ms/);
});

test("weft run: greedy stories260K text equals llama.cpp's", () => {
  if (!haveFixtures) return warnNoFixtures("weft run stories260K");
  const g = JSON.parse(readFileSync(fixture("stories260K.golden.json"), "utf8"));
  const r = weft("run", "-m", fixture("stories260K.gguf"), "-p", g.greedy.prompt, "-n", String(g.greedy.n_predict), "--temp", "0", "-t", "1");
  assert.is(r.status, 0, r.stderr);
  assert.is(r.stdout, g.greedy.text);  // piped: exactly the generated text
});

test("weft tokenize and weft logits print JSON matching the goldens", () => {
  if (!haveFixtures) return warnNoFixtures("weft tokenize / logits");
  const g = JSON.parse(readFileSync(fixture("tokenizer-bpe.golden.json"), "utf8"));
  const c = g.cases[1];
  const t = weft("tokenize", "-m", fixture("llama3-bpe-vocab.gguf"), "-p", c.text);
  assert.is(t.status, 0, t.stderr);
  assert.equal(JSON.parse(t.stdout), c.ids);
  assert.equal(JSON.parse(weft("tokenize", "-m", fixture("llama3-bpe-vocab.gguf"), "-p", c.text, "--no-bos").stdout), c.ids_no_bos);
  const gl = JSON.parse(readFileSync(fixture("nano-f32.golden.json"), "utf8"));
  const l = weft("logits", "-m", fixture("nano-f32.gguf"), "--tokens", gl.tokens.join(","), "-t", "2");
  assert.is(l.status, 0, l.stderr);
  const out = JSON.parse(l.stdout);
  assert.equal(out.tokens, gl.tokens);
  let num = 0, den = 0;
  out.logits.forEach((row: number[], i: number) => row.forEach((v, j) => { num += (v - gl.logits[i][j]) ** 2; den += gl.logits[i][j] ** 2; }));
  assert.ok(num / den < 1e-6, `NMSE ${num / den}`);
});

test("weft synth writes the preset's shapes and type mix; weft bench prints a table", () => {
  const out = join(dir, "tiny.gguf");
  const s = weft("synth", "--preset", "tiny", "--type", "q4_k_m", "-o", out);
  assert.is(s.status, 0, s.stderr);
  const f = readGguf(out);
  const type = (n: string) => f.tensors.find((t) => t.name === n)!.type;
  assert.is(f.tensors.length, 2 + 4 * 9 + 1);
  assert.equal(f.tensors.find((t) => t.name === "token_embd.weight")!.ne, [256, 32000]);
  assert.is(type("output.weight"), GgmlType.Q6_K);
  assert.is(type("blk.2.attn_v.weight"), GgmlType.Q6_K);  // llama.cpp use_more_bits: layers 2 and 3 of 4
  assert.is(type("blk.0.attn_v.weight"), GgmlType.Q4_K);
  assert.is(type("blk.1.attn_q.weight"), GgmlType.Q4_K);
  const b = weft("bench", "-m", out, "-p", "16", "-n", "4", "-r", "1", "-t", "1");
  assert.is(b.status, 0, b.stderr);
  // llama-bench's table: model type as llama.cpp names it, size, params, backend, threads, test, t/s
  assert.match(b.stdout, /\| llama 20M Q4_K - Medium \| [\d.]+ MiB \| 19\.\d+ M \| CPU \| 1 \| pp16 \| [\d.]+ ± [\d.]+ \|/);
  assert.match(b.stdout, /\| 1 \| tg4 \|/);
});

test("weft devices lists the CPU device with memory and capabilities", () => {
  const r = weft("devices");
  assert.is(r.status, 0, r.stderr);
  assert.match(r.stdout, /^cpu:0 +CPU .*memory [\d.]+ \/ [\d.]+ GiB free; async yes, events yes/m);
});

test("--split-mode layer on several devices: same logits and text as one device", () => {
  if (!haveFixtures) return warnNoFixtures("CLI layer split");
  const gl = JSON.parse(readFileSync(fixture("nano-q4_k_m.golden.json"), "utf8"));
  const one = weft("logits", "-m", fixture("nano-q4_k_m.gguf"), "--tokens", gl.tokens.join(","), "-t", "1");
  const split = weft("logits", "-m", fixture("nano-q4_k_m.gguf"), "--tokens", gl.tokens.join(","), "-t", "1", "--split-mode", "layer", "--device", "cpu:0,cpu:1,cpu:2", "--tensor-split", "1,0,1");
  assert.is(split.status, 0, split.stderr);
  assert.match(split.stderr, /cpu:1: layers 1\.\.0/);  // an empty device is fine
  assert.is(split.stdout, one.stdout);
  const g = JSON.parse(readFileSync(fixture("stories260K.golden.json"), "utf8"));
  const r = weft("run", "-m", fixture("stories260K.gguf"), "-p", g.greedy.prompt, "-n", String(g.greedy.n_predict), "--temp", "0", "-t", "1", "--device", "cpu:0,cpu:1", "-b", "3");
  assert.is(r.status, 0, r.stderr);
  assert.is(r.stdout, g.greedy.text);  // piped: exactly the generated text
  const bad = weft("run", "--split-mode", "rows");
  assert.match(bad.stderr, /--split-mode must be none, layer or tensor, got 'rows'/);
});

test("weft bench compares split modes, device sets and micro-batch sizes, with memory per device", () => {
  const out = join(dir, "tiny-bench.gguf");
  assert.is(weft("synth", "--preset", "tiny", "--type", "q8_0", "-o", out).status, 0);
  const b = weft("bench", "-m", out, "-p", "32", "-n", "2", "-r", "1", "-t", "1", "--split-mode", "none,layer,tensor", "--device", "cpu:0,cpu:1", "-ub", "32,8");
  assert.is(b.status, 0, b.stderr);
  const rows = b.stdout.split("\n").filter((l) => / pp32 /.test(l));
  assert.is(rows.length, 6, b.stdout);
  assert.match(b.stdout, /\| layer \| cpu:0,cpu:1 \| 8 \| f16 \| cpu:0 [\d.]+\+[\d.]+\+[\d.]+, cpu:1 [\d.]+\+[\d.]+\+[\d.]+ \| pp32 \|/);
  // tensor split: each device holds about half the weights (plus the mirrored embedding)
  const mem = /\| tensor \| cpu:0,cpu:1 \| 32 \| f16 \| cpu:0 ([\d.]+)\+([\d.]+)\+[\d.]+, cpu:1 ([\d.]+)\+([\d.]+)\+[\d.]+ \| pp32 \|/.exec(b.stdout);
  const whole = /\| none \| cpu:0 \| 32 \| f16 \| cpu:0 ([\d.]+)\+([\d.]+)\+[\d.]+ \| pp32 \|/.exec(b.stdout);
  assert.ok(mem && whole, b.stdout);
  assert.ok(Number(mem[1]) < 0.75 * Number(whole[1]) && Number(mem[3]) < 0.75 * Number(whole[1]), "weights per device");
  assert.ok(Math.abs(Number(mem[2]) * 2 - Number(whole[2])) <= 0.1, `KV cache per device: ${mem[2]} MiB of ${whole[2]}`);
});

test("--split-mode tensor: weft logits and weft run give one device's answer; WEFT_PROFILE shows the all-reduce apart", () => {
  if (!haveFixtures) return warnNoFixtures("CLI tensor split");
  const g = JSON.parse(readFileSync(fixture("stories260K.golden.json"), "utf8"));
  const args = ["-m", fixture("stories260K.gguf"), "--tokens", g.tokens.join(","), "-t", "1", "--kv-type", "f32"];
  const one = JSON.parse(weft("logits", ...args).stdout);
  for (const split of [["--split-mode", "tensor", "--device", "cpu:0,cpu:1"], ["--split-mode", "tensor", "--device", "cpu:0,cpu:1,cpu:2", "--tensor-split", "1,3,2"],
    ["--split-mode", "layer", "--device", "cpu:0+cpu:1,cpu:2"]]) {
    const r = weft("logits", ...args, ...split);
    assert.is(r.status, 0, r.stderr);
    const got = JSON.parse(r.stdout);
    let num = 0, den = 0;
    got.logits.forEach((row: number[], i: number) => row.forEach((v, j) => { num += (v - one.logits[i][j]) ** 2; den += one.logits[i][j] ** 2; }));
    assert.ok(num / den < 1e-9, `${split.join(" ")}: NMSE ${num / den}`);
  }
  const r = spawnSync(process.execPath, [join(ROOT, "bin/weft.js"), "run", "-m", fixture("stories260K.gguf"), "-p", g.greedy.prompt, "-n", String(g.greedy.n_predict),
    "--temp", "0", "-t", "1", "--split-mode", "tensor", "--device", "cpu:0,cpu:1"], { encoding: "utf8", env: { ...env, WEFT_PROFILE: "1" } });
  assert.is(r.status, 0, r.stderr);
  assert.is(r.stdout, g.greedy.text);  // piped: exactly the generated text
  assert.match(r.stderr, /split mode tensor over cpu:0\+cpu:1/);
  assert.match(r.stderr, /^\s+ALL_REDUCE +[\d.]+ ms/m);
});

test("flag errors are clear", () => {
  const r = weft("run", "--temperature", "1");
  assert.is(r.status, 2);
  assert.match(r.stderr, /unknown option '--temperature'/);
  assert.match(weft("run", "-n", "x").stderr, /--n-predict needs an integer/);
  assert.match(weft("run", "-m", join(dir, "nope.gguf")).stderr, /nope\.gguf/);
  assert.match(weft("synth", "--preset", "huge", "--type", "q8_0", "-o", join(dir, "x.gguf")).stderr, /unknown preset 'huge'/);
});

test.after(() => rmSync(dir, { recursive: true, force: true }));
test.run();
