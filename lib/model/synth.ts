/**
 * `weft synth`: deterministic random-weight LLaMA models with the exact shapes and type
 * mixes of ../shared/BASELINES.md, and real tokenizer vocabularies taken from npm
 * packages: Llama 2's 32000-token SentencePiece vocabulary (llama-tokenizer-js) for
 * tiny/small and Llama 3's 128256-token BPE vocabulary (llama3-tokenizer-js) for 1b,
 * written the way llama.cpp's converter writes them, so llama.cpp loads these files.
 */
import { weftError, fromNative } from "../core/errors.js";
import { mulberry32 } from "../core/random.js";
import { GgmlType } from "../core/types.js";
import { native } from "../cpu/native.js";
import { GgufFile, GgufTensorInfo, GgufValue, GgufValueType } from "../gguf/types.js";
import { writeGguf } from "../gguf/writer.js";
import { QUANT_SCHEMES, planQuantTypes } from "../quant/quantize.js";
import { TokenType } from "../tokenizer/tokenizer.js";

export interface SynthPreset {
  nEmbd: number; nLayer: number; nHead: number; nHeadKv: number; nFf: number; nCtx: number; ropeBase: number;
  vocab: "llama2-spm" | "llama3-bpe";
  tied: boolean;
}

export const SYNTH_PRESETS: Readonly<Record<string, SynthPreset>> = {
  tiny: { nEmbd: 256, nLayer: 4, nHead: 8, nHeadKv: 4, nFf: 768, nCtx: 512, ropeBase: 1e4, vocab: "llama2-spm", tied: false },
  small: { nEmbd: 768, nLayer: 12, nHead: 12, nHeadKv: 12, nFf: 2048, nCtx: 1024, ropeBase: 1e4, vocab: "llama2-spm", tied: true },
  "1b": { nEmbd: 2048, nLayer: 16, nHead: 32, nHeadKv: 8, nFf: 8192, nCtx: 2048, ropeBase: 5e5, vocab: "llama3-bpe", tied: true },
};

/** synth type → quantization scheme + --pure */
export const SYNTH_TYPES: Readonly<Record<string, { scheme: string; pure: boolean }>> = {
  f32: { scheme: "f32", pure: false }, f16: { scheme: "f16", pure: false }, bf16: { scheme: "bf16", pure: false },
  q8_0: { scheme: "q8_0", pure: false }, q4_0: { scheme: "q4_0", pure: false }, "q4_0-pure": { scheme: "q4_0", pure: true },
  q4_k_m: { scheme: "q4_k_m", pure: false }, q6_k: { scheme: "q6_k", pure: false },
};

export interface SynthOptions {
  preset: string;
  type: string;
  seed?: number;
  out: string;
  onProgress?: (done: number, total: number, tensor: string) => void;
  /** stops between tensors; the output is then not written */
  signal?: AbortSignal;
}

interface Vocab { tokens: string[]; scores?: number[]; types: number[]; merges?: string[]; model: "llama" | "gpt2"; bos: number; eos: number; unk?: number }

async function loadVocab(kind: SynthPreset["vocab"]): Promise<Vocab> {
  if (kind === "llama2-spm") {
    const { default: t } = await import("llama-tokenizer-js");
    const tokens = t.vocabById.slice();
    // SentencePiece BPE scores: earlier pieces merge first (as in Llama 2's tokenizer.model)
    const types = tokens.map((s, i) => (i === 0 ? TokenType.UNKNOWN : i <= 2 ? TokenType.CONTROL : /^<0x[0-9A-F]{2}>$/.test(s) ? TokenType.BYTE : TokenType.NORMAL));
    const scores = tokens.map((_, i) => (types[i] === TokenType.NORMAL ? -(i - 259) : 0));
    return { tokens, scores, types, model: "llama", bos: 1, eos: 2, unk: 0 };
  }
  const { default: t } = await import("llama3-tokenizer-js");
  const tokens = t.vocabById.slice();
  if (tokens.length !== 128256) throw weftError("BAD_ARGUMENT", `llama3-tokenizer-js gave ${tokens.length} tokens, expected 128256`);
  const types = tokens.map((_, i) => (i < 128000 ? TokenType.NORMAL : TokenType.CONTROL));
  const merges = [...t.merges.keys()];  // insertion order is rank order
  return { tokens, types, merges, model: "gpt2", bos: 128000, eos: 128001 };
}

/** Tensor list in llama.cpp's converter order, with GGUF shapes ([in, out]). */
function tensorInfos(p: SynthPreset, nVocab: number): GgufTensorInfo[] {
  const hd = p.nEmbd / p.nHead;
  const list: Array<[string, number[]]> = [["token_embd.weight", [p.nEmbd, nVocab]]];
  for (let i = 0; i < p.nLayer; i++) {
    const b = `blk.${i}.`;
    list.push(
      [b + "attn_norm.weight", [p.nEmbd]], [b + "attn_q.weight", [p.nEmbd, p.nHead * hd]], [b + "attn_k.weight", [p.nEmbd, p.nHeadKv * hd]],
      [b + "attn_v.weight", [p.nEmbd, p.nHeadKv * hd]], [b + "attn_output.weight", [p.nHead * hd, p.nEmbd]], [b + "ffn_norm.weight", [p.nEmbd]],
      [b + "ffn_gate.weight", [p.nEmbd, p.nFf]], [b + "ffn_up.weight", [p.nEmbd, p.nFf]], [b + "ffn_down.weight", [p.nFf, p.nEmbd]],
    );
  }
  list.push(["output_norm.weight", [p.nEmbd]]);
  if (!p.tied) list.push(["output.weight", [p.nEmbd, nVocab]]);
  return list.map(([name, ne]) => ({ name, ne, type: GgmlType.F32, offset: 0, nbytes: 0 }));
}

