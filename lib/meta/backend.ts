/**
 * The meta backend: runs a graph's program (lib/meta/compile.ts) on the devices' backends
 * and moves tensor data between the caller and the devices' slices. Collective path: one
 * compute per device per step, and the devices meet at their ALL_REDUCE nodes; generic
 * path: each device's segments in order, with copies and ADD graphs between them. Like
 * every backend it is a queue: a call has queued all its work on the devices when it
 * returns — except where a copy between devices must go through the host; then the rest
 * is queued once that copy is done, and every later call waits its turn behind it (#chain).
 * Its optional members exist where every device has them (a device without async queues
 * sends the meta backend down the synchronous fallbacks too).
 */
import { weftError, fromNative } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { Tensor } from "../core/tensor.js";
import type { Backend, Event } from "../backend/interface.js";
import { allocGraph } from "../backend/alloc.js";
import { copyTensorAsync, enqueueCopy, forgetGraph, getTensorAsync, prepareGraph, recordEvent, setTensorAsync, tensorPlace, waitEvent } from "../backend/fallback.js";
import { MetaBuffer, joinSlices, sliceBytes, sliceRanges, sumPartials, wholeOnly } from "./buffer.js";
import type { Program } from "./compile.js";
import type { MetaDevice } from "./device.js";

export class MetaBackend implements Backend {
  readonly setTensorAsync?: Backend["setTensorAsync"];
  readonly getTensorAsync?: Backend["getTensorAsync"];
  readonly waitEvent?: Backend["waitEvent"];
  /** programs compiled by computeAsync itself (graphs never given allocGraph): freed with the backend */
  readonly #ownBuffers = new Map<Graph, MetaBuffer>();
  #disposed = false;
  /** while queueing waits on a copy through the host: later calls queue after it */
  #chain: Promise<void> | null = null;

