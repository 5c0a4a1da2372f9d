import { test } from "uvu";
import * as assert from "uvu/assert";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gguf as hfGguf } from "@huggingface/gguf";
import { WeftError } from "../lib/core/errors.js";
import { GgmlType, TYPES, rowSize } from "../lib/core/types.js";
import { readGguf } from "../lib/gguf/reader.js";
import { GgufValue, GgufValueType as V } from "../lib/gguf/types.js";
import { writeGguf } from "../lib/gguf/writer.js";
import { fixture, haveFixtures, rng, warnNoFixtures } from "./helpers.js";

const dir = mkdtempSync(join(tmpdir(), "weft-gguf-"));
const r = rng(7);

function sampleMeta(): Map<string, GgufValue> {
  return new Map<string, GgufValue>([
    ["general.architecture", { type: V.STRING, value: "llama" }],
    ["test.u8", { type: V.UINT8, value: 200 }], ["test.i8", { type: V.INT8, value: -100 }],
    ["test.u16", { type: V.UINT16, value: 60000 }], ["test.i16", { type: V.INT16, value: -30000 }],
    ["test.u32", { type: V.UINT32, value: 4000000000 }], ["test.i32", { type: V.INT32, value: -2000000000 }],
    ["test.f32", { type: V.FLOAT32, value: Math.fround(0.1) }], ["test.f64", { type: V.FLOAT64, value: 1e-300 }],
    ["test.bool", { type: V.BOOL, value: true }], ["test.u64", { type: V.UINT64, value: 2n ** 63n + 5n }],
    ["test.i64", { type: V.INT64, value: -(2n ** 62n) }], ["test.unicode", { type: V.STRING, value: "héllo 世界 🙂" }],
    ["test.strings", { type: V.ARRAY, value: { elemType: V.STRING, values: ["a", "", "<0x0A>", "▁the"] } }],
    ["test.floats", { type: V.ARRAY, value: { elemType: V.FLOAT32, values: new Float32Array([1.5, -2, 0.25]) } }],
    ["test.ints", { type: V.ARRAY, value: { elemType: V.INT32, values: new Int32Array([1, -1, 7]) } }],
    ["test.nested", { type: V.ARRAY, value: { elemType: V.ARRAY, values: [{ elemType: V.UINT8, values: new Uint8Array([1, 2]) }] } }],
  ]);
}

const TENSOR_TYPES = [GgmlType.F32, GgmlType.F16, GgmlType.BF16, GgmlType.Q8_0, GgmlType.Q4_0, GgmlType.Q4_K, GgmlType.Q6_K];
function sampleTensors() {
  return TENSOR_TYPES.map((type, i) => {
    const ne = [TYPES[type].blockSize === 256 ? 256 : 64, 3 + i];
    const data = new Uint8Array(rowSize(type, ne[0]!) * ne[1]!).map(() => Math.floor(r() * 256));
    return { name: `t${i}.${TYPES[type].name}`, type, ne, data };
  });
}

for (const alignment of [32, 64]) {
  test(`write → read round trip (alignment ${alignment}), and @huggingface/gguf agrees`, async () => {
    const path = join(dir, `rt${alignment}.gguf`);
    const meta = sampleMeta(), tensors = sampleTensors();
    await writeGguf(path, meta, tensors, { alignment });
    const f = readGguf(path);
    assert.is(f.version, 3);
    assert.is(f.alignment, alignment);
    for (const [k, v] of meta) {
      const got = f.metadata.get(k)!;
      assert.is(got.type, v.type, k);
      if (v.type === V.ARRAY) assert.equal(JSON.stringify(got.value, (_, x) => (ArrayBuffer.isView(x) ? Array.from(x as unknown as number[]) : x)),
        JSON.stringify(v.value, (_, x) => (ArrayBuffer.isView(x) ? Array.from(x as unknown as number[]) : x)), k);
      else assert.equal(got.value, v.value, k);
    }
    const bytes = readFileSync(path);
    assert.is(f.dataOffset % alignment, 0);
    tensors.forEach((t, i) => {
      const info = f.tensors[i]!;
      assert.is(info.name, t.name);
      assert.is(info.type, t.type);
      assert.equal(info.ne, t.ne);
      assert.is(info.offset % alignment, 0);
      assert.ok(Buffer.from(t.data).equals(bytes.subarray(f.dataOffset + info.offset, f.dataOffset + info.offset + info.nbytes)), t.name);
    });
    // an independent parser reads the same structure (what llama.cpp's gguf.cpp would see)
    const hf = await hfGguf(path, { allowLocalFile: true });
    assert.is(hf.tensorInfos.length, tensors.length);
    hf.tensorInfos.forEach((ti, i) => {
      assert.is(ti.name, tensors[i]!.name);
      assert.is(Number(ti.dtype), tensors[i]!.type);
      assert.equal(ti.shape.map(Number), tensors[i]!.ne);
      assert.is(Number(ti.offset), f.tensors[i]!.offset);
    });
    assert.is(Number(hf.tensorDataOffset), f.dataOffset);
    assert.is((hf.metadata as Record<string, unknown>)["test.unicode"], "héllo 世界 🙂");
    assert.equal((hf.metadata as Record<string, unknown>)["test.strings"], ["a", "", "<0x0A>", "▁the"]);
  });
}

