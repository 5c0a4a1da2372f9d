import { test } from "uvu";
import * as assert from "uvu/assert";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { GgmlType, TYPES } from "../lib/core/types.js";
import { native } from "../lib/cpu/native.js";
import { readGguf } from "../lib/gguf/reader.js";
import { QUANT_SCHEMES, planQuantTypes, quantizeModel } from "../lib/quant/quantize.js";
import { dequantizeRef } from "./ref/quant.js";
import { nmse } from "./ref/ops.js";
import { fixture, haveFixtures, randomF32, rng, warnNoFixtures } from "./helpers.js";

const dir = mkdtempSync(join(tmpdir(), "weft-quant-"));

function tensorBytes(path: string) {
  const f = readGguf(path);
  const b = readFileSync(path);
  return new Map(f.tensors.map((t) => [t.name, { type: t.type, bytes: b.subarray(f.dataOffset + t.offset, f.dataOffset + t.offset + t.nbytes) }]));
}

for (const [scheme, pure, ref] of [["q8_0", false, "nano-q8_0"], ["q4_0", true, "nano-q4_0"], ["q6_k", true, "nano-q6_k"], ["q4_k_m", false, "nano-q4_k_m"]] as const) {
  test(`weft quantize nano-f32 → ${scheme}${pure ? " --pure" : ""} is byte-identical to llama.cpp's ${ref}.gguf`, async () => {
    if (!haveFixtures) return warnNoFixtures("quantization fixture comparison");
    const out = join(dir, `${ref}.gguf`);
    await quantizeModel(fixture("nano-f32.gguf"), out, scheme, { pure });
    const mine = tensorBytes(out), theirs = tensorBytes(fixture(`${ref}.gguf`));
    assert.is(mine.size, theirs.size);
    for (const [name, t] of theirs) {
      const m = mine.get(name)!;
      assert.is(TYPES[m.type as GgmlType].name, TYPES[t.type as GgmlType].name, `${name} type`);
      assert.ok(Buffer.compare(m.bytes, t.bytes) === 0, `${name}: bytes differ`);
    }
    const f = readGguf(out);
    assert.is(f.metadata.get("general.file_type")!.value, QUANT_SCHEMES[scheme]!.fileType);
  });
}

test("type mix: q4_0 keeps the output in Q6_K; q4_k_m on a tied model puts token_embd in Q6_K", () => {
  if (!haveFixtures) return warnNoFixtures("quantization type-mix check");
  const untied = planQuantTypes(readGguf(fixture("nano-f32.gguf")), QUANT_SCHEMES.q4_0!, false);
  assert.is(untied.get("output.weight"), GgmlType.Q6_K);
  assert.is(untied.get("token_embd.weight"), GgmlType.Q4_0);
  assert.is(untied.get("blk.0.attn_norm.weight"), GgmlType.F32);
  const tied = planQuantTypes(readGguf(fixture("nano-tied-q8_0.gguf")), QUANT_SCHEMES.q4_k_m!, false);
  assert.is(tied.get("token_embd.weight"), GgmlType.Q6_K);
});

test("unknown scheme is refused with the list of known ones", async () => {
  try { await quantizeModel("x.gguf", "y.gguf", "q3_xs"); assert.unreachable(); }
  catch (e) { assert.match((e as Error).message, /unknown quantization type 'q3_xs'.*q8_0/); }
});

