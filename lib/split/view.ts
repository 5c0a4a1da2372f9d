/**
 * Views of split tensors. A view (VIEW, RESHAPE, PERMUTE, TRANSPOSE, or the alias a CPY /
 * SET_ROWS result is of its destination) reads its root through byte strides; when the
 * root is cut along an axis, each device holds a narrower root, and the view must be
 * re-expressed over it. This works out, from the root's state and the view's shape,
 * strides and offset, which view dimension carries the cut (and in what sizes) and each
 * device's local shape, strides and offset — or says why the view cannot be split (it
 * picks one index of the cut dimension, starts inside it, or cuts a slice in pieces).
 */
import { weftError } from "../core/errors.js";
import { Shape4, Tensor, contiguousStrides } from "../core/tensor.js";
import { TYPES } from "../core/types.js";
import { AXIS, SplitState, axisOffset, axisSize, isAxis } from "./state.js";

export interface LocalView {
  readonly ne: Shape4;
  readonly nb: Shape4;
  /** byte offset from the device's local root */
  readonly offset: number;
}

export interface ViewSplit {
  readonly state: SplitState;
  local(d: number): LocalView;
}

function unsplittable(view: Tensor, why: string): never {
  throw weftError("UNSUPPORTED_OP", `cannot split view ${view.describe()}: ${why}`);
}

/**
 * The split of `view` (any tensor whose memory is `root`'s, at byte `offset` from it)
 * over n devices, given the root's state. The root is contiguous (every op result and
 * static tensor is).
 */
export function splitView(view: Tensor, root: Tensor, rootState: SplitState, offset: number, n: number): ViewSplit {
  const ne = view.ne, nb = view.nb;
  if (!isAxis(rootState)) return { state: rootState, local: () => ({ ne, nb, offset }) };
  if (!root.isContiguous) unsplittable(view, "its root is not contiguous");
  const k = rootState.axis;
  const blk = TYPES[root.type].blockSize;
  // counts along each dimension in steps of its stride (dimension 0 of a quantized type steps in blocks)
  const count = (shape: Shape4, i: number) => (i === 0 ? shape[0] / blk : shape[i]!);
  if (rootState.segments.length > 1) {
    // a fused tensor's slice is in pieces: only the root itself can be viewed
    if (offset === 0 && ne.every((v, i) => v === root.ne[i]) && nb.every((v, i) => v === root.nb[i]))
      return { state: rootState, local: (d) => ({ ne: localRootShape(root.ne, rootState, d), nb: contiguousStrides(root.type, localRootShape(root.ne, rootState, d)), offset: 0 }) };
    unsplittable(view, "its root is a fused tensor cut in several segments");
  }
  const inner = root.nb[k]!;                 // bytes per step of the cut axis
  const A = count(root.ne, k);               // steps along it
  const R = inner * A;                       // bytes per step of everything above it
  const outerIdx = Math.floor(offset / R), innerOff = (offset % R) % inner;
  if (Math.floor((offset % R) / inner) !== 0) unsplittable(view, "it starts inside the cut dimension");
  type Dim = { i: number; kind: "inner" | "axis" | "outer"; m: number; cnt: number };
  const dims: Dim[] = [];
  for (let i = 0; i < 4; i++) {
    const cnt = count(ne, i), st = nb[i]!;
    if (cnt <= 1) continue;
    if (st % R === 0) dims.push({ i, kind: "outer", m: st / R, cnt });
    else if (st < inner && st * cnt <= inner) dims.push({ i, kind: "inner", m: 0, cnt });
    else if (st % inner === 0 && st < R) dims.push({ i, kind: "axis", m: st / inner, cnt });
    else if (st < inner && inner % st === 0 && (st * cnt) % inner === 0) dims.push({ i, kind: "axis", m: st / inner, cnt });  // merges lower dims with the axis
    else unsplittable(view, `its dimension ${i} (stride ${st}) straddles the cut dimension`);
  }
  const onAxis = dims.filter((x) => x.kind === "axis").sort((a, b) => a.m - b.m);
  if (onAxis.length === 0) unsplittable(view, "it picks one index of the cut dimension (it would live on one device)");
  // the dims along the axis must tile it exactly, from its start: m1 <= 1, m(j+1) = m(j)·cnt(j), top covers A
  let m = onAxis[0]!.m;
  if (m > 1) unsplittable(view, "it skips part of the cut dimension");
  for (const x of onAxis) {
    if (Math.abs(x.m - m) > 1e-12) unsplittable(view, "its dimensions along the cut dimension overlap or leave gaps");
    m = x.m * x.cnt;
  }
  if (Math.abs(m - A) > 1e-9) unsplittable(view, "it covers only part of the cut dimension");
  const top = onAxis[onAxis.length - 1]!;
  const per = (v: number) => {  // steps of the top view dim for v steps of the axis
    const r = v / top.m;
    if (Math.abs(r - Math.round(r)) > 1e-9) unsplittable(view, `a device's slice (${v} along the cut) is not a whole number of its dimension ${top.i}'s steps`);
    return Math.round(r);
  };
  const scale = top.i === 0 ? blk : 1;
  const sizes = rootState.segments[0]!.map((s) => per(k === 0 ? s / blk : s) * scale);
  for (let d = 0; d < n; d++) per(k === 0 ? axisOffset(rootState, d) / blk : axisOffset(rootState, d));
  const state = AXIS(top.i, sizes);
  return {
    state,
    local(d) {
      const s = k === 0 ? axisSize(rootState, d) / blk : axisSize(rootState, d);
      const Rd = inner * s;
      const lne = [...ne] as Shape4, lnb = [...nb] as Shape4;
      lne[top.i] = sizes[d]!;
      for (const x of dims) if (x.kind === "outer") lnb[x.i] = x.m * Rd;
      // dimensions of one step keep a consistent stride (their value is never used to address)
      for (let i = 0; i < 4; i++) if (count(ne, i) <= 1 && nb[i]! >= R) lnb[i] = Math.round((nb[i]! / R) * Rd);
      return { ne: lne, nb: lnb, offset: innerOff + outerIdx * Rd };
    },
  };
}

function localRootShape(ne: Shape4, s: SplitState, d: number): Shape4 {
  const out = [...ne] as Shape4;
  if (isAxis(s)) out[s.axis] = axisSize(s, d);
  return out;
}
