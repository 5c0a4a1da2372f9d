// Plan decoding (every record validated against its buffer before anything runs) and the
// op kernels. Ops work on rows; threads split rows (or weight-row blocks for MUL_MAT).
#include "graph.h"
#include "kernels.h"
#include "threadpool.h"
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <immintrin.h>
#include <cstdio>
#include <stdexcept>

namespace weft {

constexpr int64_t MM_BN = 16;  // weight rows per MUL_MAT work unit (a multiple of 8: repacked groups)

static inline bool is_float_type(int32_t t) { return t == T_F32 || t == T_F16 || t == T_BF16; }
static inline int64_t nrows(const Tensor& t) { return t.ne[1] * t.ne[2] * t.ne[3]; }
static inline int64_t nelements(const Tensor& t) { return t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]; }
static inline bool rows_contiguous(const Tensor& t) { return t.nb[0] == type_info(t.type).size; }
static inline bool same_shape(const Tensor& a, const Tensor& b) {
  return a.ne[0] == b.ne[0] && a.ne[1] == b.ne[1] && a.ne[2] == b.ne[2] && a.ne[3] == b.ne[3];
}
static inline char* row_ptr(const Tensor& t, int64_t i1, int64_t i2, int64_t i3) {
  return t.data + i1 * t.nb[1] + i2 * t.nb[2] + i3 * t.nb[3];
}

// ---------------------------------------------------------------- checks (one per op)

// Every check gets the node and its sources (null where absent) and returns null or what
// is wrong. The TS builder checks the same things, but this code trusts nothing.
typedef const char* (*check_fn)(Plan& plan, Tensor& t, Tensor* a, Tensor* b, Tensor* c);

static const char* check_none(Plan&, Tensor&, Tensor*, Tensor*, Tensor*) { return nullptr; }

static const char* check_get_rows(Plan&, Tensor& t, Tensor* a, Tensor* b, Tensor*) {
  if (!a || !b || b->type != T_I32 || t.type != T_F32) return "needs (any, I32) -> F32";
  if (!rows_contiguous(*a) || t.ne[0] != a->ne[0] || t.ne[1] != b->ne[0] || t.ne[2] != b->ne[1] || t.ne[3] != b->ne[2] ||
      b->ne[1] != a->ne[2] || b->ne[2] != a->ne[3] || b->ne[3] != 1)
    return "shape mismatch";
  if (!rows_contiguous(t) || !rows_contiguous(*b)) return "needs contiguous rows";
  return nullptr;
}

static const char* check_mul_mat(Plan& plan, Tensor& t, Tensor* a, Tensor* b, Tensor*) {
  if (!a || !b || t.type != T_F32 || b->type != T_F32 || !kernels().dot[a->type]) return "unsupported types";
  // a batch dimension of a may be empty only with b's (a device's empty share of heads)
  auto bcast = [](int64_t na, int64_t nb) { return na == 0 ? nb == 0 : nb % na == 0; };
  if (a->ne[0] != b->ne[0] || t.ne[0] != a->ne[1] || t.ne[1] != b->ne[1] || t.ne[2] != b->ne[2] || t.ne[3] != b->ne[3] ||
      !bcast(a->ne[2], b->ne[2]) || !bcast(a->ne[3], b->ne[3]))
    return "shape mismatch";
  if (!rows_contiguous(*a) || !rows_contiguous(t)) return "needs contiguous weight and result rows";
  // BF16 is sized as converted whatever the level now: a cached plan may run after
  // the level changes (tests force levels), and its activations are only 2 bytes each
  const int32_t vt = a->type == T_BF16 ? T_BF16 : vec_dot_type(a->type);
  const bool direct = vt == T_F32 && rows_contiguous(*b);
  if (!direct) plan.wsize = std::max(plan.wsize, (size_t)(row_bytes(vt, b->ne[0]) * nrows(*b) + 64));
  plan.tile_scratch = std::max(plan.tile_scratch, (size_t)(MM_BN * tile_row_bytes(a->type, a->ne[0]) + 64));
  return nullptr;
}

static const char* check_binary(Plan&, Tensor& t, Tensor* a, Tensor* b, Tensor*) {
  if (!a || !b || a->type != T_F32 || b->type != T_F32 || t.type != T_F32) return "needs F32";
  if (!same_shape(t, *a)) return "shape mismatch";
  for (int k = 0; k < 4; ++k) if (b->ne[k] == 0 ? a->ne[k] != 0 : a->ne[k] % b->ne[k] != 0) return "cannot broadcast";
  return nullptr;
}

static const char* check_map(Plan&, Tensor& t, Tensor* a, Tensor*, Tensor*) {
  if (!a || a->type != T_F32 || t.type != T_F32 || !same_shape(t, *a)) return "needs F32 of the same shape";
  if (t.op == OP_RMS_NORM && (!rows_contiguous(*a) || !rows_contiguous(t))) return "needs contiguous rows";
  if (t.op == OP_UNARY && (t.params[0] < 0 || t.params[0] > 2)) return "unknown unary op";
  return nullptr;
}

static const char* check_glu(Plan&, Tensor& t, Tensor* a, Tensor* b, Tensor*) {
  if (!a || a->type != T_F32 || t.type != T_F32) return "needs F32";
  if (t.params[0] < 0 || t.params[0] > 1) return "unknown glu op";
  if (b) { if (b->type != T_F32 || !same_shape(*a, *b) || !same_shape(t, *a)) return "shape mismatch"; }
  else if (a->ne[0] != 2 * t.ne[0] || a->ne[1] != t.ne[1] || a->ne[2] != t.ne[2] || a->ne[3] != t.ne[3]) return "shape mismatch";
  return nullptr;
}

