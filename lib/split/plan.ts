/**
 * The static split plan of LLaMA-family models (llama, mistral, qwen2) for a meta device of
 * n devices (DESIGN §7), by tensor name:
 *  - attn_q/k/v and ffn_gate/up: by output features (AXIS 1 of the weight);
 *  - attn_output and ffn_down: by input features (AXIS 0), the same cut as their partners;
 *  - the KV cache: by KV heads, the same cut as attn_k/v;
 *  - norms, biases and the token embedding (GET_ROWS reads any row): mirrored;
 *  - the output head (tied or not): by vocabulary rows.
 * Cuts never split a quant block of a weight nor of its activations (32 for Q4_0/Q8_0, 256
 * for K-quants), a head or a GQA group, and keep repacked matrices (Q4_0/Q8_0/Q4_K) at a
 * multiple of 8 rows. Shares (--tensor-split) are honoured at that granularity; what cannot
 * be divided evenly goes to the devices furthest behind their share so far, layer after
 * layer, so no device takes every leftover. A device may get nothing of a tensor.
 */
import { weftError } from "../core/errors.js";
import { Tensor } from "../core/tensor.js";
import { GgmlType, TYPES } from "../core/types.js";
import type { HParams } from "../model/hparams.js";
import { AXIS, MIRRORED, SplitState } from "./state.js";

const REPACKABLE: ReadonlySet<number> = new Set([GgmlType.Q4_0, GgmlType.Q8_0, GgmlType.Q4_K]);
/** rows a device's slice of a matrix must be a multiple of (repacked groups are 8 rows) */
const rowUnit = (type: number) => (REPACKABLE.has(type) ? 8 : 1);
/** input features a device's slice must be a multiple of: the weight's block, which is also
 * the block the activations are quantized in (Q8_0 for Q4_0/Q8_0, Q8_K for K-quants) */
const colUnit = (type: number) => TYPES[type as GgmlType].blockSize;

const gcd = (a: number, b: number): number => (b ? gcd(b, a % b) : a);
const lcm = (a: number, b: number) => (a / gcd(a, b)) * b;

/** Normalized shares (default equal); refuses a wrong count or no positive share. */
export function checkShares(n: number, shares?: readonly number[]): number[] {
  const w = shares ? [...shares] : Array<number>(n).fill(1);
  if (w.length !== n || w.some((x) => !(x >= 0) || !Number.isFinite(x)) || !(w.reduce((a, b) => a + b, 0) > 0))
    throw weftError("BAD_ARGUMENT", `tensor split [${w.join(", ")}] needs one non-negative share per device (${n}) and a positive sum`);
  const sum = w.reduce((a, b) => a + b, 0);
  return w.map((x) => x / sum);
}

/**
 * One cut of `total` elements in whole `unit`s (the last unit may be short) for round `r`
 * (a layer) of a series: each device gets the whole units it is owed by its share of
 * everything cut so far (`given`: elements it got in earlier rounds), the rest go one each
 * to the devices furthest behind (ties rotate with the round). Returns sizes in elements.
 */
export function cutOnce(total: number, unit: number, shares: readonly number[], given: readonly number[], r: number): number[] {
  const n = shares.length;
  const units = Math.ceil(total / unit);
  const sum = given.reduce((a, b) => a + b, 0) + total;
  const owed = shares.map((s, d) => (s * sum - given[d]!) / unit);
  const take = owed.map((o) => Math.max(0, Math.floor(o + 1e-9)));
  let left = units - take.reduce((a, b) => a + b, 0);
  const behind = (d: number) => owed[d]! - take[d]!;
  const rot = (d: number) => ((d - r) % n + n) % n;
  while (left < 0) {  // rounding: take back from the device most ahead of its share
    const d = [...take.keys()].filter((i) => take[i]! > 0).sort((a, b) => behind(a) - behind(b) || rot(b) - rot(a))[0]!;
    take[d]!--; left++;
  }
  const order = [...Array(n).keys()].filter((d) => shares[d]! > 0).sort((a, b) => behind(b) - behind(a) || rot(a) - rot(b));
  for (let i = 0; left > 0; i = (i + 1) % order.length, left--) take[order[i]!]!++;
  let start = 0;
  return take.map((u) => {
    const end = Math.min(total, start + u * unit);
    const size = end - start;
    start = end;
    return size;
  });
}

