/**
 * A loaded LLaMA-family model with one sequence (KV cache) on the CPU backend:
 * loadModel → tokenize / evaluate / generate → dispose. Forward graphs are built once per
 * shape and cached with their compute buffers; a step only writes the inputs and sends
 * the graph's uid to the native side.
 */
import { availableParallelism } from "node:os";
import { weftError } from "../core/errors.js";
import { GgmlType } from "../core/types.js";
import { readGguf } from "../gguf/reader.js";
import { GgufFile } from "../gguf/types.js";
import { CpuBuffer, allocateTensors } from "../cpu/buffer.js";
import { canRepack, repackedBytes, repackWeights } from "../cpu/repack.js";
import { Tensor } from "../core/tensor.js";
import { CpuDevice, CpuQueue, cpuDevice } from "../backend/cpu.js";
import { Backend, BufferUsage } from "../backend/interface.js";
import { ScheduledGraph, Scheduler } from "../backend/sched.js";
import { Tokenizer, TokenizeOptions, DetokenizeOptions } from "../tokenizer/tokenizer.js";
import { HParams, WeightTable, readHParams, readWeightTable } from "./hparams.js";
import { ForwardGraph, KvCacheLayout, LlamaWeights, buildForward, kvCacheTensors, weightTensors } from "./llama.js";
import { Sampler, SamplingOptions } from "./sampling.js";

export interface LoadProgress { phase: "map" | "load" | "repack" | "ready"; loaded: number; total: number }

export type SplitMode = "none" | "layer";

export interface LoadModelOptions {
  /** CPU threads per device (default: all cores) */
  threads?: number;
  /** devices to use, e.g. ["cpu:0", "cpu:1"] or device objects (default ["cpu:0"]) */
  devices?: ReadonlyArray<string | CpuDevice>;
  /** "none": everything on the first device; "layer": contiguous layer ranges per device */
  splitMode?: SplitMode;
  /** share of layers per device for the layer split (default: equal) */
  tensorSplit?: readonly number[];
  /** context length (default: the model's training context, at most 4096) */
  contextSize?: number;
  /** KV cache type (default f16) */
  kvType?: "f16" | "f32";
  /** most tokens evaluated in one graph (the micro-batch, default 512); with a layer
   * split, a longer prompt is pipelined: device k runs micro-batch i while k+1 runs i−1 */
  batchSize?: number;
  /** fault the whole file in at load (default true): the first token then pays no page faults */
  prefault?: boolean;
  /** copy Q4_0, Q8_0 and Q4_K matrices into the CPU's eight-row layout at load (default true): one-token
   * products run faster; the copy takes memory the size of those matrices, and the
   * mapped file pages they came from are left to the page cache */
  repack?: boolean;
  onProgress?: (p: LoadProgress) => void;
  signal?: AbortSignal;
}

export interface EvaluateOptions {
  /** return logits for every position (default: only the last) */
  allLogits?: boolean;
  signal?: AbortSignal;
}

export interface GenerateOptions extends SamplingOptions {
  /** most tokens to generate (default 128) */
  maxTokens?: number;
  /** add BOS etc. to the prompt as the vocabulary asks (default true) */
  addSpecial?: boolean;
  signal?: AbortSignal;
}

export interface GeneratedPiece {
  /** the sampled token id (-1 for a final flush of incomplete UTF-8 bytes) */
  token: number;
  /** text completed by this token (may be empty while a multi-byte character is split) */
  text: string;
}

// Attention reads the KV cache up to the next multiple of KV_BUCKET positions (masked past
// the current one): small buckets save work, each bucket is one more cached graph.
const KV_BUCKET = 32;
const GRAPH_CACHE = 32;
/** graph instances per shape when several devices pipeline micro-batches */
const PIPELINE_SLOTS = 3;

/** mask: the graph's mask input, refilled each step (setInput copies it before it resolves) */
interface CachedGraph { fg: ForwardGraph; sg: ScheduledGraph; mask: Float32Array }

export interface DeviceUsage { device: string; layers: [number, number]; weightBytes: number; kvBytes: number; computeBytes: number }

