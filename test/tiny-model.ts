/** A small F32 LLaMA GGUF written on the fly (no fixtures needed), with a byte-fallback SPM vocab. */
import { GgmlType } from "../lib/core/types.js";
import { GgufValue, GgufValueType as V } from "../lib/gguf/types.js";
import { writeGguf, GgufTensorSpec } from "../lib/gguf/writer.js";
import { rng, randomF32 } from "./helpers.js";

export interface TinyModelOptions {
  nEmbd?: number; nLayer?: number; nHead?: number; nHeadKv?: number; nFf?: number; nCtx?: number;
  arch?: string;
  /** edit metadata / tensors before writing (malformed-model tests) */
  mutate?: (meta: Map<string, GgufValue>, tensors: GgufTensorSpec[]) => void;
  seed?: number;
}

export const TINY_PIECES = ["▁", "e", "t", "a", "o", "▁t", "he", "▁the", "▁a", "in", "▁on", "ce", "▁up", "▁time", "▁On"];

export function tinyVocab(): { tokens: string[]; scores: number[]; types: number[] } {
  const tokens = ["<unk>", "<s>", "</s>"];
  const types = [2, 3, 3];
  for (let b = 0; b < 256; b++) { tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`); types.push(6); }
  for (const p of TINY_PIECES) { tokens.push(p); types.push(1); }
  const scores = tokens.map((_, i) => (types[i] === 1 ? -i : 0));
  return { tokens, scores, types };
}

export async function writeTinyModel(path: string, o: TinyModelOptions = {}): Promise<void> {
  const nEmbd = o.nEmbd ?? 64, nLayer = o.nLayer ?? 2, nHead = o.nHead ?? 4, nHeadKv = o.nHeadKv ?? 2, nFf = o.nFf ?? 96, nCtx = o.nCtx ?? 128;
  const arch = o.arch ?? "llama";
  const hd = nEmbd / nHead;
  const { tokens, scores, types } = tinyVocab();
  const nVocab = tokens.length;
  const r = rng(o.seed ?? 1);
  const meta = new Map<string, GgufValue>([
    ["general.architecture", { type: V.STRING, value: arch }],
    [`${arch}.context_length`, { type: V.UINT32, value: nCtx }],
    [`${arch}.embedding_length`, { type: V.UINT32, value: nEmbd }],
    [`${arch}.block_count`, { type: V.UINT32, value: nLayer }],
    [`${arch}.feed_forward_length`, { type: V.UINT32, value: nFf }],
    [`${arch}.attention.head_count`, { type: V.UINT32, value: nHead }],
    [`${arch}.attention.head_count_kv`, { type: V.UINT32, value: nHeadKv }],
    [`${arch}.attention.layer_norm_rms_epsilon`, { type: V.FLOAT32, value: 1e-5 }],
    [`${arch}.rope.dimension_count`, { type: V.UINT32, value: hd }],
    ["tokenizer.ggml.model", { type: V.STRING, value: "llama" }],
    ["tokenizer.ggml.tokens", { type: V.ARRAY, value: { elemType: V.STRING, values: tokens } }],
    ["tokenizer.ggml.scores", { type: V.ARRAY, value: { elemType: V.FLOAT32, values: Float32Array.from(scores) } }],
    ["tokenizer.ggml.token_type", { type: V.ARRAY, value: { elemType: V.INT32, values: Int32Array.from(types) } }],
    ["tokenizer.ggml.bos_token_id", { type: V.UINT32, value: 1 }],
    ["tokenizer.ggml.eos_token_id", { type: V.UINT32, value: 2 }],
  ]);
  const f32 = (name: string, ne: number[], scale: number, mean = 0): GgufTensorSpec => {
    const n = ne.reduce((a, b) => a * b, 1);
    const d = randomF32(n, r, scale);
    if (mean) for (let i = 0; i < n; i++) d[i]! += mean;
    return { name, type: GgmlType.F32, ne, data: new Uint8Array(d.buffer) };
  };
  const s = 1 / Math.sqrt(nEmbd);
  const tensors: GgufTensorSpec[] = [f32("token_embd.weight", [nEmbd, nVocab], 0.5)];
  for (let i = 0; i < nLayer; i++) {
    const b = `blk.${i}.`;
    tensors.push(
      f32(b + "attn_norm.weight", [nEmbd], 0.2, 1), f32(b + "attn_q.weight", [nEmbd, nHead * hd], 2 * s),
      f32(b + "attn_k.weight", [nEmbd, nHeadKv * hd], 2 * s), f32(b + "attn_v.weight", [nEmbd, nHeadKv * hd], 2 * s),
      f32(b + "attn_output.weight", [nHead * hd, nEmbd], 2 * s), f32(b + "ffn_norm.weight", [nEmbd], 0.2, 1),
      f32(b + "ffn_gate.weight", [nEmbd, nFf], 2 * s), f32(b + "ffn_up.weight", [nEmbd, nFf], 2 * s),
      f32(b + "ffn_down.weight", [nFf, nEmbd], 2 / Math.sqrt(nFf)),
    );
  }
  tensors.push(f32("output_norm.weight", [nEmbd], 0.2, 1), f32("output.weight", [nEmbd, nVocab], 2 * s));
  o.mutate?.(meta, tensors);
  await writeGguf(path, meta, tensors);
}
