/**
 * What the model commands share: the model and device flags (with llama.cpp's spellings),
 * loading with progress and warnings, Ctrl-C and SIGTERM as an abort, and stdout that may
 * be a closed pipe.
 */
import { ALL_REDUCE_TYPES, type AllReduceType } from "../backend/interface.js";
import { readFileSync, statSync } from "node:fs";
import { weftError } from "../core/errors.js";
import { TYPES, typeName } from "../core/types.js";
import { LoadModelOptions, Model, SplitMode, loadModel } from "../model/model.js";
import { defaultModelPath, cacheDir } from "../model/default.js";
import { native, usableCores } from "../cpu/index.js";
import { LLAMA_IGNORED, Values, int, num } from "./args.js";
import { addRpcServer, readToken } from "../rpc/index.js";

export interface Command {
  summary: string;
  usage: string;
  /** resolves to the exit code; `signal` aborts on SIGINT / SIGTERM */
  run(args: string[], signal: AbortSignal): Promise<number>;
}

export const log = (s: string) => process.stderr.write(s + "\n");

export const VERSION = (JSON.parse(readFileSync(new URL("../../../package.json", import.meta.url), "utf8")) as { version: string }).version;

/** Remote devices: --rpc adds each server's devices as rpc:0, rpc:1, … */
export const RPC_FLAGS = {
  rpc: { names: ["--rpc"] },
  tokenFile: { names: ["--token-file"] },
} as const;

export const RPC_FLAGS_HELP = `  --rpc LIST               weft rpc-servers, host:port comma-separated: their devices become
                           rpc:0, rpc:1, … in this order (use them in --device)
  --token-file FILE        the shared token of those servers (default: WEFT_RPC_TOKEN)`;

export const MODEL_FLAGS = {
  ...RPC_FLAGS,
  model: { names: ["-m", "--model"] },
  threads: { names: ["-t", "--threads"] },
  threadsBatch: { names: ["-tb", "--threads-batch"] },
  ctxSize: { names: ["-c", "--ctx-size"] },
  kvType: { names: ["--kv-type"] },
  cacheTypeK: { names: ["-ctk", "--cache-type-k"] },
  cacheTypeV: { names: ["-ctv", "--cache-type-v"] },
  batch: { names: ["-b", "--batch-size"] },
  ubatch: { names: ["-ub", "--ubatch-size", "--ubatch"] },
  device: { names: ["-dev", "--device"] },
  splitMode: { names: ["-sm", "--split-mode"] },
  tensorSplit: { names: ["-ts", "--tensor-split"] },
  noRepack: { names: ["--no-repack"], switch: true },
  allReduceType: { names: ["--allreduce-type"] },
  noPeerLinks: { names: ["--no-peer-links"], switch: true },
  ...LLAMA_IGNORED,
} as const;

/** --allreduce-type's value, checked. */
export function allReduceTypeOf(x: string): AllReduceType {
  if (!(ALL_REDUCE_TYPES as readonly string[]).includes(x)) throw weftError("USAGE", `--allreduce-type must be f32, f16 or q8_0, got '${x}'`);
  return x as AllReduceType;
}

/** Connects to the --rpc servers (their devices become rpc:N); nothing without --rpc. */
export async function connectRpc(v: Values<typeof RPC_FLAGS>, signal?: AbortSignal): Promise<void> {
  const endpoints = v.rpc?.split(",").map((s) => s.trim()).filter(Boolean) ?? [];
  if (!endpoints.length) {
    if (v.tokenFile) log("weft: --token-file without --rpc has no effect");
    return;
  }
  const token = readToken(v.tokenFile);
  for (const e of endpoints) {
    const devs = await addRpcServer(e, { token, signal });
    log(`rpc: ${e}: ${devs.map((d) => `${d.name} = ${d.description}`).join("; ")}`);
  }
}

