/** `weft bench`: llama-bench-style pp/tg throughput, optionally against node-llama-cpp. */
import { basename } from "node:path";
import { weftError } from "../core/errors.js";
import { loadModel } from "../model/model.js";
import { int, intList, parse } from "./args.js";
import { Command, resolveModel } from "./run.js";
import { Peer, ensurePeerInstalled } from "./peer.js";

interface Row { model: string; threads: number; test: string; weft: number[]; peer: number[] }

const mean = (a: number[]) => a.reduce((s, x) => s + x, 0) / a.length;
const sd = (a: number[]) => (a.length < 2 ? 0 : Math.sqrt(a.reduce((s, x) => s + (x - mean(a)) ** 2, 0) / (a.length - 1)));
const fmt = (a: number[]) => (a.length ? `${mean(a).toFixed(2)} ± ${sd(a).toFixed(2)}` : "-");

export const BENCH_COMMAND: Command = {
  summary: "measure prompt processing (pp) and generation (tg) tokens/s, like llama-bench",
  usage: `weft bench [-m MODEL[,MODEL…]] [-p 128] [-n 64] [-r 3] [-t 1,2] [-o md|json] [--peer node-llama-cpp]

  -m, --model LIST     GGUF model(s), comma-separated (default: the embedded small Q8_0 model)
  -p, --n-prompt N     prompt length for the pp test; 0 skips it (default 128)
  -n, --n-gen N        generated tokens for the tg test; 0 skips it (default 64)
  -r, --repetitions N  repetitions per test, after one warm-up (default 3)
  -t, --threads LIST   thread counts, comma-separated (default 1,2)
  -b, --ubatch N       most tokens per forward graph (default 512)
  -o, --output md|json table (default) or JSON lines
  --peer node-llama-cpp  also run the same model through node-llama-cpp ${"(installed on first use into"}
                       WEFT_PEER_DIR or <cache>/peer, CPU binary only), alternating with weft, and
                       print weft/peer per row
pp is one forward pass over N prompt tokens; tg is N single-token steps from an empty
context. Results are mean ± sd of tokens/s. The KV cache is F16 on both sides.`,
  async run(args) {
    const { values: v } = parse(args, {
      model: { type: "string", short: "m" }, "n-prompt": { type: "string", short: "p" }, "n-gen": { type: "string", short: "n" },
      repetitions: { type: "string", short: "r" }, threads: { type: "string", short: "t" }, ubatch: { type: "string", short: "b" },
      output: { type: "string", short: "o" }, peer: { type: "string" },
    });
    const nP = int(v["n-prompt"], "--n-prompt", 128), nG = int(v["n-gen"], "--n-gen", 64);
    const reps = int(v.repetitions, "--repetitions", 3, 1), ubatch = int(v.ubatch, "--ubatch", 512, 1);
    const threads = intList(v.threads, "--threads", [1, 2]);
    const out = v.output ?? "md";
    if (out !== "md" && out !== "json") throw weftError("BAD_ARGUMENT", `--output must be md or json, got '${out}'`);
    if (v.peer !== undefined && v.peer !== "node-llama-cpp") throw weftError("BAD_ARGUMENT", `--peer supports only node-llama-cpp, got '${v.peer}'`);
    const models = v.model ? v.model.split(",") : [await resolveModel(undefined)];
    const peerDir = v.peer ? ensurePeerInstalled((s) => process.stderr.write(s + "\n")) : null;
    const rows: Row[] = [];
    const withPeer = peerDir !== null;
    const header = `| model | size | params | threads | test | weft t/s |${withPeer ? " node-llama-cpp t/s | weft/peer |" : ""}`;
    if (out === "md") console.log(`${header}\n|${"---|".repeat(withPeer ? 8 : 6)}`);
    for (const path of models) {
      for (const th of threads) {
        const ctx = Math.max(256, Math.ceil((nP + nG + 1) / 256) * 256);
        const m = await loadModel(path, { threads: th, batchSize: ubatch, contextSize: ctx });
        const peer = peerDir ? new Peer(peerDir, th) : null;
        try {
          if (peer) await peer.call({ cmd: "load", path, threads: th, ctx, batch: Math.max(ubatch, nP) });
          const V = m.hparams.nVocab;
          const prompt = Array.from({ length: nP }, (_, i) => 1 + ((i * 7919) % (V - 1)));
          const params = m.file.tensors.reduce((s, t) => s + t.ne.reduce((a, b) => a * b, 1), 0);
          const tests: Array<{ name: string; weft: () => Promise<number>; peer: () => Promise<number> }> = [];
          if (nP > 0) tests.push({
            name: `pp${nP}`,
            weft: async () => { m.reset(); const t0 = performance.now(); await m.evaluate(prompt); return nP / ((performance.now() - t0) / 1000); },
            peer: async () => nP / ((await peer!.call<{ ms: number }>({ cmd: "pp", tokens: prompt })).ms / 1000),
          });
          if (nG > 0) tests.push({
            name: `tg${nG}`,
            weft: async () => {
              m.reset();
              const t0 = performance.now();
              for (let i = 0; i < nG; i++) await m.evaluate([1 + ((i * 31) % (V - 1))]);
              return nG / ((performance.now() - t0) / 1000);
            },
            peer: async () => nG / ((await peer!.call<{ ms: number }>({ cmd: "tg", first: 1, n: nG })).ms / 1000),
          });
          for (const t of tests) {
            const row: Row = { model: basename(path), threads: th, test: t.name, weft: [], peer: [] };
            await t.weft(); if (peer) await t.peer();  // warm-up
            for (let r = 0; r < reps; r++) {
              // alternate which engine goes first so drift in machine speed hits both
              if (peer && r % 2 === 1) { row.peer.push(await t.peer()); row.weft.push(await t.weft()); }
              else { row.weft.push(await t.weft()); if (peer) row.peer.push(await t.peer()); }
            }
            rows.push(row);
            if (out === "md") {
              const size = `${(m.weightBytes / 2 ** 20).toFixed(1)} MiB`;
              const ratio = withPeer ? ` ${fmt(row.peer)} | ${(mean(row.weft) / mean(row.peer)).toFixed(2)} |` : "";
              console.log(`| ${row.model} | ${size} | ${(params / 1e6).toFixed(1)} M | ${th} | ${row.test} | ${fmt(row.weft)} |${ratio}`);
            } else {
              console.log(JSON.stringify({ model: row.model, path, size: m.weightBytes, params, threads: th, test: row.test,
                weft: { mean: mean(row.weft), sd: sd(row.weft), samples: row.weft },
                ...(withPeer ? { peer: { name: "node-llama-cpp", mean: mean(row.peer), sd: sd(row.peer), samples: row.peer }, ratio: mean(row.weft) / mean(row.peer) } : {}) }));
            }
          }
        } finally {
          await peer?.close();
          await m.dispose();
        }
      }
    }
    return 0;
  },
};
