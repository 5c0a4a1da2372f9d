/**
 * A loaded LLaMA-family model with one sequence (KV cache) on the CPU backend:
 * loadModel → tokenize / evaluate / generate → dispose. Forward graphs are built once per
 * shape and cached with their compute buffers; a step only writes the inputs and sends
 * the graph's uid to the native side.
 */
import { availableParallelism } from "node:os";
import { weftError } from "../core/errors.js";
import { GgmlType, TYPES } from "../core/types.js";
import { readGguf } from "../gguf/reader.js";
import { GgufFile } from "../gguf/types.js";
import { CpuBuffer, setTensorData, getTensorData } from "../cpu/buffer.js";
import { CpuBackend } from "../cpu/backend.js";
import { applyGraphAllocation, planGraphAllocation } from "../backend/alloc.js";
import { Tokenizer, TokenizeOptions, DetokenizeOptions } from "../tokenizer/tokenizer.js";
import { HParams, readHParams, readWeightTable } from "./hparams.js";
import { ForwardGraph, KvCacheLayout, LlamaWeights, buildForward, kvCacheTensors, weightTensors } from "./llama.js";
import { Sampler, SamplingOptions } from "./sampling.js";

export interface LoadProgress { phase: "map" | "load" | "ready"; loaded: number; total: number }

export interface LoadModelOptions {
  /** CPU threads (default: all cores) */
  threads?: number;
  /** context length (default: the model's training context, at most 4096) */
  contextSize?: number;
  /** KV cache type (default f16) */
  kvType?: "f16" | "f32";
  /** most tokens evaluated in one graph (the micro-batch, default 512) */
  batchSize?: number;
  /** fault the whole file in at load (default true): the first token then pays no page faults */
  prefault?: boolean;
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
const GRAPH_CACHE = 16;

interface CachedGraph { fg: ForwardGraph; buffer: CpuBuffer; mask: Float32Array }

export class Model {
  readonly path: string;
  readonly file: GgufFile;
  readonly hparams: HParams;
  readonly tokenizer: Tokenizer;
  readonly contextSize: number;
  readonly batchSize: number;
  readonly kvType: GgmlType;
  readonly threads: number;
  #backend: CpuBackend;
  #weights: CpuBuffer;
  #w: LlamaWeights;
  #kv: KvCacheLayout;
  #kvBuffer: CpuBuffer;
  #graphs = new Map<string, CachedGraph>();
  #pos = 0;
  #history: number[] = [];
  #busy = false;
  #disposed = false;

