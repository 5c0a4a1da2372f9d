/**
 * A loaded LLaMA-family model with one sequence (KV cache) on any device or devices:
 * loadModel → tokenize / evaluate / generate → dispose. Forward graphs are built once per
 * shape and cached with their compute buffers; a step only writes the inputs and sends
 * the graph's uid to the devices.
 */
import { WeftError, weftError } from "../core/errors.js";
import { GgmlType } from "../core/types.js";
import { readGguf } from "../gguf/reader.js";
import { GgufFile } from "../gguf/types.js";
import { Tensor } from "../core/tensor.js";
import { AllReduceType, Backend, Buffer, Device } from "../backend/interface.js";
import { allocateTensors } from "../backend/alloc.js";
import { canMapFiles, deviceBytes } from "../backend/fallback.js";
import { ScheduledGraph, Scheduler, planLayerSplit } from "../backend/sched.js";
import { cpuDevice, usableCores } from "../cpu/index.js";
import { AllReducePath, deviceFromSpec, isMeta, metaDevice } from "../meta/index.js";
import { planLlamaSplit } from "../split/plan.js";
import { RpcConnection } from "../rpc/client.js";
import { RpcDevice } from "../rpc/device.js";
import { SplitState } from "../split/state.js";
import { Tokenizer, TokenizeOptions, DetokenizeOptions } from "../tokenizer/tokenizer.js";
import { HParams, WeightTable, readHParams, readWeightTable } from "./hparams.js";
import { ForwardGraph, KvCacheLayout, LlamaWeights, buildForward, kvCacheTensors, weightTensors } from "./llama.js";
import { DeviceWeights, PlacedWeight, isUploaded, placeWeights } from "./load.js";
import { Sampler, SamplingOptions } from "./sampling.js";

export interface LoadProgress { phase: "map" | "load" | "upload" | "ready"; loaded: number; total: number }

/** none: all on the first device; layer: contiguous layer ranges per device (pipelined);
 * tensor: every weight matrix cut across the devices (one meta device over them) */
export type SplitMode = "none" | "layer" | "tensor";

export interface LoadModelOptions {
  /** CPU threads per device (default: the cores this process may use) */
  threads?: number;
  /** devices, e.g. ["cpu:0", "cpu:1"], a "+" group ("cpu:0+cpu:1": one meta device, tensor
   * parallel inside a layer split) or device objects such as backend.meta([...]) (default ["cpu:0"]) */
  devices?: ReadonlyArray<string | Device>;
  splitMode?: SplitMode;
  /** share per device: of the layers (layer split) or of every matrix (tensor split); default equal */
  tensorSplit?: readonly number[];
  /** with a tensor split over RPC servers: how partial sums cross the links between them
   * (f32 exact, default; f16 or q8_0 fewer bytes, rounded; see MetaOptions.allReduceType) */
  allReduceType?: AllReduceType;
  /** how a tensor split's partial sums travel (MetaOptions.allReduce): "auto" (default),
   * "collective" or "generic" (RPC servers that cannot reach each other: through this process) */
  allReduce?: AllReducePath;
  /** context length (default: the model's training context, at most 4096) */
  contextSize?: number;
  /** KV cache type (default f16) */
  kvType?: "f16" | "f32";
  /** most tokens evaluated in one graph (the micro-batch, default 512); with a layer
   * split, a longer prompt is pipelined: device k runs micro-batch i while k+1 runs i−1 */
  batchSize?: number;
  /** fault the whole file in at load (default true) where a device uses it mapped: the
   * first token then pays no page faults */
  prefault?: boolean;
  /** keep Q4_0, Q8_0 and Q4_K matrices in the CPU's eight-row layout (default true): one-token
   * products run faster; the copy takes memory the size of those matrices, and the
   * mapped file pages they came from are left to the page cache */
  repack?: boolean;
  onProgress?: (p: LoadProgress) => void;
  signal?: AbortSignal;
}

export interface EvaluateOptions {
  /** return logits for every position (default: only the last) */
  allLogits?: boolean;
  /** write the logits here (nVocab floats, or tokens × nVocab with allLogits) and return
   * it instead of a new array: a loop evaluating token after token then allocates nothing
   * per token (as llama.cpp's context-owned logits) */
  out?: Float32Array;
  signal?: AbortSignal;
}

