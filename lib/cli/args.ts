/** Flag parsing shared by the commands (node:util parseArgs, errors a person can act on). */
import { parseArgs, ParseArgsConfig } from "node:util";
import { weftError } from "../core/errors.js";

export type Options = NonNullable<ParseArgsConfig["options"]>;

type Parsed<O extends Options> = ReturnType<typeof parseArgs<{ options: O; allowPositionals: boolean; strict: true }>>;

export function parse<O extends Options>(args: string[], options: O, positionals = false): Parsed<O> {
  try {
    return parseArgs({ args, options, allowPositionals: positionals, strict: true });
  } catch (e) {
    throw weftError("BAD_ARGUMENT", (e as Error).message.replace(/\. To specify a positional argument.*$/s, ""));
  }
}

export function int(v: string | undefined, flag: string, fallback: number, min = 0): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw weftError("BAD_ARGUMENT", `${flag} needs an integer ≥ ${min}, got '${v}'`);
  return n;
}

export function num(v: string | undefined, flag: string, fallback: number): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n)) throw weftError("BAD_ARGUMENT", `${flag} needs a number, got '${v}'`);
  return n;
}

export function intList(v: string | undefined, flag: string, fallback: number[], min = 1): number[] {
  if (v === undefined) return fallback;
  return v.split(",").map((s) => int(s.trim(), flag, 0, min));
}
