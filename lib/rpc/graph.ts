/**
 * Graphs on the wire: every tensor in execution order, each as op, type, shape, strides,
 * place (the client's buffer id and byte offset), source indices and op params. The
 * client encodes a graph once per uid; the server decodes it into tensors over its own
 * buffers, checking everything it can before the native decoder checks the rest (shapes
 * per op, repacked reads, extents).
 */
import { WeftError, weftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { OPS, OP_NAMES, Op, OpName } from "../core/ops.js";
import { Tensor, tensorExtent } from "../core/tensor.js";
import { GgmlType, TYPES, isKnownType, typeName } from "../core/types.js";
import { Reader, Writer, protocolError } from "./protocol.js";

const MAX_SRC = 3;
const MAX_PARAMS = 16;
/** most tensors in one graph (a 100-layer model's step has a few thousand) */
export const MAX_GRAPH_TENSORS = 1 << 16;

/** Encodes a graph; `place` gives each tensor's buffer id and offset on the server. */
export function encodeGraph(graph: Graph, place: (t: Tensor) => { id: number; offset: number }): Uint8Array {
  const order = graph.order;
  const index = new Map(order.map((t, i) => [t, i]));
  const w = new Writer().u32(order.length);
  for (const t of order) {
    if (t.params.length > MAX_PARAMS || t.src.length > MAX_SRC) throw weftError("BAD_ARGUMENT", `${t.describe()} has too many params or sources to send`);
    w.u16(t.op).u16(t.type);
    for (let k = 0; k < 4; k++) w.u64(t.ne[k]!);
    for (let k = 0; k < 4; k++) w.u64(t.nb[k]!);
    const p = place(t);
    w.u32(p.id).u64(p.offset);
    for (let k = 0; k < MAX_SRC; k++) w.i32(k < t.src.length ? index.get(t.src[k]!)! : -1);
    w.u8(t.params.length);
    for (const x of t.params) w.f64(x);
  }
  return w.body();
}

/** What the server knows of a client's buffer. */
export interface WireBuffer { readonly buffer: object; readonly size: number }

/** One tensor of a graph (decodeGraph); `i` names it in errors. */
function decodeTensor(
  r: Reader, i: number, order: readonly Tensor[], buffers: Set<number>, bufferOf: (id: number) => WireBuffer, allowed: (op: Op) => boolean,
  mapParams: (op: Op, params: number[], what: string) => number[],
): Tensor {
  const op = r.u16("op");
  const name = OP_NAMES[op] as OpName | undefined;
  if (name === undefined) throw protocolError(`tensor ${i}: unknown op id ${op}`);
  if (!allowed(op as Op)) throw weftError("UNSUPPORTED_OP", `tensor ${i}: this server does not run ${name}`);
  const type = r.u16("type");
  if (!isKnownType(type)) throw weftError("UNSUPPORTED_TYPE", `tensor ${i}: tensor type ${typeName(type)} is not supported`);
  const ne: [number, number, number, number] = [r.u64("ne[0]"), r.u64("ne[1]"), r.u64("ne[2]"), r.u64("ne[3]")];
  const nb: [number, number, number, number] = [r.u64("nb[0]"), r.u64("nb[1]"), r.u64("nb[2]"), r.u64("nb[3]")];
  const id = r.u32("buffer");
  const offset = r.u64("offset");
  const src: Tensor[] = [];
  for (let k = 0; k < MAX_SRC; k++) {
    const s = r.i32("source");
    if (s === -1) continue;
    if (s < 0 || s >= i) throw protocolError(`tensor ${i}: source ${k} is tensor ${s}, which does not come before it`);
    if (src.length !== k) throw protocolError(`tensor ${i}: source ${k} follows an empty one`);
    src.push(order[s]!);
  }
  const np = r.u8("param count");
  if (np > MAX_PARAMS) throw protocolError(`tensor ${i}: ${np} params, at most ${MAX_PARAMS}`);
  const params: number[] = [];
  for (let k = 0; k < np; k++) params.push(r.f64("param"));
  const [lo, hi] = OPS[name].srcs;
  if (src.length < lo || src.length > hi) throw protocolError(`tensor ${i}: ${name} takes ${lo}..${hi} sources, got ${src.length}`);
  const tr = TYPES[type as GgmlType];
  if (ne[0] % tr.blockSize !== 0) throw protocolError(`tensor ${i}: row length ${ne[0]} is not a multiple of ${tr.name}'s block size`);
  let count = 1;
  for (const x of ne) count *= x;
  if (!Number.isSafeInteger(count)) throw protocolError(`tensor ${i}: too many elements`);
  const extent = tensorExtent(type as GgmlType, ne, nb);
  const b = bufferOf(id);
  if (!Number.isSafeInteger(extent) || offset + extent > b.size)
    throw weftError("OUT_OF_RANGE", `tensor ${i} (${name}): bytes [${offset}, +${extent}) lie outside buffer ${id} (${b.size} bytes)`);
  const t = new Tensor({ type: type as GgmlType, ne, nb, op: op as Op, params: mapParams(op as Op, params, `tensor ${i} (${name})`), src });
  t.buffer = b.buffer;
  t.offset = offset;
  buffers.add(id);
  return t;
}

/**
 * Decodes a graph. `bufferOf` returns the client's buffer of an id (or throws); `allowed`
 * says which ops the device may run. Throws RPC_PROTOCOL (malformed), UNSUPPORTED_OP /
 * UNSUPPORTED_TYPE or OUT_OF_RANGE (a tensor outside its buffer) naming the tensor.
 */
export function decodeGraph(
  r: Reader, bufferOf: (id: number) => WireBuffer, allowed: (op: Op) => boolean,
  mapParams: (op: Op, params: number[], what: string) => number[] = (_, p) => p,
): { graph: Graph; buffers: Set<number> } {
  const n = r.u32("tensor count");
  if (n === 0 || n > MAX_GRAPH_TENSORS) throw weftError("RPC_LIMIT", `a graph of ${n} tensors (1 to ${MAX_GRAPH_TENSORS} allowed)`);
  const order: Tensor[] = [];
  const buffers = new Set<number>();
  for (let i = 0; i < n; i++) {
    try { order.push(decodeTensor(r, i, order, buffers, bufferOf, allowed, mapParams)); } catch (e) {
      // a field the frame lacks or has out of range: named with its tensor (the readers'
      // labels are constant, so that a graph's thousands of fields build no strings)
      if (e instanceof WeftError && e.code === "RPC_PROTOCOL" && !e.message.startsWith("tensor ")) throw protocolError(`tensor ${i} ${e.message}`);
      throw e;
    }
  }
  r.end("graph");
  return { graph: new Graph(order, { inOrder: true }), buffers };
}
