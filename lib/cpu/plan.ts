/**
 * Encodes a graph into the flat record array the native backend decodes (lib/cpu/layout.ts,
 * checked against csrc/graph.h at load). Done once per graph uid; later steps send only the uid.
 */
import { weftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { cpuPlace } from "./buffer.js";
import { PLAN_LAYOUT as L } from "./layout.js";

export function encodePlan(graph: Graph): Float64Array {
  const order = graph.order;
  const index = new Map(order.map((t, i) => [t, i]));
  const rec = new Float64Array(order.length * L.REC);
  order.forEach((t, i) => {
    const r = i * L.REC;
    rec[r + L.R_OP] = t.op;
    rec[r + L.R_TYPE] = t.type;
    for (let k = 0; k < 4; k++) { rec[r + L.R_NE + k] = t.ne[k]!; rec[r + L.R_NB + k] = t.nb[k]!; }
    const loc = cpuPlace(t);
    rec[r + L.R_BUF] = loc.buffer.id;
    rec[r + L.R_OFFS] = loc.offset;
    rec[r + L.R_FLAGS] = loc.buffer.repacked ? L.F_REPACKED : 0;
    for (let k = 0; k < L.MAX_SRC; k++) rec[r + L.R_SRC + k] = k < t.src.length ? index.get(t.src[k]!)! : -1;
    if (t.params.length > L.MAX_PARAMS) throw weftError("BAD_ARGUMENT", `too many op params on ${t.describe()}`);
    rec[r + L.R_NPARAMS] = t.params.length;
    t.params.forEach((p, k) => { rec[r + L.R_PARAMS + k] = p; });
  });
  return rec;
}
