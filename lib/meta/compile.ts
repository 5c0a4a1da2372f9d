/**
 * Compiles a graph on a meta device into what its devices run (DESIGN §7). Every tensor
 * gets a split state (leaves from where they were placed, nodes from lib/split/rules.ts)
 * and a tensor on each device, built with the ordinary graph builders on that device's
 * operands; where a rule needs a source in another state the conversion is inserted:
 * PARTIAL → MIRRORED is an all-reduce, AXIS → MIRRORED an all-gather, MIRRORED → AXIS a
 * local view. Each device's graph is then planned in its own memory (a device holds only
 * its share). Two ways to combine partials, one answer:
 *  - collective: each device runs its whole graph once per step with ALL_REDUCE nodes, and
 *    the devices exchange partials among themselves (a shared communicator);
 *  - generic: each device's graph is cut at the ALL_REDUCE nodes into segments, and the
 *    meta backend exchanges partials between segments with copies and small ADD graphs
 *    (reduce-scatter, then all-gather: two rounds whatever the device count).
 * Both add the ranks' partials in the same binary-tree order, so every device holds the
 * same bits and the two ways agree bit for bit.
 */
import { weftError, WeftError } from "../core/errors.js";
import * as G from "../core/graph.js";
import { Graph } from "../core/graph.js";
import { Op, OpName, VIEW_OPS, opName } from "../core/ops.js";
import { Tensor, TensorFlag } from "../core/tensor.js";
import { GgmlType, TYPES } from "../core/types.js";
import type { Buffer, CollectiveGroup } from "../backend/interface.js";
import { allocGraph, applyGraphAllocation, planGraphAllocation } from "../backend/alloc.js";
import { collectiveGroup, tensorPlace } from "../backend/fallback.js";
import { SPLIT_RULES, refuse } from "../split/rules.js";
import { MIRRORED, SplitState, axisOffset, axisSize, describeState, isAxis, localShape, sameState } from "../split/state.js";
import { splitView } from "../split/view.js";
import type { MetaBuffer, Part } from "./buffer.js";
import type { MetaDevice } from "./device.js";

/** One collective of the step: per device, the partial (or slice) in and the result out. */
interface Collective {
  readonly kind: "sum" | "gather" | "scatter";
  readonly ins: readonly Tensor[];
  readonly outs: readonly Tensor[];
  /** gather, scatter: the axis the slices are cut along */
  readonly axis?: number;
}

/** A copy between two devices of the meta device (by index). */
export interface Copy { readonly from: number; readonly to: number; readonly src: Tensor; readonly dst: Tensor }

/**
 * The generic path's program, in queue order: computes of a device's graph, copies
 * between devices, and barriers (every device waits for every other's queue: a device
 * must not reuse memory another device still has to copy from).
 */
export type Step = { readonly device: number; readonly graph: Graph } | { readonly copy: Copy } | { readonly barrier: true };

export interface Program {
  readonly path: "collective" | "generic";
  /** per device, the whole step (the collective path runs these) */
  readonly graphs: readonly Graph[];
  /** the generic path's steps: each device's segments, with the exchanges between them */
  readonly steps: readonly Step[];
  readonly group: CollectiveGroup | null;
  /** the first failure of a run: a collective group is unusable after one */
  failure: WeftError | null;
  dispose(): void;
}

type Build = (n: Tensor, s: readonly Tensor[], d: number, view: () => { ne: number[]; nb: number[]; offset: number }) => Tensor;

