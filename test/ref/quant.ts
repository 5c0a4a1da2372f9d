/** Float64 reference dequantizers (independent of the native code) and simple quantizers. */
import { GgmlType, TYPES } from "../../lib/core/types.js";

export function f16ToF64(h: number): number {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}
export function bf16ToF64(h: number): number {
  const b = new DataView(new ArrayBuffer(4));
  b.setUint32(0, h << 16, true);
  return b.getFloat32(0, true);
}

function scaleMinK4(j: number, q: Uint8Array, o: number): [number, number] {
  if (j < 4) return [q[o + j]! & 63, q[o + j + 4]! & 63];
  return [(q[o + j + 4]! & 0xf) | ((q[o + j - 4]! >> 6) << 4), (q[o + j + 4]! >> 4) | ((q[o + j]! >> 6) << 4)];
}

/** Dequantizes n elements of `type` from bytes (row-major blocks). */
export function dequantizeRef(type: GgmlType, bytes: Uint8Array, n: number): Float64Array {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float64Array(n);
  const f16 = (o: number) => f16ToF64(dv.getUint16(o, true));
  switch (type) {
    case GgmlType.F32: for (let i = 0; i < n; i++) out[i] = dv.getFloat32(4 * i, true); break;
    case GgmlType.F16: for (let i = 0; i < n; i++) out[i] = f16(2 * i); break;
    case GgmlType.BF16: for (let i = 0; i < n; i++) out[i] = bf16ToF64(dv.getUint16(2 * i, true)); break;
    case GgmlType.I32: for (let i = 0; i < n; i++) out[i] = dv.getInt32(4 * i, true); break;
    case GgmlType.Q8_0:
      for (let b = 0; b < n / 32; b++) { const o = b * 34, d = f16(o); for (let j = 0; j < 32; j++) out[b * 32 + j] = d * dv.getInt8(o + 2 + j); }
      break;
    case GgmlType.Q4_0:
      for (let b = 0; b < n / 32; b++) {
        const o = b * 18, d = f16(o);
        for (let j = 0; j < 16; j++) { const q = bytes[o + 2 + j]!; out[b * 32 + j] = d * ((q & 15) - 8); out[b * 32 + j + 16] = d * ((q >> 4) - 8); }
      }
      break;
    case GgmlType.Q4_K:
      for (let b = 0; b < n / 256; b++) {
        const o = b * 144, d = f16(o), dmin = f16(o + 2);
        for (let j = 0; j < 8; j++) {
          const [sc, m] = scaleMinK4(j, bytes, o + 4);
          const qo = o + 16 + Math.floor(j / 2) * 32;
          for (let l = 0; l < 32; l++) {
            const q = j % 2 === 0 ? bytes[qo + l]! & 15 : bytes[qo + l]! >> 4;
            out[b * 256 + j * 32 + l] = d * sc * q - dmin * m;
          }
        }
      }
      break;
    case GgmlType.Q6_K:
      for (let b = 0; b < n / 256; b++) {
        const o = b * 210, d = f16(o + 208);
        for (let i = 0; i < 256; i++) {
          const half = Math.floor(i / 128), r = i % 128, l = r % 32, quarter = Math.floor(r / 32);
          const qlByte = bytes[o + half * 64 + l + (quarter % 2) * 32]!;
          const lo = quarter < 2 ? qlByte & 15 : qlByte >> 4;
          const hi = (bytes[o + 128 + half * 32 + l]! >> (2 * quarter)) & 3;
          const sc = dv.getInt8(o + 192 + Math.floor(i / 16));
          out[b * 256 + i] = d * sc * ((lo | (hi << 4)) - 32);
        }
      }
      break;
    default:
      throw new Error(`no reference dequantizer for ${TYPES[type].name}`);
  }
  return out;
}

const f32Bits = (x: number) => { const b = new DataView(new ArrayBuffer(4)); b.setFloat32(0, x, true); return b.getUint32(0, true); };
const roundHalfEven = (x: number) => { const f = Math.floor(x), r = x - f; return r > 0.5 || (r === 0.5 && f % 2 !== 0) ? f + 1 : f; };
/** the value of fp32 x after conversion to fp16 (round to nearest even), as ggml stores scales */
export function f16Round(x: number): number {
  const a = Math.abs(x);
  if (a === 0 || !Number.isFinite(a)) return x;
  if (a >= 65520) return Math.sign(x) * Infinity;
  const e = Math.max(((f32Bits(a) >>> 23) & 0xff) - 127, -14);  // fp16 subnormals share 2^-14's quantum
  const quantum = 2 ** (e - 10);
  return Math.sign(x) * roundHalfEven(a / quantum) * quantum;
}

/** the value of fp32 x after conversion to bf16 (round to nearest even, subnormals kept) */
export function bf16Round(x: number): number {
  const a = Math.abs(Math.fround(x));
  if (a === 0 || !Number.isFinite(a)) return x;
  const e = Math.max(((f32Bits(a) >>> 23) & 0xff) - 127, -126);  // fp32 subnormals share 2^-126's quantum
  const quantum = 2 ** (e - 7);
  return Math.sign(x) * roundHalfEven(a / quantum) * quantum;
}

/** How the kernels in use treat activations (see runReference). */
export interface RefOptions {
  /** BF16 weights meet activations rounded to BF16 (the AVX512-BF16 kernels, as ggml's BF16 vec_dot_type) */
  bf16Activations?: boolean;
}

/**
 * What a quantized MUL_MAT does to its activations, in float64: each row is quantized to
 * 8 bits like ggml's quantize_row_q8_0_ref (Q4_0/Q8_0 weights: per 32 values, scale
 * amax/127 stored as fp16, roundf) or quantize_row_q8_K_ref (K-quant weights: per 256
 * values, scale −127/max in fp32, round to nearest even) and dequantized. With it the
 * reference matches the kernels up to float summation order, so the tolerance checks the
 * kernels and not the luck of the random data (a single output near zero). BF16 weights
 * with opts.bf16Activations: each activation rounded to BF16.
 */
export function quantizeActivationsRef(weightType: GgmlType, x: Float64Array, opts: RefOptions = {}): Float64Array {
  const f = Math.fround, out = new Float64Array(x.length);
  if (weightType === GgmlType.BF16 && opts.bf16Activations) {
    for (let i = 0; i < x.length; i++) out[i] = bf16Round(x[i]!);
    return out;
  }
  if (weightType === GgmlType.Q8_0 || weightType === GgmlType.Q4_0) {
    for (let b = 0; b < x.length; b += 32) {
      let amax = 0;
      for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[b + j]!));
      const d = f(amax / 127), id = d ? f(1 / d) : 0, dh = f16Round(d);
      for (let j = 0; j < 32; j++) { const v = f(x[b + j]! * id); out[b + j] = Math.sign(v) * Math.round(Math.abs(v)) * dh; }
    }
  } else if (weightType === GgmlType.Q4_K || weightType === GgmlType.Q6_K) {
    for (let b = 0; b < x.length; b += 256) {
      let amax = 0, max = 0;
      for (let j = 0; j < 256; j++) { const ax = Math.abs(x[b + j]!); if (ax > amax) { amax = ax; max = x[b + j]!; } }
      if (!amax) continue;
      const iscale = f(-127 / max), d = f(1 / iscale);
      for (let j = 0; j < 256; j++) out[b + j] = Math.min(127, roundHalfEven(f(iscale * x[b + j]!))) * d;
    }
  } else return x;
  return out;
}