export interface GenerateOptions extends SamplingOptions {
  /** most tokens to generate (default 128; -1 or Infinity: until the end token or a full context) */
  maxTokens?: number;
  /** add BOS etc. to the prompt as the vocabulary asks (default true) */
  addSpecial?: boolean;
  /** turn special-token text in the prompt (`<|start_header_id|>`) into its token (default false) */
  parseSpecial?: boolean;
  signal?: AbortSignal;
}

/** Why a generation stopped: an end-of-generation token, maxTokens, a full context, or the signal. */
export type StopReason = "eog" | "maxTokens" | "contextFull" | "aborted";

/** The token stream of generate(); `stopReason` is set once it has stopped. */
export interface Generation extends AsyncGenerator<GeneratedPiece, void, undefined> {
  readonly stopReason: StopReason | null;
}

/** The error an aborted call throws: code ABORTED, the signal's reason as its cause. */
export function abortError(signal: AbortSignal): WeftError {
  const r = signal.reason as unknown;
  const why = r instanceof Error ? r.message : r === undefined ? "" : String(r);
  return weftError("ABORTED", `aborted${why ? `: ${why}` : ""}`, r);
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

/** The graph cache's key: tokens, KV length, whether every token's logits are read, pipeline slot. */
const graphKey = (n: number, kvLen: number, allLogits: boolean, slot: number) => `${n}:${kvLen}:${allLogits ? 1 : 0}:${slot}`;

/** mask: the graph's mask input, refilled each step (setInput copies it before it resolves) */
interface CachedGraph { fg: ForwardGraph; sg: ScheduledGraph; mask: Float32Array }

/** Memory one physical device holds for the model. */
export interface DeviceUsage { device: string; layers: [number, number]; weightBytes: number; kvBytes: number; computeBytes: number }

/** The devices a load places work on, from the options (a tensor split is one meta device). */
export function resolveDevices(opts: Pick<LoadModelOptions, "devices" | "splitMode" | "tensorSplit" | "allReduceType" | "allReduce">): { devices: Device[]; mode: SplitMode } {
  const listed = (opts.devices?.length ? [...opts.devices] : ["cpu:0"]).map((d) => deviceFromSpec(d, { allReduceType: opts.allReduceType, allReduce: opts.allReduce }));
  if (new Set(listed).size !== listed.length) throw weftError("BAD_ARGUMENT", `a device is listed twice: ${listed.map((d) => d.name).join(",")}`);
  const mode = opts.splitMode ?? "none";
  if (mode !== "none" && mode !== "layer" && mode !== "tensor") throw weftError("BAD_ARGUMENT", `split mode must be none, layer or tensor, got '${mode}'`);
  if (mode === "tensor") {
    if (listed.length === 1 && isMeta(listed[0]!)) return { devices: listed, mode };
    if (listed.some(isMeta)) throw weftError("BAD_ARGUMENT", "with --split-mode tensor, list plain devices (cpu:0,cpu:1); + groups are for a layer split");
    return { devices: [metaDevice(listed, { tensorSplit: opts.tensorSplit, allReduceType: opts.allReduceType, allReduce: opts.allReduce })], mode };
  }
  return { devices: mode === "none" ? listed.slice(0, 1) : listed, mode };
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
  /** per device (of the split): its layer range */
  readonly layerRanges: ReadonlyArray<[number, number]>;
  readonly #devices: Device[];
  #backends: Backend[] = [];
  #sched!: Scheduler;
  #weights: DeviceWeights[] = [];
  #w!: LlamaWeights;
  #kv!: KvCacheLayout;
  #kvBuffers: Buffer[] = [];
  #graphs = new Map<string, CachedGraph>();
  #pos = 0;
  /** the tokens of the sequence (what reconnect() evaluates again) and the last logits (what resume() samples from) */
  #history: number[] = [];
  #lastLogits: Float32Array | null = null;
  #lastLogitsBuf: Float32Array | null = null;
  #busy = false;
  #disposed = false;

  /** @internal use loadModel */
  constructor(path: string, file: GgufFile, hp: HParams, tok: Tokenizer, opts: LoadModelOptions) {
    this.path = path; this.file = file; this.hparams = hp; this.tokenizer = tok;
    this.threads = opts.threads ?? usableCores();
    this.contextSize = opts.contextSize ?? Math.min(hp.nCtxTrain, 4096);
    this.batchSize = opts.batchSize ?? 512;
    if (!Number.isInteger(this.contextSize) || this.contextSize < 1) throw weftError("BAD_ARGUMENT", `context size must be a positive integer, got ${opts.contextSize}`);
    if (!Number.isInteger(this.batchSize) || this.batchSize < 1) throw weftError("BAD_ARGUMENT", `batch size must be a positive integer, got ${opts.batchSize}`);
    const kvType = opts.kvType ?? "f16";
    if (kvType !== "f16" && kvType !== "f32") throw weftError("BAD_ARGUMENT", `KV cache type must be f16 or f32, got ${kvType}`);
    this.kvType = kvType === "f16" ? GgmlType.F16 : GgmlType.F32;
    const { devices, mode } = resolveDevices(opts);
    this.splitMode = mode;
    this.#devices = devices;
    this.layerRanges = mode === "layer" ? planLayerSplit(hp.nLayer, devices.length, opts.tensorSplit) : [[0, hp.nLayer]];
  }

  /**
   * @internal loadModel's body: places weights and KV cache on the devices (uploading what
   * is not used mapped, with progress) and starts their backends.
   */
  async init(table: WeightTable, opts: LoadModelOptions, report: (p: LoadProgress) => void): Promise<void> {
    const hp = this.hparams, devices = this.#devices;
    const deviceOfLayer = (l: number) => this.layerRanges.findIndex(([a, b]) => l >= a && l < b);
    const head = devices.length - 1;
    const placed: PlacedWeight[][] = devices.map(() => []);
    const matmul = new Set<Tensor>();
    this.#w = weightTensors(table, (t, info, where) => {
      const d = where === "embd" ? 0 : where === "head" ? head : deviceOfLayer(where);
      if (where !== "embd" && t.ne[1] > 1) matmul.add(t);  // the embedding is read by GET_ROWS, norms are vectors
      placed[d]!.push({ t, info });
    });
    this.#kv = kvCacheTensors(hp, this.contextSize, this.kvType);
    const types = new Map(this.file.tensors.map((t) => [t.name, t.type]));
    const typeOf = (name: string) => types.get(name) ?? types.get("token_embd.weight")!;  // a tied head is the embedding
    const splitOf = (d: Device): ((t: Tensor) => SplitState | undefined) | undefined =>
      (isMeta(d) ? planLlamaSplit(hp, d.size, d.shares, typeOf) : undefined);
    const repack = opts.repack ?? true;
    const total = devices.reduce((n, d, i) => n + placed[i]!.filter((w) => isUploaded(d, w.t, { matmul, repack })).reduce((s, w) => s + w.info.nbytes, 0), 0);
    let loaded = 0;
    const step = async (bytes: number) => {
      loaded += bytes;
      report({ phase: "upload", loaded, total });
      await new Promise((r) => setImmediate(r));
      opts.signal?.throwIfAborted();
    };
    try {
      for (const [i, d] of devices.entries()) {
        this.#weights.push(await placeWeights(d, placed[i]!, this.file, { matmul, repack, splitState: splitOf(d) }, step));
        const [a, b] = this.layerRanges[i]!;
        const kv = allocateTensors([...this.#kv.k.slice(a, b), ...this.#kv.v.slice(a, b)], { bufferType: d.bufferType(), splitState: splitOf(d) });
        kv.clear(0);  // masked positions then hold finite values (0 · -inf never happens)
        this.#kvBuffers.push(kv);
      }
      for (const d of devices) this.#backends.push(d.initBackend({ threads: this.threads }));
      this.#sched = new Scheduler(this.#backends);
    } catch (e) {
      await this.dispose();
      throw e;
    }
  }

  /** @internal whether some device uses the weights where they lie in the mapped file */
  mapsFile(): boolean { return this.#devices.some((d) => canMapFiles(d.bufferType())); }

  /** Tokens evaluated so far in the sequence (the next token's position). */
  get position(): number { return this.#pos; }
  /** Bytes of the KV cache (all devices). */
  get kvCacheBytes(): number { return this.#kvBuffers.reduce((s, b) => s + b.size, 0); }
  /** Bytes the weights take on the devices (a tensor held by two devices counts twice; of a
   * mapped file, the tensors used from it). */
  get weightBytes(): number { return this.memory().reduce((s, u) => s + u.weightBytes, 0); }
  /** The devices of the split (a meta device is one). */
  get devices(): string[] { return this.#devices.map((d) => d.name); }

  /** Memory per physical device: weights it holds, its KV cache, compute buffers of the cached graphs. */
  memory(): DeviceUsage[] {
    const rows = new Map<Device, DeviceUsage>();
    const add = (b: Buffer, i: number, key: "weightBytes" | "kvBytes" | "computeBytes", used?: number) => {
      for (const [dev, n] of used === undefined ? deviceBytes(b) : [[b.bufferType.device, used] as const]) {
        let r = rows.get(dev);
        if (!r) { r = { device: dev.name, layers: this.layerRanges[i]!, weightBytes: 0, kvBytes: 0, computeBytes: 0 }; rows.set(dev, r); }
        r[key] += n;
      }
    };
    this.#devices.forEach((_, i) => {
      const w = this.#weights[i];
      for (const b of w?.buffers ?? []) add(b, i, "weightBytes", w!.used.get(b));
      if (this.#kvBuffers[i]) add(this.#kvBuffers[i]!, i, "kvBytes");
    });
    for (const g of this.#graphs.values())
      for (const s of g.sg.splits) add(s.buffer, this.#backends.indexOf(s.backend), "computeBytes");
    return [...rows.values()];
  }

  tokenize(text: string, opts?: TokenizeOptions): number[] { return this.tokenizer.tokenize(text, opts); }
  detokenize(ids: readonly number[], opts?: DetokenizeOptions): string { return this.tokenizer.detokenize(ids, opts); }

  /** Forgets the sequence: the next evaluate starts at position 0. */
  reset(): void { this.#pos = 0; this.#history = []; this.#lastLogits = null; }

  /** The tokens of the sequence so far. */
  get tokens(): readonly number[] { return this.#history; }

  /**
   * After a remote device's server died or its link dropped (an RPC_CLOSED error): connects
   * again (trying for `timeoutMs`, default 30 s, while the server restarts), restores the
   * weights (from the server's cache where it kept them, else uploaded again) and the KV
   * cache (by evaluating the sequence so far again). resume() then continues a generation
   * where it stopped. Returns whether anything had to be reconnected.
   */
  async reconnect(opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<boolean> {
    if (this.#disposed) throw weftError("DISPOSED", "the model was disposed");
    if (this.#busy) throw weftError("BUSY", "the model is evaluating (await the call that failed first)");
    const conns = new Set<RpcConnection>();
    const walk = (d: Device): void => {
      if (d instanceof RpcDevice) conns.add(d.conn);
      else if (isMeta(d)) d.devices.forEach(walk);
    };
    this.#devices.forEach(walk);
    const dead = [...conns].filter((c) => c.closed);
    if (!dead.length) return false;
    for (const c of dead) await c.reconnect(opts);
    // graphs are rebuilt: a tensor-parallel step's collective group died with the server
    // (a new one links the servers again), and the servers forgot the graphs
    for (const g of this.#graphs.values()) g.sg.dispose();
    this.#graphs.clear();
    const seq = this.#history;
    this.reset();
    if (seq.length) await this.evaluate(seq, { signal: opts.signal });
    return true;
  }

  #check(): void {
    if (this.#disposed) throw weftError("DISPOSED", "the model was disposed");
    if (this.#busy) throw weftError("BUSY", "the model is already evaluating (await the previous call)");
  }

  #graph(n: number, kvLen: number, allLogits: boolean, slot: number): CachedGraph {
    const key = graphKey(n, kvLen, allLogits, slot);
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
    const all = opts.allLogits ?? false;
    const want = all ? tokens.length * nV : nV;
    if (opts.out && !(opts.out instanceof Float32Array && opts.out.length === want))
      throw weftError("BAD_ARGUMENT", `out must be a Float32Array of ${want} floats (${all ? "tokens × nVocab" : "nVocab"})`);
    this.#busy = true;
    // the tokens join the sequence now: if a device fails on the way, reconnect() evaluates them again
    this.#history.push(...tokens);
    this.#lastLogits = null;
    try {
      const out = all ? opts.out ?? new Float32Array(want) : null;
      let final: Float32Array | null = null;  // the last token's logits, viewed where they were read
      // One device: a micro-batch is queued when the previous one is done (it could not
      // overlap anyway), so an abort stops within one micro-batch. Several devices: up to
      // PIPELINE_SLOTS micro-batches in flight, device k on micro-batch i while k+1 is on i−1.
      const slots = this.#backends.length > 1 ? PIPELINE_SLOTS : 1;
      const pending: Promise<unknown>[] = [];
      const inFlight: Promise<unknown>[] = [];
      try {
        for (let start = 0, mb = 0; start < tokens.length; start += this.batchSize, mb++) {
          while (inFlight.length >= slots) await inFlight.shift();
          if (opts.signal?.aborted) break;
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
          const done = (await sg.enqueue()).done;
          pending.push(done);
          inFlight.push(done.catch(() => {}));
          this.#pos += n;
          if (all || last) {
            const at = start;
            // the last token's logits straight into the caller's array, where it gave one
            const into = !all && opts.out && fg.logits.nbytes === nV * 4 ? new Uint8Array(opts.out.buffer, opts.out.byteOffset, nV * 4) : undefined;
            pending.push(sg.getOutput(fg.logits, into).then((bytes) => {
              if (into) { final = opts.out!; return; }
              const rows = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
              if (out) out.set(rows, at * nV);
              else final = rows.subarray(rows.length - nV);
            }));
          }
        }
        // generating: the next token's graph, where it is a new one (every KV_BUCKET
        // positions), is built while this step runs (devices that can get it ready too:
        // RPC servers receive it now instead of with the next step)
        if (!all && !opts.signal?.aborted && this.#pos < this.contextSize) {
          const kvNext = Math.min(this.contextSize, Math.ceil((this.#pos + 1) / KV_BUCKET) * KV_BUCKET);
          if (!this.#graphs.has(graphKey(1, kvNext, false, 0))) this.#graph(1, kvNext, false, 0).sg.prepare();
        }
      } finally {
        await Promise.allSettled(pending);  // nothing of this call is still running when it returns or throws
      }
      await Promise.all(pending);
      if (opts.signal?.aborted) throw abortError(opts.signal);
      let result = out ?? final!;
      if (!all && opts.out && result !== opts.out) { opts.out.set(result); result = opts.out; }
      // kept for resume(), in one buffer for the model's life (not a new one per token)
      this.#lastLogitsBuf ??= new Float32Array(nV);
      if (result !== this.#lastLogitsBuf) this.#lastLogitsBuf.set(result.subarray(result.length - nV));
      this.#lastLogits = this.#lastLogitsBuf;
      return result;
    } finally {
      if (opts.signal?.aborted) this.#history.length = this.#pos;  // an abort keeps what was queued
      this.#busy = false;
    }
  }

  /**
   * Generates a continuation of `prompt` (the sequence is reset first), yielding each
   * token with the text it completes. Stops at an end-of-generation token, after
   * maxTokens, when the context is full, or when the signal aborts (the iterator then
   * throws a WeftError with code ABORTED); `stopReason` says which, once it has stopped.
   */
  generate(prompt: string | readonly number[], opts: GenerateOptions = {}): Generation {
    const state: { reason: StopReason | null } = { reason: null };
    const gen = this.#generate(prompt, opts, state);
    return Object.defineProperty(gen, "stopReason", { get: () => state.reason, enumerable: true }) as Generation;
  }

  /**
   * Continues the sequence so far (after reconnect(), or after a generation that stopped):
   * samples from the last evaluated position onwards, as generate() would have. With the
   * same options, a greedy generation resumed after a failure yields what the
   * uninterrupted one would have (a sampled one starts a new random stream).
   */
  resume(opts: GenerateOptions = {}): Generation {
    const state: { reason: StopReason | null } = { reason: null };
    const gen = this.#generate(null, opts, state);
    return Object.defineProperty(gen, "stopReason", { get: () => state.reason, enumerable: true }) as Generation;
  }

  async *#generate(prompt: string | readonly number[] | null, opts: GenerateOptions, state: { reason: StopReason | null }): AsyncGenerator<GeneratedPiece, void, undefined> {
    const resuming = prompt === null;
    if (resuming && (!this.#lastLogits || !this.#history.length))
      throw weftError("BAD_ARGUMENT", "nothing to resume: the last evaluation did not complete (reconnect() first) or the sequence is empty");
    const ids = resuming ? [...this.#history] : typeof prompt === "string" ? this.tokenize(prompt, { addSpecial: opts.addSpecial ?? true, parseSpecial: opts.parseSpecial ?? false }) : [...prompt];
    if (ids.length === 0) throw weftError("BAD_ARGUMENT", "the prompt is empty and the vocabulary adds no BOS token: nothing to continue from");
    const maxTokens = opts.maxTokens ?? 128;
    if (!(maxTokens === Infinity || maxTokens === -1 || (Number.isInteger(maxTokens) && maxTokens >= 0)))
      throw weftError("BAD_ARGUMENT", `maxTokens must be a non-negative integer (or -1 / Infinity: until the end token or a full context), got ${maxTokens}`);
    const limit = maxTokens < 0 ? Infinity : maxTokens;
    const sampler = new Sampler(opts);
    sampler.accept(ids);
    if (!resuming) this.reset();
    const decoder = new TextDecoder("utf-8");
    const stop = (r: StopReason) => { state.reason = r; };
    try {
      let logits = resuming ? this.#lastLogits! : await this.evaluate(ids, { signal: opts.signal });
      for (let i = 0; ; i++) {
        if (i >= limit) { stop("maxTokens"); break; }
        if (opts.signal?.aborted) throw abortError(opts.signal);
        const tok = sampler.sample(logits);
        if (this.tokenizer.isEog(tok)) { stop("eog"); break; }
        sampler.accept([tok]);
        yield { token: tok, text: decoder.decode(this.tokenizer.tokenToPiece(tok), { stream: true }) };
        if (i + 1 >= limit) { stop("maxTokens"); break; }
        if (this.#pos >= this.contextSize) { stop("contextFull"); break; }
        // into the model's own array (sampled before the next token is evaluated)
        logits = await this.evaluate([tok], { signal: opts.signal, out: (this.#lastLogitsBuf ??= new Float32Array(this.hparams.nVocab)) });
      }
    } catch (e) {
      if (e instanceof WeftError && e.code === "ABORTED") stop("aborted");
      throw e;
    }
    const rest = decoder.decode();
    if (rest) yield { token: -1, text: rest };
  }

  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    await Promise.allSettled(this.#backends.map((b) => b.synchronize()));
    for (const g of this.#graphs.values()) g.sg.dispose();
    this.#graphs.clear();
    await Promise.all(this.#backends.map((b) => b.dispose()));
    for (const b of [...this.#kvBuffers, ...this.#weights.flatMap((w) => w.buffers)]) b.dispose();
  }
  [Symbol.asyncDispose](): Promise<void> { return this.dispose(); }
}

/** Loads a GGUF model: parses and checks everything, places the weights on the devices, builds the tokenizer. */
export async function loadModel(path: string, opts: LoadModelOptions = {}): Promise<Model> {
  const report = opts.onProgress ?? (() => {});
  const file = readGguf(path);
  if (file.tensors.length === 0)
    throw weftError("BAD_GGUF", `${path} holds no tensors: it is a vocabulary-only GGUF, usable with weft tokenize (loadTokenizer), not as a model`);
  const hp = readHParams(file);
  const table = readWeightTable(file, hp);
  const tokenizer = new Tokenizer(file);
  if (tokenizer.vocabSize !== hp.nVocab)
    throw weftError("BAD_GGUF", `${path}: the tokenizer has ${tokenizer.vocabSize} tokens but token_embd.weight has ${hp.nVocab} rows`);
  const model = new Model(path, file, hp, tokenizer, opts);
  report({ phase: "map", loaded: 0, total: file.fileSize });
  if ((opts.prefault ?? true) && model.mapsFile()) {
    // fault the file in once (every device's mapping shares these pages)
    const m = cpuDevice("cpu:0").bufferType().mapFile(path);
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
  await model.init(table, opts, report);
  report({ phase: "ready", loaded: file.fileSize, total: file.fileSize });
  return model;
}

/** Loads only the tokenizer of a GGUF (works on vocab-only files). */
export function loadTokenizer(path: string): Tokenizer {
  return new Tokenizer(readGguf(path));
}