// Independent float32 emulation of ggml's Q8_0 / Q4_0 reference quantizers.
function f32ToF16Bits(x: number): number {
  const f = new Float32Array([x]), u = new Uint32Array(f.buffer)[0]!;
  const sign = (u >>> 16) & 0x8000, exp = (u >>> 23) & 0xff, man = u & 0x7fffff;
  if (exp === 0xff) return sign | (man ? 0x7e00 : 0x7c00);
  let e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    const m = man | 0x800000, shift = 14 - e;
    let h = m >>> shift;
    const rem = m & ((1 << shift) - 1), half = 1 << (shift - 1);
    if (rem > half || (rem === half && (h & 1))) h++;
    return sign | h;
  }
  let h = (e << 10) | (man >>> 13);
  const rem = man & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1))) h++;
  return sign | h;
}
const roundAway = (v: number) => Math.sign(v) * Math.floor(Math.abs(v) + 0.5);
function refQ8_0(x: Float32Array): Uint8Array {
  const out = new Uint8Array((x.length / 32) * 34), dv = new DataView(out.buffer);
  for (let b = 0; b < x.length / 32; b++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[b * 32 + j]!));
    const d = Math.fround(amax / 127), id = d ? Math.fround(1 / d) : 0;
    dv.setUint16(b * 34, f32ToF16Bits(d), true);
    for (let j = 0; j < 32; j++) dv.setInt8(b * 34 + 2 + j, roundAway(Math.fround(x[b * 32 + j]! * id)));
  }
  return out;
}
function refQ4_0(x: Float32Array): Uint8Array {
  const out = new Uint8Array((x.length / 32) * 18), dv = new DataView(out.buffer);
  for (let b = 0; b < x.length / 32; b++) {
    let amax = 0, max = 0;
    for (let j = 0; j < 32; j++) { const v = x[b * 32 + j]!; if (amax < Math.abs(v)) { amax = Math.abs(v); max = v; } }
    const d = Math.fround(max / -8), id = d ? Math.fround(1 / d) : 0;
    dv.setUint16(b * 18, f32ToF16Bits(d), true);
    const q = (v: number) => Math.min(15, Math.trunc(Math.fround(Math.fround(v * id) + 8.5)));
    for (let j = 0; j < 16; j++) out[b * 18 + 2 + j] = q(x[b * 32 + j]!) | (q(x[b * 32 + 16 + j]!) << 4);
  }
  return out;
}

test("native Q8_0 / Q4_0 quantizers equal an independent float32 emulation on random data", () => {
  const r = rng(99);
  for (let k = 0; k < 20; k++) {
    const x = randomF32(32 * 64, r, k % 2 ? 1 : 1e-3);
    assert.equal(Buffer.from(native().quantize(GgmlType.Q8_0, x, 64)), Buffer.from(refQ8_0(x)), "q8_0");
    assert.equal(Buffer.from(native().quantize(GgmlType.Q4_0, x, 64)), Buffer.from(refQ4_0(x)), "q4_0");
  }
});

for (const type of [GgmlType.F16, GgmlType.BF16, GgmlType.Q8_0, GgmlType.Q4_0, GgmlType.Q4_K, GgmlType.Q6_K]) {
  test(`${TYPES[type].name}: native dequantize equals the float64 reference; quantization error is small`, () => {
    const r = rng(type + 5);
    const x = randomF32(256 * 8, r);
    const q = native().quantize(type, x, 256);
    const nat = native().dequantize(type, q, x.length);
    const ref = dequantizeRef(type, q, x.length);
    assert.ok(nmse(nat, ref) < 1e-12, `native vs reference dequantize: ${nmse(nat, ref)}`);
    const limit = { [GgmlType.F16]: 1e-6, [GgmlType.BF16]: 1e-4, [GgmlType.Q8_0]: 1e-4, [GgmlType.Q4_0]: 2e-2, [GgmlType.Q4_K]: 1e-2, [GgmlType.Q6_K]: 1e-3 }[type]!;
    assert.ok(nmse(ref, x) < limit, `round-trip NMSE ${nmse(ref, x)} ≥ ${limit}`);
  });
}

test("quantize refuses rows that do not fill blocks", () => {
  try { native().quantize(GgmlType.Q4_K, new Float32Array(300), 300); assert.unreachable(); }
  catch (e) { assert.match((e as Error).message, /multiple of the block size 256/); }
});

test.after(() => rmSync(dir, { recursive: true, force: true }));
test.run();