export const MODEL_FLAGS_HELP = `  -m, --model FILE         GGUF model (default: the embedded small Q8_0 model, synthesized
                           once into ${cacheDir()}; set WEFT_CACHE_DIR to move it)
  -t, --threads N          CPU threads per device (default: ${usableCores()}, the cores this process may
                           use); more threads than cores works, slower, with a warning
  -tb, --threads-batch N   accepted as llama.cpp's: weft uses -t threads for prompts too
  -c, --ctx-size N         context length (default: the model's, at most 4096)
  -ctk, --cache-type-k T   KV cache type, f16 or f32 (default f16); -ctv, --cache-type-v the
  -ctv, --cache-type-v T   same (weft keeps K and V in one type); --kv-type T sets both
  -ub, --ubatch-size N     micro-batch: most tokens per forward graph (default 512); with a
                           layer split a longer prompt is pipelined across the devices
  -b, --batch-size N       logical batch (default 2048): the micro-batch is at most this
  -dev, --device LIST      devices, comma-separated (default cpu:0; see "weft devices"); a +
                           group such as cpu:0+cpu:1 is one tensor-parallel device
  -sm, --split-mode MODE   none: all on the first device; layer: contiguous layer ranges per
                           device (pipelined); tensor: every weight matrix cut across the
                           devices, partial results summed with all-reduce (default: layer
                           for several devices)
  -ts, --tensor-split LIST share per device, e.g. 3,1: of the layers (layer) or of every
                           matrix (tensor); default equal
  --no-repack              keep Q4_0/Q8_0/Q4_K matrices in the file's row layout (default:
                           copied at load into the CPU's eight-row layout, faster per token,
                           as llama.cpp's CPU_REPACK buffers; the copy takes memory)
${RPC_FLAGS_HELP}
  --allreduce-type T       with a tensor split over RPC servers, how partial sums cross the
                           links between them: f32 (exact, default), f16 (half the bytes) or
                           q8_0 (3.8× fewer; logits move by the NMSE the README lists)
  --no-peer-links          partial sums of a tensor split over RPC servers pass through this
                           machine instead of server to server (slower: for servers that
                           cannot reach each other at the --rpc addresses)
  -ngl, -fa, -mg, --mlock, --no-mmap, --numa
                           llama.cpp flags with no effect in weft yet (accepted, with a note)`;

type ModelValues = Values<typeof MODEL_FLAGS>;

/** The KV cache type from --kv-type / -ctk / -ctv (weft keeps K and V in one type). */
function kvType(v: ModelValues): "f16" | "f32" | undefined {
  const given = [["--kv-type", v.kvType], ["-ctk", v.cacheTypeK], ["-ctv", v.cacheTypeV]].filter(([, x]) => x !== undefined) as Array<[string, string]>;
  for (const [flag, x] of given)
    if (x !== "f16" && x !== "f32") throw weftError("USAGE", `${flag} ${x}: weft's KV cache is f16 or f32 (quantized caches are not supported yet)`);
  if (new Set(given.map(([, x]) => x)).size > 1) throw weftError("USAGE", `${given.map(([f, x]) => `${f} ${x}`).join(", ")}: weft keeps K and V in one type`);
  return given[0]?.[1] as "f16" | "f32" | undefined;
}

export function loadOptions(v: ModelValues): LoadModelOptions {
  const split = v.splitMode;
  if (split !== undefined && split !== "none" && split !== "layer" && split !== "tensor")
    throw weftError("USAGE", `--split-mode must be none, layer or tensor, got '${split}'`);
  const devices = v.device?.split(",").map((d) => d.trim());
  const threads = int(v.threads ?? v.threadsBatch, v.threads ? "--threads" : "--threads-batch", usableCores(), 1);
  if (v.threads && v.threadsBatch && v.threads !== v.threadsBatch) log(`weft: -tb ${v.threadsBatch}: weft uses -t ${v.threads} threads for prompts and generation alike`);
  const batch = int(v.batch, "--batch-size", 2048, 1);
  return {
    devices, splitMode: (split as SplitMode | undefined) ?? (devices && devices.length > 1 ? "layer" : "none"),
    tensorSplit: v.tensorSplit?.split(",").map((x) => num(x, "--tensor-split", 0)),
    threads,
    contextSize: v.ctxSize === undefined ? undefined : int(v.ctxSize, "--ctx-size", 0, 1),
    batchSize: Math.min(batch, int(v.ubatch, "--ubatch-size", 512, 1)),
    kvType: kvType(v),
    repack: !v.noRepack,
    allReduceType: v.allReduceType === undefined ? undefined : allReduceTypeOf(v.allReduceType),
    allReduce: v.noPeerLinks ? "generic" : undefined,
  };
}

/** With WEFT_PROFILE=1: time per op since the last call, to stderr (then reset). */
export function printProfile(label: string): void {
  if (!process.env.WEFT_PROFILE || process.env.WEFT_PROFILE === "0") return;
  const rows = Object.entries(native().profileReport(true)).sort((a, b) => b[1][0] - a[1][0]);
  const total = rows.reduce((s, [, [ms]]) => s + ms, 0);
  log(`profile (${label}): ${total.toFixed(1)} ms in native ops`);
  for (const [k, [ms, calls]] of rows) {
    const name = k.startsWith("MUL_MAT/") ? `MUL_MAT ${TYPES[Number(k.slice(8)) as keyof typeof TYPES]?.name ?? k.slice(8)}` : k;
    log(`  ${name.padEnd(16)} ${ms.toFixed(1).padStart(9)} ms ${((100 * ms) / total).toFixed(1).padStart(5)} % ${String(calls).padStart(8)} calls`);
  }
}

