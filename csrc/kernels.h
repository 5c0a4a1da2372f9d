// Dot-product kernels for MUL_MAT, selected once at run time by CPU features.
#pragma once
#include "common.h"

namespace weft {

// AVX512: AVX-512 F/BW/VL with VNNI (Ice Lake, Zen 4 and later): the int8 products use
// vpdpbusd; with AVX512-BF16 as well (Cooper Lake, Sapphire Rapids, Zen 4) BF16 products
// use vdpbf16ps (KernelTable::bf16); the other kernels are AVX2's.
enum KernelLevel : int { LEVEL_SCALAR = 0, LEVEL_AVX2 = 1, LEVEL_AVX512 = 2 };

// dot of one weight row (type t) with one activation row already converted to
// vec_dot_type(t); n = elements in the row.
typedef float (*vec_dot_fn)(int64_t n, const void* w, const void* a);
// activation row (f32) -> vec_dot_type row
typedef void (*from_float_fn)(const float* x, void* y, int64_t n);

// four weight rows (ws bytes apart) against one activation row: out[0..3]
typedef void (*dot4_fn)(int64_t n, const void* w, int64_t ws, const void* a, float* out);
// weights repacked in groups of eight rows (block_q4_0x8, block_q8_0x8, block_q4_Kx8):
// `groups` consecutive groups against one activation row -> out[0 .. 8·groups)
typedef void (*gemv8_fn)(int64_t n, const void* w, int64_t groups, const void* a, float* out);
// repacked groups against rn (≤ GEMM8_RN) activation columns at a (stride as bytes,
// vec_dot_type): out[j*os + 8g + r] for group g's row r
typedef void (*gemm8_fn)(int64_t n, const void* w, int64_t groups, const void* a, int64_t as, float* out, int64_t os, int rn);
constexpr int GEMM8_RN = 4;
// RM×RN block of a batched product: rm (≤ TILE_RM) weight rows at w (stride ws bytes)
// against rn (≤ TILE_RN) activation rows at a (stride as bytes, vec_dot_type), writing
// out[j*os + i]. Optional: types without one use dot per element.
typedef void (*tile_fn)(int64_t n, const void* w, int64_t ws, const void* a, int64_t as, float* out, int64_t os, int rm, int rn);
constexpr int TILE_RM = 4, TILE_RN = 3;

struct KernelTable {
  int level;
  // AVX512-BF16 present (and level AVX512): BF16 weights take BF16 activations (vdpbf16ps)
  bool bf16;
  tile_fn tile[32];         // indexed by weight type
  // weight rows -> the tile's input form (Q4_0 -> Q8_0 rows; K-quants -> KDec), see decoded_row_bytes (types whose tile runs on the decoded form)
  void (*decode[32])(const void* w, void* out, int64_t n);
  vec_dot_fn dot[32];       // indexed by weight type
  dot4_fn dot4[32];         // optional, by weight type: one-token products four rows at a time
  gemv8_fn gemv8[32];       // by weight type, for every type_is_repackable type
  gemm8_fn gemm8[32];       // optional, by repackable type: batched products on the groups themselves
  // one repacked group -> eight rows of the tile's input form (tile_row_bytes apart); with
  // tile, for repacked types without gemm8
  void (*unpack8[32])(const void* w, void* out, int64_t n);
  // w[i] = exp(w[i] - mx) for a row; returns the sum (softmax)
  double (*exp_sum)(float* w, int64_t n, float mx);
  // o = silu(g) * u (SwiGLU)
  void (*swiglu)(const float* g, const float* u, float* o, int64_t n);
  from_float_fn act[32];    // indexed by vec_dot_type
};

int32_t vec_dot_type(int32_t weight_type);
// bytes of one weight row in the form its tile runs on, when it is decoded first (else 0)
int64_t decoded_row_bytes(int32_t weight_type, int64_t n);
// bytes of one weight row in the form its tile reads: decoded_row_bytes, or the row itself
int64_t tile_row_bytes(int32_t weight_type, int64_t n);
const KernelTable& kernels();
int detected_level();
bool detected_bf16();
// Forces a level (<= detected) for tests; returns the level in effect.
int set_kernel_level(int level);

}  // namespace weft
