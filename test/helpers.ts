import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** repo root (tests run from dist/test) */
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
/** ../shared/fixtures next to the checkout, or WEFT_FIXTURES */
export const FIXTURES = process.env.WEFT_FIXTURES ?? resolve(ROOT, "../shared/fixtures");
export const haveFixtures = existsSync(resolve(FIXTURES, "README.md"));
export function fixture(name: string): string { return resolve(FIXTURES, name); }
/**
 * Every check that needs the fixtures names itself when it is skipped; call it once per
 * test and return (scripts/run-tests.js counts these lines as skipped tests).
 */
export function warnNoFixtures(what: string): void {
  console.warn(`\n!!! SKIPPING ${what}: fixtures folder not found at ${FIXTURES} (set WEFT_FIXTURES) !!!`);
}

/** deterministic PRNG (the library's own) */
export { mulberry32 as rng } from "../lib/core/random.js";
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

/**
 * Asserts two numeric arrays are identical (Object.is per element), naming the first
 * difference. (uvu's diff of large arrays takes minutes; this stays readable and fast.)
 */
export function assertSameArray(got: ArrayLike<number>, want: ArrayLike<number>, what = "arrays"): void {
  if (got.length !== want.length) throw new Error(`${what}: length ${got.length}, expected ${want.length}`);
  for (let i = 0; i < want.length; i++)
    if (!Object.is(got[i], want[i])) throw new Error(`${what}: element ${i} is ${got[i]}, expected ${want[i]}`);
}
