/**
 * GGUF reader. Every count, length and offset is checked against the bytes that remain in
 * the file before anything is allocated, so a truncated or hostile file gives a BAD_GGUF
 * error naming the field, never a crash, hang or huge allocation. Tensor data is not read
 * here: it is mapped (lib/cpu/buffer.ts) and addressed by `dataOffset + offset`.
 */
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { weftError } from "../core/errors.js";
import { ioError } from "../core/files.js";
import { GGML_TYPES, typeName } from "../core/types.js";
import {
  GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GgufArray, GgufFile, GgufScalar, GgufTensorInfo, GgufValue, GgufValueType, SCALAR_SIZE,
} from "./types.js";

const MAX_DIMS = 4;
const MAX_ARRAY_DEPTH = 4;

class Cursor {
  pos = 0;
  #buf = Buffer.alloc(0);
  #bufStart = 0;
  constructor(private fd: number, readonly size: number, private path: string) {}

  fail(what: string): never {
    throw weftError("BAD_GGUF", `${this.path}: ${what} (at byte ${this.pos})`);
  }
  remaining(): number { return this.size - this.pos; }
  /** makes [pos, pos+n) available in the window */
  #need(n: number, what: string): Buffer {
    if (n > this.remaining()) this.fail(`${what}: needs ${n} bytes but the file ends ${this.remaining()} bytes later (truncated?)`);
    const rel = this.pos - this.#bufStart;
    if (rel >= 0 && rel + n <= this.#buf.length) return this.#buf;
    const want = Math.min(Math.max(n, 1 << 20), this.remaining());
    const b = Buffer.allocUnsafe(want);
    let got = 0;
    while (got < want) {
      const r = readSync(this.fd, b, got, want - got, this.pos + got);
      if (r <= 0) this.fail(`${what}: unexpected end of file`);
      got += r;
    }
    this.#buf = b;
    this.#bufStart = this.pos;
    return b;
  }
  u8(w = "u8"): number { const b = this.#need(1, w); const v = b.readUInt8(this.pos - this.#bufStart); this.pos += 1; return v; }
  i8(w = "i8"): number { const b = this.#need(1, w); const v = b.readInt8(this.pos - this.#bufStart); this.pos += 1; return v; }
  u16(w = "u16"): number { const b = this.#need(2, w); const v = b.readUInt16LE(this.pos - this.#bufStart); this.pos += 2; return v; }
  i16(w = "i16"): number { const b = this.#need(2, w); const v = b.readInt16LE(this.pos - this.#bufStart); this.pos += 2; return v; }
  u32(w = "u32"): number { const b = this.#need(4, w); const v = b.readUInt32LE(this.pos - this.#bufStart); this.pos += 4; return v; }
  i32(w = "i32"): number { const b = this.#need(4, w); const v = b.readInt32LE(this.pos - this.#bufStart); this.pos += 4; return v; }
  f32(w = "f32"): number { const b = this.#need(4, w); const v = b.readFloatLE(this.pos - this.#bufStart); this.pos += 4; return v; }
  f64(w = "f64"): number { const b = this.#need(8, w); const v = b.readDoubleLE(this.pos - this.#bufStart); this.pos += 8; return v; }
  u64big(w = "u64"): bigint { const b = this.#need(8, w); const v = b.readBigUInt64LE(this.pos - this.#bufStart); this.pos += 8; return v; }
  i64big(w = "i64"): bigint { const b = this.#need(8, w); const v = b.readBigInt64LE(this.pos - this.#bufStart); this.pos += 8; return v; }
  /** u64 that must fit a JS number (read as two halves: no BigInt on the hot path) */
  u64(w: string): number {
    const b = this.#need(8, w);
    const at = this.pos - this.#bufStart;
    const lo = b.readUInt32LE(at), hi = b.readUInt32LE(at + 4);
    if (hi > 0x1fffff) this.fail(`${w} is ${(BigInt(hi) << 32n) | BigInt(lo)}, far beyond the file size`);
    this.pos += 8;
    return hi * 4294967296 + lo;
  }
  /** element i of a string array; the label is only built for an error message */
  strElem(what: string, i: number): string {
    if (this.remaining() < 8) return this.str(`${what}[${i}]`);
    const b = this.#need(8, what);
    const at = this.pos - this.#bufStart;
    const lo = b.readUInt32LE(at), hi = b.readUInt32LE(at + 4);
    if (hi !== 0 || lo > this.remaining() - 8) return this.str(`${what}[${i}]`);  // the slow path names the problem
    this.pos += 8;
    const d = this.#need(lo, what);
    const s = d.toString("utf8", this.pos - this.#bufStart, this.pos - this.#bufStart + lo);
    this.pos += lo;
    return s;
  }
  str(w: string): string {
    const len = this.u64(`${w} length`);
    if (len > this.remaining()) this.fail(`${w}: string length ${len} runs past the end of the file`);
    const b = this.#need(len, w);
    const s = b.toString("utf8", this.pos - this.#bufStart, this.pos - this.#bufStart + len);
    this.pos += len;
    return s;
  }
}

function readScalar(c: Cursor, type: number, what: string): GgufScalar {
  switch (type) {
    case GgufValueType.UINT8: return c.u8(what);
    case GgufValueType.INT8: return c.i8(what);
    case GgufValueType.UINT16: return c.u16(what);
    case GgufValueType.INT16: return c.i16(what);
    case GgufValueType.UINT32: return c.u32(what);
    case GgufValueType.INT32: return c.i32(what);
    case GgufValueType.FLOAT32: return c.f32(what);
    case GgufValueType.BOOL: {
      const v = c.u8(what);
      if (v > 1) c.fail(`${what}: bool value ${v} is neither 0 nor 1`);
      return v === 1;
    }
    case GgufValueType.STRING: return c.str(what);
    case GgufValueType.UINT64: { const v = c.u64big(what); return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v; }
    case GgufValueType.INT64: {
      const v = c.i64big(what);
      return v <= BigInt(Number.MAX_SAFE_INTEGER) && v >= BigInt(Number.MIN_SAFE_INTEGER) ? Number(v) : v;
    }
    case GgufValueType.FLOAT64: return c.f64(what);
    default: return c.fail(`${what}: unknown value type ${type}`);
  }
}

function readArray(c: Cursor, what: string, depth: number): GgufArray {
  if (depth > MAX_ARRAY_DEPTH) c.fail(`${what}: arrays nested deeper than ${MAX_ARRAY_DEPTH}`);
  const elemType = c.u32(`${what} element type`);
  const count = c.u64(`${what} element count`);
  // smallest possible encoding of one element bounds the count by the bytes left
  const minSize = elemType === GgufValueType.STRING ? 8 : elemType === GgufValueType.ARRAY ? 12 : SCALAR_SIZE[elemType as GgufValueType];
  if (minSize === undefined) c.fail(`${what}: unknown array element type ${elemType}`);
  if (count * minSize > c.remaining()) c.fail(`${what}: ${count} elements cannot fit in the ${c.remaining()} bytes left`);
  if (elemType === GgufValueType.ARRAY) {
    const values: GgufArray[] = [];
    for (let i = 0; i < count; i++) values.push(readArray(c, `${what}[${i}]`, depth + 1));
    return { elemType: GgufValueType.ARRAY, values };
  }
  switch (elemType) {
    case GgufValueType.FLOAT32: { const a = new Float32Array(count); for (let i = 0; i < count; i++) a[i] = c.f32(what); return { elemType, values: a }; }
    case GgufValueType.INT32: { const a = new Int32Array(count); for (let i = 0; i < count; i++) a[i] = c.i32(what); return { elemType, values: a }; }
    case GgufValueType.UINT32: { const a = new Uint32Array(count); for (let i = 0; i < count; i++) a[i] = c.u32(what); return { elemType, values: a }; }
    case GgufValueType.UINT8: { const a = new Uint8Array(count); for (let i = 0; i < count; i++) a[i] = c.u8(what); return { elemType, values: a }; }
    case GgufValueType.INT8: { const a = new Int8Array(count); for (let i = 0; i < count; i++) a[i] = c.i8(what); return { elemType, values: a }; }
    case GgufValueType.STRING: { const values: string[] = new Array(count); for (let i = 0; i < count; i++) values[i] = c.strElem(what, i); return { elemType, values }; }
    default: {
      const values: GgufScalar[] = new Array(count);
      for (let i = 0; i < count; i++) values[i] = readScalar(c, elemType, `${what}[${i}]`);
      return { elemType: elemType as GgufValueType, values };
    }
  }
}

/** Parses a GGUF file's header, metadata and tensor infos (not the tensor data). */
export function readGguf(path: string): GgufFile {
  let fd: number;
  try { fd = openSync(path, "r"); } catch (e) { throw ioError("open", path, e); }
  try {
    const st = fstatSync(fd);
    if (st.isDirectory()) throw weftError("IO", `cannot read ${path}: it is a directory, not a GGUF file`);
    const size = st.size;
    const c = new Cursor(fd, size, path);
    if (size < 24) c.fail(`file is ${size} bytes, too short for a GGUF header`);
    const magic = c.u32("magic");
    if (magic !== GGUF_MAGIC) c.fail(`bad magic 0x${magic.toString(16)}: not a GGUF file`);
    const version = c.u32("version");
    if (version !== 2 && version !== 3) c.fail(`unsupported GGUF version ${version} (supported: 2, 3)`);
    const nTensors = c.u64("tensor count");
    const nKv = c.u64("metadata count");
    // each KV needs ≥ 8 (key len) + 4 (type) + 1 bytes; each tensor info ≥ 8 + 4 + 8 + 4 + 8
    if (nKv * 13 > c.remaining()) c.fail(`metadata count ${nKv} cannot fit in the file`);
    if (nTensors * 32 > c.remaining()) c.fail(`tensor count ${nTensors} cannot fit in the file`);

    const metadata = new Map<string, GgufValue>();
    for (let i = 0; i < nKv; i++) {
      const key = c.str(`metadata key #${i}`);
      if (metadata.has(key)) c.fail(`duplicate metadata key '${key}'`);
      const type = c.u32(`type of '${key}'`);
      if (type === GgufValueType.ARRAY) metadata.set(key, { type, value: readArray(c, `'${key}'`, 0) });
      else if (SCALAR_SIZE[type as GgufValueType] !== undefined || type === GgufValueType.STRING)
        metadata.set(key, { type: type as Exclude<GgufValueType, 9>, value: readScalar(c, type, `'${key}'`) });
      else c.fail(`'${key}' has unknown value type ${type}`);
    }

    let alignment = GGUF_DEFAULT_ALIGNMENT;
    const al = metadata.get("general.alignment");
    if (al) {
      if (al.type !== GgufValueType.UINT32 || typeof al.value !== "number" || al.value === 0 || (al.value & (al.value - 1)) !== 0)
        c.fail(`general.alignment must be a power-of-two u32, got ${String(al.value)}`);
      alignment = al.value as number;
    }

    const tensors: GgufTensorInfo[] = [];
    const names = new Set<string>();
    for (let i = 0; i < nTensors; i++) {
      const name = c.str(`tensor #${i} name`);
      if (names.has(name)) c.fail(`duplicate tensor name '${name}'`);
      names.add(name);
      const nDims = c.u32(`'${name}' dimension count`);
      if (nDims < 1 || nDims > MAX_DIMS) c.fail(`tensor '${name}' has ${nDims} dimensions (1 to ${MAX_DIMS} allowed)`);
      const ne: number[] = [];
      let nel = 1;
      for (let d = 0; d < nDims; d++) {
        const v = c.u64(`'${name}' ne[${d}]`);
        ne.push(v);
        nel *= v;
        if (nel > Number.MAX_SAFE_INTEGER) c.fail(`tensor '${name}' has too many elements`);
      }
      // any ggml type is read (weft info lists it); a model that needs one weft cannot run is refused by name at load
      const type = c.u32(`'${name}' type`);
      const g = GGML_TYPES[type];
      if (!g) c.fail(`tensor '${name}' has type id ${type}, which ggml does not define`);
      const offset = c.u64(`'${name}' offset`);
      if (ne[0]! % g.blockSize !== 0) c.fail(`tensor '${name}': row length ${ne[0]} is not a multiple of ${typeName(type)}'s block size ${g.blockSize}`);
      if (offset % alignment !== 0) c.fail(`tensor '${name}': offset ${offset} is not aligned to ${alignment}`);
      const nbytes = nel === 0 ? 0 : (ne[0]! / g.blockSize) * g.typeSize * (nel / ne[0]!);
      tensors.push({ name, type, ne, offset, nbytes });
    }
    const dataOffset = Math.ceil(c.pos / alignment) * alignment;
    if (nTensors > 0 && dataOffset > size) c.fail(`tensor data would start at ${dataOffset}, past the end of the file`);
    const dataSize = size - dataOffset;
    for (const t of tensors)
      if (t.offset + t.nbytes > dataSize) c.fail(`tensor '${t.name}' [${t.offset}, +${t.nbytes}) lies beyond the end of the file`);
    const sorted = [...tensors].sort((a, b) => a.offset - b.offset);
    for (let i = 1; i < sorted.length; i++) {
      const p = sorted[i - 1]!, q = sorted[i]!;
      if (p.offset + p.nbytes > q.offset) c.fail(`tensors '${p.name}' and '${q.name}' overlap`);
    }
    return { path, version, fileSize: size, alignment, dataOffset, metadata, tensors };
  } finally {
    closeSync(fd);
  }
}

/** Metadata lookup helpers with type checks that name the key. */
export function metaValue(f: GgufFile, key: string): GgufScalar | GgufArray | undefined {
  return f.metadata.get(key)?.value;
}
export function metaNumber(f: GgufFile, key: string): number | undefined {
  const v = f.metadata.get(key);
  if (!v) return undefined;
  if (typeof v.value !== "number") throw weftError("BAD_GGUF", `${f.path}: metadata '${key}' should be a number`);
  return v.value;
}
export function metaString(f: GgufFile, key: string): string | undefined {
  const v = f.metadata.get(key);
  if (!v) return undefined;
  if (typeof v.value !== "string") throw weftError("BAD_GGUF", `${f.path}: metadata '${key}' should be a string`);
  return v.value;
}
