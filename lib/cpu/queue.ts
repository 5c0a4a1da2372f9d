import { fromNative, weftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { NativeContext, native } from "./native.js";
import { encodePlan } from "./plan.js";

/**
 * The private FIFO behind a CPU backend: a native context (its threads and cached plans)
 * and the order in which work reaches it. Work runs in order; a graph is encoded and
 * validated natively once per uid, later computes send only the uid.
 */
export class NativeQueue {
  readonly name: string;
  readonly threads: number;
  #ctx: NativeContext | null;
  #sent = new Set<number>();
  #tail: Promise<void> = Promise.resolve();
  #woken = -Infinity;

  constructor(threads: number, name: string) {
    this.threads = threads;
    if (!Number.isInteger(this.threads) || this.threads < 1 || this.threads > 256)
      throw weftError("BAD_ARGUMENT", `threads must be an integer from 1 to 256, got ${threads}`);
    this.name = name;
    try { this.#ctx = native().createContext(this.threads); } catch (e) { throw fromNative(e); }
  }

  get disposed(): boolean { return this.#ctx === null; }

  /** The native context (for other devices' native waits on this one). */
  get nativeContext(): NativeContext {
    if (!this.#ctx) throw weftError("DISPOSED", `${this.name} backend was disposed`);
    return this.#ctx;
  }

  /**
   * Enqueues the graph; resolves when it (and everything queued before it) has run.
   * `waits`: [other device's context, n] — the graph starts only once that device has
   * completed n computes, waited for on the worker thread (native events). `after` runs
   * once it has (and may throw to reject it: the run still happened, so that the
   * device's compute count, which other devices wait on, stays true).
   */
  compute(graph: Graph, waits?: Array<[NativeContext, number]>, after?: () => void): Promise<void> {
    const ctx = this.#ctx;
    if (!ctx) return Promise.reject(weftError("DISPOSED", `${this.name} backend was disposed`));
    // Encode eagerly so that placement errors surface at the call, not later.
    let plan: Float64Array | undefined;
    try { plan = this.#sent.has(graph.uid) ? undefined : (this.#prepared.get(graph.uid) ?? encodePlan(graph)); }
    catch (e) { return Promise.reject(e); }
    this.#prepared.delete(graph.uid);
    if (plan) this.#sent.add(graph.uid);
    return this.enqueue(async () => {
      try {
        await native().compute(ctx, graph.uid, plan, waits);
      } catch (e) {
        this.#sent.delete(graph.uid);
        throw fromNative(e);
      }
      after?.();
    });
  }

  /**
   * Runs `fn` after everything queued before it (the FIFO every other operation of this
   * device uses: copies, input writes, event waits). A failure rejects only its own promise.
   */
  enqueue<T>(fn: () => T | Promise<T>): Promise<T> {
    if (!this.#ctx) return Promise.reject(weftError("DISPOSED", `${this.name} backend was disposed`));
    this.prewake();
    const p = this.#tail.then(fn, fn);
    this.#tail = p.then(() => undefined, () => undefined);
    return p;
  }

  /**
   * Work is coming: the device's threads wake now (tens of µs to ms from a sleep),
   * overlapping the hand-off; once per burst of work is enough (they then spin for 2 ms).
   */
  prewake(): void {
    const now = performance.now();
    if (this.#ctx && now - this.#woken > 1) { this.#woken = now; native().wake(this.#ctx); }
  }

  /** Resolves when the queue is empty. */
  synchronize(): Promise<void> { return this.#tail; }

  /** Encodes a graph's plan ahead of its first compute (an RPC server does it while the step before runs). */
  prepare(graph: Graph): void {
    if (!this.#sent.has(graph.uid) && !this.#prepared.has(graph.uid)) this.#prepared.set(graph.uid, encodePlan(graph));
  }
  readonly #prepared = new Map<number, Float64Array>();

  /** Drops the native copy of a graph's plan (it is rebuilt if the graph runs again). */
  forget(graph: Graph): void {
    this.#prepared.delete(graph.uid);
    if (this.#ctx && this.#sent.delete(graph.uid)) native().forgetPlan(this.#ctx, graph.uid);
  }

  async dispose(): Promise<void> {
    if (!this.#ctx) return;
    await this.synchronize();
    const ctx = this.#ctx;
    this.#ctx = null;
    native().destroyContext(ctx);  // threads joined and plans freed now; the handle itself goes with the GC
    this.#sent.clear();
  }
}
