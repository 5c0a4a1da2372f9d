/** `weft run`, `weft tokenize`, `weft logits`, `weft synth`. */
import { weftError } from "../core/errors.js";
import { TYPES } from "../core/types.js";
import { LoadModelOptions, Model, SplitMode, loadModel, loadTokenizer } from "../model/model.js";
import { defaultModelPath, cacheDir, DEFAULT_MODEL } from "../model/default.js";
import { SYNTH_PRESETS, SYNTH_TYPES, synthModel } from "../model/synth.js";
import { int, num, parse } from "./args.js";
import { devices as listDevices } from "../backend/registry.js";
import { native, usableCores } from "../cpu/index.js";

export interface Command {
  summary: string;
  usage: string;
  run(args: string[]): Promise<number>;
}

const log = (s: string) => process.stderr.write(s + "\n");

export const MODEL_FLAGS_HELP = `  -m, --model FILE     GGUF model (default: the embedded small Q8_0 model, synthesized once
                       into ${cacheDir()}; set WEFT_CACHE_DIR to move it)
  -t, --threads N      CPU threads per device (default: ${usableCores()}, the cores this process may use)
  -c, --ctx-size N     context length (default: the model's, at most 4096)
  --kv-type f16|f32    KV cache type (default f16)
  -b, --ubatch N       most tokens per forward graph (default 512); with --split-mode layer a
                       longer prompt is pipelined across the devices in micro-batches of N
  --device LIST        devices, comma-separated (default cpu:0; see "weft devices"); a + group
                       such as cpu:0+cpu:1 is one tensor-parallel device inside a layer split
  --split-mode MODE    none: all on the first device; layer: contiguous layer ranges per device
                       (pipelined); tensor: every weight matrix cut across the devices, partial
                       results summed with all-reduce (default: layer for several devices)
  --tensor-split LIST  share per device, e.g. 3,1: of the layers (layer) or of every matrix
                       (tensor); default equal
  --no-repack          keep Q4_0/Q8_0/Q4_K matrices in the file's row layout (default: copied
                       at load into the CPU's eight-row layout, faster per token, as
                       llama.cpp's CPU_REPACK buffers; the copy takes memory the size of
                       those matrices)`;

export const modelFlags = {
  model: { type: "string", short: "m" },
  threads: { type: "string", short: "t" },
  "ctx-size": { type: "string", short: "c" },
  "kv-type": { type: "string" },
  ubatch: { type: "string", short: "b" },
  device: { type: "string" },
  "split-mode": { type: "string" },
  "tensor-split": { type: "string" },
  "no-repack": { type: "boolean" },
} as const;

export function loadOptions(v: Record<string, string | boolean | undefined>): LoadModelOptions {
  const kv = v["kv-type"] as string | undefined;
  if (kv !== undefined && kv !== "f16" && kv !== "f32") throw weftError("BAD_ARGUMENT", `--kv-type must be f16 or f32, got '${kv}'`);
  const split = v["split-mode"] as string | undefined;
  if (split !== undefined && split !== "none" && split !== "layer" && split !== "tensor")
    throw weftError("BAD_ARGUMENT", `--split-mode must be none, layer or tensor, got '${split}'`);
  const devices = (v.device as string | undefined)?.split(",").map((d) => d.trim());
  return {
    devices, splitMode: (split as SplitMode | undefined) ?? (devices && devices.length > 1 ? "layer" : "none"),
    tensorSplit: v["tensor-split"] === undefined ? undefined : (v["tensor-split"] as string).split(",").map((x) => num(x, "--tensor-split", 0)),
    threads: int(v.threads as string | undefined, "--threads", usableCores(), 1),
    contextSize: v["ctx-size"] === undefined ? undefined : int(v["ctx-size"] as string, "--ctx-size", 0, 1),
    batchSize: int(v.ubatch as string | undefined, "--ubatch", 512, 1),
    kvType: kv as "f16" | "f32" | undefined,
    repack: !v["no-repack"],
  };
}

