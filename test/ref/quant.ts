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