/** FNV-1a of the tensor name mixed with the seed: each tensor's stream is independent of the others. */
function tensorSeed(seed: number, name: string): number {
  let h = 0x811c9dc5 ^ seed;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/** Uniform values with the given standard deviation and mean. */
function randomFill(a: Float32Array, seed: number, std: number, mean = 0): void {
  const next = mulberry32(seed);
  const k = std * Math.sqrt(3) * 2;
  for (let i = 0; i < a.length; i++) a[i] = mean + (next() - 0.5) * k;
}

export async function synthModel(o: SynthOptions): Promise<{ path: string; params: number; types: Map<string, GgmlType> }> {
  const p = SYNTH_PRESETS[o.preset];
  if (!p) throw weftError("BAD_ARGUMENT", `unknown preset '${o.preset}' (known: ${Object.keys(SYNTH_PRESETS).join(", ")})`);
  const st = SYNTH_TYPES[o.type];
  if (!st) throw weftError("BAD_ARGUMENT", `unknown type '${o.type}' (known: ${Object.keys(SYNTH_TYPES).join(", ")})`);
  const seed = o.seed ?? 42;
  if (!Number.isInteger(seed) || seed < 0 || seed >= 2 ** 32) throw weftError("BAD_ARGUMENT", `seed must be an integer in [0, 2^32), got ${o.seed}`);
  const scheme = QUANT_SCHEMES[st.scheme]!;
  const vocab = await loadVocab(p.vocab);
  const nVocab = vocab.tokens.length;
  const infos = tensorInfos(p, nVocab);
  const fake = { tensors: infos } as unknown as GgufFile;
  const types = planQuantTypes(fake, scheme, st.pure);
  const hd = p.nEmbd / p.nHead;
  const U32 = GgufValueType.UINT32, F32 = GgufValueType.FLOAT32, STR = GgufValueType.STRING;
  const meta: Array<[string, GgufValue]> = [
    ["general.architecture", { type: STR, value: "llama" }],
    ["general.name", { type: STR, value: `weft-synth-${o.preset}` }],
    ["general.file_type", { type: U32, value: scheme.fileType }],
    ["general.quantization_version", { type: U32, value: 2 }],
    ["llama.context_length", { type: U32, value: p.nCtx }],
    ["llama.embedding_length", { type: U32, value: p.nEmbd }],
    ["llama.block_count", { type: U32, value: p.nLayer }],
    ["llama.feed_forward_length", { type: U32, value: p.nFf }],
    ["llama.attention.head_count", { type: U32, value: p.nHead }],
    ["llama.attention.head_count_kv", { type: U32, value: p.nHeadKv }],
    ["llama.rope.freq_base", { type: F32, value: p.ropeBase }],
    ["llama.rope.dimension_count", { type: U32, value: hd }],
    ["llama.attention.layer_norm_rms_epsilon", { type: F32, value: 1e-5 }],
    ["llama.vocab_size", { type: U32, value: nVocab }],
    ["tokenizer.ggml.model", { type: STR, value: vocab.model }],
  ];
  if (vocab.model === "gpt2") meta.push(["tokenizer.ggml.pre", { type: STR, value: "llama-bpe" }]);
  meta.push(["tokenizer.ggml.tokens", { type: GgufValueType.ARRAY, value: { elemType: STR, values: vocab.tokens } }]);
  if (vocab.scores) meta.push(["tokenizer.ggml.scores", { type: GgufValueType.ARRAY, value: { elemType: F32, values: Float32Array.from(vocab.scores) } }]);
  meta.push(["tokenizer.ggml.token_type", { type: GgufValueType.ARRAY, value: { elemType: GgufValueType.INT32, values: Int32Array.from(vocab.types) } }]);
  if (vocab.merges) meta.push(["tokenizer.ggml.merges", { type: GgufValueType.ARRAY, value: { elemType: STR, values: vocab.merges } }]);
  meta.push(
    ["tokenizer.ggml.bos_token_id", { type: U32, value: vocab.bos }],
    ["tokenizer.ggml.eos_token_id", { type: U32, value: vocab.eos }],
  );
  if (vocab.unk !== undefined) meta.push(["tokenizer.ggml.unknown_token_id", { type: U32, value: vocab.unk }]);
  meta.push(["tokenizer.ggml.add_bos_token", { type: GgufValueType.BOOL, value: true }], ["tokenizer.ggml.add_eos_token", { type: GgufValueType.BOOL, value: false }]);

  let params = 0, done = 0;
  const specs = infos.map((t) => {
    const type = types.get(t.name)!;
    const nel = t.ne.reduce((a, b) => a * b, 1);
    params += nel;
    return {
      name: t.name, type, ne: t.ne,
      data: () => {
        const f = new Float32Array(nel);
        const s = tensorSeed(seed, t.name);
        if (t.ne.length === 1) randomFill(f, s, 0.1, 1);                 // norm weights near 1
        else if (t.name === "token_embd.weight") randomFill(f, s, 0.15);
        else randomFill(f, s, 1.5 / Math.sqrt(t.ne[0]!));                // layers matter against the residual
        let bytes: Uint8Array;
        try {
          bytes = type === GgmlType.F32 ? new Uint8Array(f.buffer) : native().quantize(type, f, t.ne[0]!);
        } catch (e) { throw fromNative(e); }
        o.onProgress?.(++done, infos.length, t.name);
        return bytes;
      },
    };
  });
  await writeGguf(o.out, meta, specs, { signal: o.signal });
  return { path: o.out, params, types };
}