static const char* check_rope(Plan&, Tensor& t, Tensor* a, Tensor* b, Tensor*) {
  if (!a || !b || a->type != T_F32 || b->type != T_I32 || t.type != T_F32 || !same_shape(t, *a)) return "needs F32 and I32 positions";
  if (b->ne[0] != a->ne[2] || !rows_contiguous(*a) || !rows_contiguous(t) || !rows_contiguous(*b)) return "shape mismatch";
  const int64_t nd = (int64_t)t.params[0];
  if (nd <= 0 || nd > t.ne[0] || nd % 2 != 0) return "bad rotary dimension count";
  if (t.params[1] != 0 && t.params[1] != 2) return "unknown rope mode";
  return nullptr;
}

static const char* check_soft_max(Plan&, Tensor& t, Tensor* a, Tensor* b, Tensor*) {
  if (!a || a->type != T_F32 || t.type != T_F32 || !same_shape(t, *a) || !rows_contiguous(*a) || !rows_contiguous(t)) return "needs F32 rows";
  if (b) {
    if ((b->type != T_F32 && b->type != T_F16) || b->ne[0] != a->ne[0] || b->ne[1] < a->ne[1] || !rows_contiguous(*b) ||
        b->ne[2] == 0 || b->ne[3] == 0 || a->ne[2] % b->ne[2] != 0 || a->ne[3] % b->ne[3] != 0)
      return "mask shape mismatch";
  }
  if (t.params[1] != 0) return "ALiBi (max_bias) is not supported";
  return nullptr;
}

static const char* check_cpy(Plan&, Tensor& t, Tensor* a, Tensor*, Tensor*) {
  if (!a || (!is_float_type(a->type) && a->type != t.type)) return "unsupported source type";
  if (!type_is_quantizable(t.type) || t.type == T_Q8_K) return "unsupported destination type";
  if (!same_shape(t, *a)) return "shape mismatch";
  if (!rows_contiguous(t) && type_info(t.type).blck > 1) return "quantized destination needs contiguous rows";
  if (a->type != t.type && type_info(a->type).blck > 1) return "cannot convert from a quantized type";
  return nullptr;
}

static const char* check_set_rows(Plan&, Tensor& t, Tensor* a, Tensor* b, Tensor*) {
  if (!a || !b || a->type != T_F32 || (b->type != T_I64 && b->type != T_I32)) return "needs F32 rows and I32/I64 indices";
  if (!type_is_quantizable(t.type) || t.type == T_Q8_K) return "unsupported destination type";
  if (a->ne[0] != t.ne[0] || a->ne[2] != t.ne[2] || a->ne[3] != t.ne[3] || b->ne[0] != a->ne[1] ||
      b->ne[1] == 0 || b->ne[2] == 0 || a->ne[2] % b->ne[1] != 0 || a->ne[3] % b->ne[2] != 0)
    return "shape mismatch";
  if (!rows_contiguous(*a) || !rows_contiguous(t)) return "needs contiguous rows";
  return nullptr;
}

static const char* check_unsupported(Plan&, Tensor&, Tensor*, Tensor*, Tensor*) { return "op not supported by the CPU backend"; }

static bool is_contiguous(const Tensor& t) {
  int64_t want = type_info(t.type).size;
  if (t.nb[0] != want) return false;
  want = row_bytes(t.type, t.ne[0]);
  for (int k = 1; k < 4; ++k) { if (t.ne[k] > 1 && t.nb[k] != want) return false; want *= t.ne[k]; }
  return true;
}

static const char* check_all_reduce(Plan& plan, Tensor& t, Tensor* a, Tensor*, Tensor*) {
  if (!a || a->type != T_F32 || t.type != T_F32 || !is_contiguous(*a) || !is_contiguous(t)) return "needs contiguous F32 tensors";
  const double gid = t.params[0], rank = t.params[1], mode = t.params[2];
  std::shared_ptr<Group> g = lookup_group((int64_t)gid);
  if (!g || gid != (double)(int64_t)gid) return "unknown collective group";
  if (!(rank >= 0 && rank < g->size && rank == (double)(int)rank)) return "rank outside the group";
  if (g->networked() && rank != g->self) return "rank is not this process's rank in the group";
  if (mode == COLL_SUM) {
    if (!same_shape(t, *a)) return "shape mismatch";
  } else if (mode == COLL_GATHER || mode == COLL_REDUCE_SCATTER) {
    const double inner = t.params[3], axis = t.params[4], off = t.params[5], len = t.params[6];
    auto whole = [](double v) { return v >= 0 && v <= 9007199254740991.0 && v == (double)(int64_t)v; };
    if (!whole(inner) || !whole(axis) || !whole(off) || !whole(len) || inner < 1 || off + len > axis) return "bad slice";
    // the whole tensor and this rank's slice of it: which is which depends on the mode
    const Tensor& full = mode == COLL_GATHER ? t : *a;
    const Tensor& part = mode == COLL_GATHER ? *a : t;
    const double nt = (double)nelements(full), na = (double)nelements(part);
    if (axis == 0 ? nt != 0 : std::fmod(nt, inner * axis) != 0) return "slice shape mismatch";
    const double outer = axis == 0 ? 0 : nt / (inner * axis);
    if (na != inner * len * outer) return "the slice does not match the whole tensor";
    if (mode == COLL_REDUCE_SCATTER && t.nparams > 7) {
      // every rank's bounds: 0 = b0 <= b1 <= ... <= b_size = axis, this rank's = [off, off + len)
      if (t.nparams != 8 + g->size) return "the ranks' bounds do not match the group";
      const double* b = t.params + 7;
      if (b[0] != 0 || b[g->size] != axis || b[(int)rank] != off || b[(int)rank + 1] != off + len) return "the ranks' bounds do not match this rank's slice";
      for (int r = 0; r < g->size; ++r) if (!whole(b[r]) || b[r + 1] < b[r]) return "the ranks' bounds are not increasing";
    }
  } else {
    return "unknown collective mode";
  }
  t.group = g.get();
  plan.groups.push_back(std::move(g));
  return nullptr;
}

struct Ctx;
typedef void (*run_fn)(Ctx& c, Tensor& t, int ith, int nth);
struct OpDef { const char* name; check_fn check; run_fn run; };
static const OpDef& op_def(int32_t op);

