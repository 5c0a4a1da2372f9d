/**
 * Command-line flags, parsed the way llama.cpp's tools take them: every flag is spelled
 * out whole (`-ngl`, `-sm`, `-ub` are flags, not groups of one-letter ones), a flag that
 * takes a value takes the next argument even if it starts with "-" (`-n -1`, `-s -1`), and
 * `--flag=value` works too. llama.cpp flags weft has nothing for yet are accepted with a
 * one-line note instead of an error. Every command uses this parser; a mistake is a
 * USAGE error (exit 2) naming the flag.
 */
import { weftError } from "../core/errors.js";

export interface Flag {
  /** every spelling, e.g. ["-t", "--threads"] */
  readonly names: readonly string[];
  /** a switch takes no value */
  readonly switch?: boolean;
  /** may be given several times (its values are collected) */
  readonly multiple?: boolean;
  /** accepted for llama.cpp compatibility and ignored, with this note */
  readonly ignored?: string;
  /** values an ignored flag may take (e.g. -fa on): consumed only when one follows */
  readonly optionalValues?: readonly string[];
}
export type Flags = Readonly<Record<string, Flag>>;
export type Values<F extends Flags> = { [K in keyof F]?: F[K] extends { switch: true } ? boolean : F[K] extends { multiple: true } ? string[] : string };

const usage = (msg: string) => weftError("USAGE", msg);

/**
 * Parses `args` against `flags`; `positionals` is how many bare arguments the command
 * takes ([min, max]). `note` gets the one-line notes of ignored llama.cpp flags.
 */
export function parse<F extends Flags>(args: readonly string[], flags: F, positionals: readonly [number, number] = [0, 0],
  note: (s: string) => void = (s) => process.stderr.write(`weft: ${s}\n`)): { values: Values<F>; positionals: string[] } {
  const byName = new Map<string, [string, Flag]>();
  for (const [key, f] of Object.entries(flags)) for (const n of f.names) byName.set(n, [key, f]);
  const values: Record<string, string | boolean | string[]> = {};
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === "--") { rest.push(...args.slice(i + 1)); break; }
    if (!a.startsWith("-") || a === "-" || /^-\d/.test(a)) { rest.push(a); continue; }
    const eq = a.startsWith("--") ? a.indexOf("=") : -1;
    const name = eq > 0 ? a.slice(0, eq) : a;
    const hit = byName.get(name);
    if (!hit) throw usage(`unknown option '${name}'`);
    const [key, f] = hit;
    let value: string | undefined = eq > 0 ? a.slice(eq + 1) : undefined;
    if (f.switch) {
      if (value !== undefined) throw usage(`option '${name}' takes no value`);
    } else if (f.optionalValues) {
      if (value === undefined && f.optionalValues.includes(args[i + 1] ?? "")) value = args[++i];
    } else if (value === undefined) {
      if (i + 1 >= args.length) throw usage(`option '${name}' needs a value`);
      value = args[++i]!;
    }
    if (f.ignored) { note(`${name}${value !== undefined ? ` ${value}` : ""}: ${f.ignored}`); continue; }
    if (f.switch) values[key] = true;
    else if (f.multiple) values[key] = [...((values[key] as string[] | undefined) ?? []), value!];
    else values[key] = value!;
  }
  if (rest.length < positionals[0]) throw usage(`missing argument${positionals[0] - rest.length > 1 ? "s" : ""} (see --help)`);
  if (rest.length > positionals[1]) throw usage(`unexpected argument '${rest[positionals[1]]}'`);
  return { values: values as Values<F>, positionals: rest };
}

/** llama.cpp flags weft accepts and has nothing for yet (every model command takes them). */
export const LLAMA_IGNORED = {
  gpuLayers: { names: ["-ngl", "--gpu-layers", "--n-gpu-layers"], ignored: "no effect: weft has no GPU devices yet; every layer runs on the --device list" },
  flashAttn: { names: ["-fa", "--flash-attn"], optionalValues: ["on", "off", "auto"], ignored: "no effect: weft has no fused attention yet" },
  mlock: { names: ["--mlock"], switch: true, ignored: "no effect: weft does not lock memory" },
  noMmap: { names: ["--no-mmap"], switch: true, ignored: "no effect: weft maps the file where the device can use it in place" },
  mainGpu: { names: ["-mg", "--main-gpu"], ignored: "no effect: weft has no GPU devices yet" },
  numa: { names: ["--numa"], ignored: "no effect in weft" },
} as const satisfies Flags;

export function int(v: string | undefined, flag: string, fallback: number, min = 0): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (v.trim() === "" || !Number.isSafeInteger(n) || n < min) throw usage(`${flag} needs an integer ≥ ${min}, got '${v}'`);
  return n;
}

export function num(v: string | undefined, flag: string, fallback: number): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (v.trim() === "" || !Number.isFinite(n)) throw usage(`${flag} needs a number, got '${v}'`);
  return n;
}