/** The model file to use: the one given (checked to be a readable file), or the embedded default. */
export async function resolveModel(path: string | undefined, signal?: AbortSignal): Promise<string> {
  if (path === undefined) return defaultModelPath(log, signal);
  let st;
  try { st = statSync(path); } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw weftError("IO", `cannot open model ${path}: ${code === "ENOENT" ? "no such file" : code === "EACCES" ? "permission denied" : (e as Error).message}`, e);
  }
  if (st.isDirectory()) throw weftError("IO", `cannot open model ${path}: it is a directory (give the .gguf file inside it)`);
  return path;
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

/** Loads the model the flags name, with progress on a terminal; prints what was loaded and warnings. */
export async function openModel(v: ModelValues, signal?: AbortSignal): Promise<Model> {
  const path = await resolveModel(v.model, signal);
  await connectRpc(v, signal);
  const t0 = performance.now();
  const opts = loadOptions(v);
  const m = await loadModel(path, { ...opts, onProgress: progressBar("loading"), signal });
  const hp = m.hparams;
  const types: Record<string, number> = {};
  for (const t of m.file.tensors) { const n = typeName(t.type); types[n] = (types[n] ?? 0) + 1; }
  log(`model: ${path}`);
  log(`  ${hp.arch}, ${hp.nLayer} layers, n_embd ${hp.nEmbd}, heads ${hp.nHead}/${hp.nHeadKv}, ffn ${hp.nFf}, vocab ${hp.nVocab} (${m.tokenizer.kind.toUpperCase()}), ` +
    `${(m.weightBytes / 2 ** 20).toFixed(1)} MiB [${Object.entries(types).map(([k, n]) => `${n}× ${k}`).join(", ")}]`);
  log(`  context ${m.contextSize}, KV cache ${TYPES[m.kvType].name} ${(m.kvCacheBytes / 2 ** 20).toFixed(1)} MiB, ${m.threads} thread(s) per device, loaded in ${(performance.now() - t0).toFixed(0)} ms`);
  if (m.contextSize > hp.nCtxTrain)
    log(`weft: -c ${m.contextSize} is more than the ${hp.nCtxTrain} tokens the model was trained on: quality may drop past that`);
  const mem = m.memory();
  if (mem.length > 1) {
    log(`  split mode ${m.splitMode} over ${m.devices.join(", ")}:`);
    for (const u of mem) log(`    ${u.device}: layers ${u.layers[0]}..${u.layers[1] - 1}, weights ${(u.weightBytes / 2 ** 20).toFixed(1)} MiB, KV ${(u.kvBytes / 2 ** 20).toFixed(1)} MiB`);
    for (const u of mem) if (u.layers[1] <= u.layers[0] && m.splitMode === "layer") log(`weft: ${u.device} gets no layers with this --tensor-split; it holds nothing but its empty queue`);
  }
  // -t is the threads of each device of this machine (a server sets its own)
  const local = mem.filter((u) => u.device.startsWith("cpu")).length;
  const threads = local * m.threads;
  if (threads > usableCores())
    log(`weft: ${local > 1 ? `${local} devices × ${m.threads} thread(s) = ` : ""}${threads} threads on ${usableCores()} core(s): they take turns, slower than one thread per core (-t)`);
  return m;
}

/**
 * SIGINT and SIGTERM abort `ac` (the work stops within one micro-batch or tensor); the
 * returned exit code is 130 / 143 once one came, else `code`. A second Ctrl-C exits at once.
 */
export function onInterrupt(ac: AbortController): { code(code: number): number; dispose(): void } {
  let got: NodeJS.Signals | null = null;
  const handler = (sig: NodeJS.Signals) => {
    if (got) process.exit(sig === "SIGINT" ? 130 : 143);
    got = sig;
    ac.abort(weftError("ABORTED", sig === "SIGINT" ? "interrupted (Ctrl-C)" : "terminated (SIGTERM)"));
  };
  process.on("SIGINT", handler);
  process.on("SIGTERM", handler);
  return {
    code: (code) => (got === "SIGINT" ? 130 : got === "SIGTERM" ? 143 : code),
    dispose: () => { process.off("SIGINT", handler); process.off("SIGTERM", handler); },
  };
}

/**
 * Writes to stdout; when stdout is a pipe that closed (`weft run | head -c 20`), `onClosed`
 * runs once and later writes are dropped: the command then ends quietly.
 */
export function stdoutWriter(onClosed: () => void): (s: string) => void {
  let closed = false;
  process.stdout.on("error", (e: NodeJS.ErrnoException) => {
    if (e.code !== "EPIPE") throw e;
    if (!closed) { closed = true; onClosed(); }
  });
  return (s) => { if (!closed && s) process.stdout.write(s); };
}
