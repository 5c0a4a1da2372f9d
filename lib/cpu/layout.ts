/**
 * The plan record layout (doubles per tensor) shared with the native decoder. The addon
 * exports its own (csrc/graph.h) and lib/cpu/native.ts refuses an addon that differs.
 */
export const PLAN_LAYOUT = {
  REC: 36, R_OP: 0, R_TYPE: 1, R_NE: 2, R_NB: 6, R_BUF: 10, R_OFFS: 11, R_SRC: 12, R_FLAGS: 15,
  R_NPARAMS: 16, R_PARAMS: 17, MAX_PARAMS: 16, MAX_SRC: 3,
  /** R_FLAGS bit: the tensor lies in a repacked weight buffer */
  F_REPACKED: 1,
} as const;
