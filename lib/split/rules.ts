/**
 * Split rules (DESIGN §7): the state of every compute tensor of a graph on a meta device,
 * from its sources' states. One named rule per group of ops, in a table keyed by op (as
 * ggml-backend-meta's handlers, without the switch). A rule returns the node's state and,
 * where a source must first be in another state, that state (lib/meta turns PARTIAL into
 * MIRRORED with an all-reduce, AXIS into MIRRORED with an all-gather, and cuts a MIRRORED
 * source locally, for free). A graph the rules cannot handle is refused with a WeftError
 * naming the node, its op and its sources' states.
 */
import { WeftError, weftError } from "../core/errors.js";
import { Op, OpName, opName } from "../core/ops.js";
import { Tensor } from "../core/tensor.js";
import { AXIS, MIRRORED, PARTIAL, SplitState, describeState, isAxis, sameState, withAxis } from "./state.js";
import { splitView } from "./view.js";
import { cutOnce } from "./plan.js";

export interface RuleContext {
  /** the state already derived for a tensor of the graph */
  state(t: Tensor): SplitState;
  /** devices of the meta device */
  readonly n: number;
}

export interface RuleResult {
  readonly state: SplitState;
  /** per source: the state it must be turned into first (absent: used as it is) */
  readonly need?: ReadonlyArray<SplitState | undefined>;
}

export type SplitRule = (node: Tensor, ctx: RuleContext) => RuleResult;

export function refuse(node: Tensor, ctx: RuleContext, why: string): never {
  const srcs = node.src.map((s) => `${s.describe()} ${describeState(ctx.state(s))}`).join(", ");
  throw weftError("UNSUPPORTED_OP", `the meta backend cannot split node ${node.describe()} (op ${opName(node.op)}) with sources [${srcs}]: ${why}`);
}

const st = (node: Tensor, ctx: RuleContext, i: number) => ctx.state(node.src[i]!);

/**
 * Sequence parallelism (Megatron's): from this many tokens, a partial sum added to the
 * residual stream is reduce-scattered by tokens instead of all-reduced, so the residual
 * adds and norms run on each device's tokens and the normed activations are all-gathered
 * before the next matmuls: the same bytes as an all-reduce, half the mirrored memory and
 * work. Smaller steps (one-token generation) keep a single all-reduce, the fewest waits.
 */
export const SEQUENCE_PARALLEL_TOKENS = 32;

/** The token cut of sequence parallelism: equal shares, in whole tokens. */
function tokenCut(n: number, devices: number): SplitState {
  return AXIS(1, cutOnce(n, 1, Array<number>(devices).fill(1 / devices), Array<number>(devices).fill(0), 0));
}
const isPartial = (s: SplitState) => s.kind === "PARTIAL";

/**
 * A view (or a result aliasing its destination): the root's cut mapped through its strides.
 * A view that cannot be cut (one token of a tensor cut by tokens) reads the gathered whole.
 */
const view: SplitRule = (node, ctx) => {
  const { tensor: root, offset } = node.root();
  try {
    return { state: splitView(node, root, ctx.state(root), offset, ctx.n).state };
  } catch (e) {
    if (!(e instanceof WeftError) || e.code !== "UNSUPPORTED_OP" || !node.src[0]!.isContiguous) throw e;
    return { state: MIRRORED, need: [MIRRORED] };
  }
};

/**
 * Elementwise: partial sums add up to a partial sum (linear ops only); otherwise what is
 * partial is reduced first. The result takes the first source's cut; the second is
 * brought to it, except along dimensions where it is broadcast.
 */