test("every fixture model parses, with the tensor types llama.cpp reported", () => {
  if (!haveFixtures) return warnNoFixtures("GGUF fixture parsing");
  for (const name of ["nano-f32", "nano-f16", "nano-bf16", "nano-q8_0", "nano-q4_0", "nano-q4_k_m", "nano-q6_k", "nano-tied-q8_0", "stories260K"]) {
    const f = readGguf(fixture(`${name}.gguf`));
    const golden = JSON.parse(readFileSync(fixture(`${name}.golden.json`), "utf8"));
    const types: Record<string, string> = golden.hparams.tensor_types;
    assert.is(f.tensors.length, Object.keys(types).length, name);
    for (const t of f.tensors) assert.is(TYPES[t.type as GgmlType].name.toLowerCase(), types[t.name]!.toLowerCase(), `${name}: ${t.name}`);
  }
  const vocab = readGguf(fixture("llama3-bpe-vocab.gguf"));
  assert.is((vocab.metadata.get("tokenizer.ggml.tokens")!.value as unknown as { values: unknown[] }).values.length, 128256);
});

// ---------------------------------------------------------------- broken files

/** Little raw GGUF encoder, so each corruption is precise. */
class Raw {
  parts: Buffer[] = [];
  u32(v: number) { const b = Buffer.alloc(4); b.writeUInt32LE(v); this.parts.push(b); return this; }
  u64(v: bigint | number) { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(v)); this.parts.push(b); return this; }
  str(s: string, len?: bigint) { const b = Buffer.from(s); this.u64(len ?? BigInt(b.length)); this.parts.push(b); return this; }
  bytes(n: number, v = 0) { this.parts.push(Buffer.alloc(n, v)); return this; }
  pad(a = 32) { const l = this.len(); if (l % a) this.bytes(a - (l % a)); return this; }
  len() { return this.parts.reduce((p, b) => p + b.length, 0); }
  buf() { return Buffer.concat(this.parts); }
}
const head = (nT: number | bigint, nKv: number | bigint, version = 3) => new Raw().u32(0x46554747).u32(version).u64(nT).u64(nKv);
const tensorInfo = (w: Raw, name: string, ne: number[], type: number, offset: number | bigint) => {
  w.str(name).u32(ne.length);
  for (const d of ne) w.u64(d);
  return w.u32(type).u64(offset);
};

const valid = (() => {
  const w = head(2, 1);
  w.str("general.architecture").u32(V.STRING).str("llama");
  tensorInfo(w, "a", [32, 2], GgmlType.F32, 0);
  tensorInfo(w, "b", [32], GgmlType.F32, 256);
  return w.pad().bytes(256 + 128, 1).buf();
})();

