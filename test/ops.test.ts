/**
 * Op matrix: every op × accepted types × awkward shapes (odd sizes, non-contiguous views,
 * broadcasts, in-place) on the CPU backend at every kernel level this machine has
 * (portable, AVX2; AVX-512 in the emulated build scripts/run-tests.js adds) and 1 and 2
 * threads, against the float64 reference in test/ref.
 * Outputs are surrounded by guard bytes that must survive.
 */
import { test } from "uvu";
import * as assert from "uvu/assert";
import * as G from "../lib/core/graph.js";
import { GluOp, RopeMode, UnaryOp, VIEW_OPS } from "../lib/core/ops.js";
import { Tensor } from "../lib/core/tensor.js";
import { GgmlType, TYPES } from "../lib/core/types.js";
import { CpuBuffer, cpuDevice } from "../lib/cpu/index.js";
import { KERNEL_LEVELS, native } from "../lib/cpu/native.js";
import { allocateTensors, allocateWeights } from "../lib/backend/alloc.js";
import { getTensorData, setTensorData, tensorPlace } from "../lib/backend/fallback.js";
import { dequantizeRef } from "./ref/quant.js";
import { nmse, runReference } from "./ref/ops.js";
import { randomF32, rejectsWith, rng } from "./helpers.js";

type Gen = (r: () => number) => ArrayBufferView;
interface OpCase {
  op: string;
  vars: string;
  maxNmse: number;
  /** repack: weights placed in the CPU's repacked weight memory (written: repacked) */
  build(): { out: Tensor; gens?: Map<Tensor, Gen>; inPlace?: boolean; repack?: Tensor[] };
}

const F32 = GgmlType.F32, F16 = GgmlType.F16, BF16 = GgmlType.BF16, I32 = GgmlType.I32, I64 = GgmlType.I64;
const NMSE_EXACT = 1e-7;
// quantized MUL_MAT quantizes the activations to 8 bits (like ggml); the reference does
// the same (quantizeActivationsRef), so what is left is float32 summation order
const NMSE_QMATMUL = 1e-6;
const cases: OpCase[] = [];
const add = (op: string, vars: string, maxNmse: number, build: OpCase["build"]) => cases.push({ op, vars, maxNmse, build });
const t = (type: GgmlType, ...ne: number[]) => G.newTensor(type, ne);
const indices = (n: number, max: number, type: GgmlType = I32, distinct = false): Gen => (r) => {
  const pool = Array.from({ length: max }, (_, i) => i);
  const pick = Array.from({ length: n }, () => (distinct ? pool.splice(Math.floor(r() * pool.length), 1)[0]! : Math.floor(r() * max)));
  return type === I64 ? new BigInt64Array(pick.map(BigInt)) : new Int32Array(pick);
};

// ---- MUL_MAT: every weight type × shapes (odd N, M; batches with broadcast; strided activations)
const WEIGHT_TYPES = [F32, F16, BF16, GgmlType.Q8_0, GgmlType.Q4_0, GgmlType.Q4_K, GgmlType.Q6_K] as const;
for (const wt of WEIGHT_TYPES) {
  const bs = TYPES[wt].blockSize;
  const tol = TYPES[wt].quantized ? NMSE_QMATMUL : NMSE_EXACT;
  const Ks = bs === 1 ? [67, 256] : bs === 32 ? [96, 512] : [256, 512];
  for (const K of Ks)
    for (const [N, M] of [[1, 1], [7, 1], [37, 1], [33, 3], [16, 17]] as const)
      add("MUL_MAT", `type=${TYPES[wt].name},K=${K},N=${N},M=${M}`, tol, () => ({ out: G.mulMat(t(wt, K, N), t(F32, K, M)) }));
  const K = Ks[0]!;
  add("MUL_MAT", `type=${TYPES[wt].name},broadcast a[K,5,2,1] b[K,3,4,3]`, tol, () => ({ out: G.mulMat(t(wt, K, 5, 2, 1), t(F32, K, 3, 4, 3)) }));
  add("MUL_MAT", `type=${TYPES[wt].name},activations permuted`, tol, () => {
    const b = t(F32, K, 4, 3); // [K, heads, tokens] -> view as [K, tokens, heads]
    return { out: G.mulMat(t(wt, K, 6, 4), G.permute(b, [0, 2, 1, 3])) };
  });
  if (bs === 1)
    add("MUL_MAT", `type=${TYPES[wt].name},activations transposed (nb0 != 4)`, tol, () => ({ out: G.mulMat(t(wt, 8, 5), G.transpose(t(F32, 3, 8))) }));
}