/** With WEFT_PROFILE=1: time per op since the last call, to stderr (then reset). */
export function printProfile(label: string): void {
  if (!process.env.WEFT_PROFILE || process.env.WEFT_PROFILE === "0") return;
  const names = Object.fromEntries(Object.entries(TYPES).map(([id, t]) => [id, t.name]));
  const rows = Object.entries(native().profileReport(true)).sort((a, b) => b[1][0] - a[1][0]);
  const total = rows.reduce((s, [, [ms]]) => s + ms, 0);
  log(`profile (${label}): ${total.toFixed(1)} ms in native ops`);
  for (const [k, [ms, calls]] of rows) {
    const name = k.startsWith("MUL_MAT/") ? `MUL_MAT ${names[k.slice(8)] ?? k.slice(8)}` : k;
    log(`  ${name.padEnd(16)} ${ms.toFixed(1).padStart(9)} ms ${((100 * ms) / total).toFixed(1).padStart(5)} % ${String(calls).padStart(8)} calls`);
  }
}

export async function resolveModel(path: string | undefined): Promise<string> {
  return path ?? (await defaultModelPath(log));
}

function progressBar(label: string) {
  let last = -1;
  return ({ loaded, total, phase }: { loaded: number; total: number; phase: string }) => {
    if (!process.stderr.isTTY) return;
    const pct = total ? Math.floor((100 * loaded) / total) : 100;
    if (pct === last && phase !== "ready") return;
    last = pct;
    process.stderr.write(`\r${label}: ${phase} ${pct}%   ${phase === "ready" ? "\n" : ""}`);
  };
}

export async function openModel(v: Record<string, string | boolean | undefined>): Promise<Model> {
  const path = await resolveModel(v.model as string | undefined);
  const t0 = performance.now();
  const m = await loadModel(path, { ...loadOptions(v), onProgress: progressBar("loading") });
  const hp = m.hparams;
  const types: Record<string, number> = {};
  for (const t of m.file.tensors) { const n = TYPES[t.type as keyof typeof TYPES]?.name ?? String(t.type); types[n] = (types[n] ?? 0) + 1; }
  log(`model: ${path}`);
  log(`  ${hp.arch}, ${hp.nLayer} layers, n_embd ${hp.nEmbd}, heads ${hp.nHead}/${hp.nHeadKv}, ffn ${hp.nFf}, vocab ${hp.nVocab} (${m.tokenizer.kind.toUpperCase()}), ` +
    `${(m.weightBytes / 2 ** 20).toFixed(1)} MiB [${Object.entries(types).map(([k, n]) => `${n}× ${k}`).join(", ")}]`);
  log(`  context ${m.contextSize}, KV cache ${TYPES[m.kvType].name} ${(m.kvCacheBytes / 2 ** 20).toFixed(1)} MiB, ${m.threads} thread(s) per device, loaded in ${(performance.now() - t0).toFixed(0)} ms`);
  const mem = m.memory();
  if (mem.length > 1) {
    log(`  split mode ${m.splitMode} over ${m.devices.join(", ")}:`);
    for (const u of mem) log(`    ${u.device}: layers ${u.layers[0]}..${u.layers[1] - 1}, weights ${(u.weightBytes / 2 ** 20).toFixed(1)} MiB, KV ${(u.kvBytes / 2 ** 20).toFixed(1)} MiB`);
  }
  return m;
}

