/**
 * Model re-quantization with llama-quantize's choices (no importance matrix): which
 * tensors are quantized, the per-tensor type mix of each scheme, and the bytes of each
 * block (the native quantizers reproduce ggml's reference quantizers exactly).
 */
import { statSync } from "node:fs";
import { resolve } from "node:path";
import { fromNative, weftError } from "../core/errors.js";
import { ioError } from "../core/files.js";
import { GgmlType, TYPES, isKnownType, rowSize, typeName } from "../core/types.js";
import { cpuDevice } from "../cpu/index.js";
import { native } from "../cpu/native.js";
import { readGguf } from "../gguf/reader.js";
import { GgufFile, GgufTensorInfo, GgufValueType } from "../gguf/types.js";
import { writeGguf } from "../gguf/writer.js";

export interface QuantScheme {
  /** base type of quantized matrices */
  base: GgmlType;
  /** llama.cpp's general.file_type */
  fileType: number;
  /** the K-quant mix: Q6_K for the output and for some attn_v / ffn_down */
  mixKM?: boolean;
}

export const QUANT_SCHEMES: Readonly<Record<string, QuantScheme>> = {
  f32: { base: GgmlType.F32, fileType: 0 },
  f16: { base: GgmlType.F16, fileType: 1 },
  bf16: { base: GgmlType.BF16, fileType: 32 },
  q8_0: { base: GgmlType.Q8_0, fileType: 7 },
  q4_0: { base: GgmlType.Q4_0, fileType: 2 },
  q4_k_m: { base: GgmlType.Q4_K, fileType: 15, mixKM: true },
  q4_k_s: { base: GgmlType.Q4_K, fileType: 14 },
  q6_k: { base: GgmlType.Q6_K, fileType: 18 },
};

/** llama.cpp: more bits for the first and last eighth of layers and every third between. */
function useMoreBits(i: number, n: number): boolean {
  return i < Math.trunc(n / 8) || i >= Math.trunc((7 * n) / 8) || (i - Math.trunc(n / 8)) % 3 === 2;
}

const isQuantizable = (t: GgufTensorInfo) => t.ne.length >= 2 && t.name.endsWith("weight") && !t.name.includes("_norm.");

/** The type each tensor gets, following llama_tensor_get_type for the schemes above. */
export function planQuantTypes(file: GgufFile, scheme: QuantScheme, pure: boolean): Map<string, GgmlType> {
  const out = new Map<string, GgmlType>();
  const hasOutput = file.tensors.some((t) => t.name === "output.weight");
  const nAttnV = file.tensors.filter((t) => t.name.includes("attn_v.weight")).length;
  const nFfnDown = file.tensors.filter((t) => t.name.includes("ffn_down")).length;
  let iAttnV = 0, iFfnDown = 0;
  const quantized = TYPES[scheme.base].quantized;
  for (const t of file.tensors) {
    if (!isQuantizable(t)) { out.set(t.name, t.type as GgmlType); continue; }
    let type = scheme.base;
    if (!pure && quantized) {
      if (t.name === "output.weight" || (!hasOutput && t.name === "token_embd.weight")) {
        if (t.ne[0]! % TYPES[scheme.base].blockSize !== 0) type = GgmlType.Q8_0;
        else if (type !== GgmlType.Q8_0) type = GgmlType.Q6_K;
      } else if (t.name.includes("attn_v.weight")) {
        if (scheme.mixKM && useMoreBits(iAttnV, nAttnV)) type = GgmlType.Q6_K;
        iAttnV++;
      } else if (t.name.includes("ffn_down")) {
        if (scheme.mixKM && useMoreBits(iFfnDown, nFfnDown)) type = GgmlType.Q6_K;
        iFfnDown++;
      }
    }
    if (t.ne[0]! % TYPES[type].blockSize !== 0) {
      // llama.cpp's fallbacks for rows that do not fill a block
      if (type === GgmlType.Q6_K) type = GgmlType.Q8_0;
      else if (TYPES[type].quantized)
        throw weftError("UNSUPPORTED_TYPE", `tensor '${t.name}': row length ${t.ne[0]} does not fit ${TYPES[type].name} blocks and its fallback type is not supported`);
    }
    out.set(t.name, type);
  }
  return out;
}