// ---- MUL_MAT on repacked weights (eight-row groups): one group, an odd number of groups
// (the two-group kernel's remainder, a work unit of 8 rows), batched (unpacked for tiles)
for (const wt of [GgmlType.Q4_0, GgmlType.Q8_0, GgmlType.Q4_K])
  for (const K of wt === GgmlType.Q4_K ? [256, 768] : [96, 512])
    for (const [N, M] of [[8, 1], [40, 1], [128, 1], [24, 3], [16, 6], [40, 17]] as const)
      add("MUL_MAT", `type=${TYPES[wt].name} repacked,K=${K},N=${N},M=${M}`, NMSE_QMATMUL, () => {
        const w = t(wt, K, N);
        return { out: G.mulMat(w, t(F32, K, M)), repack: [w] };
      });

// ---- GET_ROWS from every weight type
for (const wt of WEIGHT_TYPES) {
  const K = TYPES[wt].blockSize === 256 ? 256 : 64;
  add("GET_ROWS", `type=${TYPES[wt].name},rows=5 of 9`, NMSE_EXACT, () => {
    const idx = t(I32, 5);
    return { out: G.getRows(t(wt, K, 9), idx), gens: new Map([[idx, indices(5, 9)]]) };
  });
}
add("GET_ROWS", "batched a[16,7,3] idx[4,3]", NMSE_EXACT, () => {
  const idx = t(I32, 4, 3);
  return { out: G.getRows(t(F32, 16, 7, 3), idx), gens: new Map([[idx, indices(12, 7)]]) };
});

// ---- elementwise with broadcasts, strided operands, in place
for (const [name, fn] of [["ADD", G.add], ["MUL", G.mul]] as const) {
  add(name, "same shape [33,5,2]", NMSE_EXACT, () => ({ out: fn(t(F32, 33, 5, 2), t(F32, 33, 5, 2)) }));
  add(name, "broadcast row [33,5,2] x [33]", NMSE_EXACT, () => ({ out: fn(t(F32, 33, 5, 2), t(F32, 33)) }));
  add(name, "broadcast [8,6,4,2] x [8,1,4,1]", NMSE_EXACT, () => ({ out: fn(t(F32, 8, 6, 4, 2), t(F32, 8, 1, 4, 1)) }));
  add(name, "broadcast scalar-per-row [9,4] x [1,4]", NMSE_EXACT, () => ({ out: fn(t(F32, 9, 4), t(F32, 1, 4)) }));
  add(name, "permuted first operand", NMSE_EXACT, () => ({ out: fn(G.permute(t(F32, 7, 5, 3), [1, 0, 2, 3]), t(F32, 5, 7, 3)) }));
  add(name, "in place", NMSE_EXACT, () => ({ out: fn(t(F32, 19, 3), t(F32, 19, 3)), inPlace: true }));
}
add("SCALE", "[37,3] s=0.7 b=0.25", NMSE_EXACT, () => ({ out: G.scale(t(F32, 37, 3), 0.7, 0.25) }));
add("SCALE", "transposed, in place", NMSE_EXACT, () => ({ out: G.scale(t(F32, 13, 4), -1.5), inPlace: true }));
for (const [nm, k] of Object.entries(UnaryOp)) {
  add("UNARY", `${nm} [45,3]`, NMSE_EXACT, () => ({ out: G.unary(t(F32, 45, 3), k) }));
  add("UNARY", `${nm} transposed`, NMSE_EXACT, () => ({ out: G.unary(G.transpose(t(F32, 6, 5)), k) }));
}
add("UNARY", "SILU in place", NMSE_EXACT, () => ({ out: G.silu(t(F32, 21, 2)), inPlace: true }));
for (const [nm, k] of Object.entries(GluOp)) {
  add("GLU", `${nm} split [35,4]`, NMSE_EXACT, () => ({ out: G.glu(t(F32, 35, 4), t(F32, 35, 4), k) }));
  add("GLU", `${nm} fused [2x35,4]`, NMSE_EXACT, () => ({ out: G.glu(t(F32, 70, 4), null, k) }));
  add("GLU", `${nm} fused swapped`, NMSE_EXACT, () => ({ out: G.glu(t(F32, 70, 4), null, k, true) }));
}

