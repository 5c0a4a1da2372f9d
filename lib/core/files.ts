/**
 * Files weft writes (quantized models, synthesized models, the cached default model, the
 * benchmark peer's files) are written to a temporary file beside the target and renamed
 * into place once complete: an error, an abort or a signal leaves the target as it was
 * and no temporary behind. Errors name the path and say what to do.
 */
import { mkdirSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { weftError, WeftError } from "./errors.js";

/** Temporaries being written now: removed if the process exits before they are renamed. */
const inFlight = new Set<string>();
let hooked = false;
function removeInFlight(): void {
  for (const p of inFlight) { try { rmSync(p, { force: true }); } catch { /* nothing more to do at exit */ } }
  inFlight.clear();
}

/** A WeftError for a failed file operation, naming the path and the cause a person can act on. */
export function ioError(what: string, path: string, e: unknown, hint = ""): WeftError {
  if (e instanceof WeftError) return e;
  const code = (e as NodeJS.ErrnoException)?.code;
  const why: Record<string, string> = {
    ENOENT: "no such file or directory", ENOTDIR: "a part of the path is not a directory", EISDIR: "it is a directory",
    EACCES: "permission denied", EPERM: "permission denied", EROFS: "read-only file system", ENOSPC: "no space left on the device",
    EEXIST: "it already exists", EXDEV: "it is on another file system",
  };
  return weftError("IO", `cannot ${what} ${path}: ${why[code ?? ""] ?? (e as Error)?.message ?? String(e)}${hint ? ` (${hint})` : ""}`, e);
}

/** Creates a directory (and its parents) or says plainly why it cannot. */
export function ensureDir(dir: string, what = "create the directory", hint = ""): void {
  try { mkdirSync(dir, { recursive: true }); } catch (e) { throw ioError(what, dir, e, hint); }
}

/**
 * Runs `write(tmp)` on a temporary file beside `target`, then renames it to `target`.
 * If `write` throws (an abort included) the temporary is removed and `target` is untouched.
 */
export async function writeAtomically<T>(target: string, write: (tmp: string) => Promise<T>): Promise<T> {
  const dir = dirname(resolve(target));
  let st;
  try { st = statSync(dir); } catch (e) {
    throw (e as NodeJS.ErrnoException).code === "ENOENT" ? weftError("IO", `cannot write ${target}: the folder ${dir} does not exist`) : ioError("write", target, e);
  }
  if (!st.isDirectory()) throw weftError("IO", `cannot write ${target}: ${dir} is not a directory`);
  try { if (statSync(target).isDirectory()) throw weftError("IO", `cannot write ${target}: it is a directory`); } catch (e) { if (e instanceof WeftError) throw e; }
  const tmp = join(dir, `.${basename(target)}.${process.pid}.${Math.random().toString(36).slice(2, 8)}.tmp`);
  if (!hooked) { hooked = true; process.on("exit", removeInFlight); }
  inFlight.add(tmp);
  try {
    const r = await write(tmp);
    try { renameSync(tmp, target); } catch (e) { throw ioError("write", target, e); }
    return r;
  } catch (e) {
    if ((e as Error)?.name === "AbortError") throw weftError("ABORTED", `stopped writing ${target}; it is unchanged`, (e as { cause?: unknown }).cause ?? e);
    throw ioError("write", target, e);
  } finally {
    inFlight.delete(tmp);
    rmSync(tmp, { force: true });
  }
}

/** Writes a small file through a temporary beside it (the same guarantees, synchronously). */
export function writeFileAtomicallySync(target: string, data: string | Uint8Array): void {
  const tmp = join(dirname(resolve(target)), `.${basename(target)}.${process.pid}.${Math.random().toString(36).slice(2, 8)}.tmp`);
  try {
    writeFileSync(tmp, data);
    renameSync(tmp, target);
  } catch (e) {
    throw ioError("write", target, e);
  } finally {
    rmSync(tmp, { force: true });
  }
}