export interface QuantizeOptions {
  pure?: boolean;
  /** allow an input whose matrices are already quantized (as llama-quantize's
   * --allow-requantize): quantizing twice loses more than quantizing once */
  allowRequantize?: boolean;
  onProgress?: (done: number, total: number, tensor: string) => void;
  /** stops between tensors; the output is then not written */
  signal?: AbortSignal;
}

/** Refuses to write over the input (the same path, or another name of the same file). */
function checkNotInput(inPath: string, outPath: string): void {
  let a, b;
  try { a = statSync(inPath); } catch (e) { throw ioError("read", inPath, e); }
  try { b = statSync(outPath); } catch { return; }  // the output does not exist yet
  if (resolve(inPath) === resolve(outPath) || (a.dev === b.dev && a.ino === b.ino))
    throw weftError("BAD_ARGUMENT", `the output ${outPath} is the input file: write the quantized model to another path`);
}

/** Reads IN, writes OUT with every matrix converted per the scheme. */
export async function quantizeModel(inPath: string, outPath: string, schemeName: string, opts: QuantizeOptions = {}): Promise<Map<string, GgmlType>> {
  const scheme = QUANT_SCHEMES[schemeName.toLowerCase()];
  if (!scheme) throw weftError("BAD_ARGUMENT", `unknown quantization type '${schemeName}' (known: ${Object.keys(QUANT_SCHEMES).join(", ")})`);
  checkNotInput(inPath, outPath);
  const file = readGguf(inPath);
  const plan = planQuantTypes(file, scheme, opts.pure ?? false);
  const unreadable = file.tensors.filter((t) => !isKnownType(t.type));
  if (unreadable.length)
    throw weftError("UNSUPPORTED_TYPE", `${inPath}: weft cannot read ${[...new Set(unreadable.map((t) => typeName(t.type)))].join(", ")} tensors (e.g. '${unreadable[0]!.name}')`);
  const quantized = file.tensors.filter((t) => isKnownType(t.type) && TYPES[t.type as GgmlType].quantized);
  if (quantized.length && !opts.allowRequantize)
    throw weftError("BAD_ARGUMENT", `${inPath} is already quantized (${[...new Set(quantized.map((t) => TYPES[t.type as GgmlType].name))].join(", ")} matrices): ` +
      "quantizing again loses more than quantizing once from F32/F16/BF16; pass --allow-requantize (allowRequantize) to do it anyway");
  const mapped = cpuDevice("cpu:0").bufferType().mapFile(inPath);
  try {
    const meta = new Map(file.metadata);
    meta.delete("general.alignment");
    meta.set("general.quantization_version", { type: GgufValueType.UINT32, value: 2 });
    meta.set("general.file_type", { type: GgufValueType.UINT32, value: scheme.fileType });
    let done = 0;
    const specs = file.tensors.map((t) => {
      const type = plan.get(t.name)!;
      return {
        name: t.name, type, ne: t.ne,
        data: () => {
          opts.signal?.throwIfAborted();
          const raw = mapped.get(file.dataOffset + t.offset, t.nbytes);
          let bytes = raw;
          if (type !== t.type) {
            try {
              const nel = t.ne.reduce((p, x) => p * x, 1);
              const f32 = t.type === GgmlType.F32 ? new Float32Array(raw.buffer, raw.byteOffset, nel) : native().dequantize(t.type, raw, nel);
              bytes = type === GgmlType.F32 ? new Uint8Array(f32.buffer, f32.byteOffset, f32.byteLength) : native().quantize(type, f32, t.ne[0]!);
            } catch (e) { throw fromNative(e); }
          }
          opts.onProgress?.(++done, file.tensors.length, t.name);
          return bytes;
        },
      };
    });
    await writeGguf(outPath, meta, specs, { alignment: file.alignment, signal: opts.signal });
    return plan;
  } finally {
    mapped.dispose();
  }
}

export { rowSize };
