/**
 * The LLaMA forward graph (llama, mistral, qwen2). Built once per shape (tokens in the
 * batch, attended KV length, which logits) and reused for every step of that shape.
 * The attention reads the KV cache through views of the SET_ROWS results, which makes
 * the cache writes explicit dependencies of the attention in the graph order.
 */
import * as G from "../core/graph.js";
import { Graph } from "../core/graph.js";
import { Tensor } from "../core/tensor.js";
import { GgmlType, TYPES } from "../core/types.js";
import { HParams, LayerWeights, WeightTable } from "./hparams.js";
import { GgufTensorInfo } from "../gguf/types.js";

/** Weight tensors placed in (mapped) memory. */
export interface LlamaWeights {
  tokEmbd: Tensor;
  outputNorm: Tensor;
  output: Tensor;
  layers: Array<{ [K in keyof LayerWeights]: Tensor | undefined } & { [K in "attnNorm" | "wq" | "wk" | "wv" | "wo" | "ffnNorm" | "wGate" | "wUp" | "wDown"]: Tensor }>;
}

/** Where a weight is used: the embedding lookup, the output head, or a layer. */
export type WeightSite = "embd" | "head" | number;

/** Creates placed weight tensors for a weight table (`place` puts each one in memory). */
export function weightTensors(table: WeightTable, place: (t: Tensor, info: GgufTensorInfo, site: WeightSite) => void): LlamaWeights {
  const mk = (info: GgufTensorInfo, site: WeightSite): Tensor => {
    const t = G.newTensor(info.type as GgmlType, info.ne, info.name);
    place(t, info, site);
    return t;
  };
  return {
    tokEmbd: mk(table.tokEmbd, "embd"),
    outputNorm: mk(table.outputNorm, "head"),
    // tied: a second tensor over the same bytes (named as the head it is), so the head can
    // live on another device, be cut by vocabulary rows or repacked while GET_ROWS reads the embedding
    output: mk(table.output ?? table.tokEmbd, "head").setName("output.weight"),
    layers: table.layers.map((l, i) => {
      const opt = (info: GgufTensorInfo | undefined) => (info ? mk(info, i) : undefined);
      return {
        attnNorm: mk(l.attnNorm, i), wq: mk(l.wq, i), wk: mk(l.wk, i), wv: mk(l.wv, i), wo: mk(l.wo, i),
        bq: opt(l.bq), bk: opt(l.bk), bv: opt(l.bv), bo: opt(l.bo),
        ffnNorm: mk(l.ffnNorm, i), wGate: mk(l.wGate, i), wUp: mk(l.wUp, i), wDown: mk(l.wDown, i),
      };
    }),
  };
}

/**
 * KV cache of one sequence. K is head-major ([headDim, nCtx, nHeadKv]): one head's keys
 * are contiguous, so a decode step streams them instead of gathering 128-byte rows
 * across the whole cache (that cost 4x more, measured). V is transposed ([nCtx] per
 * channel) so that attention·V is a MUL_MAT with contiguous rows.
 */
export interface KvCacheLayout {
  type: GgmlType;
  nCtx: number;
  k: Tensor[];
  v: Tensor[];
}

export function kvCacheTensors(hp: HParams, nCtx: number, type: GgmlType): KvCacheLayout {
  const nKv = hp.nHeadKv * hp.headDim;
  const k: Tensor[] = [], v: Tensor[] = [];
  for (let i = 0; i < hp.nLayer; i++) {
    k.push(G.newTensor(type, [hp.headDim, nCtx, hp.nHeadKv], `cache_k_l${i}`));
    v.push(G.newTensor(type, [nCtx, nKv], `cache_v_l${i}`));
  }
  return { type, nCtx, k, v };
}

export interface ForwardGraph {
  graph: Graph;
  /** I32 [n] token ids */
  tokens: Tensor;
  /** I32 [n] positions */
  positions: Tensor;
  /** F32 [kvLen, n] additive attention mask (0 or -inf) */
  mask: Tensor;
  /** I64 [n] KV cache slots to write */
  slots: Tensor;
  /** F32 [nVocab, n or 1] */
  logits: Tensor;
}

export function buildForward(hp: HParams, w: LlamaWeights, kv: KvCacheLayout, nTokens: number, kvLen: number, allLogits: boolean): ForwardGraph {
  const n = nTokens;
  const { headDim: hd, nHead, nHeadKv, nEmbd, rmsEps } = hp;
  const nKv = hd * nHeadKv;
  const es = TYPES[kv.type].typeSize;
  const nCtx = kv.nCtx;
  const tokens = G.newTensor(GgmlType.I32, [n], "inp_tokens").setInput();
  const positions = G.newTensor(GgmlType.I32, [n], "inp_pos").setInput();
  const mask = G.newTensor(GgmlType.F32, [kvLen, n], "inp_mask").setInput();
  const slots = G.newTensor(GgmlType.I64, [n], "inp_slots").setInput();
  const rope = { nDims: hp.ropeDims, mode: hp.ropeMode, freqBase: hp.ropeFreqBase, freqScale: hp.ropeFreqScale };
  const biased = (t: Tensor, b: Tensor | undefined) => (b ? G.add(t, b) : t);

  let x = G.getRows(w.tokEmbd, tokens);
  w.layers.forEach((L, il) => {
    let cur = G.mul(G.rmsNorm(x, rmsEps), L.attnNorm);
    const q = G.rope(G.reshape(biased(G.mulMat(L.wq, cur), L.bq), [hd, nHead, n]), positions, rope);
    const k = G.rope(G.reshape(biased(G.mulMat(L.wk, cur), L.bk), [hd, nHeadKv, n]), positions, rope);
    const v = biased(G.mulMat(L.wv, cur), L.bv);
    const kWritten = G.setRows(kv.k[il]!, G.permute(k, [0, 2, 1, 3]), slots);
    // V is stored transposed: write each token's channels as a column (one element per row)
    const vDst = G.view(kv.v[il]!, [1, nCtx, nKv], 0, [es, nCtx * es, nCtx * nKv * es]);
    const vSrc = G.view(v, [1, n, nKv], 0, [v.nb[1], 4, v.nb[1] * n]);
    const vWritten = G.setRows(vDst, vSrc, slots);
    const K = G.view(kWritten, [hd, kvLen, nHeadKv], 0, [kWritten.nb[1], kWritten.nb[2], kWritten.nb[3]]);
    const V = G.view(vWritten, [kvLen, hd, nHeadKv], 0, [nCtx * es, hd * nCtx * es, nCtx * nKv * es]);
    const kq = G.softMax(G.mulMat(K, G.permute(q, [0, 2, 1, 3])), mask, 1 / Math.sqrt(hd));
    const kqv = G.mulMat(V, kq);                                   // [hd, n, nHead]
    const attn = G.reshape(G.cont(G.permute(kqv, [0, 2, 1, 3])), [hd * nHead, n]);
    x = G.add(x, biased(G.mulMat(L.wo, attn), L.bo));
    cur = G.mul(G.rmsNorm(x, rmsEps), L.ffnNorm);
    const ffn = G.swiglu(G.mulMat(L.wGate, cur), G.mulMat(L.wUp, cur));
    x = G.add(x, G.mulMat(L.wDown, ffn));
  });
  if (!allLogits && n > 1) x = G.view(x, [nEmbd, 1], (n - 1) * x.nb[1]);
  const logits = G.mulMat(w.output, G.mul(G.rmsNorm(x, rmsEps), w.outputNorm)).setName("logits").setOutput();
  return { graph: G.buildGraph(logits), tokens, positions, mask, slots, logits };
}