// ---- row ops
for (const n of [1, 31, 256, 1000])
  add("RMS_NORM", `[${n},3,2] eps=1e-5`, NMSE_EXACT, () => ({ out: G.rmsNorm(t(F32, n, 3, 2), 1e-5) }));
add("RMS_NORM", "in place", NMSE_EXACT, () => ({ out: G.rmsNorm(t(F32, 64, 4), 1e-6), inPlace: true }));
// ROPE: the backend builds angles by repeated multiplication in float32 as ggml does; the
// reference uses exact powers, so the threshold allows float32 angle error.
for (const mode of [RopeMode.NORMAL, RopeMode.NEOX])
  for (const [hd, nd] of [[64, 64], [32, 16], [6, 6]] as const)
    add("ROPE", `mode=${mode} head=${hd} nDims=${nd}`, 1e-6, () => {
      const pos = t(I32, 5);
      return { out: G.rope(t(F32, hd, 3, 5), pos, { nDims: nd, mode, freqBase: 10000 }), gens: new Map([[pos, indices(5, 60)]]) };
    });
add("ROPE", "freqScale=0.5 attnFactor=1.2 theta=5e5", 1e-6, () => {
  const pos = t(I32, 4);
  return { out: G.rope(t(F32, 16, 2, 4), pos, { nDims: 16, freqBase: 5e5, freqScale: 0.5, attnFactor: 1.2 }), gens: new Map([[pos, indices(4, 40)]]) };
});
add("ROPE", "in place", 1e-6, () => {
  const pos = t(I32, 3);
  return { out: G.rope(t(F32, 8, 2, 3), pos, { nDims: 8 }), gens: new Map([[pos, indices(3, 20)]]), inPlace: true };
});
for (const n of [1, 17, 128, 513]) add("SOFT_MAX", `[${n},4] scale=0.3`, NMSE_EXACT, () => ({ out: G.softMax(t(F32, n, 4), null, 0.3) }));
for (const mt of [F32, F16])
  add("SOFT_MAX", `mask ${TYPES[mt].name} causal, broadcast over heads`, NMSE_EXACT, () => {
    const mask = t(mt, 9, 6);
    const gen: Gen = () => {
      const f = new Float32Array(9 * 6);
      for (let i = 0; i < 6; i++) for (let j = 0; j < 9; j++) f[i * 9 + j] = j <= i + 3 ? 0 : -Infinity;
      return mt === F32 ? f : native().quantize(F16, f, 9);
    };
    return { out: G.softMax(t(F32, 9, 6, 4), mask, 0.125), gens: new Map([[mask, gen]]) };
  });

// ---- copies and conversions
for (const dt of [F32, F16, BF16, GgmlType.Q8_0, GgmlType.Q4_0, GgmlType.Q4_K, GgmlType.Q6_K]) {
  const n = TYPES[dt].blockSize === 256 ? 256 : 64;
  const tol = dt === F32 ? NMSE_EXACT : dt === F16 ? 1e-6 : dt === BF16 ? 1e-4 : 2e-2;
  add("CPY", `f32 -> ${TYPES[dt].name} [${n},3]`, tol, () => ({ out: G.cpy(t(F32, n, 3), t(dt, n, 3)) }));
}
add("CPY", "transposed f32 -> f16", 1e-6, () => ({ out: G.cpy(G.transpose(t(F32, 5, 12)), t(F16, 12, 5)) }));
add("CPY", "f16 -> f32 into a strided view", NMSE_EXACT, () => {
  const dst = t(F32, 10, 6);
  return { out: G.cpy(t(F16, 4, 6), G.view(dst, [4, 6], 3 * 4, [dst.nb[1], dst.nb[2], dst.nb[3]])) };
});
add("CONT", "of a permute [5,4,3] -> [4,3,5]", NMSE_EXACT, () => ({ out: G.cont(G.permute(t(F32, 5, 4, 3), [2, 0, 1, 3])) }));
add("CONT", "bf16 transposed", NMSE_EXACT, () => ({ out: G.cont(G.transpose(t(BF16, 7, 3))) }));
for (const dt of [F32, F16, GgmlType.Q8_0])
  for (const it of [I64, I32])
    add("SET_ROWS", `into ${TYPES[dt].name} idx ${TYPES[it].name}`, dt === F32 ? NMSE_EXACT : dt === F16 ? 1e-6 : 2e-2, () => {
      const idx = t(it, 3);
      return { out: G.setRows(t(dt, 64, 10), t(F32, 64, 3), idx), gens: new Map([[idx, indices(3, 10, it, true)]]) };
    });
