/**
 * LLaMA-family hyper-parameters and weight table, read from GGUF metadata and checked
 * against the tensors present: every missing key or mis-shaped tensor is an error that
 * names it, before any memory is committed.
 */
import { weftError } from "../core/errors.js";
import { GgmlType, isKnownType, typeName } from "../core/types.js";
import { metaNumber, metaString, metaValue } from "../gguf/reader.js";
import { GgufFile, GgufTensorInfo } from "../gguf/types.js";
import { RopeMode } from "../core/ops.js";

/** Architectures that share the LLaMA graph; they differ in rope mode and optional biases. */
export const ARCHITECTURES = {
  llama: { ropeMode: RopeMode.NORMAL },
  mistral: { ropeMode: RopeMode.NORMAL },
  qwen2: { ropeMode: RopeMode.NEOX },
} as const;
export type Architecture = keyof typeof ARCHITECTURES;

export interface HParams {
  arch: Architecture;
  nVocab: number;
  nCtxTrain: number;
  nEmbd: number;
  nLayer: number;
  nHead: number;
  nHeadKv: number;
  headDim: number;
  nFf: number;
  ropeDims: number;
  ropeFreqBase: number;
  ropeFreqScale: number;
  ropeMode: number;
  rmsEps: number;
}

/** Weight types the CPU backend multiplies with (dot kernels exist for all of them). */
export const MATRIX_TYPES: ReadonlySet<number> = new Set([
  GgmlType.F32, GgmlType.F16, GgmlType.BF16, GgmlType.Q8_0, GgmlType.Q4_0, GgmlType.Q4_K, GgmlType.Q6_K,
]);

function bad(f: GgufFile, msg: string): never {
  throw weftError("BAD_GGUF", `${f.path}: ${msg}`);
}

function positiveInt(f: GgufFile, key: string, fallback?: number): number {
  const v = metaNumber(f, key) ?? fallback;
  if (v === undefined) bad(f, `metadata key '${key}' is missing`);
  if (!Number.isInteger(v) || v <= 0 || v > 1 << 30) bad(f, `metadata '${key}' = ${v} is not a positive integer`);
  return v;
}

export function readHParams(f: GgufFile): HParams {
  const arch = metaString(f, "general.architecture");
  if (arch === undefined) bad(f, "metadata key 'general.architecture' is missing");
  if (!(arch in ARCHITECTURES))
    throw weftError("UNSUPPORTED_TYPE", `${f.path}: architecture '${arch}' is not supported (supported: ${Object.keys(ARCHITECTURES).join(", ")})`);
  const a = arch as Architecture;
  const k = (s: string) => `${a}.${s}`;
  const nEmbd = positiveInt(f, k("embedding_length"));
  const nHead = positiveInt(f, k("attention.head_count"));
  const nHeadKv = positiveInt(f, k("attention.head_count_kv"), nHead);
  if (nHead % nHeadKv !== 0) bad(f, `${k("attention.head_count")} (${nHead}) is not a multiple of ${k("attention.head_count_kv")} (${nHeadKv})`);
  const headDim = positiveInt(f, k("attention.key_length"), nEmbd % nHead === 0 ? nEmbd / nHead : undefined);
  const vDim = positiveInt(f, k("attention.value_length"), headDim);
  if (vDim !== headDim) bad(f, `different key and value head sizes (${headDim}, ${vDim}) are not supported`);
  const ropeDims = positiveInt(f, k("rope.dimension_count"), headDim);
  if (ropeDims > headDim || ropeDims % 2 !== 0) bad(f, `${k("rope.dimension_count")} = ${ropeDims} must be even and at most the head size ${headDim}`);
  const scalingType = metaString(f, k("rope.scaling.type")) ?? "none";
  let ropeFreqScale = 1;
  if (scalingType === "linear") {
    const factor = metaNumber(f, k("rope.scaling.factor")) ?? 1;
    if (!(factor > 0)) bad(f, `${k("rope.scaling.factor")} must be positive`);
    ropeFreqScale = 1 / factor;
  } else if (scalingType !== "none") {
    throw weftError("UNSUPPORTED_TYPE", `${f.path}: RoPE scaling '${scalingType}' is not supported`);
  }
  if (f.tensors.some((t) => t.name === "rope_freqs.weight"))
    throw weftError("UNSUPPORTED_TYPE", `${f.path}: tensor 'rope_freqs.weight' (Llama 3.1-style RoPE frequency factors) is not supported yet`);
  const rmsEps = metaNumber(f, k("attention.layer_norm_rms_epsilon"));
  if (rmsEps === undefined) bad(f, `metadata key '${k("attention.layer_norm_rms_epsilon")}' is missing`);
  if (!(rmsEps > 0 && rmsEps < 1)) bad(f, `${k("attention.layer_norm_rms_epsilon")} = ${rmsEps} is out of range`);
  const ropeFreqBase = metaNumber(f, k("rope.freq_base")) ?? 10000;
  if (!(ropeFreqBase > 0)) bad(f, `${k("rope.freq_base")} = ${ropeFreqBase} must be positive`);
  const embd = f.tensors.find((t) => t.name === "token_embd.weight");
  if (!embd) bad(f, "tensor 'token_embd.weight' is missing");
  const tokens = metaValue(f, "tokenizer.ggml.tokens");
  const nVocab = positiveInt(f, k("vocab_size"), embd.ne[1] ?? (tokens && typeof tokens === "object" ? (tokens.values as ArrayLike<unknown>).length : undefined));
  return {
    arch: a, nVocab, nEmbd, nHead, nHeadKv, headDim, ropeDims, ropeFreqBase, ropeFreqScale, rmsEps,
    nCtxTrain: positiveInt(f, k("context_length")),
    nLayer: positiveInt(f, k("block_count")),
    nFf: positiveInt(f, k("feed_forward_length")),
    ropeMode: ARCHITECTURES[a].ropeMode,
  };
}