  /** Holds later calls until `p` settles (it queues the rest of a step). */
  #hold(p: Promise<void>): void {
    const c = p.catch(() => {}).then(() => { if (this.#chain === c) this.#chain = null; });
    this.#chain = c;
  }

  /** @internal use MetaDevice.initBackend */
  constructor(readonly device: MetaDevice, readonly backends: readonly Backend[]) {
    const all = (cap: "async" | "events") => backends.every((b) => b.device.caps[cap]);
    if (all("async")) {
      // every device queues writes itself: the fallback calls below enqueue before returning
      this.setTensorAsync = (t, data, offset) => {
        const copy = this.#chain ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength).slice() : data;
        if (this.#chain) { this.#hold(this.#chain.then(() => this.setTensorAsync!(t, copy, offset))); return; }
        const { state, locals } = this.#part(t);
        const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
        if (state.kind === "MIRRORED") { locals.forEach((l, d) => void setTensorAsync(backends[d]!, l, bytes, offset)); return; }
        wholeOnly(t, offset, bytes.length);
        locals.forEach((l, d) => void setTensorAsync(backends[d]!, l, sliceBytes(t, state, d, bytes)));
      };
      this.getTensorAsync = async (t, offset, size, into) => {
        if (this.#chain) await this.#chain;
        const { state, locals } = this.#part(t);
        if (state.kind === "MIRRORED") return getTensorAsync(backends[0]!, locals[0]!, offset, size, into);
        const whole = offset === 0 && size === t.nbytes;
        // a step's output cut along its outermost axis: each slice read into its place
        const ranges = whole && into ? sliceRanges(t, state, locals.length) : null;
        if (ranges) {
          await Promise.all(locals.map((l, d) => getTensorAsync(backends[d]!, l, 0, l.nbytes, into!.subarray(ranges[d]![0], ranges[d]![0] + ranges[d]![1]))));
          return into!;
        }
        const slices = await Promise.all(locals.map((l, d) => getTensorAsync(backends[d]!, l)));
        const all = state.kind === "PARTIAL" ? sumPartials(slices) : joinSlices(t, state, slices, whole ? into : undefined);
        return all.subarray(offset, offset + size);
      };
    }
    // every device waits natively (registered at once): the queues stall, the JS thread does not
    if (all("events")) this.waitEvent = (e) => {
      const wait = () => { for (const b of backends) void waitEvent(b, e); };
      if (this.#chain) this.#hold(this.#chain.then(wait)); else wait();
    };
  }

  get name(): string { return this.device.name; }

  #part(t: Tensor) {
    const b = tensorPlace(t).buffer;
    if (!(b instanceof MetaBuffer)) throw weftError("BAD_ARGUMENT", `tensor ${t.describe()} is not in ${this.device.name}'s memory`);
    return b.part(t);
  }

  #program(graph: Graph): Program {
    if (this.#disposed) throw weftError("DISPOSED", `the ${this.device.name} backend was disposed`);
    // the program lives in the memory its tensors were placed in (allocGraph)
    for (const t of graph.nodes) {
      const b = t.buffer;
      if (b instanceof MetaBuffer && b.program) return b.program;
    }
    let own = this.#ownBuffers.get(graph);
    if (!own) { own = allocGraph(this.device.bufferType(), graph) as MetaBuffer; this.#ownBuffers.set(graph, own); }
    return own.program!;
  }

  computeAsync(graph: Graph): Promise<void> {
    if (this.#chain) return this.#chain.then(() => this.computeAsync(graph));
    let program: Program;
    try { program = this.#program(graph); } catch (e) { return Promise.reject(e); }
    if (program.failure) return Promise.reject(program.failure);
    const fail = (e: unknown): never => {
      const err = fromNative(e);
      program.failure ??= err;
      program.group?.abort(err.message);  // the other devices stop waiting for this one
      throw err;
    };
    const pending: Promise<void>[] = [];
    const run = (d: number, g: Graph | null) => {
      if (!g) return;
      const p = this.backends[d]!.computeAsync(g).catch(fail);
      p.catch(() => {});  // awaited below; not an unhandled rejection meanwhile
      pending.push(p);
    };
    if (program.path === "collective") {
      program.graphs.forEach((g, d) => run(d, g));
      // when a server dies, its partners' steps fail too (their links to it reset, the group
      // is aborted), and one of those replies may come first: the failure reported is the
      // device that is gone (RPC_CLOSED: reconnect() is the way on), not its consequence
      return Promise.allSettled(pending).then((rs) => {
        const errs = rs.flatMap((r) => (r.status === "rejected" ? [fromNative(r.reason)] : []));
        if (!errs.length) return;
        program.failure = errs.find((e) => e.code === "RPC_CLOSED") ?? errs[0]!;
        throw program.failure;
      });
    }
    // generic: queue the steps in order; a copy the devices cannot do themselves goes
    // through the host, and the steps after it are queued once it is done
    const steps = program.steps;
    const queueFrom = async (i: number, host: Promise<void> | null): Promise<void> => {
      if (host) await host;
      for (; i < steps.length; i++) {
        const s = steps[i]!;
        if ("graph" in s) { run(s.device, s.graph); continue; }
        if ("barrier" in s) {
          const marks = this.backends.map((b) => recordEvent(b));
          const waits = this.backends.flatMap((b, d) => marks.filter((_, e) => e !== d).map((m) => waitEvent(b, m)));
          if (!this.backends.every((b) => b.device.caps.events)) return queueFrom(i + 1, Promise.all(waits).then(() => undefined));
          continue;
        }
        const { from, to, src, dst } = s.copy;
        if (!enqueueCopy(this.backends[from]!, this.backends[to]!, src, dst))
          return queueFrom(i + 1, copyTensorAsync(this.backends[from]!, this.backends[to]!, src, dst));
      }
    };
    let queued: Promise<void>;
    try { queued = queueFrom(0, null); } catch (e) { queued = Promise.reject(e); }
    this.#hold(queued);
    return queued.then(() => Promise.all(pending), async (e) => { await Promise.allSettled(pending); fail(e); }).then(() => undefined);
  }

  /** compiles the program now (the devices get their graphs ready too: servers receive theirs) */
  prepare(graph: Graph): void {
    const program = this.#program(graph);
    if (program.path === "collective") program.graphs.forEach((g, d) => prepareGraph(this.backends[d]!, g));
    else for (const s of program.steps) if ("graph" in s) prepareGraph(this.backends[s.device]!, s.graph);
  }

  copyTensorAsync(): boolean { return false; }  // into meta memory: the fallback scatters through setTensorAsync

  /** a mirrored tensor is whole on the first device: copies out of the meta device read it there */
  sourceOf(t: Tensor): { backend: Backend; tensor: Tensor } | null {
    const b = tensorPlace(t).buffer;
    if (!(b instanceof MetaBuffer)) return null;
    const p = b.part(t);
    return p.state.kind === "MIRRORED" ? { backend: this.backends[0]!, tensor: p.locals[0]! } : null;
  }

  recordEvent(): Event {
    if (this.#chain) return { backend: this, done: this.#chain.then(() => this.synchronize()) };
    const parts = this.backends.map((b) => recordEvent(b));
    return { backend: this, done: Promise.all(parts.map((p) => p.done)).then(() => undefined), parts };
  }

  async synchronize(): Promise<void> {
    while (this.#chain) await this.#chain;
    const r = await Promise.allSettled(this.backends.map((b) => b.synchronize()));
    const bad = r.find((x): x is PromiseRejectedResult => x.status === "rejected");
    if (bad) throw fromNative(bad.reason);
  }

  forget(graph: Graph): void {
    let program: Program | null = null;
    for (const t of graph.nodes) if (t.buffer instanceof MetaBuffer && t.buffer.program) { program = t.buffer.program; break; }
    const own = this.#ownBuffers.get(graph);
    program ??= own?.program ?? null;
    if (!program) return;
    program.graphs.forEach((g, d) => forgetGraph(this.backends[d]!, g));
    for (const s of program.steps) if ("graph" in s) forgetGraph(this.backends[s.device]!, s.graph);
    if (own) { own.dispose(); this.#ownBuffers.delete(graph); }
  }

  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    await Promise.allSettled(this.backends.map((b) => b.synchronize()));
    for (const g of [...this.#ownBuffers.keys()]) this.forget(g);
    await Promise.all(this.backends.map((b) => b.dispose()));
  }
  [Symbol.asyncDispose](): Promise<void> { return this.dispose(); }
}