add("SET_ROWS", "KV-cache style [16,8,2] rows per head", 1e-6, () => {
  const idx = t(I64, 2);
  return { out: G.setRows(t(F16, 16, 8, 2), t(F32, 16, 2, 2), idx), gens: new Map([[idx, indices(2, 8, I64, true)]]) };
});

// ---------------------------------------------------------------- runner

const backends = [cpuDevice("cpu:0").initBackend({ threads: 1 }), cpuDevice("cpu:1").initBackend({ threads: 2 })];
const levels = Array.from({ length: native().kernelLevel().detected + 1 }, (_, i) => i);
const GUARD = 64, SENTINEL = 0xa5;

function leafBytes(leaf: Tensor, r: () => number, gens?: Map<Tensor, Gen>): Uint8Array {
  const g = gens?.get(leaf);
  const v = g ? g(r) : (() => {
    const f = randomF32(leaf.nelements, r);
    return leaf.type === F32 ? f : native().quantize(leaf.type, f, leaf.ne[0]);
  })();
  return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
}

function valuesOf(type: GgmlType, bytes: Uint8Array, n: number): Float64Array {
  if (type === I64) return Float64Array.from(new BigInt64Array(bytes.slice().buffer), Number);
  return dequantizeRef(type, bytes, n);
}

async function runCase(c: OpCase, seed: number): Promise<string[]> {
  const problems: string[] = [];
  for (const level of levels) {
    native().kernelLevel(level);
    for (const be of backends) {
      const { out, gens, inPlace, repack } = c.build();
      const graph = G.buildGraph(out);
      const packed = repack ? allocateWeights(cpuDevice("cpu:0"), repack, { matmulWeights: new Set(repack) }) : [];
      const buf = allocateTensors(graph.order, { guard: GUARD }) as CpuBuffer;
      if (inPlace) {
        const src = out.src[0]!;
        out.buffer = src.buffer; out.offset = src.offset;
      }
      buf.memset(0, buf.size, SENTINEL);
      const r = rng(seed);
      const leafVals = new Map<Tensor, Float64Array>();
      for (const leaf of graph.leafs) {
        const bytes = leafBytes(leaf, r, gens);
        setTensorData(leaf, bytes);
        leafVals.set(leaf, valuesOf(leaf.type, bytes, leaf.nelements));
      }
      // where every tensor was placed in buf (repacked weights are in their own memory)
      const inside = new Uint8Array(buf.size);
      for (const tt of graph.order) {
        if (VIEW_OPS.has(tt.op)) continue;
        const { tensor: rt } = tt.root();
        const { offset } = tensorPlace(rt);
        if ((rt.buffer as CpuBuffer) === buf) inside.fill(1, offset, offset + rt.nbytes);
      }
      if (repack && !repack.every((w) => (w.buffer as CpuBuffer | null)?.repacked)) problems.push("weights were not repacked");
      await be.computeAsync(graph);
      for (const p of packed) p.dispose();
      const ref = runReference(graph.order, (l) => leafVals.get(l)!, { bf16Activations: native().kernelLevel().bf16 });
      const root = out.root().tensor;
      const got = valuesOf(root.type, getTensorData(root), root.nelements);
      const want = ref.get(root) ?? ref.get(out)!;
      // compare the whole root (for CPY/SET_ROWS that includes rows that must be untouched)
      const wantArr = want.data.length === root.nelements ? want.data : want.data.slice(0, root.nelements);
      const e = nmse(got, wantArr);
      if (!(e <= c.maxNmse)) problems.push(`${KERNEL_LEVELS[level]}, ${be.threads} thread(s): NMSE ${e.toExponential(2)} > ${c.maxNmse}`);
      // guard bytes: everything outside the placed tensors must still be the sentinel
      const all = buf.get(0, buf.size);
      for (let i = 0; i < all.length; i++) if (!inside[i] && all[i] !== SENTINEL) { problems.push(`byte ${i} outside every tensor was overwritten`); break; }
      buf.dispose();
    }
  }
  native().kernelLevel(levels[levels.length - 1]!);
  return problems;
}