const char* op_name(int32_t op) { return op >= 0 && op < OP_COUNT ? op_def(op).name : "?"; }

// ---------------------------------------------------------------- decode

std::unique_ptr<Plan> decode_plan(const double* rec, int64_t count, std::string& err) {
  auto plan = std::make_unique<Plan>();
  plan->t.resize(count);
  char msg[512];
  for (int64_t i = 0; i < count; ++i) {
    const double* r = rec + i * REC;
    Tensor& t = plan->t[i];
    t.group = nullptr;
    const double opd = r[R_OP];
    t.op = opd >= 0 && opd < OP_COUNT && opd == (double)(int32_t)opd ? (int32_t)opd : -1;
    t.type = (int32_t)r[R_TYPE];
    const char* on = t.op >= 0 ? op_name(t.op) : "?";
    auto fail = [&](const char* what) {
      snprintf(msg, sizeof msg, "tensor #%lld (op %s): %s", (long long)i, on, what);
      err = msg;
      return nullptr;
    };
    if (t.op < 0) return fail("unknown op id");
    TypeInfo ti = type_info(t.type);
    if (!ti.known || r[R_TYPE] != (double)t.type) return fail("unknown tensor type");
    for (int k = 0; k < 4; ++k) {
      double ne = r[R_NE + k], nb = r[R_NB + k];
      if (!(ne >= 0 && ne <= 9007199254740991.0) || ne != (double)(int64_t)ne) return fail("bad ne");
      if (!(nb >= 0 && nb <= 9007199254740991.0) || nb != (double)(int64_t)nb) return fail("bad nb");
      t.ne[k] = (int64_t)ne;
      t.nb[k] = (int64_t)nb;
    }
    if (t.ne[0] % ti.blck != 0) return fail("row length is not a multiple of the type's block size");
    // the element count in double: a hostile shape must not wrap int64 (and skip the bounds check below)
    if ((double)t.ne[0] * (double)t.ne[1] * (double)t.ne[2] * (double)t.ne[3] > 9007199254740991.0) return fail("too many elements");
    for (int k = 0; k < MAX_SRC; ++k) {
      double s = r[R_SRC + k];
      if (s != (double)(int32_t)s || s < -1 || s >= (double)i) return fail("source index out of order");
      t.src[k] = (int32_t)s;
    }
    const double np = r[R_NPARAMS];
    if (!(np >= 0 && np <= MAX_PARAMS) || np != (double)(int)np) return fail("bad param count");
    for (int k = 0; k < MAX_PARAMS; ++k) t.params[k] = k < (int)np ? r[R_PARAMS + k] : 0.0;
    t.nparams = (int32_t)np;
    t.is_node = t.op != OP_NONE;
    const double flags = r[R_FLAGS];
    if (flags != 0 && flags != F_REPACKED) return fail("unknown flags");
    t.packed = flags == F_REPACKED;
    if (t.packed && (t.op != OP_NONE || !type_is_repackable(t.type) || t.ne[1] % 8 != 0 || t.ne[2] != 1 || t.ne[3] != 1 ||
                     t.nb[1] != row_bytes(t.type, t.ne[0])))
      return fail("a repacked weight must be a whole 2-D matrix of Q4_0, Q8_0 or Q4_K rows, a multiple of 8 of them");
    // placement: every tensor must lie wholly inside a live buffer
    BufferInfo bi;
    const double bid = r[R_BUF];
    if (bid != (double)(int64_t)bid || !lookup_buffer((int64_t)bid, &bi)) return fail("tensor has no live buffer");
    if (std::find(plan->buffers.begin(), plan->buffers.end(), (int64_t)bid) == plan->buffers.end()) plan->buffers.push_back((int64_t)bid);
    double offs = r[R_OFFS];
    if (!(offs >= 0) || offs > (double)bi.size || offs != (double)(int64_t)offs) return fail("offset beyond its buffer");
    if (nelements(t) > 0) {
      // extent in bytes, computed in double so a hostile shape cannot overflow; a repacked
      // matrix (checked above to be whole and 2-D) takes repacked_row_bytes per row
      double extent = offs + (double)(t.ne[0] / ti.blck - 1) * t.nb[0] + ti.size;
      for (int k = 1; k < 4; ++k) extent += (double)(t.ne[k] - 1) * t.nb[k];
      if (t.packed) extent = std::max(extent, offs + (double)t.ne[1] * (double)repacked_row_bytes(t.type, t.ne[0]));
      if (extent > (double)bi.size) return fail("tensor extends beyond its buffer");
      // what a node writes has no element twice (zero or overlapping strides): its work is
      // bounded by its memory, so a hostile graph cannot ask for 2^60 writes into one byte
      if (op_def(t.op).run && !t.packed && (double)nelements(t) / ti.blck * ti.size > extent - offs)
        return fail("a node's elements overlap in memory (zero or overlapping strides)");
    }
    // a mapped file is mapped read-only: a node there would fault instead of failing
    if (bi.read_only && op_def(t.op).run) return fail("writes into a read-only (mapped file) buffer");
    t.data = bi.base + (int64_t)offs;
    auto S = [&](int k) -> Tensor* { return t.src[k] >= 0 ? &plan->t[t.src[k]] : nullptr; };
    for (int k = 0; k < MAX_SRC; ++k)
      if (S(k) && S(k)->packed && !(t.op == OP_MUL_MAT && k == 0)) return fail("reads repacked weights, which only MUL_MAT can (as its first operand)");
    if (const char* why = op_def(t.op).check(*plan, t, S(0), S(1), S(2))) return fail(why);
    if (op_def(t.op).run) plan->nodes.push_back((int32_t)i);
  }
  // Row temporaries: the widest row of any node, per thread, after the MUL_MAT area.
  int64_t widest = 0;
  for (int32_t i : plan->nodes) {
    widest = std::max(widest, plan->t[i].ne[0]);
    for (int k = 0; k < MAX_SRC; ++k) if (plan->t[i].src[k] >= 0) widest = std::max(widest, plan->t[plan->t[i].src[k]].ne[0]);
  }
  plan->row_scratch = (size_t)((widest * 4 + 63) / 64 * 64);
  return plan;
}

