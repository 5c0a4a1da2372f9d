/**
 * GGUF v3 writer: header, metadata (any value type), tensor infos, then the tensor data,
 * each tensor padded to the alignment as llama.cpp writes it. Tensors are streamed to the
 * file one at a time so a large model never sits in memory whole.
 */
import { closeSync, openSync, writeSync } from "node:fs";
import { weftError } from "../core/errors.js";
import { writeAtomically } from "../core/files.js";
import { GGML_TYPES, TYPES, isKnownType, typeName } from "../core/types.js";
import { GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GgufArray, GgufScalar, GgufValue, GgufValueType } from "./types.js";

export interface GgufTensorSpec {
  name: string;
  type: number;
  ne: number[];
  /** the tensor's bytes, or a function producing them when the tensor is written */
  data: Uint8Array | (() => Uint8Array);
}

class ByteWriter {
  #chunks: Buffer[] = [];
  length = 0;
  #push(b: Buffer) { this.#chunks.push(b); this.length += b.length; }
  u8(v: number) { const b = Buffer.alloc(1); b.writeUInt8(v); this.#push(b); }
  i8(v: number) { const b = Buffer.alloc(1); b.writeInt8(v); this.#push(b); }
  u16(v: number) { const b = Buffer.alloc(2); b.writeUInt16LE(v); this.#push(b); }
  i16(v: number) { const b = Buffer.alloc(2); b.writeInt16LE(v); this.#push(b); }
  u32(v: number) { const b = Buffer.alloc(4); b.writeUInt32LE(v); this.#push(b); }
  i32(v: number) { const b = Buffer.alloc(4); b.writeInt32LE(v); this.#push(b); }
  f32(v: number) { const b = Buffer.alloc(4); b.writeFloatLE(v); this.#push(b); }
  f64(v: number) { const b = Buffer.alloc(8); b.writeDoubleLE(v); this.#push(b); }
  u64(v: number | bigint) { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(v)); this.#push(b); }
  i64(v: number | bigint) { const b = Buffer.alloc(8); b.writeBigInt64LE(BigInt(v)); this.#push(b); }
  str(s: string) { const b = Buffer.from(s, "utf8"); this.u64(b.length); this.#push(b); }
  pad(align: number) { const n = (align - (this.length % align)) % align; if (n) this.#push(Buffer.alloc(n)); }
  bytes(): Buffer { return Buffer.concat(this.#chunks); }
}

function writeScalar(w: ByteWriter, type: number, v: GgufScalar, key: string): void {
  const num = () => { if (typeof v !== "number") throw weftError("BAD_ARGUMENT", `metadata '${key}': expected a number`); return v; };
  switch (type) {
    case GgufValueType.UINT8: return w.u8(num());
    case GgufValueType.INT8: return w.i8(num());
    case GgufValueType.UINT16: return w.u16(num());
    case GgufValueType.INT16: return w.i16(num());
    case GgufValueType.UINT32: return w.u32(num());
    case GgufValueType.INT32: return w.i32(num());
    case GgufValueType.FLOAT32: return w.f32(num());
    case GgufValueType.FLOAT64: return w.f64(num());
    case GgufValueType.BOOL: return w.u8(v ? 1 : 0);
    case GgufValueType.STRING: if (typeof v !== "string") throw weftError("BAD_ARGUMENT", `metadata '${key}': expected a string`); return w.str(v);
    case GgufValueType.UINT64: return w.u64(v as number | bigint);
    case GgufValueType.INT64: return w.i64(v as number | bigint);
    default: throw weftError("BAD_ARGUMENT", `metadata '${key}': unknown value type ${type}`);
  }
}

function writeArray(w: ByteWriter, a: GgufArray, key: string): void {
  w.u32(a.elemType);
  w.u64(a.values.length);
  if (a.elemType === GgufValueType.ARRAY) for (const x of a.values as readonly GgufArray[]) writeArray(w, x, key);
  else for (let i = 0; i < a.values.length; i++) writeScalar(w, a.elemType, (a.values as ArrayLike<GgufScalar>)[i]!, key);
}

export interface WriteGgufOptions {
  alignment?: number;
  /** stops the write between tensors (the file is then removed, the target untouched) */
  signal?: AbortSignal;
}

/**
 * Writes a GGUF file, a tensor at a time (the event loop gets a turn between tensors), to
 * a temporary beside `path` that is renamed into place when complete (lib/core/files.ts).
 */
export async function writeGguf(path: string, metadata: Map<string, GgufValue> | Iterable<[string, GgufValue]>, tensors: GgufTensorSpec[], opts: WriteGgufOptions = {}): Promise<void> {
  const alignment = opts.alignment ?? GGUF_DEFAULT_ALIGNMENT;
  const meta = new Map(metadata);
  if (alignment !== GGUF_DEFAULT_ALIGNMENT) meta.set("general.alignment", { type: GgufValueType.UINT32, value: alignment });
  const h = new ByteWriter();
  h.u32(GGUF_MAGIC);
  h.u32(3);
  h.u64(tensors.length);
  h.u64(meta.size);
  for (const [key, v] of meta) {
    h.str(key);
    h.u32(v.type);
    if (v.type === GgufValueType.ARRAY) writeArray(h, v.value, key);
    else writeScalar(h, v.type, v.value, key);
  }
  let offset = 0;
  const sizes: number[] = [];
  for (const t of tensors) {
    // any ggml type can be stored (its bytes are given); weft itself writes only the ones it computes with
    const g = GGML_TYPES[t.type];
    if (!g || (isKnownType(t.type) && !TYPES[t.type].weight)) throw weftError("UNSUPPORTED_TYPE", `tensor '${t.name}': type ${typeName(t.type)} cannot be stored`);
    if (t.ne[0]! % g.blockSize !== 0) throw weftError("BAD_ARGUMENT", `tensor '${t.name}': row length ${t.ne[0]} is not a multiple of ${typeName(t.type)}'s block size ${g.blockSize}`);
    if (t.ne.length < 1 || t.ne.length > 4) throw weftError("BAD_ARGUMENT", `tensor '${t.name}': 1 to 4 dimensions`);
    const nbytes = (t.ne[0]! / g.blockSize) * g.typeSize * t.ne.slice(1).reduce((p, x) => p * x, 1);
    sizes.push(nbytes);
    h.str(t.name);
    h.u32(t.ne.length);
    for (const d of t.ne) h.u64(d);
    h.u32(t.type);
    h.u64(offset);
    offset += Math.ceil(nbytes / alignment) * alignment;
  }
  h.pad(alignment);
  await writeAtomically(path, async (tmp) => {
    const fd = openSync(tmp, "w");
    try {
      writeSync(fd, h.bytes());
      for (const [i, t] of tensors.entries()) {
        opts.signal?.throwIfAborted();
        const data = typeof t.data === "function" ? t.data() : t.data;
        if (data.byteLength !== sizes[i]) throw weftError("BAD_ARGUMENT", `tensor '${t.name}': ${data.byteLength} bytes given, ${sizes[i]} expected`);
        writeSync(fd, data);
        const pad = (alignment - (data.byteLength % alignment)) % alignment;
        if (pad) writeSync(fd, Buffer.alloc(pad));
        await new Promise((r) => setImmediate(r));
      }
      opts.signal?.throwIfAborted();
    } finally {
      closeSync(fd);
    }
  });
}