/** How each op is rebuilt on a device from that device's operands (views: from their local layout). */
const LOCAL_BUILD: Record<OpName, Build> = {
  NONE: (n) => { throw weftError("BAD_ARGUMENT", `leaf ${n.describe()} is not rebuilt`); },
  GET_ROWS: (_, [a, i]) => G.getRows(a!, i!),
  MUL_MAT: (_, [a, b]) => G.mulMat(a!, b!),
  ADD: (_, [a, b]) => G.add(a!, b!),
  MUL: (_, [a, b]) => G.mul(a!, b!),
  SCALE: (n, [a]) => G.scale(a!, n.params[0]!, n.params[1]!),
  RMS_NORM: (n, [a]) => G.rmsNorm(a!, n.params[0]!),
  ROPE: (n, [a, p]) => G.rope(a!, p!, { nDims: n.params[0]!, mode: n.params[1]!, freqBase: n.params[2]!, freqScale: n.params[3]!, attnFactor: n.params[4]! }),
  SOFT_MAX: (n, [a, m]) => G.softMax(a!, m ?? null, n.params[0]!),
  CPY: (_, [a, b]) => G.cpy(a!, b!),
  CONT: (n, [a]) => G.cont(a!, n.type),
  VIEW: (_, [a], __, view) => { const v = view(); return G.view(a!, v.ne, v.offset - a!.root().offset, v.nb.slice(1)); },
  RESHAPE: (_, [a], __, view) => G.reshape(a!, view().ne),
  PERMUTE: (n, [a]) => G.permute(a!, n.params as [number, number, number, number]),
  TRANSPOSE: (_, [a]) => G.transpose(a!),
  SET_ROWS: (_, [src, idx, dst]) => G.setRows(dst!, src!, idx!),
  UNARY: (n, [a]) => G.unary(a!, n.params[0] as 0),
  GLU: (n, [a, b]) => G.glu(a!, b ?? null, n.params[0] as 0, n.params[1] === 1),
  FLASH_ATTN_EXT: (n) => { throw weftError("UNSUPPORTED_OP", `${n.describe()} has no split rule`); },
  ALL_REDUCE: (n) => { throw weftError("UNSUPPORTED_OP", `${n.describe()}: collectives are inserted by the meta backend`); },
};

/** Bytes from the start of a whole tensor to index `at` of axis k (quant blocks whole). */
function axisByteOffset(t: Tensor, axis: number, at: number): number {
  const tr = TYPES[t.type];
  return axis === 0 ? (at / tr.blockSize) * tr.typeSize : at * t.nb[axis]!;
}

/** A leaf over another tensor's memory (segments and exchanges read placed tensors through these). */
function aliasOf(t: Tensor, name = t.name, ne: readonly number[] = t.ne, byteOffset = 0): Tensor {
  const at = tensorPlace(t);
  const a = ne === t.ne ? new Tensor({ type: t.type, ne: [...t.ne], nb: [...t.nb], name }) : G.newTensor(t.type, ne, name);
  a.buffer = at.buffer;
  a.offset = at.offset + byteOffset;
  return a;
}