// ---------------------------------------------------------------- kernels

// Scratch layout: [activations converted for MUL_MAT: wsize][row temporaries × threads]
// [decoded weight rows × threads].
struct Ctx {
  Plan* plan;
  char* scratch;
  size_t row_scratch;  // bytes per thread for row temporaries
  Barrier* barrier;    // the pool's: every thread of this device
  std::atomic<int>* bad_index;
  // a failure every thread must see (set by worker 0 before a pool barrier): later
  // nodes are skipped, and execute_plan throws `failure` once all threads are done
  std::atomic<bool>* failed;
  std::string* failure;
  float* row_tmp(int ith) const { return (float*)(scratch + plan->wsize + ith * row_scratch); }
  // 64-byte aligned (KDec is loaded with aligned loads; tile_scratch has 64 bytes of slack)
  char* tile_tmp(int ith, int nth) const {
    char* p = scratch + plan->wsize + nth * row_scratch + ith * plan->tile_scratch;
    return (char*)(((uintptr_t)p + 63) & ~(uintptr_t)63);
  }
  void fail(const std::string& msg) { if (!failed->exchange(true)) *failure = msg; }
};

static inline void split(int64_t n, int ith, int nth, int64_t& lo, int64_t& hi) {
  const int64_t per = (n + nth - 1) / nth;
  lo = std::min(n, per * ith);
  hi = std::min(n, lo + per);
}

// Reads element i0 of a row as float (for strided float rows).
static inline float load_f(const char* p, int32_t type) {
  switch (type) {
    case T_F32: return *(const float*)p;
    case T_F16: return fp16_to_fp32(*(const uint16_t*)p);
    case T_BF16: return bf16_to_fp32(*(const uint16_t*)p);
    default: return 0;
  }
}

template <typename F>
static void for_rows(const Tensor& t, int ith, int nth, F f) {
  const int64_t nr = nrows(t);
  int64_t lo, hi;
  split(nr, ith, nth, lo, hi);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t i1 = r % t.ne[1], i2 = (r / t.ne[1]) % t.ne[2], i3 = r / (t.ne[1] * t.ne[2]);
    f(i1, i2, i3);
  }
}

static void op_get_rows(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  Tensor& b = c.plan->t[t.src[1]];
  const int64_t nr = nrows(t);
  int64_t lo, hi;
  split(nr, ith, nth, lo, hi);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t i1 = r % t.ne[1], i2 = (r / t.ne[1]) % t.ne[2], i3 = r / (t.ne[1] * t.ne[2]);
    const int32_t idx = *(const int32_t*)(b.data + i1 * b.nb[0] + i2 * b.nb[1] + i3 * b.nb[2]);
    float* out = (float*)row_ptr(t, i1, i2, i3);
    if (idx < 0 || idx >= a.ne[1]) { c.bad_index->store(1); std::fill(out, out + t.ne[0], 0.0f); continue; }
    dequantize_row(a.type, row_ptr(a, idx, i2, i3), out, t.ne[0]);
  }
}

static void mul_mat_convert(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  Tensor& b = c.plan->t[t.src[1]];
  const int32_t vt = vec_dot_type(a.type);
  if ((vt == T_F32 && rows_contiguous(b)) || a.ne[0] == 0) return;
  const int64_t K = b.ne[0], nr = nrows(b), rb = row_bytes(vt, K);
  float* tmp = c.row_tmp(ith);
  int64_t lo, hi;
  split(nr, ith, nth, lo, hi);
  const from_float_fn act = kernels().act[vt];
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t i1 = r % b.ne[1], i2 = (r / b.ne[1]) % b.ne[2], i3 = r / (b.ne[1] * b.ne[2]);
    const char* src = row_ptr(b, i1, i2, i3);
    const float* row = (const float*)src;
    if (!rows_contiguous(b)) {
      for (int64_t k = 0; k < K; ++k) tmp[k] = *(const float*)(src + k * b.nb[0]);
      row = tmp;
    }
    act(row, c.scratch + r * rb, K);
  }
}

