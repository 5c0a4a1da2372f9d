import { test } from "uvu";
import * as assert from "uvu/assert";
import { readFileSync, readdirSync } from "node:fs";
import * as G from "../lib/core/graph.js";
import { Op } from "../lib/core/ops.js";
import { Tensor } from "../lib/core/tensor.js";
import { GgmlType } from "../lib/core/types.js";
import { CpuDevice, cpuDevice } from "../lib/cpu/index.js";
import { copyTensorAsync, getTensorAsync, getTensorData, get2d, get2dAsync, recordEvent, set2d, set2dAsync, setTensorAsync, setTensorData, waitEvent } from "../lib/backend/fallback.js";
import { Scheduler } from "../lib/backend/sched.js";
import { allocGraph, allocateTensors } from "../lib/backend/alloc.js";
import { loadModel } from "../lib/model/model.js";
import { assertSameArray, fixture, haveFixtures, randomF32, rejectsWith, rng, warnNoFixtures } from "./helpers.js";

const F32 = GgmlType.F32;
const f32 = (u: Uint8Array) => new Float32Array(u.buffer.slice(u.byteOffset, u.byteOffset + u.byteLength));

/** a graph slow enough to observe ordering: a chain of matmuls */
function slowGraph(n = 384, steps = 40) {
  const w = G.newTensor(F32, [n, n]);
  const x = G.newTensor(F32, [n, 64]);
  let y = x;
  for (let i = 0; i < steps; i++) y = G.scale(G.mulMat(w, y), 1.7 / Math.sqrt(n));  // keeps values O(1)
  const g = G.buildGraph(y);
  const buf = allocateTensors(g.order);
  setTensorData(w, randomF32(n * n, rng(1)));
  setTensorData(x, randomF32(n * 64, rng(2)));
  return { g, y, buf };
}