export function compileGraph(graph: Graph, meta: MetaDevice, out: MetaBuffer): Program {
  const n = meta.size;
  let group: CollectiveGroup | null = null;
  if (meta.allReduce !== "generic") {
    group = collectiveGroup(meta.devices, { allReduceType: meta.allReduceType });
    if (!group && meta.allReduce === "collective")
      throw weftError("UNSUPPORTED_OP", `${meta.name}: its devices share no communicator, so allReduce "collective" cannot be used (use "generic" or "auto")`);
  }
  const gid = group?.id ?? 0;
  const parts = new Map<Tensor, Part>();
  const part = (t: Tensor): Part => {
    const p = parts.get(t);
    if (!p) throw weftError("BAD_ARGUMENT", `meta compile: ${t.describe()} is used before it is computed`);
    return p;
  };
  const ctx = { n, state: (t: Tensor) => part(t).state };
  const collectives: Collective[] = [];
  const cache = new Map<Tensor, Map<string, Part>>();
  const each = <T>(f: (d: number) => T): T[] => Array.from({ length: n }, (_, d) => f(d));
  const contiguous = (l: Tensor) => (l.isContiguous ? l : G.cont(l));

  const reduce = (p: Part): Part => {
    const ins = p.locals.map(contiguous);
    const outs = each((d) => G.allReduce(ins[d]!, gid, d));
    collectives.push({ kind: "sum", ins, outs });
    return { state: MIRRORED, locals: outs };
  };
  const gather = (t: Tensor, p: Part): Part => {
    const s = p.state as Extract<SplitState, { kind: "AXIS" }>;
    if (s.segments.length > 1) throw weftError("UNSUPPORTED_OP", `cannot gather ${t.describe()}: it is cut in ${s.segments.length} segments`);
    if (t.type !== GgmlType.F32) throw weftError("UNSUPPORTED_OP", `cannot gather ${t.describe()}: only F32 results are gathered`);
    const ins = p.locals.map(contiguous);
    const outs = each((d) => G.allGather(ins[d]!, t.ne, s.axis, axisOffset(s, d), gid, d));
    collectives.push({ kind: "gather", ins, outs, axis: s.axis });
    return { state: MIRRORED, locals: outs };
  };
  /** PARTIAL straight to one cut: each device sums only its slice (its slice must be
   * contiguous in the whole tensor: the cut axis is the outermost one) */
  const scatter = (t: Tensor, p: Part, want: Extract<SplitState, { kind: "AXIS" }>): Part | null => {
    if (want.segments.length > 1 || t.ne.slice(want.axis + 1).some((v) => v !== 1)) return null;
    const ins = p.locals.map(contiguous);
    // every rank's bounds (where they fit in a node's params): ranks in other processes then exchange slices only
    const bounds = n <= 8 ? [...each((d) => axisOffset(want, d)), t.ne[want.axis]!] : [];
    const outs = each((d) => G.reduceScatter(ins[d]!, want.axis, axisOffset(want, d), axisSize(want, d), gid, d, bounds));
    collectives.push({ kind: "scatter", ins, outs, axis: want.axis });
    return { state: want, locals: outs };
  };
  const slice = (t: Tensor, p: Part, want: Extract<SplitState, { kind: "AXIS" }>): Part => {
    if (want.segments.length > 1) throw weftError("UNSUPPORTED_OP", `cannot cut ${t.describe()} into ${describeState(want)}: several segments`);
    return {
      state: want,
      locals: each((d) => {
        const l = p.locals[d]!;
        return G.view(l, localShape(t.ne, want, d), axisByteOffset(t, want.axis, axisOffset(want, d)), l.nb.slice(1));
      }),
    };
  };
  /** t as the state `want` (cached: consumers share one collective) */
  const convert = (t: Tensor, want: SplitState): Part => {
    let p = part(t);
    if (sameState(p.state, want)) return p;
    const key = describeState(want);
    const hit = cache.get(t)?.get(key);
    if (hit) return hit;
    if (want.kind === "PARTIAL") throw weftError("UNSUPPORTED_OP", `${t.describe()} cannot be made a partial sum`);
    if (p.state.kind === "PARTIAL" && isAxis(want)) {
      const r = scatter(t, p, want);
      if (r) {
        if (!cache.has(t)) cache.set(t, new Map());
        cache.get(t)!.set(key, r);
        return r;
      }
    }
    if (p.state.kind === "PARTIAL") p = cache.get(t)?.get("MIRRORED") ?? reduce(p);
    else if (isAxis(p.state)) p = cache.get(t)?.get("MIRRORED") ?? gather(t, p);
    if (!cache.has(t)) cache.set(t, new Map());
    cache.get(t)!.set("MIRRORED", p);
    const r = isAxis(want) ? slice(t, p, want) : p;
    cache.get(t)!.set(key, r);
    return r;
  };

  for (const t of graph.order) {
    if (t.op === Op.NONE) {
      if (t.buffer) {
        const b = t.buffer as Buffer;
        if (b.bufferType.device !== meta) throw weftError("BAD_ARGUMENT", `${t.describe()} lies on ${b.bufferType.device.name}, not on ${meta.name}: copy it in first`);
        parts.set(t, (b as MetaBuffer).part(t));
      } else {
        parts.set(t, { state: MIRRORED, locals: each(() => { const l = new Tensor({ type: t.type, ne: [...t.ne], name: t.name }); l.flags = TensorFlag.INPUT; return l; }) });
      }
      continue;
    }
    const rule = SPLIT_RULES[opName(t.op)](t, ctx);
    const srcs = t.src.map((s, i) => (rule.need?.[i] ? convert(s, rule.need[i]!) : part(s)).locals);
    let view: ReturnType<typeof splitView> | null = null;
    const viewOf = (d: number) => {
      // a view of a gathered source: the same view of the whole, contiguous copy
      if (VIEW_OPS.has(t.op) && rule.need?.[0]) return { ne: t.ne, nb: t.nb, offset: srcs[0]![d]!.root().offset + t.viewOffs };
      view ??= splitView(t, t.root().tensor, part(t.root().tensor).state, t.root().offset, n);
      return view.local(d);
    };
    const build = LOCAL_BUILD[opName(t.op)];
    let locals: Tensor[];
    try {
      locals = each((d) => build(t, srcs.map((s) => s[d]!), d, () => viewOf(d)).setName(t.name));
    } catch (e) {
      if (e instanceof WeftError && e.code === "SHAPE_MISMATCH") refuse(t, ctx, `on a device its operands do not fit: ${e.message}`);
      throw e;
    }
    parts.set(t, { state: rule.state, locals });
  }
  // outputs are read whole: partial sums are reduced first
  const outputs = graph.order.filter((t) => t.flags & TensorFlag.OUTPUT && t.op !== Op.NONE);
  for (const t of outputs) if (part(t).state.kind === "PARTIAL") parts.set(t, convert(t, MIRRORED));
  const graphs = each((d) => {
    const outs = outputs.map((t) => part(t).locals[d]!.setOutput());
    return new Graph(outs.length ? outs : [part(graph.nodes[graph.nodes.length - 1]!).locals[d]!]);
  });
  let steps: Step[] = [];
  try {
    // (what `out` owns is freed by the caller if this fails)
    graphs.forEach((g, d) => out.own(allocGraph(meta.devices[d]!.bufferType(), g)));
    if (!group) steps = genericSteps(meta, graphs, collectives, out);
  } catch (e) {
    group?.dispose();
    throw e;
  }
  // the meta graph's own tensors: inputs and nodes, read and written through their locals
  for (const t of graph.order) if (!t.buffer && !t.viewSrc) out.register(t, part(t));
  return { path: group ? "collective" : "generic", graphs, steps, group, failure: null, dispose() { group?.dispose(); } };
}

