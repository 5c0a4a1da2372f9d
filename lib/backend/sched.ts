/**
 * The scheduler (DESIGN §5): runs one graph across several backends.
 *  1. Assign: a node goes where the memory it writes or the weights it reads live; nodes
 *     without weights follow their sources (then their consumers); an op a backend
 *     refuses (supportsOp) falls back to the last backend, the CPU.
 *  2. Split: consecutive nodes on one backend form a split, cloned into its own graph.
 *  3. Copies: a split reading a tensor that lives on another backend gets a private copy
 *     in its own compute buffer: a CPY node at the split's start when both sides are host
 *     memory, else copyTensorAsync before it runs. Inputs are written to every backend
 *     that reads them; a split reads an earlier split of its own backend in place.
 * A scheduled graph is built once and run many times. Runs only enqueue work: splits on
 * different backends overlap (pipeline parallelism) and events keep every buffer safe:
 * a copy waits for its producer, a producer waits until the last copy of its previous
 * value is done before overwriting it.
 */
import { weftError } from "../core/errors.js";
import * as G from "../core/graph.js";
import { Graph } from "../core/graph.js";
import { Op, OPS, OpInfo, VIEW_OPS, opName } from "../core/ops.js";
import { Tensor, TensorFlag } from "../core/tensor.js";
import { allocGraph } from "./alloc.js";
import { Backend, Buffer, Event } from "./interface.js";
import { copyTensorAsync, forgetGraph, getTensorAsync, prepareGraph, recordEvent, setTensorAsync, waitEvent } from "./fallback.js";

interface InputCopy {
  /** "queue": copyTensorAsync before the split; "graph": a CPY node at the split's start
   * reading the source memory directly (both sides host memory), ordered by an event */
  kind: "queue" | "graph";
  from: Tensor;
  fromBackend: Backend;
  to: Tensor;
  /** event on the destination once the latest run has read the source */
  done: Event | null;
}

export interface Split {
  readonly backend: Backend;
  readonly graph: Graph;
  readonly buffer: Buffer;
  /** copies into this split, done before it runs */
  readonly copies: InputCopy[];
  /** copies out of this split's memory (by later splits) */
  readonly outgoing: InputCopy[];
}

export class ScheduledGraph {
  readonly splits: Split[] = [];
  /** original tensor -> [the tensor holding its value, its backend] */
  readonly #where = new Map<Tensor, [Tensor, Backend]>();
  #disposed = false;