for (const async of [true, false]) {
  const label = async ? "native async/events" : "fallback (no async, no events)";
  const dev = (i: number): CpuDevice => cpuDevice(`cpu:${i}`, { async });

  test(`queue contract (${label}): a copy queued after a compute sees the computed data`, async () => {
    const a = dev(1).initBackend({ threads: 1 }), b = dev(2).initBackend({ threads: 1 });
    const { g, y, buf } = slowGraph();
    const dst = G.newTensor(F32, [...y.ne]);
    const dbuf = dev(2).bufferType().alloc(dst.nbytes);
    dst.buffer = dbuf; dst.offset = 0;
    dbuf.clear(0);
    const computed = a.computeAsync(g);           // not awaited: the copy must still wait for it
    await copyTensorAsync(a, b, y, dst);
    const got = f32(await getTensorAsync(b, dst));
    await computed;
    assertSameArray(got, f32(getTensorData(y)), "copied data");
    assert.ok(got.some((v) => v !== 0));
    await a.dispose(); await b.dispose(); buf.dispose(); dbuf.dispose();
  });

  test(`queue contract (${label}): waiting on an event stalls only the waiting queue`, async () => {
    const a = dev(1).initBackend({ threads: 1 }), b = dev(2).initBackend({ threads: 1 }), c = dev(3).initBackend({ threads: 1 });
    const slow = slowGraph(512, 60), other = slowGraph(64, 1);
    // b doubles a's result, reading a's memory directly: only correct if b waited for a
    const yAlias = G.newTensor(F32, [...slow.y.ne]);
    const root = slow.y.root();
    yAlias.buffer = root.tensor.buffer; yAlias.offset = root.tensor.offset + root.offset;
    const z = G.scale(yAlias, 2);
    const zg = G.buildGraph(z);
    const zbuf = allocateTensors(zg.order);
    const t0 = performance.now();
    let cAt = 0, aAt = 0;
    const aDone = a.computeAsync(slow.g).then(() => { aAt = performance.now() - t0; });
    await waitEvent(b, recordEvent(a));
    const bDone = b.computeAsync(zg);
    const cDone = c.computeAsync(other.g).then(() => { cAt = performance.now() - t0; });
    let timerAt = 0;
    await new Promise((r) => setTimeout(r, 1)).then(() => { timerAt = performance.now() - t0; });
    await Promise.all([aDone, bDone, cDone]);
    const y = f32(getTensorData(slow.y));
    assertSameArray(f32(getTensorData(z)), y.map((v) => v * 2), "b's result (it read a's memory: did it wait?)");
    if (async) {
      assert.ok(cAt < aAt, `the independent queue waited (c at ${cAt} ms, a at ${aAt} ms)`);
      assert.ok(timerAt < aAt, `the JS thread was blocked (timer at ${timerAt} ms, a done at ${aAt} ms)`);
    }
    for (const x of [a, b, c]) await x.dispose();
    for (const x of [slow, other]) x.buf.dispose();
    zbuf.dispose();
  });

  test(`buffers (${label}): zero-size buffers, strided 2-D set/get, async set`, async () => {
    const bt = dev(1).bufferType();
    const z = bt.alloc(0);
    assert.is(z.size, 0);
    z.clear(7);
    assert.is(z.get(0, 0).length, 0);
    z.dispose();
    const b = bt.alloc(64);
    b.clear(0);
    set2d(b, 4, Uint8Array.of(1, 2, 3, 4, 5, 6), 3, 2, 10);
    assert.equal(Array.from(get2d(b, 4, 3, 2, 10)), [1, 2, 3, 4, 5, 6]);
    assert.equal(Array.from(b.get(14, 2)), [3, 4]);
    const t = G.newTensor(F32, [4]);
    t.buffer = b; t.offset = 32;
    const q = dev(1).initBackend({ threads: 1 });
    const rowsIn = Uint8Array.of(9, 8, 7, 6);
    await set2dAsync(q, b, 50, rowsIn, 2, 2, 5);
    rowsIn.fill(0);  // queued writes took their own copy
    assert.equal(Array.from(await get2dAsync(q, b, 50, 2, 2, 5)), [9, 8, 7, 6]);
    await setTensorAsync(q, t, Float32Array.of(1, 2, 3, 4));
    assert.equal(Array.from(f32(await getTensorAsync(q, t))), [1, 2, 3, 4]);
    await q.dispose();
    b.dispose();
  });
}

test("a failed queued write makes the next synchronize and compute reject with that error, once", async () => {
  const be = cpuDevice("cpu:1").initBackend({ threads: 1 });
  const { g, buf } = slowGraph(32, 1);
  const t = G.newTensor(F32, [4]);
  const tb = allocateTensors([t]);
  tb.dispose();  // the write below is queued against freed memory
  await setTensorAsync(be, t, Float32Array.of(1, 2, 3, 4));
  await rejectsWith(be.synchronize(), /used after dispose/);
  await be.synchronize();  // reported once
  await setTensorAsync(be, t, Float32Array.of(1, 2, 3, 4));
  await rejectsWith(be.computeAsync(g), /used after dispose/);
  await be.computeAsync(g);
  await be.dispose(); buf.dispose();
});

test("freeing a buffer while a queued graph uses it is safe: the run completes on valid memory, later runs are refused", async () => {
  const be = cpuDevice("cpu:1").initBackend({ threads: 1 });
  const n = 512, steps = 40;
  const w = G.newTensor(F32, [n, n]), x = G.newTensor(F32, [n, 64]);
  let y = x;
  for (let i = 0; i < steps; i++) y = G.scale(G.mulMat(w, y), 1.7 / Math.sqrt(n));
  const g = G.buildGraph(y);
  const wb = allocateTensors([w, x]);
  const cb = allocGraph(cpuDevice("cpu:1").bufferType(), g);
  setTensorData(w, randomF32(n * n, rng(1)));
  setTensorData(x, randomF32(n * 64, rng(2)));
  await be.computeAsync(g);
  const want = f32(getTensorData(y));
  let finished = false;
  const run = be.computeAsync(g).then(() => { finished = true; });
  await new Promise((r) => setTimeout(r, 5));
  assert.not.ok(finished, "the run is still going");
  wb.dispose();  // weights freed mid-run: natively the memory stays until the run ends
  await run;
  assertSameArray(f32(getTensorData(y)), want, "result of the run that was using the freed buffer");
  await rejectsWith(be.computeAsync(g), /freed/);
  await be.dispose(); cb.dispose();
});

