/**
 * `weft bench`: llama-bench's tests, flags and output fields (pp, tg, pp+tg, at a depth;
 * md, json, jsonl, csv), every configuration of a model loaded at once with their
 * repetitions alternating, optionally against node-llama-cpp in the same run.
 */
import { cpus } from "node:os";
import { basename } from "node:path";
import { weftError } from "../core/errors.js";
import { readGguf } from "../gguf/reader.js";
import { metaNumber, metaString } from "../gguf/reader.js";
import { GgufFile } from "../gguf/types.js";
import { typeName } from "../core/types.js";
import { Model, SplitMode, loadModel } from "../model/model.js";
import { native, usableCores, KERNEL_LEVELS } from "../cpu/index.js";
import { LLAMA_IGNORED, int, parse } from "./args.js";
import { Command, RPC_FLAGS, VERSION, allReduceTypeOf, connectRpc, log, printProfile, resolveModel } from "./common.js";
import type { AllReduceType } from "../backend/interface.js";
import { Peer, ensurePeerInstalled } from "./peer.js";

const mean = (a: number[]) => (a.length ? a.reduce((s, x) => s + x, 0) / a.length : 0);
const sd = (a: number[]) => (a.length < 2 ? 0 : Math.sqrt(a.reduce((s, x) => s + (x - mean(a)) ** 2, 0) / (a.length - 1)));
const fmt = (a: number[]) => (a.length ? `${mean(a).toFixed(2)} ± ${sd(a).toFixed(2)}` : "-");

/** llama.cpp's names of general.file_type (llama_model_ftype_name). */
const FTYPE: Record<number, string> = {
  0: "all F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K - Medium", 11: "Q3_K - Small",
  12: "Q3_K - Medium", 13: "Q3_K - Large", 14: "Q4_K - Small", 15: "Q4_K - Medium", 16: "Q5_K - Small", 17: "Q5_K - Medium",
  18: "Q6_K", 32: "BF16",
};

/** "llama 1B Q8_0", as llama-bench's model_type (without general.file_type: the matrices' type). */
function modelType(f: GgufFile, params: number): string {
  const arch = metaString(f, "general.architecture") ?? "?";
  const size = params >= 1e9 ? `${Math.round(params / 1e9)}B` : params >= 1e6 ? `${Math.round(params / 1e6)}M` : `${Math.round(params / 1e3)}K`;
  const ft = metaNumber(f, "general.file_type");
  const counts = new Map<string, number>();
  for (const t of f.tensors) if (t.ne.length > 1) counts.set(typeName(t.type), (counts.get(typeName(t.type)) ?? 0) + 1);
  const main = [...counts].sort((a, b) => b[1] - a[1])[0]?.[0] ?? "?";
  return `${arch} ${size} ${ft !== undefined ? FTYPE[ft] ?? `ftype ${ft}` : main === "F32" ? "all F32" : main}`;
}

