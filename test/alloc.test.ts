import { test } from "uvu";
import * as assert from "uvu/assert";
import * as G from "../lib/core/graph.js";
import { Graph } from "../lib/core/graph.js";
import { IN_PLACE_OPS, Op } from "../lib/core/ops.js";
import { Tensor, TensorFlag } from "../lib/core/tensor.js";
import { GgmlType } from "../lib/core/types.js";
import { allocateTensors, applyGraphAllocation, planGraphAllocation } from "../lib/backend/alloc.js";
import { getTensorData, setTensorData } from "../lib/backend/fallback.js";
import { Buffer } from "../lib/backend/interface.js";
import { cpuDevice } from "../lib/cpu/index.js";
import { assertSameArray, randomF32, rng } from "./helpers.js";

const F32 = GgmlType.F32;
const IN_PLACE = IN_PLACE_OPS;

/** A random graph: inputs of a few shapes, then elementwise, row, matmul, view and copy nodes. */
function randomGraph(seed: number): { graph: Graph; inputs: Tensor[] } {
  const r = rng(seed);
  const pick = <T>(a: readonly T[]): T => a[Math.floor(r() * a.length)]!;
  const rows = 1 + Math.floor(r() * 5);
  const widths = [8, 16, 24];
  const inputs = widths.map((w) => G.newTensor(F32, [w, rows]).setInput());
  const weights = [G.newTensor(F32, [8, 16]), G.newTensor(F32, [16, 24]), G.newTensor(F32, [24, 8])];
  const pool: Tensor[] = [...inputs];
  const n = 5 + Math.floor(r() * 40);
  for (let i = 0; i < n; i++) {
    const a = pick(pool.slice(-6));  // recent tensors, so chains form and memory can be reused
    const same = pool.filter((t) => t.ne[0] === a.ne[0] && t.ne[1] === a.ne[1]);
    let t: Tensor;
    switch (Math.floor(r() * 9)) {
      case 0: t = G.add(a, pick(same)); break;
      case 1: t = G.mul(a, pick(same)); break;
      case 2: t = G.scale(a, 0.5, 0.1); break;
      case 3: t = G.silu(a); break;
      case 4: t = G.rmsNorm(a, 1e-5); break;
      case 5: t = G.softMax(a, null, 0.3); break;
      case 6: { const w = weights.find((x) => x.ne[0] === a.ne[0])!; t = G.mulMat(w, a); break; }
      case 7: t = G.cont(G.transpose(G.cont(G.transpose(a)))); break;
      default: t = G.reshape(G.cont(a), [a.ne[0] * a.ne[1]]); t = G.reshape(G.scale(t, 1.5), [a.ne[0], a.ne[1]]); break;
    }
    pool.push(t);
  }
  const outs = [pool[pool.length - 1]!];
  for (const t of pool.slice(inputs.length)) if (r() < 0.1) outs.push(t);
  for (const o of outs) o.setOutput();
  return { graph: G.buildGraph(outs), inputs: [...inputs, ...weights] };
}

test("allocator property: thousands of random graphs; no live overlap, inside the buffer, memory reused", () => {
  let reused = 0, inPlace = 0;
  const GRAPHS = 3000;
  for (let s = 1; s <= GRAPHS; s++) {
    const { graph } = randomGraph(s);
    const plan = planGraphAllocation(graph);
    // positions: producer index and last consumer index in execution order
    const order = graph.nodes.filter((t) => t.root().tensor === t && t.op !== Op.VIEW && t.op !== Op.RESHAPE && t.op !== Op.PERMUTE && t.op !== Op.TRANSPOSE);
    const pos = new Map<Tensor, number>();
    graph.nodes.forEach((t, i) => pos.set(t, i));
    const lastUse = new Map<Tensor, number>();
    graph.nodes.forEach((t, i) => { for (const src of t.src) lastUse.set(src.root().tensor, i); });
    const placed = [...plan.offsets.keys()];
    for (const t of placed) {
      const off = plan.offsets.get(t)!;
      assert.ok(off >= 0 && off + t.nbytes <= plan.size, `graph ${s}: ${t.describe()} outside the buffer`);
      assert.is(off % 64, 0);
    }
    const start = (t: Tensor) => (t.op === Op.NONE ? -1 : pos.get(t)!);
    const end = (t: Tensor) => (t.op === Op.NONE || t.root().tensor.flags & TensorFlag.OUTPUT ? Infinity : (lastUse.get(t) ?? start(t)));
    for (let i = 0; i < placed.length; i++)
      for (let j = i + 1; j < placed.length; j++) {
        let a = placed[i]!, b = placed[j]!;
        if (start(b) < start(a)) [a, b] = [b, a];
        const oa = plan.offsets.get(a)!, ob = plan.offsets.get(b)!;
        const overlap = oa < ob + b.nbytes && ob < oa + a.nbytes;
        if (!overlap) continue;
        // b may share a's memory only once a is dead, or by running in place on it as a's last reader
        const dead = start(b) > end(a);
        const inPlaceOk = start(b) === end(a) && oa === ob && IN_PLACE.has(b.op) && b.src[0]!.root().tensor === a;
        assert.ok(dead || inPlaceOk, `graph ${s}: ${a.describe()} and ${b.describe()} overlap while both live`);
      }
    if (plan.size < plan.total) reused++;
    inPlace += plan.inPlace;
    assert.ok(order.length > 0);
  }
  assert.ok(reused > GRAPHS * 0.5, `memory reused in only ${reused} of ${GRAPHS} graphs`);
  assert.ok(inPlace > 0, "no node ever ran in place");
});

test("planned allocation computes exactly what a separate buffer per tensor computes", async () => {
  const be = cpuDevice("cpu:0").initBackend({ threads: 2 });
  for (let s = 1; s <= 40; s++) {
    const results: Uint8Array[][] = [];
    for (const planned of [false, true]) {
      const { graph, inputs } = randomGraph(s);
      const data = inputs.map((t, i) => randomF32(t.nelements, rng(1000 * s + i)));
      const bufs: Buffer[] = [];
      if (planned) {
        const plan = planGraphAllocation(graph);
        const b = cpuDevice().bufferType().alloc(Math.max(64, plan.size));
        applyGraphAllocation(plan, b);
        bufs.push(b);
        bufs.push(allocateTensors(inputs.filter((t) => !t.buffer)));
      } else {
        bufs.push(allocateTensors(graph.order));
      }
      inputs.forEach((t, i) => { if (t.buffer) setTensorData(t, data[i]!); });  // unused inputs are not in the graph
      await be.computeAsync(graph);
      results.push(graph.nodes.filter((t) => t.flags & TensorFlag.OUTPUT).map((t) => getTensorData(t)));
      be.forget(graph);
      bufs.forEach((b) => b.dispose());
    }
    results[0]!.forEach((r, i) => assertSameArray(results[1]![i]!, r, `graph ${s}, output ${i}`));
  }
  await be.dispose();
});

test.run();