test("dispose frees a device's threads at once, not at garbage collection", async () => {
  const threads = () => readdirSync("/proc/self/task").length;
  const before = threads();
  const qs = [1, 2, 3].map((i) => cpuDevice(`cpu:${i}`).initBackend({ threads: 3 }));
  assert.is(threads(), before + 9);  // each device: a dispatcher thread (its pool's worker 0) and two workers
  for (const q of qs) await q.dispose();
  assert.is(threads(), before);
  const { g, buf } = slowGraph(32, 1);
  let err: Error | null = null;
  try { await qs[0]!.computeAsync(g); } catch (e) { err = e as Error; }
  assert.match(String(err?.message), /disposed/);
  buf.dispose();
});

test("devices are canonical objects; names are checked", () => {
  assert.is(cpuDevice("cpu"), cpuDevice("cpu:0"));
  assert.is(cpuDevice("cpu:3").bufferType(), cpuDevice("cpu:3").bufferType());
  assert.not.equal(cpuDevice("cpu:1"), cpuDevice("cpu:2"));
  assert.throws(() => cpuDevice("gpu:0"), /not a CPU device name/);
});

/** A CPU device that refuses one op, to exercise the scheduler's fallback. */
class PickyDevice extends CpuDevice {
  constructor(name: string, private refuse: number) { super(name); }
  override supportsOp(n: Tensor): boolean { return n.op !== this.refuse; }
}

test("scheduler: nodes follow their weights, refused ops fall back to the CPU, same-device splits share memory", async () => {
  const picky = new PickyDevice("cpu:7", Op.SOFT_MAX);
  const p = picky.initBackend({ threads: 1 });
  const cpu = cpuDevice("cpu:6").initBackend({ threads: 1 });
  const w0 = G.newTensor(F32, [32, 32]), w1 = G.newTensor(F32, [32, 32]);
  const wb0 = picky.bufferType().alloc(w0.nbytes), wb1 = cpuDevice("cpu:6").bufferType().alloc(w1.nbytes);
  w0.buffer = wb0; w1.buffer = wb1;
  setTensorData(w0, randomF32(1024, rng(3))); setTensorData(w1, randomF32(1024, rng(4)));
  const build = () => {
    const x = G.newTensor(F32, [32, 5]).setInput();
    const h = G.mulMat(w0, x);                   // picky (weights)
    const sm = G.softMax(h);                     // refused by picky -> cpu
    const h2 = G.mulMat(w0, sm);                 // back on picky
    // cpu: reads h from the first picky split (a copy) and sm from the earlier cpu split (shared memory)
    const out = G.add(G.add(G.mulMat(w1, h2), h), sm);
    return { x, out: out.setOutput(), g: G.buildGraph(out) };
  };
  const xs = randomF32(160, rng(5));
  const a = build();
  const sg = new Scheduler([p, cpu]).schedule(a.g);
  assert.equal(sg.splits.map((sp) => sp.backend.name), ["cpu:7", "cpu:6", "cpu:7", "cpu:6"]);
  await sg.setInput(a.x, xs);
  await sg.run();
  const got = f32(await sg.getOutput(a.out));
  // the same graph on one backend (all memory is host memory: one split)
  const ref = cpuDevice("cpu:5").initBackend({ threads: 1 });
  const b = build();
  const sg1 = new Scheduler([ref]).schedule(b.g);
  assert.is(sg1.splits.length, 1);
  await sg1.setInput(b.x, xs);
  await sg1.run();
  assertSameArray(got, f32(await sg1.getOutput(b.out)), "split result");
  assert.ok(got.some((v) => v !== 0));
  sg.dispose(); sg1.dispose();
  for (const be of [p, cpu, ref]) await be.dispose();
  wb0.dispose(); wb1.dispose();
});

