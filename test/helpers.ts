import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** repo root (tests run from dist/test) */
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
/** ../shared/fixtures next to the checkout, or WEFT_FIXTURES */
export const FIXTURES = process.env.WEFT_FIXTURES ?? resolve(ROOT, "../shared/fixtures");
export const haveFixtures = existsSync(resolve(FIXTURES, "README.md"));
export function fixture(name: string): string { return resolve(FIXTURES, name); }
/** Every check that needs the fixtures names itself when it is skipped. */
export function warnNoFixtures(what: string): void {
  console.warn(`\n!!! SKIPPING ${what}: fixtures folder not found at ${FIXTURES} (set WEFT_FIXTURES) !!!`);
}

/** deterministic PRNG (mulberry32) */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
/** uniform in [-1, 1), never all zeros */
export function randomF32(n: number, r: () => number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (r() * 2 - 1) * scale;
  return a;
}

/** Asserts that `p` rejects with a message matching `re` (returns the error). */
export async function rejectsWith(p: Promise<unknown>, re: RegExp): Promise<Error> {
  let err: Error | null = null;
  try { await p; } catch (e) { err = e as Error; }
  if (!err) throw new Error(`expected a rejection matching ${re}, but it resolved`);
  if (!re.test(err.message)) throw new Error(`expected a rejection matching ${re}, got: ${err.message}`);
  return err;
}