let seed = 1234;
for (const c of cases) {
  const s = seed++;
  test(`${c.op} ${c.vars}`, async () => {
    const problems = await runCase(c, s);
    assert.equal(problems, [], problems.join("; "));
  });
}

test("a graph runs again by uid without re-encoding, with new inputs", async () => {
  const a = t(F32, 32, 4), b = t(F32, 32, 4);
  const g = G.buildGraph(G.add(a, b));
  const buf = allocateTensors(g.order);
  const be = backends[1]!;
  for (let i = 0; i < 3; i++) {
    setTensorData(a, new Float32Array(128).fill(i));
    setTensorData(b, new Float32Array(128).fill(1));
    await be.computeAsync(g);
    const out = new Float32Array(getTensorData(g.nodes[0]!).slice().buffer);
    assert.ok(out.every((v) => v === i + 1), `step ${i}`);
  }
  buf.dispose();
  // its buffer is gone: the cached plan must be refused, not run on freed memory
  await rejectsWith(be.computeAsync(g), /freed/);
});

test("a graph whose tensor lies outside its buffer is refused with a clear error", async () => {
  const a = t(F32, 32, 4);
  const g = G.buildGraph(G.scale(a, 2));
  const small = cpuDevice().bufferType().alloc(64);
  for (const x of g.order) { x.buffer = small; x.offset = 0; }
  await rejectsWith(backends[0]!.computeAsync(g), /beyond its buffer/);
  small.dispose();
});

test("out-of-range GET_ROWS index is reported, not read", async () => {
  const w = t(F32, 8, 4), idx = t(I32, 2);
  const g = G.buildGraph(G.getRows(w, idx));
  const buf = allocateTensors(g.order);
  setTensorData(w, new Float32Array(32).fill(1));
  setTensorData(idx, new Int32Array([1, 99]));
  await rejectsWith(backends[0]!.computeAsync(g), /out of range/);
  buf.dispose();
});

test("repacked weights are read by MUL_MAT only: other readers are refused, rows cannot be fetched", async () => {
  const w = t(GgmlType.Q4_0, 64, 8), idx = t(I32, 2);
  const g = G.buildGraph(G.getRows(w, idx));
  const packed = allocateWeights(cpuDevice(), [w], { matmulWeights: new Set([w]) });
  const buf = allocateTensors(g.order);
  setTensorData(w, native().quantize(GgmlType.Q4_0, randomF32(512, rng(5)), 64));
  setTensorData(idx, new Int32Array([1, 2]));
  assert.ok((w.buffer as CpuBuffer).repacked, "an 8-row Q4_0 matrix is repackable");
  await rejectsWith(backends[0]!.computeAsync(g), /repacked weights, which only MUL_MAT can/);
  assert.throws(() => getTensorData(w), /repacked/);
  // not repackable: a row count that is not a multiple of 8, a type without a repacked form
  const odd = t(GgmlType.Q4_0, 64, 7), q6 = t(GgmlType.Q6_K, 256, 8);
  const other = allocateWeights(cpuDevice(), [odd, q6], { matmulWeights: new Set([odd, q6]) });
  assert.ok(![odd, q6].some((x) => (x.buffer as CpuBuffer).repacked), "neither is repacked");
  for (const b of [...other, ...packed]) b.dispose();
  buf.dispose();
});

test.after(async () => { for (const b of backends) await b.dispose(); });
test.run();
