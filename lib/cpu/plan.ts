/**
 * Encodes a graph into the flat record array the native backend decodes (csrc/graph.h:
 * REC doubles per tensor). Done once per graph uid; later steps send only the uid.
 */
import { weftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { tensorLocation } from "./buffer.js";

export const REC = 36;
/** R_FLAGS bit: the tensor is in a repacked weight buffer (csrc/graph.h F_REPACKED) */
const F_REPACKED = 1;
const R_OP = 0, R_TYPE = 1, R_NE = 2, R_NB = 6, R_BUF = 10, R_OFFS = 11, R_SRC = 12, R_FLAGS = 15, R_NPARAMS = 16, R_PARAMS = 17, MAX_PARAMS = 16;

export function encodePlan(graph: Graph): Float64Array {
  const order = graph.order;
  const index = new Map(order.map((t, i) => [t, i]));
  const rec = new Float64Array(order.length * REC);
  order.forEach((t, i) => {
    const r = i * REC;
    rec[r + R_OP] = t.op;
    rec[r + R_TYPE] = t.type;
    for (let k = 0; k < 4; k++) { rec[r + R_NE + k] = t.ne[k]!; rec[r + R_NB + k] = t.nb[k]!; }
    const loc = tensorLocation(t);
    rec[r + R_BUF] = loc.buffer.id;
    rec[r + R_OFFS] = loc.offset;
    rec[r + R_FLAGS] = loc.buffer.repacked ? F_REPACKED : 0;
    for (let k = 0; k < 3; k++) rec[r + R_SRC + k] = k < t.src.length ? index.get(t.src[k]!)! : -1;
    if (t.params.length > MAX_PARAMS) throw weftError("BAD_ARGUMENT", `too many op params on ${t.describe()}`);
    rec[r + R_NPARAMS] = t.params.length;
    t.params.forEach((p, k) => { rec[r + R_PARAMS + k] = p; });
  });
  return rec;
}
