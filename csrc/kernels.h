// Dot-product kernels for MUL_MAT, selected once at run time by CPU features.
#pragma once
#include "common.h"

namespace weft {

enum KernelLevel : int { LEVEL_SCALAR = 0, LEVEL_AVX2 = 1 };

// dot of one weight row (type t) with one activation row already converted to
// vec_dot_type(t); n = elements in the row.
typedef float (*vec_dot_fn)(int64_t n, const void* w, const void* a);
// activation row (f32) -> vec_dot_type row
typedef void (*from_float_fn)(const float* x, void* y, int64_t n);

struct KernelTable {
  int level;
  vec_dot_fn dot[32];       // indexed by weight type
  from_float_fn act[32];    // indexed by vec_dot_type
};

int32_t vec_dot_type(int32_t weight_type);
const KernelTable& kernels();
int detected_level();
// Forces a level (<= detected) for tests; returns the level in effect.
int set_kernel_level(int level);

}  // namespace weft
