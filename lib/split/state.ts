/**
 * Split states (DESIGN §7): how a tensor of a graph on a meta device is spread over its
 * devices.
 *  - MIRRORED: every device holds the whole tensor (the same bits).
 *  - PARTIAL: every device holds a whole-shape partial; the value is their sum.
 *  - AXIS(k): each device holds a slice along dimension k. Sizes are per device; a fused
 *    tensor (e.g. [gate | up] rows) has several segments, each cut across the devices, and
 *    a device's slice is its part of each segment, in segment order. Sizes may be 0 (a
 *    device with no share of a tensor still takes part in every collective).
 */
import { weftError } from "../core/errors.js";
import type { Shape4 } from "../core/tensor.js";

export type SplitState =
  | { readonly kind: "MIRRORED" }
  | { readonly kind: "PARTIAL" }
  | { readonly kind: "AXIS"; readonly axis: number; readonly segments: ReadonlyArray<readonly number[]> };

export const MIRRORED: SplitState = Object.freeze({ kind: "MIRRORED" });
export const PARTIAL: SplitState = Object.freeze({ kind: "PARTIAL" });

/** AXIS(axis) with per-device sizes, or several segments of per-device sizes (fused tensors). */
export function AXIS(axis: number, sizes: readonly number[] | ReadonlyArray<readonly number[]>): SplitState {
  if (!Number.isInteger(axis) || axis < 0 || axis > 3) throw weftError("BAD_ARGUMENT", `split axis ${axis} is not 0..3`);
  const segments = (Array.isArray(sizes[0]) ? sizes : [sizes]) as ReadonlyArray<readonly number[]>;
  const n = segments[0]!.length;
  for (const s of segments)
    if (s.length !== n || s.some((v) => !Number.isSafeInteger(v) || v < 0))
      throw weftError("BAD_ARGUMENT", `split sizes ${JSON.stringify(sizes)} must be non-negative integers, one per device in every segment`);
  return Object.freeze({ kind: "AXIS", axis, segments: segments.map((s) => Object.freeze([...s])) });
}

export const isAxis = (s: SplitState): s is Extract<SplitState, { kind: "AXIS" }> => s.kind === "AXIS";

/** Elements along the split axis on device d (all segments). */
export function axisSize(s: SplitState, d: number): number {
  return isAxis(s) ? s.segments.reduce((n, seg) => n + seg[d]!, 0) : 0;
}
/** Elements along the split axis in all (the tensor's size along it). */
export function axisTotal(s: SplitState): number {
  return isAxis(s) ? s.segments.reduce((n, seg) => n + seg.reduce((a, b) => a + b, 0), 0) : 0;
}
/** Where device d's part of segment `seg` starts along the axis of the whole tensor. */
export function axisOffset(s: SplitState, d: number, seg = 0): number {
  if (!isAxis(s)) return 0;
  let off = 0;
  for (let i = 0; i < seg; i++) off += s.segments[i]!.reduce((a, b) => a + b, 0);
  for (let i = 0; i < d; i++) off += s.segments[seg]![i]!;
  return off;
}

export function sameState(a: SplitState, b: SplitState): boolean {
  if (a.kind !== b.kind) return false;
  if (!isAxis(a) || !isAxis(b)) return true;
  return a.axis === b.axis && a.segments.length === b.segments.length &&
    a.segments.every((s, i) => s.every((v, d) => v === b.segments[i]![d]));
}

/** The same per-device cut moved to another axis and scaled (views, reshapes, batches). */
export function withAxis(s: SplitState, axis: number, num = 1, den = 1): SplitState {
  if (!isAxis(s)) return s;
  return AXIS(axis, s.segments.map((seg) => seg.map((v) => {
    const r = (v * num) / den;
    if (!Number.isInteger(r)) throw weftError("UNSUPPORTED_OP", `a slice of ${v} cannot be scaled by ${num}/${den}`);
    return r;
  })));
}

/** Device d's shape of a tensor of shape `ne` in state s. */
export function localShape(ne: Shape4, s: SplitState, d: number): Shape4 {
  if (!isAxis(s)) return [...ne] as Shape4;
  const out = [...ne] as Shape4;
  out[s.axis] = axisSize(s, d);
  return out;
}

export function describeState(s: SplitState): string {
  if (!isAxis(s)) return s.kind;
  return `AXIS(${s.axis}, ${s.segments.map((seg) => `[${seg.join(",")}]`).join("+")})`;
}
