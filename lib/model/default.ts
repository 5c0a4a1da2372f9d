/**
 * The embedded default model: the `small` synth preset in Q8_0, synthesized once into a
 * cache directory (WEFT_CACHE_DIR, else $XDG_CACHE_HOME/weft, else ~/.cache/weft), so that
 * `weft run` works on a fresh machine without a download.
 */
import { existsSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { ensureDir } from "../core/files.js";
import { synthModel } from "./synth.js";

export const DEFAULT_MODEL = { preset: "small", type: "q8_0", seed: 42 } as const;

export function cacheDir(): string {
  return process.env.WEFT_CACHE_DIR ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), ".cache"), "weft");
}

/**
 * Path of the default model, synthesizing it first if it is not cached yet (written to a
 * temporary and renamed: a concurrent or interrupted run never sees half a file).
 */
export async function defaultModelPath(onProgress?: (msg: string) => void, signal?: AbortSignal): Promise<string> {
  const dir = cacheDir();
  const path = join(dir, `${DEFAULT_MODEL.preset}-${DEFAULT_MODEL.type}-seed${DEFAULT_MODEL.seed}.gguf`);
  if (existsSync(path)) return path;
  ensureDir(dir, "create the cache directory", "set WEFT_CACHE_DIR to a folder weft may write, or pass -m MODEL");
  onProgress?.(`synthesizing the default model (${DEFAULT_MODEL.preset}, ${DEFAULT_MODEL.type}) into ${path} (once)`);
  await synthModel({ ...DEFAULT_MODEL, out: path, signal });
  return path;
}
