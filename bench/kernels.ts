/**
 * Kernel benchmarks: memory read bandwidth, and MUL_MAT per weight type at the 1b
 * preset's shapes with 1 token (memory-bound: GB/s and % of measured bandwidth) and 128
 * tokens (compute-bound: GFLOP/s), at 1 and 2 threads. Weights rotate among copies
 * totalling ≥ 256 MiB so the 32 MiB L3 never holds them; medians over many runs. At one
 * token a timed graph holds many products (as a model's graph does), so the number is the
 * kernel's and not the JS-to-native round trip.
 *
 *   node dist/bench/kernels.js [--threads 1,2] [--tokens 1,128] [--types q8_0,q4_0,...]
 *                              [--shapes 2048x2048,...] [--time MS] [--rotate MIB] [--no-repack] [--json]
 *
 * Q4_0, Q8_0 and Q4_K weights are repacked as a model load repacks them (lib/cpu/repack.ts) unless
 * --no-repack asks for the row layout.
 */
import { Bench } from "tinybench";
import * as G from "../lib/core/graph.js";
import { Graph } from "../lib/core/graph.js";
import { GgmlType, TYPES, rowSize, typeByName } from "../lib/core/types.js";
import { cpuDevice } from "../lib/cpu/index.js";
import { KERNEL_LEVELS, native } from "../lib/cpu/native.js";
import { allocateTensors, allocateWeights } from "../lib/backend/alloc.js";
import { setTensorData } from "../lib/backend/fallback.js";

const args = process.argv.slice(2);
const opt = (name: string, def: string) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1]! : def; };
if (args.includes("--help")) {
  console.log(`usage: node dist/bench/kernels.js [options]
  --threads LIST   thread counts (default 1,2)
  --tokens LIST    activation columns: 1 = decode (GB/s), 128 = prompt (GFLOP/s) (default 1,128)
  --types LIST     weight types (default q8_0,q4_0,q4_K,q6_K,f16,bf16)
  --shapes LIST    KxN weight shapes (default 2048x2048,2048x8192,8192x2048,2048x128256)
  --time MS        time budget per row (default 1000)
  --rotate MIB     weight bytes to rotate among (default 256; a small value such as 1 keeps
                   the weights in cache and so measures the kernel's compute speed alone)
  --no-repack      keep Q4_0/Q8_0/Q4_K weights in rows (default: repacked in eight-row groups, as
                   loadModel does)
  --json           one JSON object per row instead of a table`);
  process.exit(0);
}
const threads = opt("--threads", "1,2").split(",").map(Number);
const tokens = opt("--tokens", "1,128").split(",").map(Number);
const types = opt("--types", "q8_0,q4_0,q4_K,q6_K,f16,bf16").split(",").map((n) => {
  const t = typeByName(n);
  if (t === undefined || !TYPES[t].weight) throw new Error(`unknown weight type ${n}`);
  return t;
});
const shapes = opt("--shapes", "2048x2048,2048x8192,8192x2048,2048x128256").split(",").map((s) => s.split("x").map(Number) as [number, number]);
const timeMs = Number(opt("--time", "1000"));
const json = args.includes("--json");
const ROTATE_BYTES = Number(opt("--rotate", "256")) * (1 << 20);
const repack = !args.includes("--no-repack");

const lvl = native().kernelLevel();
const bandwidth = new Map(threads.map((t) => [t, native().readBandwidth(1 << 30, t, 5)]));
if (!json) {
  console.log(`kernels: ${KERNEL_LEVELS[lvl.current]}; read bandwidth: ${threads.map((t) => `${t}T ${bandwidth.get(t)!.toFixed(1)} GB/s`).join(", ")}`);
  console.log("| type | K×N | threads | tokens | median ms | GB/s | % of bw | GFLOP/s |");
  console.log("|---|---|---|---|---|---|---|---|");
} else console.log(JSON.stringify({ kernels: KERNEL_LEVELS[lvl.current], bandwidthGBs: Object.fromEntries(bandwidth) }));

