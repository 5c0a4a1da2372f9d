/** Every failure weft reports is a WeftError with a machine-readable code. */
export type WeftErrorCode =
  | "BAD_GGUF" // malformed or truncated GGUF file
  | "BAD_ARGUMENT" // a caller passed something unusable
  | "USAGE" // a command line that cannot be parsed (the CLI exits with 2)
  | "SHAPE_MISMATCH" // graph construction with incompatible shapes
  | "UNSUPPORTED_OP" // an op a backend cannot run
  | "UNSUPPORTED_TYPE" // a tensor type weft does not handle
  | "BAD_PLAN" // the native backend refused a graph
  | "COMPUTE_FAILED" // a graph failed while running
  | "OUT_OF_MEMORY"
  | "OUT_OF_RANGE"
  | "READ_ONLY"
  | "DISPOSED" // use after dispose()
  | "ABORTED"
  | "IO"
  | "NATIVE_MISSING" // the addon was not built
  | "BUSY"
  | "RPC_CLOSED" // the connection to an RPC server is gone (it died, the link dropped, or it went silent)
  | "RPC_PROTOCOL" // a malformed frame or an unexpected message
  | "RPC_AUTH" // the shared token did not match, or one side requires one the other lacks
  | "RPC_LIMIT"; // a frame, allocation or count over what the server allows

/** Every code, for checking a code that came over the network. */
export const ERROR_CODES: ReadonlySet<string> = new Set<WeftErrorCode>([
  "BAD_GGUF", "BAD_ARGUMENT", "USAGE", "SHAPE_MISMATCH", "UNSUPPORTED_OP", "UNSUPPORTED_TYPE", "BAD_PLAN",
  "COMPUTE_FAILED", "OUT_OF_MEMORY", "OUT_OF_RANGE", "READ_ONLY", "DISPOSED", "ABORTED", "IO", "NATIVE_MISSING",
  "BUSY", "RPC_CLOSED", "RPC_PROTOCOL", "RPC_AUTH", "RPC_LIMIT",
]);

export class WeftError extends Error {
  readonly code: WeftErrorCode;
  constructor(code: WeftErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "WeftError";
    this.code = code;
  }
}

/** Builds a WeftError; trims this helper from the stack so it points at the caller. */
export function weftError(code: WeftErrorCode, message: string, cause?: unknown): WeftError {
  const e = new WeftError(code, message, cause === undefined ? undefined : { cause });
  Error.captureStackTrace?.(e, weftError);
  return e;
}

/** Converts an error thrown by the native addon (which carries a string code) into a WeftError. */
export function fromNative(e: unknown): WeftError {
  if (e instanceof WeftError) return e;
  const err = e as { code?: string; message?: string };
  const code = (err?.code ?? "COMPUTE_FAILED") as WeftErrorCode;
  return new WeftError(code, err?.message ?? String(e), { cause: e });
}