/** Layer ranges per device, proportional to `split` (llama.cpp's --tensor-split). */
export function layerRanges(nLayer: number, nDev: number, split?: readonly number[]): Array<[number, number]> {
  const w = split ?? Array(nDev).fill(1);
  if (w.length !== nDev || w.some((x) => !(x >= 0)) || !(w.reduce((a, b) => a + b, 0) > 0))
    throw weftError("BAD_ARGUMENT", `tensor split [${w.join(", ")}] must have one non-negative share per device (${nDev}) and a positive sum`);
  const total = w.reduce((a, b) => a + b, 0);
  const out: Array<[number, number]> = [];
  let acc = 0, start = 0;
  for (let d = 0; d < nDev; d++) {
    acc += w[d]!;
    const end = d === nDev - 1 ? nLayer : Math.round((nLayer * acc) / total);
    out.push([start, Math.max(start, end)]);
    start = Math.max(start, end);
  }
  return out;
}

export class Model {
  readonly path: string;
  readonly file: GgufFile;
  readonly hparams: HParams;
  readonly tokenizer: Tokenizer;
  readonly contextSize: number;
  readonly batchSize: number;
  readonly kvType: GgmlType;
  readonly threads: number;
  readonly splitMode: SplitMode;
  /** per device: its layer range */
  readonly layerRanges: ReadonlyArray<[number, number]>;
  #backends: CpuQueue[];
  #sched: Scheduler;
  #weights: CpuBuffer[];
  #weightBytes: number[];
  /** per device: the MUL_MAT weight matrices placed on it (candidates for repacking) */
  #matrices: Tensor[][];
  #w: LlamaWeights;
  #kv: KvCacheLayout;
  #kvBuffers: CpuBuffer[];
  #graphs = new Map<string, CachedGraph>();
  #pos = 0;
  #busy = false;
  #disposed = false;