  /** @internal */
  place(orig: Tensor, t: Tensor, be: Backend): void { if (!this.#where.has(orig)) this.#where.set(orig, [t, be]); }

  #locate(t: Tensor): [Tensor, Backend] {
    const w = this.#where.get(t);
    if (!w) throw weftError("BAD_ARGUMENT", `${t.describe()} is not an input or output of this scheduled graph`);
    return w;
  }
  readonly #replicas = new Map<Tensor, Array<[Tensor, Backend]>>();
  /** @internal */
  addReplica(orig: Tensor, rep: Tensor, be: Backend): void { this.#replicas.set(orig, [...(this.#replicas.get(orig) ?? []), [rep, be]]); }

  /** Writes an input (on every backend that reads it) after the work already queued there. */
  async setInput(t: Tensor, data: ArrayBufferView): Promise<void> {
    const [x, be] = this.#locate(t);
    await setTensorAsync(be, x, data);
    for (const [r, rbe] of this.#replicas.get(t) ?? []) await setTensorAsync(rbe, r, data);
  }
  /** Reads an output once the queued work that computes it has run (into `into`, where given). */
  getOutput(t: Tensor, into?: Uint8Array): Promise<Uint8Array> {
    const [x, be] = this.#locate(t);
    return getTensorAsync(be, x, 0, x.nbytes, into);
  }

  /** Enqueues one run and resolves when every split of it has run. */
  async run(): Promise<void> { await (await this.enqueue()).done; }

  /**
   * Enqueues one run without waiting for it (resolves once everything is queued, to the
   * promise of its completion), so that consecutive runs overlap across backends.
   * (Wrapped in an object: an async function cannot resolve to a bare promise.)
   */
  async enqueue(): Promise<{ done: Promise<void> }> {
    if (this.#disposed) throw weftError("DISPOSED", "the scheduled graph was disposed");
    const done: Promise<void>[] = [];
    for (const s of this.splits) {
      const waited = new Set<Backend>();
      for (const c of s.copies) {
        if (c.kind === "queue") {
          await copyTensorAsync(c.fromBackend, s.backend, c.from, c.to);
          c.done = recordEvent(s.backend);
        } else if (!waited.has(c.fromBackend)) {
          waited.add(c.fromBackend);
          await waitEvent(s.backend, recordEvent(c.fromBackend));
        }
      }
      // do not overwrite what a later split has yet to copy from the previous run
      for (const c of s.outgoing) if (c.done) await waitEvent(s.backend, c.done);
      done.push(s.backend.computeAsync(s.graph));
      const read = s.copies.some((c) => c.kind === "graph") ? recordEvent(s.backend) : null;
      for (const c of s.copies) if (c.kind === "graph") c.done = read;
    }
    const all = Promise.all(done).then(() => undefined);
    all.catch(() => {});  // reported to whoever awaits it, never unhandled
    return { done: all };
  }

  /** Gets every split ready ahead of the first run (backends that can: RPC devices send it now). */
  prepare(): void {
    if (!this.#disposed) for (const s of this.splits) prepareGraph(s.backend, s.graph);
  }

  /** The compute buffers of its splits. */
  get buffers(): Buffer[] { return this.splits.map((s) => s.buffer); }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const s of this.splits) { forgetGraph(s.backend, s.graph); s.buffer.dispose(); }
  }
}

/**
 * Layer ranges per device for a layer split, proportional to `split` (llama.cpp's
 * --tensor-split; default equal shares): device i runs layers [start, end).
 */
export function planLayerSplit(nLayer: number, nDev: number, split?: readonly number[]): Array<[number, number]> {
  const w = split ?? Array(nDev).fill(1);
  if (w.length !== nDev || w.some((x) => !(x >= 0)) || !(w.reduce((a, b) => a + b, 0) > 0))
    throw weftError("BAD_ARGUMENT", `tensor split [${w.join(", ")}] must have one non-negative share per device (${nDev}) and a positive sum`);
  const total = w.reduce((a, b) => a + b, 0);
  const out: Array<[number, number]> = [];
  let acc = 0, start = 0;
  for (let d = 0; d < nDev; d++) {
    acc += w[d]!;
    const end = d === nDev - 1 ? nLayer : Math.round((nLayer * acc) / total);
    out.push([start, Math.max(start, end)]);
    start = Math.max(start, end);
  }
  return out;
}

export class Scheduler {
  readonly #byDevice = new Map<object, Backend>();

  /** backends in priority order; the last one is the fallback for refused ops (the CPU) */
  constructor(readonly backends: readonly Backend[]) {
    if (backends.length === 0) throw weftError("BAD_ARGUMENT", "the scheduler needs at least one backend");
    for (const b of backends) if (!this.#byDevice.has(b.device)) this.#byDevice.set(b.device, b);
  }

  get fallback(): Backend { return this.backends[this.backends.length - 1]!; }

  /** The backend owning a placed tensor's memory (host memory of an unknown device: the fallback). */
  backendOfMemory(t: Tensor): Backend | null {
    const r = t.root().tensor;
    const buf = r.buffer as Buffer | null;
    if (!buf) return null;
    const be = this.#byDevice.get(buf.bufferType.device);
    if (be) return be;
    if (buf.bufferType.isHost) return this.fallback;
    throw weftError("BAD_ARGUMENT", `${t.describe()} lives on ${buf.bufferType.device.name}, which none of the scheduler's backends drives`);
  }

  /** Assigns, splits, clones and allocates `graph` (once; run the result many times). */
  schedule(graph: Graph): ScheduledGraph {
    const assign = new Map<Tensor, Backend>();
    const isView = (t: Tensor) => VIEW_OPS.has(t.op);
    const compute = graph.nodes.filter((t) => !isView(t));
    // 1. memory written, then weights read
    for (const n of compute) {
      let be: Backend | null = null;
      if ((OPS[opName(n.op)] as OpInfo).writesSource) be = this.backendOfMemory(n);
      for (let i = 0; !be && i < n.src.length; i++) {
        const r = n.src[i]!.root().tensor;
        if (r.op === Op.NONE) be = this.backendOfMemory(r);
      }
      if (be) assign.set(n, be);
    }
    const firstPass = new Map(assign);
    const srcBackend = (s: Tensor): Backend | undefined => {
      const r = s.root().tensor;
      return r.op === Op.NONE ? this.backendOfMemory(r) ?? undefined : assign.get(r) ?? assign.get(s);
    };
    // 2. a weightless node feeding a node placed by its weights goes with that node (a
    //    norm joins the layer that scales it: one hidden-state copy per boundary, not two)
    for (let i = compute.length - 1; i >= 0; i--) {
      const n = compute[i]!;
      if (assign.has(n)) continue;
      const user = compute.slice(i + 1, i + 8).find((u) => u.src.some((s) => s.root().tensor === n));
      const b = user && firstPass.get(user);
      if (b) assign.set(n, b);
    }
    //    the others follow their most recently computed source (a residual add
    //    follows the layer's output, not the stream it adds to), then their consumers
    const index = new Map(compute.map((n, i) => [n, i]));
    for (const n of compute) {
      if (assign.has(n)) continue;
      let best: Backend | undefined, at = -2;
      for (const s of n.src) {
        const b = srcBackend(s);
        const i = index.get(s.root().tensor) ?? -1;
        if (b && i > at) { best = b; at = i; }
      }
      if (best) assign.set(n, best);
    }
    for (let i = compute.length - 1; i >= 0; i--) {
      const n = compute[i]!;
      if (assign.has(n)) continue;
      const user = compute.slice(i + 1).find((u) => u.src.some((s) => s.root().tensor === n) && assign.has(u));
      assign.set(n, user ? assign.get(user)! : this.backends[0]!);
    }
    // 3. ops a backend refuses go to the fallback
    for (const n of compute) {
      if (assign.get(n)!.device.supportsOp(n)) continue;
      if (!this.fallback.device.supportsOp(n)) throw weftError("UNSUPPORTED_OP", `no backend can run ${n.describe()}`);
      assign.set(n, this.fallback);
    }
    // 4. splits of consecutive nodes on one backend
    const groups: Array<{ be: Backend; nodes: Tensor[] }> = [];
    for (const n of compute) {
      const be = assign.get(n)!;
      if (groups.length === 0 || groups[groups.length - 1]!.be !== be) groups.push({ be, nodes: [] });
      groups[groups.length - 1]!.nodes.push(n);
    }
    // unplaced leaves (inputs) belong to the first backend that reads them
    const inputOwner = new Map<Tensor, Backend>();
    for (const g of groups) for (const n of g.nodes) for (const s of n.src) {
      const r = s.root().tensor;
      if (r.op === Op.NONE && !r.buffer && !inputOwner.has(r)) inputOwner.set(r, g.be);
    }

    const sg = new ScheduledGraph();
    const clones = new Map<Tensor, { t: Tensor; be: Backend }>();
    const copiesFrom = new Map<Tensor, InputCopy[]>();
    const replicas = new Map<Tensor, Map<Backend, Tensor>>();
    const pending: Array<{ be: Backend; clonesInSplit: Tensor[]; copies: InputCopy[]; aliases: Array<[Tensor, Tensor]> }> = [];
    for (const g of groups) {
      const local = new Map<Tensor, Tensor>();
      const copies: InputCopy[] = [];
      const aliases: Array<[Tensor, Tensor]> = [];
      /** a leaf over another tensor's memory, placed once that memory is allocated */
      const aliasOf = (of: Tensor): Tensor => {
        const alias = new Tensor({ type: of.type, ne: [...of.ne], nb: [...of.nb], name: of.name });
        aliases.push([alias, of]);
        return alias;
      };
      const copyOf = (orig: Tensor, from: Tensor, fromBackend: Backend): Tensor => {
        const to = new Tensor({ type: from.type, ne: [...from.ne], name: `${from.name || "t"}#${g.be.name}` }).setInput();
        const host = fromBackend.device.bufferType().isHost && g.be.device.bufferType().isHost;
        const c: InputCopy = { kind: host ? "graph" : "queue", from, fromBackend, to, done: null };
        copies.push(c);
        copiesFrom.set(from, [...(copiesFrom.get(from) ?? []), c]);
        from.flags |= TensorFlag.OUTPUT;  // its memory must outlive its split's run
        let value = to;
        if (host) {
          // the split copies the source itself, first thing (a CPY node): no host round trip
          value = G.cpy(from.buffer ? from : aliasOf(from), to);
        }
        local.set(orig, value);
        return value;
      };
      const get = (t: Tensor): Tensor => {
        const hit = local.get(t);
        if (hit) return hit;
        if (t.viewSrc && isView(t)) {
          const v = cloneNode(t, get(t.viewSrc), [get(t.src[0]!)]);
          local.set(t, v);
          return v;
        }
        if (t.op === Op.NONE) {
          if (t.buffer) {
            const be = this.backendOfMemory(t)!;
            if (be === g.be) return t;
            return copyOf(t, t, be);
          }
          const owner = inputOwner.get(t)!;
          sg.place(t, t, owner);
          if (owner === g.be) return t;
          // an input read on several backends is written to each of them: no copy, no event
          let rep = replicas.get(t)?.get(g.be);
          if (!rep) {
            rep = new Tensor({ type: t.type, ne: [...t.ne], name: `${t.name}@${g.be.name}` }).setInput();
            replicas.set(t, (replicas.get(t) ?? new Map()).set(g.be, rep));
            sg.addReplica(t, rep, g.be);
          }
          local.set(t, rep);
          return rep;
        }
        const c = clones.get(t);
        if (!c) throw weftError("BAD_ARGUMENT", `scheduler: ${t.describe()} is used before it is computed`);
        if (c.be !== g.be) return copyOf(t, c.t, c.be);
        // computed by an earlier split on this backend: read its memory through a leaf alias
        // (placed when that split's memory is known), never by recomputing it here
        c.t.flags |= TensorFlag.OUTPUT;
        const alias = aliasOf(c.t);
        local.set(t, alias);
        return alias;
      };
      const inSplit: Tensor[] = [];
      for (const n of g.nodes) {
        const src = n.src.map(get);
        const viewSrc = n.viewSrc ? get(n.viewSrc) : null;
        const c = cloneNode(n, viewSrc, src);
        if (n.flags & TensorFlag.OUTPUT) c.flags |= TensorFlag.OUTPUT;
        local.set(n, c);
        clones.set(n, { t: c, be: g.be });
        sg.place(n, c, g.be);
        inSplit.push(c);
      }
      pending.push({ be: g.be, clonesInSplit: inSplit, copies, aliases });
    }
    // graphs and memory once every cross-split use has marked its outputs
    for (const p of pending) {
      const outs = p.clonesInSplit.filter((t) => t.flags & TensorFlag.OUTPUT);
      const last = p.clonesInSplit[p.clonesInSplit.length - 1]!;
      if (!outs.includes(last)) outs.push(last);
      for (const [alias, of] of p.aliases) {
        const r = of.root();
        alias.buffer = r.tensor.buffer;
        alias.offset = r.tensor.offset + r.offset;
      }
      const graph = new Graph(outs);
      const buffer = allocGraph(p.be.device.bufferType(), graph);
      const outgoing = p.clonesInSplit.flatMap((t) => copiesFrom.get(t) ?? []);
      sg.splits.push({ backend: p.be, graph, buffer, copies: p.copies, outgoing });
    }
    // leaves copied from (inputs, weights) belong to no split; their copies need no guard
    return sg;
  }
}

function cloneNode(n: Tensor, viewSrc: Tensor | null, src: Tensor[]): Tensor {
  const c = new Tensor({
    type: n.type, ne: [...n.ne], nb: [...n.nb], op: n.op, params: n.params, src,
    viewSrc, viewOffs: n.viewOffs, name: n.name,
  });
  c.flags = n.flags & TensorFlag.INPUT;
  return c;
}