static void op_mul_mat(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  Tensor& b = c.plan->t[t.src[1]];
  if (nelements(t) == 0) return;
  if (a.ne[0] == 0) {  // an empty share of the inner dimension (a device without heads): zeros
    for_rows(t, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) { std::memset(row_ptr(t, i1, i2, i3), 0, t.ne[0] * 4); });
    return;
  }
  const int32_t vt = vec_dot_type(a.type);
  const bool direct = vt == T_F32 && rows_contiguous(b);
  const int64_t K = a.ne[0], N = a.ne[1], M = b.ne[1];
  const int64_t rb = row_bytes(vt, K);
  const int64_t r2 = b.ne[2] / a.ne[2], r3 = b.ne[3] / a.ne[3];
  const vec_dot_fn dot = kernels().dot[a.type];
  // Work units: (batch i2,i3) x blocks of BN weight rows. Within a unit, each weight row
  // block is reused across all M activation columns while it sits in L1/L2.
  const int64_t BN = MM_BN;
  const int64_t nblk = (N + BN - 1) / BN;
  const int64_t units = nblk * b.ne[2] * b.ne[3];
  int64_t lo, hi;
  split(units, ith, nth, lo, hi);
  const tile_fn tile = M > 1 ? kernels().tile[a.type] : nullptr;
  const gemm8_fn gemm8 = M > 1 && a.packed ? kernels().gemm8[a.type] : nullptr;
  const dot4_fn dot4 = kernels().dot4[a.type];
  const int64_t wrow = row_bytes(a.type, K);
  const bool strided = a.nb[1] != wrow && wrow <= 4096;
  const int64_t packed_rb = a.packed ? repacked_row_bytes(a.type, K) : 0;  // a 2-D matrix: no batch offset
  for (int64_t u = lo; u < hi; ++u) {
    const int64_t blk = u % nblk, i2 = (u / nblk) % b.ne[2], i3 = u / (nblk * b.ne[2]);
    const int64_t n0 = blk * BN, n1 = std::min(N, n0 + BN);
    const char* wbase = a.data + (i2 / r2) * a.nb[2] + (i3 / r3) * a.nb[3];
    if (gemm8) {
      const char* act0 = c.scratch + ((i3 * b.ne[2] + i2) * M) * rb;  // quantized activations: never direct
      float* out0 = (float*)row_ptr(t, 0, i2, i3);
      const int64_t os = t.nb[1] / 4;
      for (int64_t m = 0; m < M; m += GEMM8_RN)
        gemm8(K, a.data + n0 * packed_rb, (n1 - n0) / 8, act0 + m * rb, rb, out0 + m * os + n0, os, (int)std::min<int64_t>(GEMM8_RN, M - m));
      continue;
    }
    if (tile) {
      const char* wrows = wbase + n0 * a.nb[1];
      int64_t ws = a.nb[1];
      if (a.packed) {  // Q4_K (no gemm8); units start at multiples of 16 rows, so at group boundaries
        char* buf = c.tile_tmp(ith, nth);
        ws = tile_row_bytes(a.type, K);
        for (int64_t n = n0; n < n1; n += 8) kernels().unpack8[a.type](a.data + n * packed_rb, buf + (n - n0) * ws, K);
        wrows = buf;
      } else if (auto dec = kernels().decode[a.type]) {
        char* buf = c.tile_tmp(ith, nth);
        ws = decoded_row_bytes(a.type, K);
        for (int64_t n = n0; n < n1; ++n) dec(wbase + n * a.nb[1], buf + (n - n0) * ws, K);
        wrows = buf;
      }
      // register-blocked tiles; the result row stride is t.nb[1] (contiguous rows checked at decode)
      const char* act0 = direct ? row_ptr(b, 0, i2, i3) : c.scratch + ((i3 * b.ne[2] + i2) * M) * rb;
      const int64_t as = direct ? b.nb[1] : rb;
      float* out0 = (float*)row_ptr(t, 0, i2, i3);
      const int64_t os = t.nb[1] / 4;
      for (int64_t m = 0; m < M; m += TILE_RN) {
        const int rn = (int)std::min<int64_t>(TILE_RN, M - m);
        for (int64_t n = n0; n < n1; n += TILE_RM) {
          const int rm = (int)std::min<int64_t>(TILE_RM, n1 - n);
          tile(K, wrows + (n - n0) * ws, ws, act0 + m * as, as, out0 + m * os + n, os, rm, rn);
        }
      }
      continue;
    }
    for (int64_t m = 0; m < M; ++m) {
      const char* act = direct ? row_ptr(b, m, i2, i3) : c.scratch + ((i3 * b.ne[2] + i2) * M + m) * rb;
      float* out = (float*)row_ptr(t, m, i2, i3);
      if (a.packed) {
        kernels().gemv8[a.type](K, a.data + n0 * packed_rb, (n1 - n0) / 8, act, out + n0);
      } else if (strided) {
        // rows of a view (the transposed V cache) are far apart: fetch the row after next
        // while this one is multiplied, or every row start waits on memory
        for (int64_t n = n0; n < n1; ++n) {
          if (n + 2 < N) for (int64_t o = 0; o < wrow; o += 64) _mm_prefetch(wbase + (n + 2) * a.nb[1] + o, _MM_HINT_T0);
          out[n] = dot(K, wbase + n * a.nb[1], act);
        }
      } else {
        int64_t n = n0;
        if (dot4) for (; n + 4 <= n1; n += 4) dot4(K, wbase + n * a.nb[1], a.nb[1], act, out + n);
        for (; n < n1; ++n) out[n] = dot(K, wbase + n * a.nb[1], act);
      }
    }
  }
}

static void op_binary(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  Tensor& b = c.plan->t[t.src[1]];
  const bool add = t.op == OP_ADD;
  for_rows(t, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
    char* o = row_ptr(t, i1, i2, i3);
    const char* x = row_ptr(a, i1, i2, i3);
    const char* y = row_ptr(b, i1 % b.ne[1], i2 % b.ne[2], i3 % b.ne[3]);
    const int64_t n = t.ne[0], nb1 = b.ne[0];
    if (t.nb[0] == 4 && a.nb[0] == 4 && b.nb[0] == 4 && nb1 == n) {
      float* of = (float*)o; const float* xf = (const float*)x; const float* yf = (const float*)y;
      if (add) for (int64_t i = 0; i < n; ++i) of[i] = xf[i] + yf[i];
      else for (int64_t i = 0; i < n; ++i) of[i] = xf[i] * yf[i];
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float xv = *(const float*)(x + i * a.nb[0]);
        const float yv = *(const float*)(y + (i % nb1) * b.nb[0]);
        *(float*)(o + i * t.nb[0]) = add ? xv + yv : xv * yv;
      }
    }
  });
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }
static inline float gelu(float x) {
  const float k = 0.79788456080286535587989211986876f;  // sqrt(2/pi)
  return 0.5f * x * (1.0f + tanhf(k * x * (1.0f + 0.044715f * x * x)));
}

static void op_map(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  const float s = (float)t.params[0], bias = (float)t.params[1];
  const int kind = (int)t.params[0];
  for_rows(t, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
    char* o = row_ptr(t, i1, i2, i3);
    const char* x = row_ptr(a, i1, i2, i3);
    for (int64_t i = 0; i < t.ne[0]; ++i) {
      const float v = *(const float*)(x + i * a.nb[0]);
      float r;
      if (t.op == OP_SCALE) r = v * s + bias;
      else if (kind == UNARY_SILU) r = silu(v);
      else if (kind == UNARY_GELU) r = gelu(v);
      else r = v > 0 ? v : 0;
      *(float*)(o + i * t.nb[0]) = r;
    }
  });
}