  /** @internal use loadModel */
  constructor(path: string, file: GgufFile, hp: HParams, tok: Tokenizer, table: WeightTable, opts: LoadModelOptions) {
    this.path = path; this.file = file; this.hparams = hp; this.tokenizer = tok;
    this.threads = opts.threads ?? availableParallelism();
    this.contextSize = opts.contextSize ?? Math.min(hp.nCtxTrain, 4096);
    this.batchSize = opts.batchSize ?? 512;
    if (!Number.isInteger(this.contextSize) || this.contextSize < 1) throw weftError("BAD_ARGUMENT", `context size must be a positive integer, got ${opts.contextSize}`);
    if (!Number.isInteger(this.batchSize) || this.batchSize < 1) throw weftError("BAD_ARGUMENT", `batch size must be a positive integer, got ${opts.batchSize}`);
    const kvType = opts.kvType ?? "f16";
    if (kvType !== "f16" && kvType !== "f32") throw weftError("BAD_ARGUMENT", `KV cache type must be f16 or f32, got ${kvType}`);
    this.kvType = kvType === "f16" ? GgmlType.F16 : GgmlType.F32;
    this.splitMode = opts.splitMode ?? "none";
    if (this.splitMode !== "none" && this.splitMode !== "layer")
      throw weftError("BAD_ARGUMENT", `split mode must be none or layer, got '${this.splitMode}' (tensor parallelism comes with the meta backend)`);
    const listed = (opts.devices && opts.devices.length ? [...opts.devices] : ["cpu:0"]).map((d) => (typeof d === "string" ? cpuDevice(d) : d));
    if (new Set(listed).size !== listed.length) throw weftError("BAD_ARGUMENT", `a device is listed twice: ${listed.map((d) => d.name).join(",")}`);
    const devices = this.splitMode === "none" ? listed.slice(0, 1) : listed;
    this.layerRanges = this.splitMode === "none" ? [[0, hp.nLayer]] : layerRanges(hp.nLayer, devices.length, opts.tensorSplit);
    const deviceOfLayer = (l: number) => this.layerRanges.findIndex(([a, b]) => l >= a && l < b);
    const head = devices.length - 1;

    this.#backends = [];
    this.#weights = [];
    this.#kvBuffers = [];
    this.#weightBytes = devices.map(() => 0);
    try {
      for (const d of devices) {
        this.#backends.push(d.initBackend({ threads: this.threads }));
        // each device maps the file itself (the page cache shares the pages)
        const m = d.bufferType().mapFile(path);
        m.usage = BufferUsage.WEIGHTS;
        this.#weights.push(m);
      }
      const counted = devices.map(() => new Set<string>());
      this.#matrices = devices.map(() => []);
      this.#w = weightTensors(table, (t, info, where) => {
        const d = where === "embd" ? 0 : where === "head" ? head : deviceOfLayer(where);
        if (where !== "embd") this.#matrices[d]!.push(t);  // the embedding is read by GET_ROWS
        t.buffer = this.#weights[d]!;
        t.offset = file.dataOffset + info.offset;
        // a tied embedding used by the head on the same device counts once
        if (!counted[d]!.has(info.name)) { counted[d]!.add(info.name); this.#weightBytes[d]! += info.nbytes; }
      });
      this.#kv = kvCacheTensors(hp, this.contextSize, this.kvType);
      devices.forEach((d, i) => {
        const [a, b] = this.layerRanges[i]!;
        const buf = allocateTensors([...this.#kv.k.slice(a, b), ...this.#kv.v.slice(a, b)], 0, (n) => d.bufferType().alloc(n));
        buf.clear(0);  // masked positions then hold finite values (0 · -inf never happens)
        this.#kvBuffers.push(buf);
      });
      this.#sched = new Scheduler(this.#backends);
    } catch (e) {
      for (const b of [...this.#weights, ...this.#kvBuffers]) b.dispose();
      for (const b of this.#backends) void b.dispose();
      throw e;
    }
  }

  /**
   * @internal loadModel's last step: each device's Q4_0, Q8_0 and Q4_K matrices move into its repacked
   * buffer (lib/cpu/repack.ts). The event loop gets a turn every tensor; `signal` stops it.
   */
  async repackWeights(report: (p: LoadProgress) => void, signal?: AbortSignal): Promise<void> {
    const total = this.#matrices.flat().filter(canRepack).reduce((n, t) => n + repackedBytes(t), 0);
    let before = 0;
    for (const [i, be] of this.#backends.entries()) {
      let here = 0;
      const buf = await repackWeights(this.#matrices[i]!, (n) => be.device.bufferType().alloc(n, { repacked: true }), async (p) => {
        here = p.loaded;
        report({ phase: "repack", loaded: before + here, total });
        await new Promise((r) => setImmediate(r));
        signal?.throwIfAborted();
      });
      if (buf) { buf.usage = BufferUsage.WEIGHTS; this.#weights.push(buf); }
      before += here;
    }
  }

  /** Tokens evaluated so far in the sequence (the next token's position). */
  get position(): number { return this.#pos; }
  /** Bytes of the KV cache (all devices). */
  get kvCacheBytes(): number { return this.#kvBuffers.reduce((s, b) => s + b.size, 0); }
  /** Bytes of the model's weights (a tensor used on two devices counts twice). */
  get weightBytes(): number { return this.#weightBytes.reduce((a, b) => a + b, 0); }
  get devices(): string[] { return this.#backends.map((b) => b.name); }

  /** Memory per device: weights it holds, its KV cache, compute buffers of the cached graphs. */
  memory(): DeviceUsage[] {
    const compute = new Map<Backend, number>();
    for (const g of this.#graphs.values()) for (const [be, n] of g.sg.computeBytes()) compute.set(be, (compute.get(be) ?? 0) + n);
    return this.#backends.map((be, i) => ({
      device: be.name, layers: this.layerRanges[i]!, weightBytes: this.#weightBytes[i]!,
      kvBytes: this.#kvBuffers[i]!.size, computeBytes: compute.get(be) ?? 0,
    }));
  }

  tokenize(text: string, opts?: TokenizeOptions): number[] { return this.tokenizer.tokenize(text, opts); }
  detokenize(ids: readonly number[], opts?: DetokenizeOptions): string { return this.tokenizer.detokenize(ids, opts); }

  /** Forgets the sequence: the next evaluate starts at position 0. */
  reset(): void { this.#pos = 0; }

  #check(): void {
    if (this.#disposed) throw weftError("DISPOSED", "the model was disposed");
    if (this.#busy) throw weftError("BUSY", "the model is already evaluating (await the previous call)");
  }

  #graph(n: number, kvLen: number, allLogits: boolean, slot: number): CachedGraph {
    const key = `${n}:${kvLen}:${allLogits ? 1 : 0}:${slot}`;
    const hit = this.#graphs.get(key);
    if (hit) { this.#graphs.delete(key); this.#graphs.set(key, hit); return hit; }
    if (this.#graphs.size >= GRAPH_CACHE) {
      const [oldKey, old] = this.#graphs.entries().next().value as [string, CachedGraph];
      this.#graphs.delete(oldKey);
      old.sg.dispose();  // its last run has completed: evaluate awaits every run it enqueues
    }
    const fg = buildForward(this.hparams, this.#w, this.#kv, n, kvLen, allLogits);
    const c = { fg, sg: this.#sched.schedule(fg.graph), mask: new Float32Array(kvLen * n) };
    this.#graphs.set(key, c);
    return c;
  }

  /**
   * Appends tokens to the sequence and runs them through the model. Returns the logits of
   * the last token ([nVocab]) or, with allLogits, of every token ([n × nVocab], row-major).
   */
  async evaluate(tokens: readonly number[], opts: EvaluateOptions = {}): Promise<Float32Array> {
    this.#check();
    const nV = this.hparams.nVocab;
    if (tokens.length === 0) throw weftError("BAD_ARGUMENT", "evaluate needs at least one token");
    for (const t of tokens) if (!Number.isInteger(t) || t < 0 || t >= nV) throw weftError("OUT_OF_RANGE", `token id ${t} is outside the vocabulary (0..${nV - 1})`);
    if (this.#pos + tokens.length > this.contextSize)
      throw weftError("OUT_OF_RANGE", `context full: ${this.#pos} + ${tokens.length} tokens exceed the context size ${this.contextSize} (use a larger contextSize / -c)`);
    this.#busy = true;
    try {
      const all = opts.allLogits ?? false;
      const out = new Float32Array(all ? tokens.length * nV : nV);
      const slots = this.#backends.length > 1 ? PIPELINE_SLOTS : 1;
      const pending: Promise<unknown>[] = [];
      // Every micro-batch is only enqueued here: on several devices they pipeline.
      for (let start = 0, mb = 0; start < tokens.length; start += this.batchSize, mb++) {
        opts.signal?.throwIfAborted();
        const chunk = tokens.slice(start, start + this.batchSize);
        const n = chunk.length;
        const p0 = this.#pos;
        const kvLen = Math.min(this.contextSize, Math.ceil((p0 + n) / KV_BUCKET) * KV_BUCKET);
        const last = start + n >= tokens.length;
        const { fg, sg, mask } = this.#graph(n, kvLen, all, mb % slots);
        const pos = new Int32Array(n);
        for (let i = 0; i < n; i++) pos[i] = p0 + i;
        mask.fill(-Infinity);
        for (let i = 0; i < n; i++) mask.fill(0, i * kvLen, i * kvLen + p0 + i + 1);
        await sg.setInput(fg.tokens, Int32Array.from(chunk));
        await sg.setInput(fg.positions, pos);
        await sg.setInput(fg.mask, mask);
        await sg.setInput(fg.slots, BigInt64Array.from(pos, (p) => BigInt(p)));
        pending.push((await sg.enqueue()).done);
        this.#pos += n;
        if (all || last) {
          const at = start;
          pending.push(sg.getOutput(fg.logits).then((bytes) => {
            const rows = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
            if (all) out.set(rows, at * nV);
            else out.set(rows.subarray(rows.length - nV));
          }));
        }
      }
      await Promise.all(pending);
      return out;
    } finally {
      this.#busy = false;
    }
  }

  /**
   * Generates a continuation of `prompt` (the sequence is reset first), yielding each
   * token with the text it completes. Stops at an end-of-generation token, after
   * maxTokens, or when the signal aborts (the iterator then throws an AbortError).
   */
  async *generate(prompt: string | readonly number[], opts: GenerateOptions = {}): AsyncGenerator<GeneratedPiece, void, undefined> {
    const ids = typeof prompt === "string" ? this.tokenize(prompt, { addSpecial: opts.addSpecial ?? true }) : [...prompt];
    if (ids.length === 0) throw weftError("BAD_ARGUMENT", "the prompt is empty and the vocabulary adds no BOS token: nothing to continue from");
    const maxTokens = opts.maxTokens ?? 128;
    if (!Number.isInteger(maxTokens) || maxTokens < 0) throw weftError("BAD_ARGUMENT", `maxTokens must be a non-negative integer, got ${maxTokens}`);
    const sampler = new Sampler(opts);
    sampler.accept(ids);
    this.reset();
    const decoder = new TextDecoder("utf-8");
    let logits = await this.evaluate(ids, { signal: opts.signal });
    for (let i = 0; i < maxTokens; i++) {
      opts.signal?.throwIfAborted();
      const tok = sampler.sample(logits);
      if (this.tokenizer.isEog(tok)) break;
      sampler.accept([tok]);
      yield { token: tok, text: decoder.decode(this.tokenizer.tokenToPiece(tok), { stream: true }) };
      if (i + 1 < maxTokens) {
        if (this.#pos >= this.contextSize) break;
        logits = await this.evaluate([tok], { signal: opts.signal });
      }
    }
    const rest = decoder.decode();
    if (rest) yield { token: -1, text: rest };
  }

  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    await Promise.all(this.#backends.map((b) => b.synchronize()));
    for (const g of this.#graphs.values()) g.sg.dispose();
    this.#graphs.clear();
    await Promise.all(this.#backends.map((b) => b.dispose()));
    for (const b of [...this.#kvBuffers, ...this.#weights]) b.dispose();
  }
  [Symbol.asyncDispose](): Promise<void> { return this.dispose(); }
}

/** Loads a GGUF model: parses and checks everything, maps the weights (no copy), builds the tokenizer. */
export async function loadModel(path: string, opts: LoadModelOptions = {}): Promise<Model> {
  const report = opts.onProgress ?? (() => {});
  const file = readGguf(path);
  const hp = readHParams(file);
  const table = readWeightTable(file, hp);
  const tokenizer = new Tokenizer(file);
  if (tokenizer.vocabSize !== hp.nVocab)
    throw weftError("BAD_GGUF", `${path}: the tokenizer has ${tokenizer.vocabSize} tokens but token_embd.weight has ${hp.nVocab} rows`);
  report({ phase: "map", loaded: 0, total: file.fileSize });
  if (opts.prefault ?? true) {
    // fault the file in once (every device's mapping shares these pages)
    const m = CpuBuffer.mapFile(path);
    try {
      const chunk = 64 << 20;
      for (let off = 0; off < m.size; off += chunk) {
        opts.signal?.throwIfAborted();
        m.touch(off, Math.min(chunk, m.size - off));
        report({ phase: "load", loaded: Math.min(off + chunk, m.size), total: m.size });
        await new Promise((r) => setImmediate(r));
      }
    } finally {
      m.dispose();
    }
  }
  const model = new Model(path, file, hp, tokenizer, table, opts);
  if (opts.repack ?? true) {
    try { await model.repackWeights(report, opts.signal); }
    catch (e) { await model.dispose(); throw e; }
  }
  report({ phase: "ready", loaded: file.fileSize, total: file.fileSize });
  return model;
}

/** Loads only the tokenizer of a GGUF (works on vocab-only files). */
export function loadTokenizer(path: string): Tokenizer {
  return new Tokenizer(readGguf(path));
}

