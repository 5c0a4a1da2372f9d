/** `weft bench`: llama-bench-style pp/tg throughput, optionally against node-llama-cpp. */
import { basename } from "node:path";
import { weftError } from "../core/errors.js";
import { Model, SplitMode, loadModel } from "../model/model.js";
import { int, intList, parse } from "./args.js";
import { Command, printProfile, resolveModel } from "./run.js";
import { Peer, ensurePeerInstalled } from "./peer.js";

interface Row { model: string; threads: number; test: string; weft: number[]; peer: number[] }

const mean = (a: number[]) => a.reduce((s, x) => s + x, 0) / a.length;
const sd = (a: number[]) => (a.length < 2 ? 0 : Math.sqrt(a.reduce((s, x) => s + (x - mean(a)) ** 2, 0) / (a.length - 1)));
const fmt = (a: number[]) => (a.length ? `${mean(a).toFixed(2)} ± ${sd(a).toFixed(2)}` : "-");

export const BENCH_COMMAND: Command = {
  summary: "measure prompt processing (pp) and generation (tg) tokens/s, like llama-bench",
  usage: `weft bench [-m MODEL[,MODEL…]] [-p 128] [-n 64] [-r 3] [-t 1,2] [-o md|json] [--peer node-llama-cpp]
           [--split-mode none,layer,tensor] [--device cpu:0,cpu:1 [--device …]] [--tensor-split 1,1] [-b 512,64] [--no-repack]

  -m, --model LIST     GGUF model(s), comma-separated (default: the embedded small Q8_0 model)
  -p, --n-prompt N     prompt length for the pp test; 0 skips it (default 128)
  -n, --n-gen N        generated tokens for the tg test; 0 skips it (default 64)
  -r, --repetitions N  repetitions per test, after one warm-up (default 3)
  -t, --threads LIST   thread counts, comma-separated (default 1,2)
  -b, --ubatch LIST    micro-batch sizes to compare (default 512); with a layer split a
                       prompt longer than one micro-batch is pipelined across the devices
  --split-mode LIST    none, layer and/or tensor (default none): one row each
  --device SET         a device set, comma-separated; repeat the flag for several sets
                       (default cpu:0); with split mode none only the first device is used
  --tensor-split LIST  share per device: of the layers (layer), of every matrix (tensor); default equal
  --no-repack          keep Q4_0/Q8_0/Q4_K matrices in rows (default: repacked at load, as weft run)
  -o, --output md|json table (default) or JSON lines
  --peer node-llama-cpp  also run the same model through node-llama-cpp ${"(installed on first use into"}
                       WEFT_PEER_DIR or <cache>/peer, CPU binary only), alternating with weft, and
                       print weft/peer per row
pp is one forward pass over N prompt tokens; tg is N single-token steps from an empty
context. Results are mean ± sd of tokens/s. The KV cache is F16 on both sides. Memory per
device is weights + KV cache + compute buffers, in MiB.`,
  async run(args) {
    const { values: v } = parse(args, {
      model: { type: "string", short: "m" }, "n-prompt": { type: "string", short: "p" }, "n-gen": { type: "string", short: "n" },
      repetitions: { type: "string", short: "r" }, threads: { type: "string", short: "t" }, ubatch: { type: "string", short: "b" },
      output: { type: "string", short: "o" }, peer: { type: "string" },
      "split-mode": { type: "string" }, device: { type: "string", multiple: true }, "tensor-split": { type: "string" },
      "no-repack": { type: "boolean" },
    });
    const nP = int(v["n-prompt"], "--n-prompt", 128), nG = int(v["n-gen"], "--n-gen", 64);
    const reps = int(v.repetitions, "--repetitions", 3, 1);
    const ubatches = intList(v.ubatch, "--ubatch", [512]);
    const splitModes = (v["split-mode"] ?? "none").split(",").map((x) => x.trim());
    for (const sm of splitModes) if (sm !== "none" && sm !== "layer" && sm !== "tensor") throw weftError("BAD_ARGUMENT", `--split-mode must list none, layer and/or tensor, got '${sm}'`);
    const deviceSets = (v.device ?? ["cpu:0"]).map((d) => d.split(",").map((x) => x.trim()));
    const tensorSplit = v["tensor-split"]?.split(",").map(Number);
    const threads = intList(v.threads, "--threads", [1, 2]);
    const out = v.output ?? "md";
    if (out !== "md" && out !== "json") throw weftError("BAD_ARGUMENT", `--output must be md or json, got '${out}'`);
    if (v.peer !== undefined && v.peer !== "node-llama-cpp") throw weftError("BAD_ARGUMENT", `--peer supports only node-llama-cpp, got '${v.peer}'`);
    const models = v.model ? v.model.split(",") : [await resolveModel(undefined)];
    const peerDir = v.peer ? ensurePeerInstalled((s) => process.stderr.write(s + "\n")) : null;
    const rows: Row[] = [];
    const withPeer = peerDir !== null;
    const multi = splitModes.length > 1 || deviceSets.length > 1 || deviceSets[0]!.length > 1 || ubatches.length > 1;
    const header = `| model | size | params | threads |${multi ? " split | devices | ubatch | memory |" : ""} test | weft t/s |${withPeer ? " node-llama-cpp t/s | weft/peer |" : ""}`;
    if (out === "md") console.log(`${header}\n|${"---|".repeat(header.split("|").length - 2)}`);
    const configs: Array<{ th: number; sm: string; devs: string[]; ub: number }> = [];
    for (const th of threads) for (const sm of splitModes) for (const devs of deviceSets) for (const ub of ubatches)
      if (sm !== "none" || devs === deviceSets[0] || deviceSets.length === 1) configs.push({ th, sm, devs: sm === "none" ? devs.slice(0, 1) : devs, ub });
    const mib = (b: number) => (b / 2 ** 20).toFixed(1);
    const ctx = Math.max(256, Math.ceil((nP + nG + 1) / 256) * 256);
    // Every configuration of a model is loaded at once and their repetitions alternate
    // (a rotating order), so that drift in the machine's speed hits all of them alike.
    for (const path of models) {
      const loaded: Array<{ m: Model; c: (typeof configs)[number] }> = [];
      const peers = new Map<number, Peer>();
      try {
        for (const c of configs)
          loaded.push({ c, m: await loadModel(path, { threads: c.th, batchSize: c.ub, contextSize: ctx, devices: c.devs, splitMode: c.sm as SplitMode, tensorSplit, repack: !v["no-repack"] }) });
        if (peerDir) for (const th of threads) {
          const p = new Peer(peerDir, th);
          peers.set(th, p);
          await p.call({ cmd: "load", path, threads: th, ctx, batch: Math.max(Math.max(...ubatches), nP) });
        }
        const first = loaded[0]!.m;
        const V = first.hparams.nVocab;
        const prompt = Array.from({ length: nP }, (_, i) => 1 + ((i * 7919) % (V - 1)));
        const params = first.file.tensors.reduce((s, t) => s + t.ne.reduce((a, b) => a * b, 1), 0);
        const tests: Array<{ name: string; weft: (m: Model) => Promise<number>; peer: (p: Peer) => Promise<number> }> = [];
        if (nP > 0) tests.push({
          name: `pp${nP}`,
          weft: async (m) => { m.reset(); const t0 = performance.now(); await m.evaluate(prompt); return nP / ((performance.now() - t0) / 1000); },
          peer: async (p) => nP / ((await p.call<{ ms: number }>({ cmd: "pp", tokens: prompt })).ms / 1000),
        });
        if (nG > 0) tests.push({
          name: `tg${nG}`,
          weft: async (m) => {
            m.reset();
            const t0 = performance.now();
            for (let i = 0; i < nG; i++) await m.evaluate([1 + ((i * 31) % (V - 1))]);
            return nG / ((performance.now() - t0) / 1000);
          },
          peer: async (p) => nG / ((await p.call<{ ms: number }>({ cmd: "tg", first: 1, n: nG })).ms / 1000),
        });
        for (const t of tests) {
          const runs: Array<() => Promise<void>> = [];
          const samples = loaded.map(() => [] as number[]);
          const peerSamples = new Map([...peers.keys()].map((th) => [th, [] as number[]]));
          loaded.forEach(({ m }, i) => runs.push(async () => { samples[i]!.push(await t.weft(m)); }));
          for (const [th, p] of peers) runs.push(async () => { peerSamples.get(th)!.push(await t.peer(p)); });
          for (const { m } of loaded) await t.weft(m);  // warm-up
          for (const p of peers.values()) await t.peer(p);
          for (let r = 0; r < reps; r++) for (let k = 0; k < runs.length; k++) await runs[(k + r) % runs.length]!();
          printProfile(`${basename(path)} ${t.name}, all configurations, warm-up and repetitions`);
          loaded.forEach(({ m, c }, i) => {
            const row: Row = { model: basename(path), threads: c.th, test: t.name, weft: samples[i]!, peer: peerSamples.get(c.th) ?? [] };
            rows.push(row);
            const memory = m.memory();
            if (out === "md") {
              const size = `${(m.weightBytes / 2 ** 20).toFixed(1)} MiB`;
              const ratio = withPeer ? ` ${fmt(row.peer)} | ${(mean(row.weft) / mean(row.peer)).toFixed(2)} |` : "";
              const mem = memory.map((u) => `${u.device} ${mib(u.weightBytes)}+${mib(u.kvBytes)}+${mib(u.computeBytes)}`).join(", ");
              const extra = multi ? ` ${c.sm} | ${c.devs.join(",")} | ${c.ub} | ${mem} |` : "";
              console.log(`| ${row.model} | ${size} | ${(params / 1e6).toFixed(1)} M | ${c.th} |${extra} ${row.test} | ${fmt(row.weft)} |${ratio}`);
            } else {
              console.log(JSON.stringify({ model: row.model, path, size: m.weightBytes, params, threads: c.th, splitMode: c.sm, devices: c.devs, ubatch: c.ub, memory, test: row.test,
                weft: { mean: mean(row.weft), sd: sd(row.weft), samples: row.weft },
                ...(withPeer ? { peer: { name: "node-llama-cpp", mean: mean(row.peer), sd: sd(row.peer), samples: row.peer }, ratio: mean(row.weft) / mean(row.peer) } : {}) }));
            }
          });
        }
      } finally {
        for (const p of peers.values()) await p.close();
        for (const { m } of loaded) await m.dispose();
      }
    }
    return 0;
  },
};
