/**
 * Token sampling, in llama.cpp's default chain order: repeat penalty → top-k → top-p →
 * min-p → temperature → draw. Temperature ≤ 0 is greedy (argmax, lowest id on ties, as
 * llama_sampler_init_greedy).
 */
import { weftError } from "../core/errors.js";
import { mulberry32 } from "../core/random.js";

export interface SamplingOptions {
  /** 0 = greedy (default 0.8) */
  temperature?: number;
  /** keep the k most likely tokens; 0 = all (default 40) */
  topK?: number;
  /** nucleus: smallest set with cumulative probability ≥ p; 1 = off (default 0.95) */
  topP?: number;
  /** drop tokens below minP × the top probability; 0 = off (default 0.05) */
  minP?: number;
  /** divide positive / multiply negative logits of recent tokens; 1 = off (default 1) */
  repeatPenalty?: number;
  /** how many recent tokens the penalty looks at (default 64) */
  repeatLastN?: number;
  /** RNG seed (default: random) */
  seed?: number;
}

export function argmax(logits: ArrayLike<number>): number {
  let best = 0, bv = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i]! > bv) { bv = logits[i]!; best = i; }
  return best;
}

export class Sampler {
  readonly temperature: number;
  readonly topK: number;
  readonly topP: number;
  readonly minP: number;
  readonly repeatPenalty: number;
  readonly repeatLastN: number;
  readonly seed: number;
  #rand: () => number;
  #recent: number[] = [];

  constructor(o: SamplingOptions = {}) {
    this.temperature = o.temperature ?? 0.8;
    this.topK = o.topK ?? 40;
    this.topP = o.topP ?? 0.95;
    this.minP = o.minP ?? 0.05;
    this.repeatPenalty = o.repeatPenalty ?? 1;
    this.repeatLastN = o.repeatLastN ?? 64;
    this.seed = o.seed ?? Math.floor(Math.random() * 2 ** 32);
    const check = (ok: boolean, what: string) => { if (!ok) throw weftError("BAD_ARGUMENT", what); };
    check(Number.isFinite(this.temperature), `temperature must be a number, got ${o.temperature}`);
    check(Number.isInteger(this.topK) && this.topK >= 0, `top-k must be a non-negative integer, got ${o.topK}`);
    check(this.topP > 0 && this.topP <= 1, `top-p must be in (0, 1], got ${o.topP}`);
    check(this.minP >= 0 && this.minP <= 1, `min-p must be in [0, 1], got ${o.minP}`);
    check(this.repeatPenalty > 0, `repeat penalty must be positive, got ${o.repeatPenalty}`);
    check(Number.isInteger(this.repeatLastN) && this.repeatLastN >= 0, `repeat-last-n must be a non-negative integer, got ${o.repeatLastN}`);
    check(Number.isInteger(this.seed) && this.seed >= 0 && this.seed < 2 ** 32, `seed must be an integer in [0, 2^32), got ${o.seed}`);
    this.#rand = mulberry32(this.seed);
  }

  /** Remembers tokens for the repeat penalty (the prompt, then each sampled token). */
  accept(tokens: Iterable<number>): void {
    for (const t of tokens) this.#recent.push(t);
    if (this.#recent.length > this.repeatLastN) this.#recent.splice(0, this.#recent.length - this.repeatLastN);
  }

  sample(logitsIn: Float32Array): number {
    let logits = logitsIn;
    if (this.repeatPenalty !== 1 && this.#recent.length) {
      logits = Float32Array.from(logitsIn);
      for (const t of new Set(this.#recent)) {
        if (t < 0 || t >= logits.length) continue;
        logits[t] = logits[t]! > 0 ? logits[t]! / this.repeatPenalty : logits[t]! * this.repeatPenalty;
      }
    }
    if (this.temperature <= 0) return argmax(logits);
    // candidates sorted by logit (descending; ties by id); top-k by partial selection
    const n = logits.length;
    let ids: number[];
    const k = this.topK > 0 ? Math.min(this.topK, n) : n;
    if (k < n) {
      ids = [];
      let minV = -Infinity;
      for (let i = 0; i < n; i++) {
        const v = logits[i]!;
        if (ids.length < k) { ids.push(i); if (ids.length === k) { ids.sort((a, b) => logits[b]! - logits[a]! || a - b); minV = logits[ids[k - 1]!]!; } continue; }
        if (v <= minV) continue;
        let j = k - 1;
        while (j > 0 && logits[ids[j - 1]!]! < v) j--;
        ids.splice(j, 0, i);
        ids.pop();
        minV = logits[ids[k - 1]!]!;
      }
      if (ids.length < k || k === 0) ids.sort((a, b) => logits[b]! - logits[a]! || a - b);
    } else {
      ids = Array.from({ length: n }, (_, i) => i).sort((a, b) => logits[b]! - logits[a]! || a - b);
    }
    // probabilities at temperature 1 for top-p / min-p (as llama.cpp, which applies temperature last)
    const softmax = (list: number[], temp: number) => {
      const mx = logits[list[0]!]!;
      const p = list.map((i) => Math.exp((logits[i]! - mx) / temp));
      const s = p.reduce((a, b) => a + b, 0);
      return p.map((x) => x / s);
    };
    let p = softmax(ids, 1);
    if (this.topP < 1) {
      let cum = 0, keep = ids.length;
      for (let i = 0; i < ids.length; i++) { cum += p[i]!; if (cum >= this.topP) { keep = i + 1; break; } }
      ids = ids.slice(0, keep); p = p.slice(0, keep);
    }
    if (this.minP > 0) {
      const cut = p[0]! * this.minP;
      let keep = 1;
      while (keep < ids.length && p[keep]! >= cut) keep++;
      ids = ids.slice(0, keep);
    }
    p = softmax(ids, this.temperature);
    let r = this.#rand();
    for (let i = 0; i < ids.length; i++) { r -= p[i]!; if (r < 0) return ids[i]!; }
    return ids[ids.length - 1]!;
  }
}
