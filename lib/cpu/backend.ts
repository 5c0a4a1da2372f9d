import { fromNative, weftError } from "../core/errors.js";
import { Graph } from "../core/graph.js";
import { NativeContext, native } from "./native.js";
import { encodePlan } from "./plan.js";
import { availableParallelism } from "node:os";

export interface CpuBackendOptions {
  /** worker threads for this device (default: all cores) */
  threads?: number;
  name?: string;
}

/**
 * One CPU device's execution queue. Work runs in order (FIFO); a graph is encoded and
 * validated natively once per uid, later computes send only the uid.
 */
export class CpuBackend {
  readonly name: string;
  readonly threads: number;
  #ctx: NativeContext | null;
  #sent = new Set<number>();
  #tail: Promise<void> = Promise.resolve();

  constructor(opts: CpuBackendOptions = {}) {
    this.threads = opts.threads ?? availableParallelism();
    if (!Number.isInteger(this.threads) || this.threads < 1 || this.threads > 256)
      throw weftError("BAD_ARGUMENT", `threads must be an integer from 1 to 256, got ${opts.threads}`);
    this.name = opts.name ?? "cpu";
    try { this.#ctx = native().createContext(this.threads); } catch (e) { throw fromNative(e); }
  }

  get disposed(): boolean { return this.#ctx === null; }

  /** Enqueues the graph; resolves when it (and everything queued before it) has run. */
  compute(graph: Graph): Promise<void> {
    const ctx = this.#ctx;
    if (!ctx) return Promise.reject(weftError("DISPOSED", `${this.name} backend was disposed`));
    // Encode eagerly so that placement errors surface at the call, not later.
    const plan = this.#sent.has(graph.uid) ? undefined : encodePlan(graph);
    const run = async () => {
      try {
        await native().compute(ctx, graph.uid, plan);
        this.#sent.add(graph.uid);
      } catch (e) {
        this.#sent.delete(graph.uid);
        throw fromNative(e);
      }
    };
    const p = this.#tail.then(run, run);
    this.#tail = p.catch(() => undefined);
    return p;
  }

  /** Resolves when the queue is empty. */
  synchronize(): Promise<void> { return this.#tail; }

  /** Drops the native copy of a graph's plan (it is rebuilt if the graph runs again). */
  forget(graph: Graph): void {
    if (this.#ctx && this.#sent.delete(graph.uid)) native().forgetPlan(this.#ctx, graph.uid);
  }

  async dispose(): Promise<void> {
    if (!this.#ctx) return;
    await this.synchronize();
    this.#ctx = null;  // the native context (and its threads) is freed by the GC finalizer
    this.#sent.clear();
  }
  [Symbol.asyncDispose](): Promise<void> { return this.dispose(); }
}