export const RUN_COMMANDS: Record<string, Command> = {
  run: {
    summary: "generate text from a prompt (streams to stdout; everything else goes to stderr)",
    usage: `weft run [-m MODEL] -p TEXT [options]

${MODEL_FLAGS_HELP}
  -p, --prompt TEXT    the prompt (default "Once upon a time")
  -n, --n-predict N    most tokens to generate (default 128)
  --temp T             temperature; 0 = greedy (default 0.8)
  --top-k K            keep the K most likely tokens; 0 = all (default 40)
  --top-p P            nucleus sampling threshold; 1 = off (default 0.95)
  --min-p P            drop tokens below P × the top probability; 0 = off (default 0.05)
  --repeat-penalty R   penalize the last 64 tokens; 1 = off (default 1)
  -s, --seed S         RNG seed (default: random)
  --echo               print the prompt before the generation
Generation stops at an end-of-generation token or after -n tokens. Timings (load, prompt
and generation tokens/s) go to stderr, so "weft run ... > out.txt" captures only the text.`,
    async run(args) {
      const { values: v } = parse(args, {
        ...modelFlags,
        prompt: { type: "string", short: "p" }, "n-predict": { type: "string", short: "n" },
        temp: { type: "string" }, "top-k": { type: "string" }, "top-p": { type: "string" }, "min-p": { type: "string" },
        "repeat-penalty": { type: "string" }, seed: { type: "string", short: "s" }, echo: { type: "boolean" },
      });
      const prompt = v.prompt ?? "Once upon a time";
      const maxTokens = int(v["n-predict"], "--n-predict", 128);
      const sampling = {
        temperature: num(v.temp, "--temp", 0.8), topK: int(v["top-k"], "--top-k", 40), topP: num(v["top-p"], "--top-p", 0.95),
        minP: num(v["min-p"], "--min-p", 0.05), repeatPenalty: num(v["repeat-penalty"], "--repeat-penalty", 1),
        seed: v.seed === undefined ? undefined : int(v.seed, "--seed", 0),
      };
      const m = await openModel(v);
      const ac = new AbortController();
      const onSig = () => ac.abort();
      process.once("SIGINT", onSig);
      try {
        const ids = m.tokenize(prompt);
        if (v.echo) process.stdout.write(prompt);
        let n = 0, tFirst = 0;
        const t0 = performance.now();
        try {
          for await (const p of m.generate(ids, { ...sampling, maxTokens, signal: ac.signal })) {
            if (n === 0) tFirst = performance.now();
            if (p.token >= 0) n++;
            process.stdout.write(p.text);
          }
        } catch (e) {
          if (!ac.signal.aborted) throw e;
          log("\n(interrupted)");
        }
        const t1 = performance.now();
        process.stdout.write("\n");
        const ppMs = (tFirst || t1) - t0;
        log(`prompt: ${ids.length} tokens in ${ppMs.toFixed(0)} ms (${(ids.length / (ppMs / 1000)).toFixed(1)} t/s)`);
        if (n > 1) log(`generation: ${n} tokens in ${(t1 - tFirst).toFixed(0)} ms (${((n - 1) / ((t1 - tFirst) / 1000)).toFixed(1)} t/s)`);
        printProfile("prompt + generation");
        return 0;
      } finally {
        process.off("SIGINT", onSig);
        await m.dispose();
      }
    },
  },
  tokenize: {
    summary: "print a text's token ids as a JSON array",
    usage: `weft tokenize -m MODEL -p TEXT [--no-bos] [--parse-special]

  -m, --model FILE   GGUF model or vocab-only GGUF
  -p, --prompt TEXT  text to tokenize
  --no-bos           do not add BOS/EOS (llama_tokenize with add_special = false)
  --parse-special    turn special-token text such as <s> into its token
  --pieces           print [id, "piece"] pairs instead of ids`,
    async run(args) {
      const { values: v } = parse(args, {
        model: { type: "string", short: "m" }, prompt: { type: "string", short: "p" },
        "no-bos": { type: "boolean" }, "parse-special": { type: "boolean" }, pieces: { type: "boolean" },
      });
      if (v.prompt === undefined) throw weftError("BAD_ARGUMENT", "-p TEXT is required");
      const tok = loadTokenizer(await resolveModel(v.model));
      const ids = tok.tokenize(v.prompt, { addSpecial: !v["no-bos"], parseSpecial: v["parse-special"] ?? false });
      const dec = new TextDecoder();
      console.log(JSON.stringify(v.pieces ? ids.map((id) => [id, dec.decode(tok.tokenToPiece(id, true))]) : ids));
      return 0;
    },
  },
  logits: {
    summary: "print the logits of every position of a prompt as JSON {tokens, logits}",
    usage: `weft logits [-m MODEL] (-p TEXT | --tokens 1,2,3) [options]

${MODEL_FLAGS_HELP}
  -p, --prompt TEXT    tokenized with BOS as the vocabulary asks
  --tokens LIST        comma-separated token ids instead of a prompt
The whole sequence is evaluated as one batch; logits[i] is the distribution of the token
after tokens[0..i].`,
    async run(args) {
      const { values: v } = parse(args, { ...modelFlags, prompt: { type: "string", short: "p" }, tokens: { type: "string" } });
      if ((v.prompt === undefined) === (v.tokens === undefined)) throw weftError("BAD_ARGUMENT", "give exactly one of -p TEXT or --tokens LIST");
      const m = await openModel({ ...v, ubatch: v.ubatch ?? String(1 << 30) });
      try {
        const tokens = v.tokens !== undefined ? v.tokens.split(",").map((s) => int(s.trim(), "--tokens", 0)) : m.tokenize(v.prompt!);
        const lg = await m.evaluate(tokens, { allLogits: true });
        const V = m.hparams.nVocab;
        const rows = tokens.map((_, i) => Array.from(lg.subarray(i * V, (i + 1) * V)));
        process.stdout.write(JSON.stringify({ tokens, logits: rows }) + "\n");
        return 0;
      } finally {
        await m.dispose();
      }
    },
  },
  devices: {
    summary: "list the devices weft can use, with memory and capabilities",
    usage: `weft devices

CPU devices cpu:0, cpu:1, … are separate queues with their own thread pools in this process
(--device cpu:0,cpu:1 -t 1 gives each one thread), so multi-device runs work on one machine.
A + group (cpu:0+cpu:1) is one tensor-parallel (meta) device over its members.`,
    async run(args) {
      parse(args, {});
      for (const d of listDevices()) {
        const mem = d.memory();
        console.log(`${d.name.padEnd(8)} ${d.type.padEnd(4)} ${d.description}; memory ${(mem.free / 2 ** 30).toFixed(1)} / ${(mem.total / 2 ** 30).toFixed(1)} GiB free; ` +
          `async ${d.caps.async ? "yes" : "no"}, events ${d.caps.events ? "yes" : "no"}, collectives ${d.caps.collectives ? "yes" : "no"}`);
      }
      console.log("cpu:N    more CPU devices on the same cores (cpu:1, cpu:2, …): each its own queue and threads");
      console.log("a+b      a tensor-parallel device over a and b (--split-mode tensor makes one over all --device)");
      console.log("(no CUDA or RPC devices in this build yet)");
      return 0;
    },
  },
  synth: {
    summary: "write a deterministic random-weight model of a benchmark preset",
    usage: `weft synth --preset PRESET --type TYPE [--seed S] -o FILE

  --preset NAME   ${Object.entries(SYNTH_PRESETS).map(([k, p]) => `${k} (n_embd ${p.nEmbd}, ${p.nLayer} layers, ${p.vocab})`).join(", ")}
  --type TYPE     ${Object.keys(SYNTH_TYPES).join(", ")}
                  (q4_0: Q4_0 with the output matrix in Q6_K; q4_k_m: llama.cpp's Q4_K_M mix)
  --seed S        weights seed (default 42)
  -o, --out FILE  output GGUF
Shapes follow ../shared/BASELINES.md. Vocabularies: Llama 2's 32000-token SentencePiece
vocabulary (tiny, small) and Llama 3's 128256-token BPE vocabulary (1b), from the npm
packages llama-tokenizer-js and llama3-tokenizer-js. The default model of "weft run" is
--preset ${DEFAULT_MODEL.preset} --type ${DEFAULT_MODEL.type} --seed ${DEFAULT_MODEL.seed}.`,
    async run(args) {
      const { values: v } = parse(args, { preset: { type: "string" }, type: { type: "string" }, seed: { type: "string" }, out: { type: "string", short: "o" } });
      if (!v.preset || !v.type || !v.out) throw weftError("BAD_ARGUMENT", "--preset, --type and -o are required");
      const t0 = performance.now();
      const r = await synthModel({
        preset: v.preset, type: v.type, seed: int(v.seed, "--seed", 42), out: v.out,
        onProgress: (d, n, name) => { if (process.stderr.isTTY) process.stderr.write(`\r[${d}/${n}] ${name.padEnd(32)}`); },
      });
      if (process.stderr.isTTY) process.stderr.write("\n");
      log(`wrote ${r.path}: ${(r.params / 1e6).toFixed(1)} M parameters in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
      return 0;
    },
  },
};