/**
 * The split state of every static tensor of a LLaMA-family model on n devices with
 * `shares`; `typeOf` gives each weight's type by tensor name. Unknown names: undefined.
 */
export function planLlamaSplit(hp: HParams, n: number, shares: readonly number[] | undefined, typeOf: (name: string) => number): (t: Tensor) => SplitState | undefined {
  const w = checkShares(n, shares);
  const { nLayer, nHead, nHeadKv, headDim: hd, nFf, nVocab } = hp;
  const g = nHead / nHeadKv;
  const layerType = (il: number, w: string) => typeOf(`blk.${il}.${w}.weight`);
  // the smallest cut of attention, in KV heads: whole GQA groups whose attn_output columns
  // fill whole blocks and whose q/k/v rows fill whole repacked groups
  const attnUnit = (il: number) => {
    for (let u = 1; u < nHeadKv; u++) {
      if ((u * g * hd) % colUnit(layerType(il, "attn_output")) !== 0 || (u * g * hd) % rowUnit(layerType(il, "attn_q")) !== 0) continue;
      if ((u * hd) % rowUnit(layerType(il, "attn_k")) !== 0 || (u * hd) % rowUnit(layerType(il, "attn_v")) !== 0) continue;
      return u;
    }
    return nHeadKv;
  };
  const ffnUnit = (il: number) => Math.min(nFf, [layerType(il, "ffn_up"), layerType(il, "ffn_gate")].map(rowUnit)
    .reduce(lcm, colUnit(layerType(il, "ffn_down"))));
  // one cut per layer (units may differ by layer where quant types are mixed), balanced
  // against the earlier layers
  const cut = (total: number, unitOf: (il: number) => number) => {
    const given = Array<number>(n).fill(0);
    return Array.from({ length: nLayer }, (_, il) => {
      const sizes = cutOnce(total, unitOf(il), w, given, il);
      sizes.forEach((x, d) => { given[d]! += x; });
      return sizes;
    });
  };
  const heads = cut(nHeadKv, attnUnit);  // KV heads per device, per layer
  const ffn = cut(nFf, ffnUnit);
  const vocab = cutOnce(nVocab, rowUnit(typeOf("output.weight")), w, Array<number>(n).fill(0), nLayer);
  const scale = (v: readonly number[], k: number) => v.map((x) => x * k);

  const layer = /^blk\.(\d+)\.(\w+)\.(weight|bias)$/, cache = /^cache_([kv])_l(\d+)$/;
  return (t: Tensor) => {
    const name = t.name;
    if (name === "token_embd.weight" || name === "output_norm.weight") return MIRRORED;
    if (name === "output.weight") return AXIS(1, vocab);
    let m = cache.exec(name);
    if (m) {
      const kvh = heads[Number(m[2])];
      if (!kvh) return undefined;
      return m[1] === "k" ? AXIS(2, kvh) : AXIS(1, scale(kvh, hd));
    }
    m = layer.exec(name);
    if (!m) return undefined;
    const kvh = heads[Number(m[1])], ff = ffn[Number(m[1])];
    if (!kvh || !ff) return undefined;
    if (m[3] === "bias") return MIRRORED;  // added to a split result: each device adds its slice
    switch (m[2]) {
      case "attn_norm": case "ffn_norm": return MIRRORED;
      case "attn_q": return AXIS(1, scale(kvh, g * hd));
      case "attn_k": case "attn_v": return AXIS(1, scale(kvh, hd));
      case "attn_output": return AXIS(0, scale(kvh, g * hd));
      case "ffn_gate": case "ffn_up": return AXIS(1, ff);
      case "ffn_down": return AXIS(0, ff);
      default: return undefined;
    }
  };
}