const bytesText = (b: number) => (b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(2)} GiB` : `${(b / 2 ** 20).toFixed(2)} MiB`);
const paramsText = (p: number) => (p >= 1e9 ? `${(p / 1e9).toFixed(2)} B` : `${(p / 1e6).toFixed(2)} M`);

interface Test { name: string; nPrompt: number; nGen: number; depth: number }
interface Config { th: number; sm: string; devs: string[]; ub: number; b: number; kv: "f16" | "f32"; ar: AllReduceType }

export const BENCH_COMMAND: Command = {
  summary: "measure prompt processing (pp) and generation (tg) tokens/s, like llama-bench",
  usage: `weft bench [-m MODEL[,MODEL…]] [-p 128] [-n 64] [-pg PP,TG] [-d 0] [-r 3] [-t 1,2] [-o md|json|jsonl|csv]
           [-sm none,layer,tensor] [-dev cpu:0,cpu:1 [-dev …]] [-ts 1,1] [-ub 512,64] [-b 2048] [-ctk f16,f32]
           [--no-repack] [--rpc HOST:PORT,…] [--allreduce-type f32,f16,q8_0] [--peer node-llama-cpp]

  -m, --model LIST          GGUF model(s), comma-separated or repeated (default: the embedded
                            small Q8_0 model); every one is checked before anything runs
  -p, --n-prompt LIST       prompt lengths of the pp tests; 0 skips them (default 128)
  -n, --n-gen LIST          generated tokens of the tg tests; 0 skips them (default 64)
  -pg PP,TG                 a prompt of PP tokens then TG generated tokens, timed together
                            (llama-bench's ppPP+tgTG); repeat for several
  -d, --n-depth LIST        tokens already in the KV cache when each test starts (default 0)
  -r, --repetitions N       repetitions per test, after one warm-up (default 3)
  -t, --threads LIST        thread counts per device (default 1,2)
  -ub, --ubatch-size LIST   micro-batch sizes (default 512); with a layer split a prompt longer
                            than one micro-batch is pipelined across the devices
  -b, --batch-size LIST     logical batch sizes (default 2048): the micro-batch is at most this
  -sm, --split-mode LIST    none, layer and/or tensor (default none): one row each
  -dev, --device SET        a device set, comma-separated; repeat the flag for several sets
                            (default cpu:0); split mode none runs on the first device of each
                            set, layer and tensor on each set of two or more devices
  -ts, --tensor-split LIST  share per device: of the layers (layer), of every matrix (tensor)
  -ctk, --cache-type-k LIST KV cache types, f16 and/or f32 (default f16; -ctv: the same)
  --no-repack               keep Q4_0/Q8_0/Q4_K matrices in rows (default: repacked, as weft run)
  --allreduce-type LIST     how partial sums cross the links between RPC servers in a tensor
                            split: f32, f16 and/or q8_0 (default f32); one row each
  --no-peer-links           a tensor split's partial sums pass through this machine, not
                            server to server (the generic path, for comparison)
  --rpc LIST                weft rpc-servers (host:port, comma-separated): their devices are
                            rpc:0, rpc:1, … for -dev; rows name the devices they ran on
  --token-file FILE         the servers' shared token (default: WEFT_RPC_TOKEN)
  -o, --output FORMAT       md (table, default), json (one array), jsonl (an object a line), csv
  --peer node-llama-cpp     also run the same tests through node-llama-cpp (installed on first use
                            into WEFT_PEER_DIR or <cache>/peer, CPU binary only), alternating with
                            weft, and report weft/peer (tests at depth 0)
Every configuration of a model is loaded at once and the repetitions of a test alternate
among them (and the peer), so drift in the machine's speed hits all alike. Results are
mean ± sd of tokens/s. The JSON fields are llama-bench's (model_type, model_size,
model_n_params, n_threads, n_prompt, n_gen, n_depth, avg_ts, stddev_ts, samples_ts, …) plus
weft's (devices, memory per device as weights, kv and compute bytes, peer_avg_ts, ratio).`,
  async run(args, signal) {
    const { values: v } = parse(args, {
      model: { names: ["-m", "--model"], multiple: true }, nPrompt: { names: ["-p", "--n-prompt"], multiple: true },
      nGen: { names: ["-n", "--n-gen"], multiple: true }, pg: { names: ["-pg"], multiple: true }, depth: { names: ["-d", "--n-depth"], multiple: true },
      repetitions: { names: ["-r", "--repetitions"] }, threads: { names: ["-t", "--threads"], multiple: true },
      ubatch: { names: ["-ub", "--ubatch-size", "--ubatch"], multiple: true }, batch: { names: ["-b", "--batch-size"], multiple: true },
      output: { names: ["-o", "--output"] }, peer: { names: ["--peer"] },
      splitMode: { names: ["-sm", "--split-mode"], multiple: true }, device: { names: ["-dev", "--device"], multiple: true },
      tensorSplit: { names: ["-ts", "--tensor-split"] }, cacheTypeK: { names: ["-ctk", "--cache-type-k"], multiple: true },
      cacheTypeV: { names: ["-ctv", "--cache-type-v"], multiple: true }, noRepack: { names: ["--no-repack"], switch: true },
      allReduceType: { names: ["--allreduce-type"], multiple: true }, noPeerLinks: { names: ["--no-peer-links"], switch: true },
      ...RPC_FLAGS, ...LLAMA_IGNORED,
    });
    const list = (xs: string[] | undefined) => xs?.flatMap((x) => x.split(",").map((s) => s.trim())).filter((s) => s !== "");
    const ints = (xs: string[] | undefined, flag: string, fallback: number[], min: number) => (xs ? list(xs)!.map((s) => int(s, flag, 0, min)) : fallback);
    const nPs = ints(v.nPrompt, "--n-prompt", [128], 0), nGs = ints(v.nGen, "--n-gen", [64], 0);
    const depths = ints(v.depth, "--n-depth", [0], 0);
    const pgs = (v.pg ?? []).map((x) => {
      const [a, b] = x.split(",").map((s) => int(s.trim(), "-pg", 0, 1));
      if (a === undefined || b === undefined || x.split(",").length !== 2) throw weftError("USAGE", `-pg needs PP,TG (e.g. -pg 512,128), got '${x}'`);
      return [a, b] as const;
    });
    const reps = int(v.repetitions, "--repetitions", 3, 1);
    const threads = ints(v.threads, "--threads", [1, 2], 1);
    const ubatches = ints(v.ubatch, "--ubatch-size", [512], 1), batches = ints(v.batch, "--batch-size", [2048], 1);
    const splitModes = list(v.splitMode) ?? ["none"];
    for (const sm of splitModes) if (sm !== "none" && sm !== "layer" && sm !== "tensor") throw weftError("USAGE", `--split-mode must list none, layer and/or tensor, got '${sm}'`);
    const deviceSets = (v.device ?? ["cpu:0"]).map((d) => d.split(",").map((x) => x.trim()));
    const tensorSplit = v.tensorSplit?.split(",").map(Number);
    const kvs = list(v.cacheTypeK) ?? list(v.cacheTypeV) ?? ["f16"];
    const ars = (list(v.allReduceType) ?? ["f32"]).map((x) => allReduceTypeOf(x));
    for (const k of kvs) if (k !== "f16" && k !== "f32") throw weftError("USAGE", `-ctk ${k}: weft's KV cache is f16 or f32`);
    const out = v.output ?? "md";
    if (!["md", "json", "jsonl", "csv"].includes(out)) throw weftError("USAGE", `--output must be md, json, jsonl or csv, got '${out}'`);
    if (v.peer !== undefined && v.peer !== "node-llama-cpp") throw weftError("USAGE", `--peer supports only node-llama-cpp, got '${v.peer}'`);
    const tests: Test[] = [];
    for (const depth of depths) {
      for (const p of nPs) if (p > 0) tests.push({ name: `pp${p}`, nPrompt: p, nGen: 0, depth });
      for (const g of nGs) if (g > 0) tests.push({ name: `tg${g}`, nPrompt: 0, nGen: g, depth });
      for (const [p, g] of pgs) tests.push({ name: `pp${p}+tg${g}`, nPrompt: p, nGen: g, depth });
    }
    if (!tests.length) throw weftError("USAGE", "nothing to measure: -p and -n are 0 and there is no -pg");
    // every model is checked before anything runs (a typo in the last one must not cost a long run)
    const models: string[] = [];
    for (const m of list(v.model) ?? [undefined as unknown as string]) models.push(await resolveModel(m ?? undefined, signal));
    const files = models.map((p) => readGguf(p));
    await connectRpc(v, signal);
    const configs: Config[] = [];
    // split mode none runs on the first device of each set (once per device); layer and
    // tensor on each set of two or more (-dev cpu:0 -dev rpc:0 -dev rpc:0,rpc:1 -sm none,layer:
    // cpu:0 alone, rpc:0 alone, and the layer split over both servers)
    const setsFor = (sm: string): string[][] => {
      if (sm === "none") return [...new Map(deviceSets.map((d) => [d[0]!, [d[0]!]])).values()];
      const multi = deviceSets.filter((d) => d.length > 1 || d[0]!.includes("+"));
      if (!multi.length) throw weftError("USAGE", `--split-mode ${sm} needs a device set of two or more devices (e.g. -dev cpu:0,cpu:1)`);
      return multi;
    };
    // the all-reduce wire types matter where a tensor split is (a + group in a layer split too)
    const splitsTensors = (sm: string, devs: string[]) => sm === "tensor" || devs.some((d) => d.includes("+"));
    for (const th of threads) for (const sm of splitModes) for (const devs of setsFor(sm)) for (const ub of ubatches) for (const b of batches) for (const kv of kvs)
      for (const ar of splitsTensors(sm, devs) ? ars : ["f32" as const]) configs.push({ th, sm, devs, ub, b, kv: kv as "f16" | "f32", ar });
    const peerDir = v.peer ? ensurePeerInstalled(log) : null;
    const multi = splitModes.length > 1 || deviceSets.length > 1 || deviceSets[0]!.length > 1 || ubatches.length > 1 || batches.length > 1 || kvs.length > 1;
    const arCol = ars.length > 1 || ars[0] !== "f32";
    const header = ["model", "size", "params", "backend", "threads", ...(multi ? ["split", "devices", "n_ubatch", "type_k", ...(arCol ? ["allreduce"] : []), "memory MiB (weights+kv+compute)"] : []), "test", "t/s",
      ...(peerDir ? ["node-llama-cpp t/s", "weft/peer"] : [])];
    if (out === "md") console.log(`| ${header.join(" | ")} |\n|${header.map(() => "---|").join("")}`);
    const records: object[] = [];
    const level = native().kernelLevel();
    const common = {
      build_commit: `weft ${VERSION}`, cpu_info: cpus()[0]?.model ?? "", gpu_info: "", backends: "CPU",
      kernel_level: KERNEL_LEVELS[level.current], usable_cores: usableCores(),
    };
    let csvHeader = false;
    const emit = (rec: Record<string, unknown>, md: string[]) => {
      if (out === "md") console.log(`| ${md.join(" | ")} |`);
      else if (out === "jsonl") console.log(JSON.stringify(rec));
      else if (out === "json") records.push(rec);
      else {
        const keys = Object.keys(rec);
        const cell = (x: unknown) => { const s = typeof x === "object" ? JSON.stringify(x) : String(x); return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s; };
        if (!csvHeader) { console.log(keys.join(",")); csvHeader = true; }
        console.log(keys.map((k) => cell(rec[k])).join(","));
      }
    };
    for (const [mi, path] of models.entries()) {
      const file = files[mi]!;
      const params = file.tensors.reduce((s, t) => s + t.ne.reduce((a, b) => a * b, 1), 0);
      const ctx = Math.max(256, Math.ceil((Math.max(...tests.map((t) => t.depth + t.nPrompt + t.nGen)) + 1) / 256) * 256);
      const loaded: Array<{ m: Model; c: Config }> = [];
      const peers = new Map<number, Peer>();
      try {
        for (const c of configs) {
          signal.throwIfAborted();
          loaded.push({ c, m: await loadModel(path, { threads: c.th, batchSize: Math.min(c.ub, c.b), contextSize: ctx, devices: c.devs, splitMode: c.sm as SplitMode, tensorSplit, kvType: c.kv, allReduceType: c.ar, allReduce: v.noPeerLinks ? "generic" : undefined, repack: !v.noRepack, signal }) });
        }
        if (peerDir) for (const th of threads) {
          const p = new Peer(peerDir, th);
          peers.set(th, p);
          await p.call({ cmd: "load", path, threads: th, ctx, batch: Math.max(Math.max(...ubatches), ...nPs) });
        }
        const V = loaded[0]!.m.hparams.nVocab;
        const tokenAt = (i: number) => 1 + ((i * 7919) % (V - 1));
        const timed = async (m: Model, t: Test): Promise<number> => {
          m.reset();
          if (t.depth) await m.evaluate(Array.from({ length: t.depth }, (_, i) => tokenAt(i + 1000)), { signal });
          const t0 = performance.now();
          if (t.nPrompt) await m.evaluate(Array.from({ length: t.nPrompt }, (_, i) => tokenAt(i)), { signal });
          // logits into one array, as llama-bench's decode fills its context's
          const out = new Float32Array(V);
          for (let i = 0; i < t.nGen; i++) await m.evaluate([1 + ((i * 31) % (V - 1))], { signal, out });
          return (t.nPrompt + t.nGen) / ((performance.now() - t0) / 1000);
        };
        const timedPeer = async (p: Peer, t: Test): Promise<number> => {
          let ms = 0;
          if (t.nPrompt) ms += (await p.call<{ ms: number }>({ cmd: "pp", tokens: Array.from({ length: t.nPrompt }, (_, i) => tokenAt(i)) })).ms;
          if (t.nGen) ms += (await p.call<{ ms: number }>({ cmd: "tg", first: 1, n: t.nGen })).ms;
          return (t.nPrompt + t.nGen) / (ms / 1000);
        };
        for (const t of tests) {
          const samples = loaded.map(() => [] as number[]);
          const peerSamples = new Map([...peers.keys()].map((th) => [th, [] as number[]]));
          const runs: Array<() => Promise<void>> = loaded.map(({ m }, i) => async () => { samples[i]!.push(await timed(m, t)); });
          if (t.depth === 0) for (const [th, p] of peers) runs.push(async () => { peerSamples.get(th)!.push(await timedPeer(p, t)); });
          for (const { m } of loaded) await timed(m, t);  // warm-up
          if (t.depth === 0) for (const p of peers.values()) await timedPeer(p, t);
          for (let r = 0; r < reps; r++) for (let k = 0; k < runs.length; k++) { signal.throwIfAborted(); await runs[(k + r) % runs.length]!(); }
          printProfile(`${basename(path)} ${t.name}, all configurations, warm-up and repetitions`);
          loaded.forEach(({ m, c }, i) => {
            const ts = samples[i]!, peerTs = peerSamples.get(c.th) ?? [];
            const memory = m.memory();
            const testName = `${t.name}${t.depth ? ` @ d${t.depth}` : ""}`;
            // llama-bench's backend column: the kinds of device the row ran on
            const kinds = [...new Set(c.devs.flatMap((d) => d.split("+")).map((d) => (d.startsWith("rpc") ? "RPC" : "CPU")))].join(",");
            const rec: Record<string, unknown> = {
              ...common, model_filename: path, model_type: modelType(file, params), model_size: file.tensors.reduce((s, x) => s + x.nbytes, 0),
              model_n_params: params, n_batch: c.b, n_ubatch: c.ub, n_threads: c.th, type_k: c.kv, type_v: c.kv, n_gpu_layers: 0,
              split_mode: c.sm, main_gpu: 0, no_kv_offload: false, flash_attn: false, tensor_split: (tensorSplit ?? []).map((x) => x.toFixed(2)).join("/"),
              use_mmap: true, embeddings: false, n_prompt: t.nPrompt, n_gen: t.nGen, n_depth: t.depth, test_time: new Date().toISOString(),
              avg_ns: Math.round(mean(ts.map((x) => ((t.nPrompt + t.nGen) / x) * 1e9))), stddev_ns: Math.round(sd(ts.map((x) => ((t.nPrompt + t.nGen) / x) * 1e9))),
              avg_ts: mean(ts), stddev_ts: sd(ts), samples_ns: ts.map((x) => Math.round(((t.nPrompt + t.nGen) / x) * 1e9)), samples_ts: ts,
              backends: kinds, devices: c.devs, repack: !v.noRepack, allreduce_type: c.ar,
              memory: memory.map((u) => ({ device: u.device, weights: u.weightBytes, kv: u.kvBytes, compute: u.computeBytes })),
              ...(peerTs.length ? { peer: "node-llama-cpp", peer_avg_ts: mean(peerTs), peer_stddev_ts: sd(peerTs), peer_samples_ts: peerTs, ratio: mean(ts) / mean(peerTs) } : {}),
            };
            const mib = (b: number) => (b / 2 ** 20).toFixed(1);
            emit(rec, [modelType(file, params), bytesText(m.weightBytes), paramsText(params), kinds, String(c.th),
              ...(multi ? [c.sm, c.devs.join(","), String(c.ub), c.kv, ...(arCol ? [c.ar] : []), memory.map((u) => `${u.device} ${mib(u.weightBytes)}+${mib(u.kvBytes)}+${mib(u.computeBytes)}`).join(", ")] : []),
              testName, fmt(ts), ...(peerDir ? [fmt(peerTs), peerTs.length ? (mean(ts) / mean(peerTs)).toFixed(2) : "-"] : [])]);
          });
        }
      } finally {
        for (const p of peers.values()) await p.close();
        for (const { m } of loaded) await m.dispose();
      }
    }
    if (out === "json") console.log(JSON.stringify(records, null, 2));
    return 0;
  },
};