  /** @internal use loadModel */
  constructor(path: string, file: GgufFile, hp: HParams, tok: Tokenizer, weights: CpuBuffer, w: LlamaWeights, opts: LoadModelOptions) {
    this.path = path; this.file = file; this.hparams = hp; this.tokenizer = tok;
    this.#weights = weights; this.#w = w;
    this.threads = opts.threads ?? availableParallelism();
    this.contextSize = opts.contextSize ?? Math.min(hp.nCtxTrain, 4096);
    this.batchSize = opts.batchSize ?? 512;
    if (!Number.isInteger(this.contextSize) || this.contextSize < 1) throw weftError("BAD_ARGUMENT", `context size must be a positive integer, got ${opts.contextSize}`);
    if (!Number.isInteger(this.batchSize) || this.batchSize < 1) throw weftError("BAD_ARGUMENT", `batch size must be a positive integer, got ${opts.batchSize}`);
    const kvType = opts.kvType ?? "f16";
    if (kvType !== "f16" && kvType !== "f32") throw weftError("BAD_ARGUMENT", `KV cache type must be f16 or f32, got ${kvType}`);
    this.kvType = kvType === "f16" ? GgmlType.F16 : GgmlType.F32;
    this.#backend = new CpuBackend({ threads: this.threads });
    this.#kv = kvCacheTensors(hp, this.contextSize, this.kvType);
    const all = [...this.#kv.k, ...this.#kv.v];
    const size = all.reduce((s, t) => s + Math.ceil(t.nbytes / 64) * 64, 0);
    this.#kvBuffer = CpuBuffer.alloc(Math.max(size, 64));
    let off = 0;
    for (const t of all) { t.buffer = this.#kvBuffer; t.offset = off; off += Math.ceil(t.nbytes / 64) * 64; }
    // a zeroed cache: masked positions then hold finite values (0 · -inf never happens)
    this.#kvBuffer.fill(0, this.#kvBuffer.size, 0);
  }

  /** Tokens evaluated so far in the sequence (the next token's position). */
  get position(): number { return this.#pos; }
  /** Bytes of the KV cache. */
  get kvCacheBytes(): number { return this.#kvBuffer.size; }
  get weightBytes(): number { return this.#weights.size; }

  tokenize(text: string, opts?: TokenizeOptions): number[] { return this.tokenizer.tokenize(text, opts); }
  detokenize(ids: readonly number[], opts?: DetokenizeOptions): string { return this.tokenizer.detokenize(ids, opts); }

  /** Forgets the sequence: the next evaluate starts at position 0. */
  reset(): void { this.#pos = 0; this.#history = []; }

  #check(): void {
    if (this.#disposed) throw weftError("DISPOSED", "the model was disposed");
    if (this.#busy) throw weftError("BUSY", "the model is already evaluating (await the previous call)");
  }

  #graph(n: number, kvLen: number, allLogits: boolean): CachedGraph {
    const key = `${n}:${kvLen}:${allLogits ? 1 : 0}`;
    const hit = this.#graphs.get(key);
    if (hit) { this.#graphs.delete(key); this.#graphs.set(key, hit); return hit; }
    if (this.#graphs.size >= GRAPH_CACHE) {
      const [oldKey, old] = this.#graphs.entries().next().value as [string, CachedGraph];
      this.#graphs.delete(oldKey);
      this.#backend.forget(old.fg.graph);
      old.buffer.dispose();
    }
    const fg = buildForward(this.hparams, this.#w, this.#kv, n, kvLen, allLogits);
    const plan = planGraphAllocation(fg.graph);
    const buffer = CpuBuffer.alloc(Math.max(plan.size, 64));
    applyGraphAllocation(plan, buffer);
    const c = { fg, buffer, mask: new Float32Array(kvLen * n) };
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
      for (let start = 0; start < tokens.length; start += this.batchSize) {
        opts.signal?.throwIfAborted();
        const chunk = tokens.slice(start, start + this.batchSize);
        const n = chunk.length;
        const p0 = this.#pos;
        const kvLen = Math.min(this.contextSize, Math.ceil((p0 + n) / KV_BUCKET) * KV_BUCKET);
        const last = start + n >= tokens.length;
        const g = this.#graph(n, kvLen, all);
        const { fg, mask } = g;
        const pos = new Int32Array(n);
        for (let i = 0; i < n; i++) pos[i] = p0 + i;
        mask.fill(-Infinity);
        for (let i = 0; i < n; i++) mask.fill(0, i * kvLen, i * kvLen + p0 + i + 1);
        setTensorData(fg.tokens, Int32Array.from(chunk));
        setTensorData(fg.positions, pos);
        setTensorData(fg.mask, mask);
        setTensorData(fg.slots, BigInt64Array.from(pos, (p) => BigInt(p)));
        await this.#backend.compute(fg.graph);
        this.#pos += n;
        this.#history.push(...chunk);
        if (all || last) {
          const bytes = getTensorData(fg.logits);
          const rows = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
          if (all) out.set(rows, start * nV);
          else out.set(rows.subarray(rows.length - nV));
        }
      }
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
    await this.#backend.dispose();
    for (const g of this.#graphs.values()) g.buffer.dispose();
    this.#graphs.clear();
    this.#kvBuffer.dispose();
    this.#weights.dispose();
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
  const weights = CpuBuffer.mapFile(path);
  try {
    const w = weightTensors(table, (t, info) => { t.buffer = weights; t.offset = file.dataOffset + info.offset; });
    if (opts.prefault ?? true) {
      const chunk = 64 << 20;
      for (let off = 0; off < weights.size; off += chunk) {
        opts.signal?.throwIfAborted();
        weights.touch(off, Math.min(chunk, weights.size - off));
        report({ phase: "load", loaded: Math.min(off + chunk, weights.size), total: weights.size });
        await new Promise((r) => setImmediate(r));
      }
    }
    const m = new Model(path, file, hp, tokenizer, weights, w, opts);
    report({ phase: "ready", loaded: weights.size, total: weights.size });
    return m;
  } catch (e) {
    weights.dispose();
    throw e;
  }
}

/** Loads only the tokenizer of a GGUF (works on vocab-only files). */
export function loadTokenizer(path: string): Tokenizer {
  return new Tokenizer(readGguf(path));
}

export { TYPES };
