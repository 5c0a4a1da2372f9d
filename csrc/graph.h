// A compute graph decoded from the plan TypeScript encodes (lib/cpu/plan.ts), validated
// once against the buffers it points into, cached by graph uid, executed on a pool.
#pragma once
#include "common.h"
#include <string>
#include <vector>
#include <memory>
#include <unordered_map>

namespace weft {

// Op ids: must match lib/core/ops.ts.
enum Op : int32_t {
  OP_NONE = 0, OP_GET_ROWS, OP_MUL_MAT, OP_ADD, OP_MUL, OP_SCALE, OP_RMS_NORM, OP_ROPE, OP_SOFT_MAX,
  OP_CPY, OP_CONT, OP_VIEW, OP_RESHAPE, OP_PERMUTE, OP_TRANSPOSE, OP_SET_ROWS, OP_UNARY, OP_GLU,
  OP_FLASH_ATTN_EXT, OP_ALL_REDUCE, OP_COUNT
};
enum Unary : int32_t { UNARY_SILU = 0, UNARY_GELU = 1, UNARY_RELU = 2 };
enum Glu : int32_t { GLU_SWIGLU = 0, GLU_GEGLU = 1 };

// Plan record layout (doubles per tensor); mirrored in lib/cpu/plan.ts.
constexpr int REC = 36;
constexpr int R_OP = 0, R_TYPE = 1, R_NE = 2, R_NB = 6, R_BUF = 10, R_OFFS = 11, R_SRC = 12, R_FLAGS = 15,
              R_NPARAMS = 16, R_PARAMS = 17, MAX_PARAMS = 16, MAX_SRC = 3;
constexpr int F_REPACKED = 1;  // R_FLAGS bit: the tensor lies in a repacked weight buffer

struct Tensor {
  int32_t op, type;
  int64_t ne[4];
  int64_t nb[4];
  char* data;
  int32_t src[MAX_SRC];
  double params[MAX_PARAMS];
  bool is_node;
  bool packed;  // weight rows repacked in groups of eight (R_FLAGS & F_REPACKED)
};

struct Plan {
  std::vector<Tensor> t;
  std::vector<int32_t> nodes;  // indices of tensors that compute (in order)
  size_t wsize = 0;            // scratch bytes needed by MUL_MAT activation conversion
  size_t row_scratch = 0;      // per-thread bytes for row temporaries (widest row)
  size_t tile_scratch = 0;     // per-thread bytes for weight rows decoded before tiling
};

struct BufferInfo { char* base; size_t size; };
// Looks up a live buffer by id (addon.cpp owns the registry); null if unknown.
bool lookup_buffer(int64_t id, BufferInfo* out);

// Decodes and validates; on error returns null and sets err to a message naming the node.
std::unique_ptr<Plan> decode_plan(const double* rec, int64_t count, std::string& err);

class ThreadPool;
void execute_plan(Plan& plan, ThreadPool& pool, std::vector<char>& scratch);

// Per-op time profile (WEFT_PROFILE=1): nanoseconds and calls by op (x weight type for
// MUL_MAT), accumulated by worker 0 between barriers.
struct OpProfile { double ns[OP_COUNT][32]; int64_t calls[OP_COUNT][32]; };
extern bool g_profile;
OpProfile& op_profile();

}  // namespace weft