const elementwise = (linear: boolean): SplitRule => (node, ctx) => {
  let a = st(node, ctx, 0);
  if (node.src.length === 1) return isPartial(a) && !linear ? { state: MIRRORED, need: [MIRRORED] } : { state: a };
  let b = st(node, ctx, 1);
  if (isPartial(a) && isPartial(b) && linear) return { state: PARTIAL };
  const [x, y] = node.src as [Tensor, Tensor];
  if (node.op === Op.ADD && isPartial(a) !== isPartial(b) && node.ne[1] >= SEQUENCE_PARALLEL_TOKENS && node.ne[2] === 1 && node.ne[3] === 1) {
    // a partial sum meets a whole (or token-cut) tensor: reduce-scatter by tokens
    const [other, otherT] = isPartial(a) ? [b, y] : [a, x];
    const cut = isAxis(other) && other.axis === 1 && other.segments.length === 1 ? other : !isAxis(other) ? tokenCut(node.ne[1], ctx.n) : null;
    if (cut) {
      const bring = sameState(other, cut) || otherT.ne[1] === 1 ? undefined : cut;
      return { state: cut, need: isPartial(a) ? [cut, bring] : [bring, cut] };
    }
  }
  const need: Array<SplitState | undefined> = [undefined, undefined];
  if (isPartial(a)) { a = MIRRORED; need[0] = MIRRORED; }
  if (isPartial(b)) { b = MIRRORED; need[1] = MIRRORED; }
  if (!isAxis(a) && !isAxis(b)) return { state: MIRRORED, need };
  if (isAxis(a)) {
    const k = a.axis;
    if (y.ne[k] === 1 && !isAxis(b)) return { state: a, need };
    if (sameState(a, b)) return { state: a, need };
    if (y.ne[k] === x.ne[k]) return { state: a, need: [need[0], a] };
    refuse(node, ctx, `the second source is broadcast along the cut dimension ${k}`);
  }
  // the first source is whole, the second cut: cut the first the same way
  const bs = b as Extract<SplitState, { kind: "AXIS" }>;
  if (y.ne[bs.axis] !== x.ne[bs.axis]) refuse(node, ctx, "a source broadcast along a dimension is cut along it");
  return { state: bs, need: [bs, need[1]] };
};

/** Row ops (norms, softmax, rope): rows are whole, so dim 0 is never cut; other sources follow. */
const perRow: SplitRule = (node, ctx) => {
  const a = st(node, ctx, 0);
  const out = isPartial(a) || (isAxis(a) && a.axis === 0) ? MIRRORED : a;
  const need: Array<SplitState | undefined> = [sameState(out, a) ? undefined : out];
  // the second source: ROPE's positions (one per dim-2 entry), SOFT_MAX's mask (broadcast)
  for (let i = 1; i < node.src.length; i++) {
    const s = st(node, ctx, i), src = node.src[i]!;
    if (!isAxis(out)) { need.push(sameState(s, MIRRORED) ? undefined : MIRRORED); continue; }
    const k = out.axis;
    const along = node.op === Op.ROPE ? (k === 2 ? 0 : -1) : src.ne[k]! > 1 ? k : -1;
    const want = along < 0 ? MIRRORED : withAxis(out, along);
    need.push(sameState(s, want) ? undefined : want);
  }
  return { state: out, need };
};

/**
 * MUL_MAT: weight cut by output features × mirrored → cut result rows; weight cut by input
 * features × activations cut the same way → PARTIAL; batches cut alike on both sides
 * (attention by heads, GQA groups whole).
 */
const mulMat: SplitRule = (node, ctx) => {
  const [wt, x] = node.src as [Tensor, Tensor];
  let a = st(node, ctx, 0), b = st(node, ctx, 1);
  const need: Array<SplitState | undefined> = [undefined, undefined];
  if (isPartial(a)) { a = MIRRORED; need[0] = MIRRORED; }
  if (isPartial(b)) { b = MIRRORED; need[1] = MIRRORED; }
  const withNeed = (state: SplitState, na?: SplitState, nb?: SplitState): RuleResult =>
    ({ state, need: [na ?? need[0], nb ?? need[1]] });
  if (!isAxis(a) && !isAxis(b)) return withNeed(MIRRORED);
  if (isAxis(a) && a.axis === 1) {
    // rows of the result follow the weight's rows; activations must be whole
    return withNeed(AXIS(0, a.segments), undefined, isAxis(b) ? MIRRORED : undefined);
  }
  if (isAxis(a) && a.axis === 0) {
    if (a.segments.length > 1) refuse(node, ctx, "the weight's input features are cut in several segments");
    const want = withAxis(a, 0);
    return withNeed(PARTIAL, undefined, sameState(b, want) ? undefined : want);
  }
  if (isAxis(b) && b.axis === 0) {
    if (b.segments.length > 1) refuse(node, ctx, "the activations' features are cut in several segments");
    return withNeed(PARTIAL, withAxis(b, 0), undefined);
  }
  if (isAxis(b) && b.axis === 1) {
    if (isAxis(a)) refuse(node, ctx, "both the weight and the activation columns are cut");
    return withNeed(b);
  }
  // batch dims 2/3: a broadcasts over b by r = b.ne / a.ne (GQA: r query heads per KV head)
  const k = isAxis(b) ? b.axis : (a as Extract<SplitState, { kind: "AXIS" }>).axis;
  const r = x.ne[k]! / (wt.ne[k]! || 1);
  if (isAxis(a) && isAxis(b)) {
    if (a.axis !== b.axis || !sameState(withAxis(a, k, r), b)) refuse(node, ctx, "the batch cuts of the two sources do not match");
    return withNeed(b);
  }
  if (isAxis(b)) {
    if (wt.ne[k] === 1) return withNeed(b);
    return withNeed(b, withAxis(b, k, 1, r));
  }
  const as = a as Extract<SplitState, { kind: "AXIS" }>;
  if (as.axis < 2) refuse(node, ctx, `the weight is cut along dimension ${as.axis}`);
  return withNeed(withAxis(as, k, r), undefined, withAxis(as, k, r));
};