static void op_glu(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  Tensor* b = t.src[1] >= 0 ? &c.plan->t[t.src[1]] : nullptr;
  const int kind = (int)t.params[0];
  const bool swapped = t.params[1] != 0;
  for_rows(t, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
    char* o = row_ptr(t, i1, i2, i3);
    const char* g = row_ptr(a, i1, i2, i3);
    const char* u = b ? row_ptr(*b, i1, i2, i3) : g + t.ne[0] * a.nb[0];
    const int64_t ub = b ? b->nb[0] : a.nb[0];
    if (!b && swapped) std::swap(g, u);
    if (kind == GLU_SWIGLU && a.nb[0] == 4 && ub == 4 && t.nb[0] == 4) {
      kernels().swiglu((const float*)g, (const float*)u, (float*)o, t.ne[0]);
      return;
    }
    for (int64_t i = 0; i < t.ne[0]; ++i) {
      const float gv = *(const float*)(g + i * a.nb[0]);
      const float uv = *(const float*)(u + i * ub);
      *(float*)(o + i * t.nb[0]) = (kind == GLU_SWIGLU ? silu(gv) : gelu(gv)) * uv;
    }
  });
}

static void op_rms_norm(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  const float eps = (float)t.params[0];
  for_rows(t, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
    const float* x = (const float*)row_ptr(a, i1, i2, i3);
    float* o = (float*)row_ptr(t, i1, i2, i3);
    double sum = 0;
    for (int64_t i = 0; i < t.ne[0]; ++i) sum += (double)x[i] * x[i];
    const float mean = (float)(sum / t.ne[0]);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int64_t i = 0; i < t.ne[0]; ++i) o[i] = x[i] * scale;
  });
}

static void op_rope(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  Tensor& p = c.plan->t[t.src[1]];
  const int64_t nd = (int64_t)t.params[0];
  const bool neox = t.params[1] == 2;
  const float base = (float)t.params[2], fscale = (float)t.params[3];
  const float mscale = t.params[4] == 0 ? 1.0f : (float)t.params[4];
  const float theta_scale = powf(base, -2.0f / nd);
  float* cache = c.row_tmp(ith);
  // Work is split by token (i2): the sin/cos cache of a position is built once per token
  // and reused for every head.
  const int64_t units = t.ne[2] * t.ne[3];
  int64_t lo, hi;
  split(units, ith, nth, lo, hi);
  for (int64_t u = lo; u < hi; ++u) {
    const int64_t i2 = u % t.ne[2], i3 = u / t.ne[2];
    const int32_t pos = *(const int32_t*)(p.data + i2 * p.nb[0]);
    float theta = (float)pos;
    for (int64_t i0 = 0; i0 < nd; i0 += 2) {
      const float th = fscale * theta;
      cache[i0] = cosf(th) * mscale;
      cache[i0 + 1] = sinf(th) * mscale;
      theta *= theta_scale;
    }
    for (int64_t i1 = 0; i1 < t.ne[1]; ++i1) {
      const float* x = (const float*)row_ptr(a, i1, i2, i3);
      float* o = (float*)row_ptr(t, i1, i2, i3);
      if (!neox) {
        for (int64_t i0 = 0; i0 < nd; i0 += 2) {
          const float c0 = cache[i0], s0 = cache[i0 + 1], x0 = x[i0], x1 = x[i0 + 1];
          o[i0] = x0 * c0 - x1 * s0;
          o[i0 + 1] = x0 * s0 + x1 * c0;
        }
      } else {
        const int64_t h = nd / 2;
        for (int64_t i0 = 0; i0 < nd; i0 += 2) {
          const int64_t ic = i0 / 2;
          const float c0 = cache[i0], s0 = cache[i0 + 1], x0 = x[ic], x1 = x[ic + h];
          o[ic] = x0 * c0 - x1 * s0;
          o[ic + h] = x0 * s0 + x1 * c0;
        }
      }
      if (o != x) for (int64_t i0 = nd; i0 < t.ne[0]; ++i0) o[i0] = x[i0];
    }
  }
}

static void op_soft_max(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  Tensor* m = t.src[1] >= 0 ? &c.plan->t[t.src[1]] : nullptr;
  const float scale = (float)t.params[0];
  float* w = c.row_tmp(ith);
  for_rows(t, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
    const float* x = (const float*)row_ptr(a, i1, i2, i3);
    float* o = (float*)row_ptr(t, i1, i2, i3);
    const int64_t n = t.ne[0];
    const char* mr = m ? row_ptr(*m, i1, i2 % m->ne[2], i3 % m->ne[3]) : nullptr;
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      float v = x[i] * scale;
      if (mr) v += m->type == T_F32 ? ((const float*)mr)[i] : fp16_to_fp32(((const uint16_t*)mr)[i]);
      w[i] = v;
      mx = std::max(mx, v);
    }
    if (mx == -INFINITY) { for (int64_t i = 0; i < n; ++i) o[i] = 0; return; }
    const double sum = kernels().exp_sum(w, n, mx);
    const float inv = (float)(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) o[i] = w[i] * inv;
  });
}

// src row (float types, any stride) -> float buffer
static inline const float* row_as_float(const Tensor& s, const char* src, float* tmp) {
  if (s.type == T_F32 && s.nb[0] == 4) return (const float*)src;
  for (int64_t i = 0; i < s.ne[0]; ++i) tmp[i] = load_f(src + i * s.nb[0], s.type);
  return tmp;
}
static inline void store_row(const Tensor& d, char* dst, const float* x) {
  if (type_info(d.type).blck > 1 || d.nb[0] == type_info(d.type).size) { quantize_row(d.type, x, dst, d.ne[0]); return; }
  for (int64_t i = 0; i < d.ne[0]; ++i) {
    char* p = dst + i * d.nb[0];
    if (d.type == T_F32) *(float*)p = x[i];
    else if (d.type == T_F16) *(uint16_t*)p = fp32_to_fp16(x[i]);
    else *(uint16_t*)p = fp32_to_bf16(x[i]);
  }
}