// ---- layer split of real models: bit-identical with one device

const NANO = ["nano-f32", "nano-f16", "nano-bf16", "nano-q8_0", "nano-q4_0", "nano-q4_k_m", "nano-q6_k", "nano-tied-q8_0", "stories260K"];
const SPLITS: Array<{ devices: Array<string | CpuDevice>; tensorSplit?: number[]; batchSize?: number; what: string }> = [
  { devices: ["cpu:0", "cpu:1"], what: "2 devices" },
  { devices: ["cpu:0", "cpu:1", "cpu:2"], tensorSplit: [1, 3, 2], what: "3 devices, uneven" },
  { devices: ["cpu:0", "cpu:1"], tensorSplit: [3, 1], batchSize: 5, what: "2 devices, 3:1, pipelined micro-batches of 5" },
  { devices: ["cpu:0", cpuDevice("cpu:1", { async: false })], what: "2 devices, one without async/events (fallback path)" },
];
for (const name of NANO) {
  test(`layer split of ${name} equals one device bit for bit (${SPLITS.map((s) => s.what).join("; ")})`, async () => {
    if (!haveFixtures) return warnNoFixtures(`layer split ${name}`);
    const g = JSON.parse(readFileSync(fixture(`${name}.golden.json`), "utf8")) as { tokens: number[] };
    const one = await loadModel(fixture(`${name}.gguf`), { threads: 1, kvType: "f32" });
    const want = await one.evaluate(g.tokens, { allLogits: true });
    await one.dispose();
    for (const s of SPLITS) {
      const m = await loadModel(fixture(`${name}.gguf`), { threads: 1, kvType: "f32", splitMode: "layer", ...s });
      const got = await m.evaluate(g.tokens, { allLogits: true });
      assertSameArray(got, want, `${s.what}: logits`);
      await m.dispose();
    }
  });
}

test("layer split: stories260K greedy text unchanged", async () => {
  if (!haveFixtures) return warnNoFixtures("layer split greedy");
  const g = JSON.parse(readFileSync(fixture("stories260K.golden.json"), "utf8"));
  const m = await loadModel(fixture("stories260K.gguf"), { threads: 1, devices: ["cpu:0", "cpu:1", "cpu:2"], splitMode: "layer", tensorSplit: [2, 1, 2] });
  for (const gr of [g.greedy, ...g.greedy_extra]) {
    const ids: number[] = [];
    for await (const p of m.generate(gr.prompt_tokens, { temperature: 0, maxTokens: gr.n_predict })) if (p.token >= 0) ids.push(p.token);
    assert.equal(ids, gr.tokens, gr.prompt);
  }
  const mem = m.memory();
  assert.equal(mem.map((u) => u.layers), [[0, 2], [2, 3], [3, 5]]);
  assert.ok(mem.every((u) => u.weightBytes > 0 && u.kvBytes > 0));
  await m.dispose();
});

test("bad split options are clear errors", async () => {
  if (!haveFixtures) return warnNoFixtures("split options");
  const p = fixture("nano-f32.gguf");
  const rej = async (o: Parameters<typeof loadModel>[1], re: RegExp) => {
    let err: Error | null = null;
    try { await (await loadModel(p, o)).dispose(); } catch (e) { err = e as Error; }
    assert.ok(err && re.test(err.message), `${JSON.stringify(o)}: ${err?.message}`);
  };
  await rej({ devices: ["cpu:0", "cpu:1"], splitMode: "layer", tensorSplit: [1] }, /one non-negative share per device/);
  await rej({ devices: ["cpu:0", "cpu:0"], splitMode: "layer" }, /listed twice/);
  await rej({ devices: ["gpu:0"] }, /unknown device 'gpu:0'/);
  await rej({ splitMode: "rows" as "layer" }, /split mode must be none, layer or tensor/);
});

test.run();