/** fills a weight tensor by tiling one quantized block of 64 random rows */
/** A weight's bytes: one quantized tile of 64 rows, repeated. */
function weightBytes(type: GgmlType, K: number, N: number): Uint8Array {
  const tileRows = Math.min(64, N);
  const f = new Float32Array(K * tileRows);
  for (let i = 0; i < f.length; i++) f[i] = Math.sin(i * 12.9898) * 0.5;
  const tile = type === GgmlType.F32 ? new Uint8Array(f.buffer) : native().quantize(type, f, K);
  const rb = rowSize(type, K);
  const out = new Uint8Array(rb * N);
  for (let r = 0; r < N; r += tileRows) out.set(tile.subarray(0, Math.min(tileRows, N - r) * rb), r * rb);
  return out;
}

for (const type of types) {
  for (const [K, N] of shapes) {
    if (K % TYPES[type].blockSize) continue;
    const wbytes = rowSize(type, K) * N;
    const copies = Math.max(1, Math.ceil(ROTATE_BYTES / wbytes));
    const weights = Array.from({ length: copies }, () => G.newTensor(type, [K, N]));
    // the CPU's weight memory: Q4_0/Q8_0/Q4_K matrices repacked as a model loads them
    const wbufs = allocateWeights(cpuDevice(), weights, { matmulWeights: repack ? new Set(weights) : undefined });
    const bytes = weightBytes(type, K, N);
    for (const w of weights) setTensorData(w, bytes);
    const packed = wbufs.some((b) => b.bufferType.name.endsWith("/repacked"));
    const name = `${TYPES[type].name}${packed ? " (repacked)" : ""}`;
    for (const M of tokens) {
      const x = G.newTensor(GgmlType.F32, [K, M]);
      // One token: one graph holds many products (every copy of the weight, repeated up to
      // 64 MiB of reads), as a model's graph does, so the time is the kernel's and not the
      // JS-to-native round trip (~30-200 us on this VM, most of it waking an idle vCPU).
      // Many tokens: one product per graph, rotating among the copies.
      const perGraph = M === 1 ? Math.min(4096, Math.max(copies, Math.ceil((64 << 20) / wbytes))) : 1;
      const graphs: Graph[] = M === 1
        ? [G.buildGraph(Array.from({ length: perGraph }, (_, i) => G.mulMat(weights[i % copies]!, x)))]
        : weights.map((w) => G.buildGraph(G.mulMat(w, x)));
      const abuf = allocateTensors(graphs.flatMap((g) => g.order));
      const xf = new Float32Array(K * M).map((_, i) => Math.cos(i));
      setTensorData(x, xf);
      for (const t of threads) {
        const be = cpuDevice().initBackend({ threads: t });
        let i = 0;
        const bench = new Bench({ time: timeMs, warmupIterations: 2, iterations: 5 });
        bench.add("mm", async () => { await be.computeAsync(graphs[i++ % graphs.length]!); });
        await bench.run();
        const res = bench.tasks[0]!.result;
        if (res.state !== "completed") throw new Error(`benchmark failed: ${res.state}`);
        const ms = res.latency.p50 / perGraph;
        const gbs = wbytes / (ms / 1000) / 1e9;
        const gflops = (2 * K * N * M) / (ms / 1000) / 1e9;
        const pct = (100 * gbs) / bandwidth.get(t)!;
        const row = { type: name, K, N, threads: t, tokens: M, medianMs: ms, GBs: gbs, pctBandwidth: pct, GFLOPs: gflops, samples: res.latency.samplesCount };
        if (json) console.log(JSON.stringify(row));
        else console.log(`| ${row.type} | ${K}×${N} | ${t} | ${M} | ${ms.toFixed(3)} | ${M === 1 ? gbs.toFixed(1) : "–"} | ${M === 1 ? pct.toFixed(0) + " %" : "–"} | ${gflops.toFixed(1)} |`);
        await be.dispose();
      }
      abuf.dispose();
    }
    for (const b of wbufs) b.dispose();
  }
}