export interface LayerWeights {
  attnNorm: GgufTensorInfo; wq: GgufTensorInfo; wk: GgufTensorInfo; wv: GgufTensorInfo; wo: GgufTensorInfo;
  bq?: GgufTensorInfo; bk?: GgufTensorInfo; bv?: GgufTensorInfo; bo?: GgufTensorInfo;
  ffnNorm: GgufTensorInfo; wGate: GgufTensorInfo; wUp: GgufTensorInfo; wDown: GgufTensorInfo;
}
export interface WeightTable {
  tokEmbd: GgufTensorInfo;
  outputNorm: GgufTensorInfo;
  /** null: tied to token_embd */
  output: GgufTensorInfo | null;
  layers: LayerWeights[];
}

/** Finds every weight, checking name, shape and type; unknown extra tensors are ignored. */
export function readWeightTable(f: GgufFile, hp: HParams): WeightTable {
  const byName = new Map(f.tensors.map((t) => [t.name, t]));
  const want = (name: string, ne: number[], kind: "matrix" | "vector", optional = false): GgufTensorInfo | undefined => {
    const t = byName.get(name);
    if (!t) {
      if (optional) return undefined;
      bad(f, `tensor '${name}' is missing`);
    }
    const got = [...t.ne];
    while (got.length > ne.length && got[got.length - 1] === 1) got.pop();
    if (got.length !== ne.length || got.some((v, i) => v !== ne[i]))
      bad(f, `tensor '${name}' has shape [${t.ne.join(", ")}], expected [${ne.join(", ")}]`);
    if (kind === "vector" && t.type !== GgmlType.F32)
      throw weftError("UNSUPPORTED_TYPE", `${f.path}: tensor '${name}' is ${typeName(t.type)}; norm and bias vectors must be F32`);
    if (kind === "matrix" && (!isKnownType(t.type) || !MATRIX_TYPES.has(t.type)))
      throw weftError("UNSUPPORTED_TYPE", `${f.path}: tensor '${name}' has type ${typeName(t.type)}, which weft cannot multiply ` +
        `(it runs ${[...MATRIX_TYPES].map(typeName).join(", ")}; weft quantize converts from F32/F16/BF16)`);
    return t;
  };
  const { nEmbd, nVocab, headDim, nHead, nHeadKv, nFf } = hp;
  const nQ = nHead * headDim, nKv = nHeadKv * headDim;
  const layers: LayerWeights[] = [];
  for (let i = 0; i < hp.nLayer; i++) {
    const p = `blk.${i}.`;
    layers.push({
      attnNorm: want(p + "attn_norm.weight", [nEmbd], "vector")!,
      wq: want(p + "attn_q.weight", [nEmbd, nQ], "matrix")!,
      wk: want(p + "attn_k.weight", [nEmbd, nKv], "matrix")!,
      wv: want(p + "attn_v.weight", [nEmbd, nKv], "matrix")!,
      wo: want(p + "attn_output.weight", [nQ, nEmbd], "matrix")!,
      bq: want(p + "attn_q.bias", [nQ], "vector", true),
      bk: want(p + "attn_k.bias", [nKv], "vector", true),
      bv: want(p + "attn_v.bias", [nKv], "vector", true),
      bo: want(p + "attn_output.bias", [nEmbd], "vector", true),
      ffnNorm: want(p + "ffn_norm.weight", [nEmbd], "vector")!,
      wGate: want(p + "ffn_gate.weight", [nEmbd, nFf], "matrix")!,
      wUp: want(p + "ffn_up.weight", [nEmbd, nFf], "matrix")!,
      wDown: want(p + "ffn_down.weight", [nFf, nEmbd], "matrix")!,
    });
  }
  return {
    tokEmbd: want("token_embd.weight", [nEmbd, nVocab], "matrix")!,
    outputNorm: want("output_norm.weight", [nEmbd], "vector")!,
    output: want("output.weight", [nEmbd, nVocab], "matrix", true) ?? null,
    layers,
  };
}