/** Clones a run of a device's nodes into a graph of its own; tensors from outside it are read in place. */
function segmentGraph(nodes: readonly Tensor[]): Graph | null {
  if (!nodes.length) return null;
  const clones = new Map<Tensor, Tensor>();
  const get = (t: Tensor): Tensor => {
    const c = clones.get(t);
    if (c) return c;
    if (t.op === Op.NONE) return t;
    const a = aliasOf(t);  // computed in an earlier segment: its memory stays (planned for the whole step)
    clones.set(t, a);
    return a;
  };
  for (const t of nodes) {
    const c = new Tensor({
      type: t.type, ne: [...t.ne], nb: [...t.nb], op: t.op, params: t.params, src: t.src.map(get),
      viewSrc: t.viewSrc ? get(t.viewSrc) : null, viewOffs: t.viewOffs, name: t.name,
    });
    c.buffer = t.buffer;  // where the whole step's plan put it
    c.offset = t.offset;
    clones.set(t, c);
  }
  return new Graph(nodes.filter((t) => !VIEW_OPS.has(t.op)).map((t) => clones.get(t)!));
}

/** The binary tree of ADDs in which every path sums the ranks' partials (csrc/graph.cpp tree_sum). */
function treeSum(terms: readonly Tensor[], lo = 0, hi = terms.length): Tensor {
  if (hi - lo === 1) return terms[lo]!;
  let h = 1;
  while (h * 2 < hi - lo) h *= 2;
  return G.add(treeSum(terms, lo, lo + h), treeSum(terms, lo + h, hi));
}