/** GET_ROWS: whole rows of a mirrored table (a table cut by columns gives cut rows). */
const getRows: SplitRule = (node, ctx) => {
  const a = st(node, ctx, 0), idx = st(node, ctx, 1);
  const needIdx = sameState(idx, MIRRORED) ? undefined : MIRRORED;
  if (isAxis(a) && a.axis === 0) return { state: a, need: [undefined, needIdx] };
  return { state: MIRRORED, need: [sameState(a, MIRRORED) ? undefined : MIRRORED, needIdx] };
};

/** CPY into a destination, SET_ROWS into a cache: the destination's cut; the source is brought to it. */
const intoDestination = (dstIndex: number): SplitRule => (node, ctx) => {
  const dst = st(node, ctx, dstIndex);
  if (isPartial(dst)) refuse(node, ctx, "the destination is a partial sum");
  if (node.op === Op.SET_ROWS && isAxis(dst) && dst.axis === 1) refuse(node, ctx, "rows are written into a destination cut by rows");
  const need: Array<SplitState | undefined> = node.src.map(() => undefined);
  const src = st(node, ctx, 0);
  const want = isAxis(dst) ? splitView(node, node.root().tensor, ctx.state(node.root().tensor), node.root().offset, ctx.n).state : dst;
  if (!sameState(src, want)) need[0] = want;
  if (node.op === Op.SET_ROWS) need[1] = sameState(st(node, ctx, 1), MIRRORED) ? undefined : MIRRORED;
  return { state: want, need };
};

/** CONT: the same cut in a fresh layout (a partial stays partial: copying is linear). */
const sameAsSource: SplitRule = (node, ctx) => ({ state: st(node, ctx, 0) });

/** GLU: elementwise on gate and up; a fused [gate | up] row cut in two equal segments keeps the cut. */
const glu: SplitRule = (node, ctx) => {
  if (node.src.length === 2) return elementwise(false)(node, ctx);
  const a = st(node, ctx, 0);
  if (isPartial(a)) return { state: MIRRORED, need: [MIRRORED] };
  if (!isAxis(a) || a.axis > 0) return { state: a };
  const [g, u] = a.segments;
  if (a.segments.length === 2 && g!.every((v, d) => v === u![d])) return { state: AXIS(0, g!) };
  return { state: MIRRORED, need: [MIRRORED] };
};

const noRule = (why: string): SplitRule => (node, ctx) => refuse(node, ctx, why);

export const SPLIT_RULES: Record<OpName, SplitRule> = {
  NONE: noRule("leaves get their state from the split plan"),
  GET_ROWS: getRows,
  MUL_MAT: mulMat,
  ADD: elementwise(true),
  MUL: elementwise(false),
  SCALE: (node, ctx) => elementwise(node.params[1] === 0)(node, ctx),
  RMS_NORM: perRow,
  ROPE: perRow,
  SOFT_MAX: perRow,
  CPY: intoDestination(1),
  CONT: sameAsSource,
  VIEW: view,
  RESHAPE: view,
  PERMUTE: view,
  TRANSPOSE: view,
  SET_ROWS: intoDestination(2),
  UNARY: elementwise(false),
  GLU: glu,
  FLASH_ATTN_EXT: noRule("there is no split rule for fused attention yet"),
  ALL_REDUCE: noRule("collectives are inserted by the meta backend, not written in its graphs"),
};

export function splitRule(node: Tensor): SplitRule {
  return SPLIT_RULES[opName(node.op)];
}