static void op_cpy(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  float* tmp = c.row_tmp(ith);
  const int64_t rb = row_bytes(a.type, a.ne[0]);
  for_rows(t, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
    const char* src = row_ptr(a, i1, i2, i3);
    char* dst = row_ptr(t, i1, i2, i3);
    if (a.type == t.type && rows_contiguous(a) && rows_contiguous(t)) { std::memmove(dst, src, rb); return; }
    store_row(t, dst, row_as_float(a, src, tmp));
  });
}

static void op_set_rows(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  Tensor& ix = c.plan->t[t.src[1]];
  for_rows(a, ith, nth, [&](int64_t i1, int64_t i2, int64_t i3) {
    const char* ip = ix.data + i1 * ix.nb[0] + (i2 % ix.ne[1]) * ix.nb[1] + (i3 % ix.ne[2]) * ix.nb[2];
    const int64_t idx = ix.type == T_I64 ? *(const int64_t*)ip : *(const int32_t*)ip;
    if (idx < 0 || idx >= t.ne[1]) { c.bad_index->store(1); return; }
    const float* x = (const float*)row_ptr(a, i1, i2, i3);
    char* dst = row_ptr(t, idx, i2, i3);
    if (t.ne[0] == 1) {  // one element per row: the transposed V cache
      if (t.type == T_F16) *(uint16_t*)dst = fp32_to_fp16(*x);
      else if (t.type == T_F32) *(float*)dst = *x;
      else store_row(t, dst, x);
      return;
    }
    store_row(t, dst, x);
  });
}

// Both MUL_MAT phases: activations converted by every thread, then the product.
static void op_mul_mat_both(Ctx& c, Tensor& t, int ith, int nth) {
  mul_mat_convert(c, t, ith, nth);
  c.barrier->wait();
  op_mul_mat(c, t, ith, nth);
}

// Canonical summation order of the ranks' partials: a binary tree, (lo..mid) + (mid..hi)
// with mid at the largest power of two below the count. The generic AllReduce path
// (lib/meta) adds in the same tree, so both paths give the same bits.
static inline int tree_mid(int lo, int hi) {
  int h = 1;
  while (h * 2 < hi - lo) h *= 2;
  return lo + h;
}
void tree_sum(const char* const* src, int lo, int hi, int64_t e0, int64_t n, float* out, float* tmp) {
  if (hi - lo == 1) { std::memcpy(out, src[lo] + e0 * 4, n * 4); return; }
  if (hi - lo == 2) {
    const float* x = (const float*)src[lo] + e0; const float* y = (const float*)src[lo + 1] + e0;
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] + y[i];
    return;
  }
  const int mid = tree_mid(lo, hi);
  tree_sum(src, lo, mid, e0, n, out, tmp + n);
  tree_sum(src, mid, hi, e0, n, tmp, tmp + n);
  for (int64_t i = 0; i < n; ++i) out[i] += tmp[i];
}

// ALL_REDUCE across the CPU devices of one group: worker 0 of every rank publishes its
// tensors and meets the others at the group barrier; then each rank's threads reduce (or
// copy, for a gather) the rank's share of the elements into every rank's result; a second
// group barrier keeps anyone from reusing a partial that another rank still reads.
static constexpr int64_t COLL_DEADLINE_NS = 300LL * 1000000000LL;
// The other devices at a group barrier are computing their share of the same step, a
// few to a few hundred microseconds away: spinning (yielding when cores are short) beats
// a futex sleep and wake-up there. 1 ms, or WEFT_SPIN_US if longer.
static int64_t coll_spin_ns() { return std::max<int64_t>(spin_ns(), 1000000); }
static void op_all_reduce(Ctx& c, Tensor& t, int ith, int nth) {
  Tensor& a = c.plan->t[t.src[0]];
  Group& g = *t.group;
  if (g.networked()) {
    // one thread talks to the peers; the others wait (with -t 1 on a server, there are none)
    if (ith == 0) {
      std::string err;
      if (!peer_all_reduce(g, t, a, c.row_tmp(0), err)) c.fail("all-reduce failed: " + err);
    }
    c.barrier->wait();
    return;
  }
  const int rank = (int)t.params[1], n = g.size;
  const int mode = (int)t.params[2];
  const bool gather = mode == COLL_GATHER;
  if (ith == 0) {
    // `elements`: the whole tensor's size, which every rank must agree on
    g.slots[rank] = {a.data, t.data, (int64_t)t.params[5], (int64_t)t.params[6], mode == COLL_REDUCE_SCATTER ? nelements(a) : nelements(t)};
    if (!g.barrier.wait(now_ns() + COLL_DEADLINE_NS, coll_spin_ns())) {
      g.fail("another device of the group did not reach the all-reduce within 300 s");
      c.fail("all-reduce failed: " + g.why);
    } else {
      // every rank checks that the others agree on the shape (each checked its own at decode)
      for (int r = 0; r < n; ++r)
        if (g.slots[r].elements != g.slots[rank].elements) { c.fail("all-reduce: the ranks' tensors differ in size"); break; }
      if (mode != COLL_SUM && !c.failed->load()) {
        int64_t covered = 0;
        for (int r = 0; r < n; ++r) covered += g.slots[r].length;
        if (covered != (int64_t)t.params[4]) c.fail("all-gather: the ranks' slices do not cover the axis");
      }
    }
  }
  c.barrier->wait();
  if (!c.failed->load()) {
    const char* srcs[64];
    for (int r = 0; r < n && r < 64; ++r) srcs[r] = g.slots[r].src;
    if (mode == COLL_REDUCE_SCATTER) {
      // this rank's slice of the sum, from every rank's whole partial, into its own result
      const int64_t inner = (int64_t)t.params[3], axis = (int64_t)t.params[4];
      const int64_t off = (int64_t)t.params[5], len = (int64_t)t.params[6];
      const int64_t outer = axis ? nelements(a) / (inner * axis) : 0, row = len * inner;
      int64_t e0, e1;
      split(outer * row, ith, nth, e0, e1);
      float* tmp = c.row_tmp(ith);
      constexpr int64_t CH = 64;
      for (int64_t e = e0; e < e1;) {
        const int64_t o = e / row, i = e % row, m = std::min({CH, e1 - e, row - i});
        tree_sum(srcs, 0, n, (o * axis + off) * inner + i, m, tmp, tmp + CH);
        std::memcpy(t.data + e * 4, tmp, m * 4);
        e += m;
      }
    } else if (!gather) {
      const int64_t L = nelements(t), lo = L * rank / n, hi = L * (rank + 1) / n;
      int64_t a0, a1;
      split(hi - lo, ith, nth, a0, a1);
      float* tmp = c.row_tmp(ith);  // [chunk][log2(n) levels of chunk]: n <= 64, row_scratch >= 4 * 8 * 64
      constexpr int64_t CH = 64;
      for (int64_t e = lo + a0; e < lo + a1; e += CH) {
        const int64_t m = std::min(CH, lo + a1 - e);
        tree_sum(srcs, 0, n, e, m, tmp, tmp + CH);
        for (int r = 0; r < n; ++r) std::memcpy(g.slots[r].dst + e * 4, tmp, m * 4);
      }
    } else {
      // this rank's slice goes into every rank's result: outer blocks split across threads
      const int64_t inner = (int64_t)t.params[3], axis = (int64_t)t.params[4];
      const int64_t off = (int64_t)t.params[5], len = (int64_t)t.params[6];
      const int64_t outer = axis ? nelements(t) / (inner * axis) : 0;
      int64_t o0, o1;
      split(outer, ith, nth, o0, o1);
      for (int64_t o = o0; o < o1; ++o)
        for (int r = 0; r < n; ++r)
          std::memcpy(g.slots[r].dst + (o * axis + off) * inner * 4, a.data + o * len * inner * 4, len * inner * 4);
    }
  }
  c.barrier->wait();
  if (ith == 0 && !c.failed->load() && !g.barrier.wait(now_ns() + COLL_DEADLINE_NS, coll_spin_ns())) {
    g.fail("another device of the group did not finish the all-reduce within 300 s");
    c.fail("all-reduce failed: " + g.why);
  }
}