const corpus: Array<[string, Buffer, RegExp]> = [
  ["empty file", Buffer.alloc(0), /too short/],
  ["three bytes", Buffer.from("GGU"), /too short/],
  ["bad magic", Buffer.concat([Buffer.from("GGML"), valid.subarray(4)]), /bad magic/],
  ["version 1", head(0, 0, 1).buf(), /version 1/],
  ["version 99", head(0, 0, 99).buf(), /version 99/],
  ["tensor count 2^60", head(2n ** 60n, 0).buf(), /tensor count/],
  ["metadata count 2^40", head(0, 2n ** 40n).buf(), /metadata count/],
  ["key length 2^62", head(0, 1).str("k", 2n ** 62n).bytes(64).buf(), /key #0 length/],
  ["string value past the end", head(0, 1).str("k").u32(V.STRING).str("abc", 1000n).buf(), /past the end/],
  ["array of 2^40 u32", head(0, 1).str("k").u32(V.ARRAY).u32(V.UINT32).u64(2n ** 40n).buf(), /cannot fit/],
  ["array of 1e9 strings", head(0, 1).str("k").u32(V.ARRAY).u32(V.STRING).u64(1e9).bytes(64).buf(), /cannot fit/],
  ["unknown value type", head(0, 1).str("k").u32(77).bytes(8).buf(), /unknown value type/],
  ["unknown array element type", head(0, 1).str("k").u32(V.ARRAY).u32(55).u64(1).bytes(8).buf(), /unknown array element type/],
  ["bool value 7", head(0, 1).str("k").u32(V.BOOL).bytes(1, 7).bytes(40).buf(), /bool/],
  ["duplicate key", head(0, 2).str("k").u32(V.UINT8).bytes(1).str("k").u32(V.UINT8).bytes(1).bytes(40).buf(), /duplicate metadata key/],
  ["alignment 3", head(0, 1).str("general.alignment").u32(V.UINT32).u32(3).bytes(40).buf(), /power-of-two/],
  ["alignment 0", head(0, 1).str("general.alignment").u32(V.UINT32).u32(0).bytes(40).buf(), /power-of-two/],
  ["0 dimensions", tensorInfo(head(1, 0), "a", [], GgmlType.F32, 0).pad().bytes(64).buf(), /0 dimensions/],
  ["5 dimensions", tensorInfo(head(1, 0), "a", [1, 1, 1, 1, 1], GgmlType.F32, 0).pad().bytes(64).buf(), /5 dimensions/],
  ["unknown tensor type", tensorInfo(head(1, 0), "a", [32], 99, 0).pad().bytes(128).buf(), /type id 99, which ggml does not define/],
  ["row not a block multiple", tensorInfo(head(1, 0), "a", [33], GgmlType.Q8_0, 0).pad().bytes(128).buf(), /block size/],
  ["element count overflow", tensorInfo(head(1, 0), "a", [2 ** 31, 2 ** 31, 2 ** 31], GgmlType.F32, 0).pad().bytes(64).buf(), /too many elements|beyond/],
  ["offset beyond the file", tensorInfo(head(1, 0), "a", [32], GgmlType.F32, 1 << 20).pad().bytes(128).buf(), /beyond the end/],
  ["misaligned offset", tensorInfo(head(1, 0), "a", [32], GgmlType.F32, 4).pad().bytes(256).buf(), /not aligned/],
  ["huge offset", tensorInfo(head(1, 0), "a", [32], GgmlType.F32, 2n ** 63n).pad().bytes(256).buf(), /offset/],
  ["overlapping tensors", (() => { const w = head(2, 0); tensorInfo(w, "a", [64], GgmlType.F32, 0); tensorInfo(w, "b", [64], GgmlType.F32, 128); return w.pad().bytes(512).buf(); })(), /overlap/],
  ["duplicate tensor name", (() => { const w = head(2, 0); tensorInfo(w, "a", [8], GgmlType.F32, 0); tensorInfo(w, "a", [8], GgmlType.F32, 32); return w.pad().bytes(128).buf(); })(), /duplicate tensor name/],
  ["arrays nested 10 deep", (() => { const w = head(0, 1).str("k").u32(V.ARRAY); for (let i = 0; i < 10; i++) w.u32(V.ARRAY).u64(1); return w.u32(V.UINT8).u64(1).bytes(64).buf(); })(), /nested/],
];
// every truncation of the valid file inside its header and data
for (let cut = 1; cut < valid.length; cut += cut < 200 ? 3 : 97) corpus.push([`truncated at ${cut}`, valid.subarray(0, cut), /.+/]);

test("the valid base file of the corpus parses", () => {
  const p = join(dir, "valid.gguf");
  writeFileSync(p, valid);
  const f = readGguf(p);
  assert.is(f.tensors.length, 2);
});

test(`broken-GGUF corpus (${corpus.length} files): each refused with BAD_GGUF naming the problem`, () => {
  for (const [name, bytes, why] of corpus) {
    const p = join(dir, "broken.gguf");
    writeFileSync(p, bytes);
    const t0 = performance.now();
    try {
      readGguf(p);
      assert.unreachable(`${name}: accepted`);
    } catch (e) {
      assert.instance(e, WeftError, `${name}: ${String(e)}`);
      assert.is((e as WeftError).code, "BAD_GGUF", `${name}: ${(e as Error).message}`);
      assert.match((e as Error).message, why, name);
    }
    assert.ok(performance.now() - t0 < 1000, `${name}: took too long`);
  }
});

test("a missing file is an IO error naming the path", () => {
  try { readGguf(join(dir, "nope.gguf")); assert.unreachable(); }
  catch (e) { assert.is((e as WeftError).code, "IO"); assert.match((e as Error).message, /nope\.gguf/); }
});

test.after(() => rmSync(dir, { recursive: true, force: true }));
test.run();
