/**
 * Tokenizers read from GGUF metadata, reproducing llama.cpp (llama-vocab.cpp) token for
 * token: `llama` (SentencePiece-style: score-ordered merges, byte fallback, one leading
 * space) and `gpt2` (byte-level BPE with ranked merges and the `llama-bpe` pre-tokenizer).
 * Special-token text is split out first (only when asked, except user-defined tokens).
 */
import { weftError } from "../core/errors.js";
import { metaNumber, metaValue } from "../gguf/reader.js";
import { GgufFile } from "../gguf/types.js";
import { Heap } from "./heap.js";

/** tokenizer.ggml.token_type values */
export const TokenType = { NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6 } as const;

/** Pre-tokenizer regexes by `tokenizer.ggml.pre` (llama.cpp's adapted forms). */
const LLAMA3_SPLIT = /(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+/gu;
const PRE_TOKENIZERS: Readonly<Record<string, RegExp>> = { "llama-bpe": LLAMA3_SPLIT, llama3: LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT };

export interface TokenizeOptions {
  /** add BOS/EOS as the vocabulary asks (default true) */
  addSpecial?: boolean;
  /** turn special-token text such as `<s>` into its token (default false) */
  parseSpecial?: boolean;
}
export interface DetokenizeOptions {
  /** drop a leading BOS / trailing EOS the vocabulary adds (default false) */
  removeSpecial?: boolean;
  /** render control tokens as their text (default false) */
  unparseSpecial?: boolean;
}

// GPT-2 byte <-> unicode character mapping used by byte-level BPE vocabularies
const BYTE_TO_CHAR: string[] = [];
const CHAR_TO_BYTE = new Map<string, number>();
{
  let n = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    const c = String.fromCodePoint(printable ? b : 256 + n++);
    BYTE_TO_CHAR[b] = c;
    CHAR_TO_BYTE.set(c, b);
  }
}

const utf8 = new TextEncoder();

type Fragment = string | number;  // raw text, or a token id

export class Tokenizer {
  readonly kind: "spm" | "bpe";
  readonly tokens: readonly string[];
  readonly types: Uint8Array;
  readonly bos: number | null;
  readonly eos: number | null;
  readonly unk: number | null;
  readonly addBos: boolean;
  readonly addEos: boolean;
  readonly addSpacePrefix: boolean;
  readonly cleanSpaces: boolean;
  #scores: ArrayLike<number> | null;
  #ids = new Map<string, number>();
  #ranks = new Map<string, number>();
  #pre: RegExp | null = null;
  #specials: number[];  // control / user-defined / unknown, longest text first
  #pieces: Uint8Array[] = [];  // token_to_piece cache (special = false)