// The op table: an op's name, its check at decode, and its kernel (null: no work, a view
// or a leaf). Indexed by op id; lib/core/ops.ts lists the same names in the same order.
static const OpDef OP_TABLE[OP_COUNT] = {
    /* NONE */           {"NONE", check_none, nullptr},
    /* GET_ROWS */       {"GET_ROWS", check_get_rows, op_get_rows},
    /* MUL_MAT */        {"MUL_MAT", check_mul_mat, op_mul_mat_both},
    /* ADD */            {"ADD", check_binary, op_binary},
    /* MUL */            {"MUL", check_binary, op_binary},
    /* SCALE */          {"SCALE", check_map, op_map},
    /* RMS_NORM */       {"RMS_NORM", check_map, op_rms_norm},
    /* ROPE */           {"ROPE", check_rope, op_rope},
    /* SOFT_MAX */       {"SOFT_MAX", check_soft_max, op_soft_max},
    /* CPY */            {"CPY", check_cpy, op_cpy},
    /* CONT */           {"CONT", check_cpy, op_cpy},
    /* VIEW */           {"VIEW", check_none, nullptr},
    /* RESHAPE */        {"RESHAPE", check_none, nullptr},
    /* PERMUTE */        {"PERMUTE", check_none, nullptr},
    /* TRANSPOSE */      {"TRANSPOSE", check_none, nullptr},
    /* SET_ROWS */       {"SET_ROWS", check_set_rows, op_set_rows},
    /* UNARY */          {"UNARY", check_map, op_map},
    /* GLU */            {"GLU", check_glu, op_glu},
    /* FLASH_ATTN_EXT */ {"FLASH_ATTN_EXT", check_unsupported, nullptr},
    /* ALL_REDUCE */     {"ALL_REDUCE", check_all_reduce, op_all_reduce},
};
static const OpDef& op_def(int32_t op) { return OP_TABLE[op]; }

bool g_profile = false;
OpProfile& op_profile() { static OpProfile p{}; return p; }

void execute_plan(Plan& plan, ThreadPool& pool, std::vector<char>& scratch) {
  const size_t row_scratch = std::max<size_t>(plan.row_scratch, 4 * 64 * 8);  // ALL_REDUCE's tree temporaries
  const size_t need = plan.wsize + (row_scratch + plan.tile_scratch) * pool.size() + 64;
  if (scratch.size() < need) scratch.resize(need);
  std::atomic<int> bad{0};
  std::atomic<bool> failed{false};
  std::string failure;
  Ctx c{&plan, scratch.data(), row_scratch, &pool.barrier(), &bad, &failed, &failure};
  const bool prof = g_profile;
  pool.run([&](int ith, int nth) {
    auto t_prev = std::chrono::steady_clock::now();
    for (int32_t i : plan.nodes) {
      Tensor& t = plan.t[i];
      if (failed.load(std::memory_order_acquire)) break;  // seen alike by every thread (set before a barrier)
      OP_TABLE[t.op].run(c, t, ith, nth);
      pool.barrier().wait();
      if (prof && ith == 0) {
        auto now = std::chrono::steady_clock::now();
        const int sub = t.op == OP_MUL_MAT ? plan.t[t.src[0]].type : 0;
        op_profile().ns[t.op][sub] += std::chrono::duration<double, std::nano>(now - t_prev).count();
        op_profile().calls[t.op][sub]++;
        t_prev = now;
      }
    }
  });
  if (failed.load()) throw std::runtime_error(failure);
  if (bad.load()) throw std::runtime_error("an index input (GET_ROWS / SET_ROWS) was out of range; the affected rows were not written");
}

}  // namespace weft
