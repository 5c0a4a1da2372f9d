import { test } from "uvu";
import * as assert from "uvu/assert";
import { Sampler, argmax } from "../lib/model/sampling.js";
import { rng } from "./helpers.js";

const r = rng(3);
const logits = Float32Array.from({ length: 1000 }, () => r() * 10 - 5);

test("greedy is argmax with the lowest id winning ties (llama_sampler_init_greedy)", () => {
  const l = Float32Array.from([1, 3, 2, 3]);
  assert.is(new Sampler({ temperature: 0 }).sample(l), 1);
  assert.is(argmax(logits), new Sampler({ temperature: 0 }).sample(logits));
  assert.is(new Sampler({ temperature: 1, topK: 1 }).sample(logits), argmax(logits));
});

test("seeded sampling is reproducible and differs between seeds", () => {
  const draw = (seed: number) => { const s = new Sampler({ seed, temperature: 1, topK: 0, topP: 1, minP: 0 }); return Array.from({ length: 50 }, () => s.sample(logits)); };
  assert.equal(draw(1), draw(1));
  assert.not.equal(draw(1), draw(2));
});

test("temperature 1 without truncation samples from softmax(logits)", () => {
  const l = Float32Array.from([0, 1, 2, Math.log(10)]);
  const p = Array.from(l, (x) => Math.exp(x)); const z = p.reduce((a, b) => a + b); const want = p.map((x) => x / z);
  const s = new Sampler({ seed: 9, temperature: 1, topK: 0, topP: 1, minP: 0 });
  const n = 40000, counts = [0, 0, 0, 0];
  for (let i = 0; i < n; i++) counts[s.sample(l)]!++;
  counts.forEach((c, i) => assert.ok(Math.abs(c / n - want[i]!) < 0.01, `p[${i}] ${c / n} vs ${want[i]}`));
});

test("top-k, top-p and min-p restrict the candidates", () => {
  const order = Array.from(logits.keys()).sort((a, b) => logits[b]! - logits[a]!);
  const seen = (o: ConstructorParameters<typeof Sampler>[0]) => { const s = new Sampler({ seed: 4, temperature: 5, ...o }); const set = new Set<number>(); for (let i = 0; i < 3000; i++) set.add(s.sample(logits)); return set; };
  const k5 = seen({ topK: 5, topP: 1, minP: 0 });
  assert.ok(k5.size <= 5 && [...k5].every((t) => order.slice(0, 5).includes(t)));
  // min-p 0.5: only tokens within ln 2 of the best logit
  const mp = seen({ topK: 0, topP: 1, minP: 0.5 });
  const best = logits[order[0]!]!;
  assert.ok([...mp].every((t) => logits[t]! >= best - Math.log(2) - 1e-6));
  // top-p tiny: only the best token
  assert.equal([...seen({ topK: 0, topP: 1e-6, minP: 0 })], [order[0]]);
});

test("repeat penalty lowers recent tokens", () => {
  const l = Float32Array.from([2, 1.9, 0]);
  const s = new Sampler({ temperature: 0, repeatPenalty: 1.5 });
  s.accept([0]);
  assert.is(s.sample(l), 1);
});

test("bad options are refused", () => {
  assert.throws(() => new Sampler({ topP: 0 }), /top-p/);
  assert.throws(() => new Sampler({ topK: -1 }), /top-k/);
  assert.throws(() => new Sampler({ seed: -3 }), /seed/);
  assert.throws(() => new Sampler({ repeatPenalty: 0 }), /repeat penalty/);
});

test.run();