  constructor(f: GgufFile) {
    const model = metaValue(f, "tokenizer.ggml.model");
    const toks = metaValue(f, "tokenizer.ggml.tokens");
    if (typeof model !== "string") throw weftError("BAD_GGUF", `${f.path}: metadata key 'tokenizer.ggml.model' is missing`);
    if (!toks || typeof toks !== "object" || !Array.isArray(toks.values) || toks.values.some((t) => typeof t !== "string"))
      throw weftError("BAD_GGUF", `${f.path}: 'tokenizer.ggml.tokens' is missing or not an array of strings`);
    this.tokens = toks.values as string[];
    const n = this.tokens.length;
    if (model === "llama") this.kind = "spm";
    else if (model === "gpt2") this.kind = "bpe";
    else throw weftError("UNSUPPORTED_TYPE", `${f.path}: tokenizer '${model}' is not supported (supported: llama, gpt2)`);

    const types = metaValue(f, "tokenizer.ggml.token_type");
    this.types = new Uint8Array(n).fill(TokenType.NORMAL);
    if (types !== undefined) {
      if (typeof types !== "object" || (types.values as ArrayLike<number>).length !== n)
        throw weftError("BAD_GGUF", `${f.path}: 'tokenizer.ggml.token_type' must have one entry per token (${n})`);
      this.types.set(Array.from(types.values as ArrayLike<number>, Number));
    }
    const scores = metaValue(f, "tokenizer.ggml.scores");
    this.#scores = scores !== undefined && typeof scores === "object" ? (scores.values as ArrayLike<number>) : null;
    if (this.#scores && this.#scores.length !== n) throw weftError("BAD_GGUF", `${f.path}: 'tokenizer.ggml.scores' must have one entry per token (${n})`);
    for (let i = 0; i < n; i++) if (!this.#ids.has(this.tokens[i]!)) this.#ids.set(this.tokens[i]!, i);

    const id = (key: string, fallback: number | null): number | null => {
      const v = metaNumber(f, key);
      if (v === undefined) return fallback;
      if (v === 0xffffffff || v === -1) return null;
      if (!Number.isInteger(v) || v < 0 || v >= n) throw weftError("BAD_GGUF", `${f.path}: '${key}' = ${v} is not a token id (vocabulary has ${n})`);
      return v;
    };
    const flag = (key: string, fallback: boolean): boolean => {
      const v = metaValue(f, key);
      return typeof v === "boolean" ? v : fallback;
    };
    if (this.kind === "spm") {
      this.bos = id("tokenizer.ggml.bos_token_id", 1);
      this.eos = id("tokenizer.ggml.eos_token_id", 2);
      this.unk = id("tokenizer.ggml.unknown_token_id", 0);
      this.addSpacePrefix = flag("tokenizer.ggml.add_space_prefix", true);
      this.cleanSpaces = false;
      this.addBos = flag("tokenizer.ggml.add_bos_token", true);
    } else {
      const pre = metaValue(f, "tokenizer.ggml.pre");
      const preName = typeof pre === "string" ? pre : "default";
      this.#pre = PRE_TOKENIZERS[preName] ?? null;
      if (!this.#pre)
        throw weftError("UNSUPPORTED_TYPE", `${f.path}: BPE pre-tokenizer '${preName}' is not supported (supported: ${Object.keys(PRE_TOKENIZERS).join(", ")}); refusing to tokenize it wrongly`);
      this.bos = id("tokenizer.ggml.bos_token_id", 11);
      this.eos = id("tokenizer.ggml.eos_token_id", 11);
      this.unk = id("tokenizer.ggml.unknown_token_id", null);
      this.addSpacePrefix = flag("tokenizer.ggml.add_space_prefix", false);
      this.cleanSpaces = true;
      this.addBos = flag("tokenizer.ggml.add_bos_token", true);
      const merges = metaValue(f, "tokenizer.ggml.merges");
      if (!merges || typeof merges !== "object" || !Array.isArray(merges.values))
        throw weftError("BAD_GGUF", `${f.path}: 'tokenizer.ggml.merges' is missing (needed by the gpt2 tokenizer)`);
      // Keyed by the merge text "left right" itself: byte-level BPE symbols never contain a
      // space (0x20 is written as "Ġ"), so a lookup of left + " " + right is unambiguous,
      // and 280k merges load without building a single new string.
      const list = merges.values as string[];
      for (let rank = 0; rank < list.length; rank++) {
        const m = list[rank];
        if (typeof m !== "string") throw weftError("BAD_GGUF", `${f.path}: merge #${rank} is not a string`);
        if (m.indexOf(" ", 1) < 0) throw weftError("BAD_GGUF", `${f.path}: merge #${rank} '${m}' has no separator`);
        if (!this.#ranks.has(m)) this.#ranks.set(m, rank);
      }
    }
    this.addEos = flag("tokenizer.ggml.add_eos_token", false);
    if (this.addBos && this.bos === null) throw weftError("BAD_GGUF", `${f.path}: the vocabulary adds BOS but has no BOS token id`);
    const eog = new Set<number>();
    for (const key of ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]) {
      const v = key.endsWith("eos_token_id") ? this.eos : id(key, null);
      if (v !== null) eog.add(v);
    }
    for (const name of ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>"]) {
      const v = this.#ids.get(name);
      if (v !== undefined && this.types[v] === TokenType.CONTROL) eog.add(v);
    }
    this.eog = eog;
    this.#specials = [];
    for (let i = 0; i < n; i++) {
      const t = this.types[i]!;
      if (t === TokenType.CONTROL || t === TokenType.USER_DEFINED || t === TokenType.UNKNOWN) this.#specials.push(i);
    }
    this.#specials.sort((a, b) => this.tokens[b]!.length - this.tokens[a]!.length || a - b);
  }

  get vocabSize(): number { return this.tokens.length; }

  /** End-of-generation tokens: EOS, EOT/EOM from metadata, and the usual end-of-turn control tokens. */
  readonly eog: ReadonlySet<number>;
  isEog(id: number): boolean { return this.eog.has(id); }

  tokenize(text: string, opts: TokenizeOptions = {}): number[] {
    const addSpecial = opts.addSpecial ?? true;
    const out: number[] = [];
    if (addSpecial && this.addBos) out.push(this.bos!);
    let prevSpecial = true;  // SPM: a text fragment at the start or after a special token gets the space prefix
    for (const frag of this.#partition(text, opts.parseSpecial ?? false)) {
      if (typeof frag === "number") { out.push(frag); prevSpecial = true; continue; }
      if (this.kind === "spm") {
        const t = (this.addSpacePrefix && prevSpecial ? " " : "") + frag;
        this.#spm(t.replaceAll(" ", "\u2581"), out);
      } else {
        for (const m of frag.matchAll(this.#pre!)) this.#bpe(m[0], out);
      }
      prevSpecial = false;
    }
    if (addSpecial && this.addEos && this.eos !== null) out.push(this.eos);
    return out;
  }

  /** Splits out special-token text (control/unknown only when parseSpecial; user-defined always). */
  #partition(text: string, parseSpecial: boolean): Fragment[] {
    if (text.length === 0) return [];
    let frags: Fragment[] = [text];
    for (const id of this.#specials) {
      const t = this.types[id]!;
      if (!parseSpecial && (t === TokenType.CONTROL || t === TokenType.UNKNOWN)) continue;
      const s = this.tokens[id]!;
      if (s.length === 0) continue;
      const next: Fragment[] = [];
      for (const f of frags) {
        if (typeof f === "number" || !f.includes(s)) { next.push(f); continue; }
        let pos = 0;
        for (;;) {
          const at = f.indexOf(s, pos);
          if (at < 0) break;
          if (at > pos) next.push(f.slice(pos, at));
          next.push(id);
          pos = at + s.length;
        }
        if (pos < f.length) next.push(f.slice(pos));
      }
      frags = next;
    }
    return frags;
  }

  #byteToken(b: number): number {
    if (this.kind === "spm") {
      const id = this.#ids.get(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`) ?? this.#ids.get(String.fromCharCode(b));
      if (id !== undefined) return id;
    } else {
      const id = this.#ids.get(BYTE_TO_CHAR[b]!);
      if (id !== undefined) return id;
    }
    if (this.unk === null) throw weftError("BAD_ARGUMENT", `the vocabulary has no token for byte 0x${b.toString(16)} and no unknown token`);
    return this.unk;
  }

  /** SentencePiece-style merging: highest score first, leftmost on ties (llm_tokenizer_spm). */
  #spm(text: string, out: number[]): void {
    const scores = this.#scores;
    const merged = mergePairs(Array.from(text), (l, r) => {
      const id = this.#ids.get(l + r);
      return id === undefined ? undefined : -(scores ? scores[id]! : 0);
    });
    for (const piece of merged) {
      const id = this.#ids.get(piece);
      if (id !== undefined) { out.push(id); continue; }
      for (const byte of utf8.encode(piece)) out.push(this.#byteToken(byte));
    }
  }

  /** Byte-level BPE on one pre-tokenized word: lowest merge rank first, leftmost on ties. */
  #bpe(word: string, out: number[]): void {
    let s = "";
    for (const b of utf8.encode(word)) s += BYTE_TO_CHAR[b]!;
    const whole = this.#ids.get(s);
    if (whole !== undefined) { out.push(whole); return; }  // llama-bpe ignores merges for whole-token words
    for (const piece of mergePairs(Array.from(s), (l, r) => this.#ranks.get(l + " " + r))) {
      const id = this.#ids.get(piece);
      if (id !== undefined) { out.push(id); continue; }
      for (const c of piece) { const t = this.#ids.get(c); if (t !== undefined) out.push(t); }
    }
  }

  /** The bytes a token renders as (llama_token_to_piece with lstrip 0). */
  tokenToPiece(id: number, special = false): Uint8Array {
    if (!Number.isInteger(id) || id < 0 || id >= this.tokens.length) throw weftError("OUT_OF_RANGE", `token id ${id} is outside the vocabulary (0..${this.tokens.length - 1})`);
    if (!special) { const c = this.#pieces[id]; if (c) return c; }
    const p = this.#piece(id, special);
    if (!special) this.#pieces[id] = p;
    return p;
  }

  #piece(id: number, special: boolean): Uint8Array {
    const t = this.types[id]!;
    const text = this.tokens[id]!;
    const isSpecial = t === TokenType.CONTROL || t === TokenType.UNKNOWN;
    if (isSpecial && !special) return new Uint8Array(0);
    if (isSpecial || t === TokenType.USER_DEFINED) return utf8.encode(text);
    if (this.kind === "spm") {
      if (t === TokenType.BYTE) {
        const m = /^<0x([0-9A-Fa-f]{2})>$/.exec(text);
        return m ? Uint8Array.of(parseInt(m[1]!, 16)) : utf8.encode(text);
      }
      if (t === TokenType.NORMAL) return utf8.encode(text.replaceAll("\u2581", " "));
      return new Uint8Array(0);
    }
    if (t !== TokenType.NORMAL) return new Uint8Array(0);
    const bytes: number[] = [];
    for (const c of text) {
      const b = CHAR_TO_BYTE.get(c);
      if (b !== undefined) bytes.push(b);
      else bytes.push(...utf8.encode(c));
    }
    return Uint8Array.from(bytes);
  }

  /** Token ids to bytes, as llama_detokenize. */
  detokenizeBytes(ids: readonly number[], opts: DetokenizeOptions = {}): Uint8Array {
    let list = ids;
    let removeSpace = this.addSpacePrefix;
    if (opts.removeSpecial && this.addBos && list.length > 0 && list[0] === this.bos) { removeSpace = false; list = list.slice(1); }
    if (opts.removeSpecial && this.addEos && list.length > 0 && list[list.length - 1] === this.eos) list = list.slice(0, -1);
    const parts: number[] = [];
    for (const id of list) {
      const p = this.tokenToPiece(id, opts.unparseSpecial ?? false);
      let start = 0;
      if (removeSpace && p.length > 0 && p[0] === 0x20) start = 1;
      removeSpace = false;
      for (let i = start; i < p.length; i++) parts.push(p[i]!);
    }
    return Uint8Array.from(this.cleanSpaces ? cleanUpSpaces(parts) : parts);
  }

  detokenize(ids: readonly number[], opts: DetokenizeOptions = {}): string {
    return new TextDecoder().decode(this.detokenizeBytes(ids, opts));
  }
}

/**
 * The merge loop both tokenizers share: repeatedly join the adjacent pair with the lowest
 * priority (leftmost on ties) until no pair has one. A heap of candidate pairs, each
 * checked against the current symbols when popped, keeps it O(n log n) on hostile input.
 */
function mergePairs(sym: string[], priority: (left: string, right: string) => number | undefined): string[] {
  const n = sym.length;
  const prev = Int32Array.from({ length: n }, (_, i) => i - 1);
  const next = Int32Array.from({ length: n }, (_, i) => (i + 1 < n ? i + 1 : -1));
  const alive = new Uint8Array(n).fill(1);
  type Pair = { left: number; right: number; prio: number; text: string };
  const q = new Heap<Pair>((a, b) => a.prio < b.prio || (a.prio === b.prio && a.left < b.left));
  const consider = (l: number, r: number) => {
    if (l < 0 || r < 0) return;
    const prio = priority(sym[l]!, sym[r]!);
    if (prio !== undefined) q.push({ left: l, right: r, prio, text: sym[l]! + sym[r]! });
  };
  for (let i = 1; i < n; i++) consider(i - 1, i);
  for (let p = q.pop(); p; p = q.pop()) {
    if (!alive[p.left] || !alive[p.right] || next[p.left] !== p.right || sym[p.left]! + sym[p.right]! !== p.text) continue;  // stale
    sym[p.left] = p.text;
    alive[p.right] = 0;
    next[p.left] = next[p.right]!;
    if (next[p.right]! >= 0) prev[next[p.right]!] = p.left;
    consider(prev[p.left]!, p.left);
    consider(p.left, next[p.left]!);
  }
  const out: string[] = [];
  for (let i = n > 0 ? 0 : -1; i !== -1; i = next[i]!) out.push(sym[i]!);
  return out;
}

/** llama.cpp's clean_spaces passes over the detokenized bytes (BPE vocabularies). */
function cleanUpSpaces(text: number[]): number[] {
  const SP = 0x20, AP = 0x27;
  // pass 1: drop the space before ? ! . ,
  let a: number[] = text.length ? [text[0]!] : [];
  for (let i = 1; i < text.length; i++) {
    const x = text[i]!;
    if (text[i - 1] === SP && (x === 0x3f || x === 0x21 || x === 0x2e || x === 0x2c)) a.pop();
    a.push(x);
  }
  // pass 2: " ' " -> "'" (a lone apostrophe between spaces)
  let b: number[] = a.length ? [a[0]!] : [];
  for (let i = 1; i < a.length; i++) {
    const x = a[i]!;
    if (x === AP && i + 1 < a.length && a[i - 1] === SP && a[i + 1] === SP) { b.pop(); b.push(x); i++; continue; }
    b.push(x);
  }
  // pass 3: " 's", " 'm", " 're", " 've" lose their space
  const c: number[] = b.length ? [b[0]!] : [];
  for (let i = 1; i < b.length; i++) {
    const x = b[i]!;
    if (b[i - 1] === SP && x === AP && i + 1 < b.length) {
      const x1 = b[i + 1]!;
      if (x1 === 0x73 || x1 === 0x6d) c.pop();
      else if (i + 2 < b.length) {
        const x2 = b[i + 2]!;
        if ((x1 === 0x72 && x2 === 0x65) || (x1 === 0x76 && x2 === 0x65)) c.pop();
      }
    }
    c.push(x);
  }
  a = []; b = [];
  return c;
}