/** Cuts each device's graph at its collectives and builds the exchanges between the segments. */
function genericSteps(meta: MetaDevice, graphs: readonly Graph[], collectives: readonly Collective[], out: MetaBuffer): Step[] {
  const n = meta.size;
  const isCollective = new Set(collectives.flatMap((c) => c.outs));
  // each device's nodes in order, cut at its collectives (the same order on every device)
  const cuts = graphs.map((g) => {
    const segs: Tensor[][] = [[]];
    const order: Tensor[] = [];
    for (const t of g.nodes) {
      if (isCollective.has(t)) { order.push(t); segs.push([]); } else segs[segs.length - 1]!.push(t);
    }
    return { segs, order };
  });
  const byOut = new Map(collectives.flatMap((c) => c.outs.map((o) => [o, c] as const)));
  const sequence = cuts[0]!.order.map((o) => byOut.get(o)!);
  cuts.forEach((c, d) => {
    if (c.order.some((o, i) => byOut.get(o) !== sequence[i]))
      throw weftError("BAD_ARGUMENT", `meta compile: device ${meta.devices[d]!.name} meets the collectives in another order`);
  });
  // scratch per device: what the largest exchange receives
  const F32 = GgmlType.F32;
  const chunk = (L: number, c: number) => [Math.floor((L * c) / n), Math.floor((L * (c + 1)) / n)] as const;
  const up = (x: number) => Math.ceil(x / 64) * 64;
  const need = Array<number>(n).fill(0);
  for (const c of sequence) for (let to = 0; to < n; to++) {
    let bytes = 0;
    for (let from = 0; from < n; from++) {
      if (from === to) continue;
      if (c.kind === "sum") { const [a, b] = chunk(c.outs[0]!.nelements, to); bytes += up((b - a) * 4); }
      else if (c.kind === "scatter") bytes += up(c.outs[to]!.nbytes);
      else bytes += up(c.ins[from]!.nbytes);
    }
    need[to] = Math.max(need[to]!, bytes);
  }
  const scratch = need.map((bytes, d) => { const b = meta.devices[d]!.bufferType().alloc(bytes); out.own(b); return b; });
  const slot = (d: number, at: number, ne: readonly number[]) => {
    const t = G.newTensor(F32, ne, `exchange@${meta.devices[d]!.name}`);
    t.buffer = scratch[d]!;
    t.offset = at;
    return t;
  };
  const steps: Step[] = [];
  const combines: Graph[][] = meta.devices.map(() => []);
  const computeAll = (graphs: ReadonlyArray<Graph | null>) => graphs.forEach((graph, device) => { if (graph) steps.push({ device, graph }); });
  sequence.forEach((c, i) => {
    computeAll(cuts.map((x) => segmentGraph(x.segs[i]!)));
    const copiesIn: Copy[] = [], copiesOut: Copy[] = [];
    const combine = meta.devices.map((_, to) => {
      let at = 0;
      if (c.kind === "sum") {
        const [a, b] = chunk(c.outs[0]!.nelements, to), len = b - a;
        if (len === 0) return null;
        const terms = meta.devices.map((__, from) => {
          if (from === to) return aliasOf(c.ins[to]!, "own", [len], a * 4);
          const dst = slot(to, at, [len]);
          at += up(len * 4);
          copiesIn.push({ from, to, src: aliasOf(c.ins[from]!, "partial", [len], a * 4), dst });
          return dst;
        });
        for (let other = 0; other < n; other++)
          if (other !== to) copiesOut.push({ from: to, to: other, src: aliasOf(c.outs[to]!, "sum", [len], a * 4), dst: aliasOf(c.outs[other]!, "sum", [len], a * 4) });
        return new Graph([G.cpy(treeSum(terms), aliasOf(c.outs[to]!, "sum", [len], a * 4))]);
      }
      if (c.kind === "scatter") {
        // this device's slice of every device's partial, summed into its own result
        const mine = c.outs[to]!, len = mine.nelements;
        if (len === 0) return null;
        const at0 = (mine.params[5]! * mine.params[3]!) * 4;  // the slice's first byte in the whole tensor
        const terms = meta.devices.map((__, from) => {
          if (from === to) return aliasOf(c.ins[to]!, "own", [len], at0);
          const dst = slot(to, at, [len]);
          at += up(len * 4);
          copiesIn.push({ from, to, src: aliasOf(c.ins[from]!, "partial", [len], at0), dst });
          return dst;
        });
        return new Graph([G.cpy(treeSum(terms), aliasOf(mine, "slice", [len]))]);
      }
      // gather: every slice into this device's whole tensor
      const whole = aliasOf(c.outs[to]!), axis = c.axis!;
      const cpys = meta.devices.map((__, from) => {
        const part = c.ins[from]!;
        let src = aliasOf(part);  // read in place (the node itself would pull its whole graph in)
        if (from !== to) {
          if (part.nbytes === 0) return null;
          src = slot(to, at, part.ne);
          at += up(part.nbytes);
          copiesIn.push({ from, to, src: part, dst: src });
        }
        const off = c.outs[from]!.params[5]!;
        return G.cpy(src, G.view(whole, part.ne, off * whole.nb[axis]!, whole.nb.slice(1)));
      }).filter((x): x is Tensor => x !== null);
      return new Graph(cpys);
    });
    combine.forEach((g, d) => { if (g) combines[d]!.push(g); });
    // reduce-scatter, then all-gather: every device's chunk in, combined, sent back out
    steps.push(...copiesIn.map((copy) => ({ copy })));
    computeAll(combine);
    steps.push(...copiesOut.map((copy) => ({ copy })));
    if (copiesIn.length || copiesOut.length) steps.push({ barrier: true });
  });
  computeAll(cuts.map((x) => segmentGraph(x.segs[sequence.length]!)));
  // the combining graphs' temporaries share one buffer per device (they run one after another)
  combines.forEach((gs, d) => {
    const plans = gs.map((g) => planGraphAllocation(g, { alignment: meta.devices[d]!.bufferType().alignment }));
    const b = meta.devices[d]!.bufferType().alloc(Math.max(0, ...plans.map((p) => p.size)));
    out.own(b);
    plans.forEach((p) => applyGraphAllocation(p, b));
  });
  return steps;
}
