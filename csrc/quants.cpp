// Reference quantization: byte-for-byte what ggml's quantize_row_*_ref produce, so that
// `weft quantize` reproduces llama-quantize's files (no importance matrix). This file is
// compiled with -ffp-contract=off: ggml-base builds it without FMA contraction, and a
// fused multiply-add changes the sums that pick K-quant scales.
#include "common.h"
#include <algorithm>

namespace weft {

float g_fp16_table[65536];
static struct Fp16TableInit {
  Fp16TableInit() { for (uint32_t i = 0; i < 65536; ++i) g_fp16_table[i] = fp16_to_fp32_calc((uint16_t)i); }
} s_fp16_table_init;

static constexpr float GROUP_MAX_EPS = 1e-15f;

static inline int nearest_int(float fval) {
  float val = fval + 12582912.f;
  int i; std::memcpy(&i, &val, sizeof(int));
  return (i & 0x007fffff) - 0x00400000;
}

static void quantize_row_q8_0(const float* x, block_q8_0* y, int64_t k) {
  const int64_t nb = k / QK8_0;
  for (int64_t i = 0; i < nb; ++i) {
    float amax = 0.0f;
    for (int j = 0; j < QK8_0; ++j) amax = std::max(amax, std::fabs(x[i * QK8_0 + j]));
    const float d = amax / ((1 << 7) - 1);
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    for (int j = 0; j < QK8_0; ++j) y[i].qs[j] = (int8_t)roundf(x[i * QK8_0 + j] * id);
  }
}

static void quantize_row_q4_0(const float* x, block_q4_0* y, int64_t k) {
  const int64_t nb = k / QK4_0;
  for (int64_t i = 0; i < nb; ++i) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK4_0; ++j) {
      const float v = x[i * QK4_0 + j];
      if (amax < std::fabs(v)) { amax = std::fabs(v); max = v; }
    }
    const float d = max / -8;
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    for (int j = 0; j < QK4_0 / 2; ++j) {
      const float x0 = x[i * QK4_0 + j] * id;
      const float x1 = x[i * QK4_0 + QK4_0 / 2 + j] * id;
      const uint8_t xi0 = std::min<int8_t>(15, (int8_t)(x0 + 8.5f));
      const uint8_t xi1 = std::min<int8_t>(15, (int8_t)(x1 + 8.5f));
      y[i].qs[j] = (uint8_t)(xi0 | (xi1 << 4));
    }
  }
}

static float make_qx_quants(int n, int nmax, const float* x, int8_t* L, int rmse_type) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    float ax = std::fabs(x[i]);
    if (ax > amax) { amax = ax; max = x[i]; }
  }
  if (amax < GROUP_MAX_EPS) { for (int i = 0; i < n; ++i) L[i] = 0; return 0.f; }
  float iscale = -nmax / max;
  // Only rmse_type 1 (weights x²) is used by the reference quantizers we reproduce.
  (void)rmse_type;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = std::max(-nmax, std::min(nmax - 1, l));
    L[i] = (int8_t)(l + nmax);
    float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * x[i]);
      l = std::max(-nmax, std::min(nmax - 1, l));
      float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        L[i] = (int8_t)(nmax + std::max(-nmax, std::min(nmax - 1, l)));
      }
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

static float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L,
                              float* the_min, uint8_t* Laux, float rmin, float rdelta, int nstep, bool use_mad) {
  float min = x[0], max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) { for (int i = 0; i < n; ++i) L[i] = 0; *the_min = -min; return 0.f; }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * (x[i] - min));
    L[i] = (uint8_t)std::max(0, std::min(nmax, l));
    float diff = scale * L[i] + min - x[i];
    diff = use_mad ? std::fabs(diff) : diff * diff;
    best_error += weights[i] * diff;
  }
  if (nstep < 1) { *the_min = -min; return scale; }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * (x[i] - min));
      l = std::max(0, std::min(nmax, l));
      Laux[i] = (uint8_t)l;
      float w = weights[i];
      sum_l += w * l;
      sum_l2 += w * l * l;
      sum_xl += w * l * x[i];
    }
    float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) { this_min = 0; this_scale = sum_xl / sum_l2; }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * Laux[i] + this_min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        cur_error += weights[i] * diff;
      }
      if (cur_error < best_error) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

static inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) { *d = q[j] & 63; *m = q[j + 4] & 63; }
  else { *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4); }
}

static void quantize_row_q4_K(const float* x, block_q4_K* y, int64_t k) {
  const int64_t nb = k / QK_K;
  uint8_t L[QK_K], Laux[32];
  float weights[32], mins[QK_K / 32], scales[QK_K / 32];
  for (int64_t i = 0; i < nb; ++i) {
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 32; ++j) {
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
      float av_x = sqrtf(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
      scales[j] = make_qkx2_quants(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20, false);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < QK_K / 32; ++j) {
      uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
      uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
      ls = std::min<uint8_t>(63, ls);
      lm = std::min<uint8_t>(63, lm);
      if (j < 4) { y[i].scales[j] = ls; y[i].scales[j + 4] = lm; }
      else {
        y[i].scales[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
        y[i].scales[j - 4] |= (uint8_t)((ls >> 4) << 6);
        y[i].scales[j - 0] |= (uint8_t)((lm >> 4) << 6);
      }
    }
    y[i].d = fp32_to_fp16(max_scale / 63.f);
    y[i].dmin = fp32_to_fp16(max_min / 63.f);
    uint8_t sc, m;
    for (int j = 0; j < QK_K / 32; ++j) {
      get_scale_min_k4(j, y[i].scales, &sc, &m);
      const float d = fp16_to_fp32_calc(y[i].d) * sc;
      if (!d) continue;
      const float dm = fp16_to_fp32_calc(y[i].dmin) * m;
      for (int ii = 0; ii < 32; ++ii) {
        int l = nearest_int((x[32 * j + ii] + dm) / d);
        L[32 * j + ii] = (uint8_t)std::max(0, std::min(15, l));
      }
    }
    uint8_t* q = y[i].qs;
    for (int j = 0; j < QK_K; j += 64) {
      for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
      q += 32;
    }
    x += QK_K;
  }
}

static void quantize_row_q6_K(const float* x, block_q6_K* y, int64_t k) {
  const int64_t nb = k / QK_K;
  int8_t L[QK_K];
  float scales[QK_K / 16];
  for (int64_t i = 0; i < nb; ++i) {
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < QK_K / 16; ++ib) {
      const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib, 1);
      scales[ib] = scale;
      const float abs_scale = std::fabs(scale);
      if (abs_scale > max_abs_scale) { max_abs_scale = abs_scale; max_scale = scale; }
    }
    if (max_abs_scale < GROUP_MAX_EPS) {
      std::memset(&y[i], 0, sizeof(block_q6_K));
      y[i].d = fp32_to_fp16(0.f);
      x += QK_K;
      continue;
    }
    float iscale = -128.f / max_scale;
    y[i].d = fp32_to_fp16(1 / iscale);
    for (int ib = 0; ib < QK_K / 16; ++ib) y[i].scales[ib] = (int8_t)std::min(127, nearest_int(iscale * scales[ib]));
    for (int j = 0; j < QK_K / 16; ++j) {
      float d = fp16_to_fp32_calc(y[i].d) * y[i].scales[j];
      if (!d) continue;
      for (int ii = 0; ii < 16; ++ii) {
        int l = nearest_int(x[16 * j + ii] / d);
        l = std::max(-32, std::min(31, l));
        L[16 * j + ii] = (int8_t)(l + 32);
      }
    }
    uint8_t* ql = y[i].ql;
    uint8_t* qh = y[i].qh;
    for (int j = 0; j < QK_K; j += 128) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t q1 = L[j + l + 0] & 0xF, q2 = L[j + l + 32] & 0xF;
        const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
        ql[l + 0] = (uint8_t)(q1 | (q3 << 4));
        ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
        qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
      }
      ql += 64;
      qh += 32;
    }
    x += QK_K;
  }
}

// Activation format for K-quant dot products (never stored in files).
static void quantize_row_q8_K(const float* x, block_q8_K* y, int64_t k) {
  const int64_t nb = k / QK_K;
  for (int64_t i = 0; i < nb; ++i) {
    float max = 0, amax = 0;
    for (int j = 0; j < QK_K; ++j) {
      float ax = std::fabs(x[j]);
      if (ax > amax) { amax = ax; max = x[j]; }
    }
    if (!amax) {
      y[i].d = 0;
      std::memset(y[i].qs, 0, QK_K);
      std::memset(y[i].bsums, 0, sizeof(y[i].bsums));
      x += QK_K;
      continue;
    }
    const float iscale = -127.f / max;
    for (int j = 0; j < QK_K; ++j) y[i].qs[j] = (int8_t)std::min(127, nearest_int(iscale * x[j]));
    for (int j = 0; j < QK_K / 16; ++j) {
      int sum = 0;
      for (int ii = 0; ii < 16; ++ii) sum += y[i].qs[j * 16 + ii];
      y[i].bsums[j] = (int16_t)sum;
    }
    y[i].d = 1 / iscale;
    x += QK_K;
  }
}

bool type_is_quantizable(int32_t type) {
  switch (type) {
    case T_F32: case T_F16: case T_BF16: case T_Q8_0: case T_Q4_0: case T_Q4_K: case T_Q6_K: case T_Q8_K: return true;
    default: return false;
  }
}

void quantize_row(int32_t type, const float* x, void* y, int64_t n) {
  switch (type) {
    case T_F32: std::memcpy(y, x, n * 4); break;
    case T_F16: { auto* o = (uint16_t*)y; for (int64_t i = 0; i < n; ++i) o[i] = fp32_to_fp16(x[i]); } break;
    case T_BF16: { auto* o = (uint16_t*)y; for (int64_t i = 0; i < n; ++i) o[i] = fp32_to_bf16(x[i]); } break;
    case T_Q8_0: quantize_row_q8_0(x, (block_q8_0*)y, n); break;
    case T_Q4_0: quantize_row_q4_0(x, (block_q4_0*)y, n); break;
    case T_Q4_K: quantize_row_q4_K(x, (block_q4_K*)y, n); break;
    case T_Q6_K: quantize_row_q6_K(x, (block_q6_K*)y, n); break;
    case T_Q8_K: quantize_row_q8_K(x, (block_q8_K*)y, n); break;
    default: break;
  }
}

void dequantize_row(int32_t type, const void* vx, float* y, int64_t n) {
  switch (type) {
    case T_F32: std::memcpy(y, vx, n * 4); break;
    case T_F16: { auto* s = (const uint16_t*)vx; for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(s[i]); } break;
    case T_BF16: { auto* s = (const uint16_t*)vx; for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_fp32(s[i]); } break;
    case T_I32: { auto* s = (const int32_t*)vx; for (int64_t i = 0; i < n; ++i) y[i] = (float)s[i]; } break;
    case T_Q8_0: {
      auto* x = (const block_q8_0*)vx;
      for (int64_t i = 0; i < n / QK8_0; ++i) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK8_0; ++j) y[i * QK8_0 + j] = x[i].qs[j] * d;
      }
    } break;
    case T_Q4_0: {
      auto* x = (const block_q4_0*)vx;
      for (int64_t i = 0; i < n / QK4_0; ++i) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK4_0 / 2; ++j) {
          y[i * QK4_0 + j] = ((x[i].qs[j] & 0x0F) - 8) * d;
          y[i * QK4_0 + j + QK4_0 / 2] = ((x[i].qs[j] >> 4) - 8) * d;
        }
      }
    } break;
    case T_Q4_K: {
      auto* x = (const block_q4_K*)vx;
      for (int64_t i = 0; i < n / QK_K; ++i) {
        const uint8_t* q = x[i].qs;
        const float d = fp16_to_fp32(x[i].d), min = fp16_to_fp32(x[i].dmin);
        int is = 0;
        uint8_t sc, m;
        for (int j = 0; j < QK_K; j += 64) {
          get_scale_min_k4(is + 0, x[i].scales, &sc, &m);
          const float d1 = d * sc, m1 = min * m;
          get_scale_min_k4(is + 1, x[i].scales, &sc, &m);
          const float d2 = d * sc, m2 = min * m;
          for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
          for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
          q += 32;
          is += 2;
        }
      }
    } break;
    case T_Q6_K: {
      auto* x = (const block_q6_K*)vx;
      for (int64_t i = 0; i < n / QK_K; ++i) {
        const float d = fp16_to_fp32(x[i].d);
        const uint8_t* ql = x[i].ql;
        const uint8_t* qh = x[i].qh;
        const int8_t* sc = x[i].scales;
        for (int k = 0; k < QK_K; k += 128) {
          for (int l = 0; l < 32; ++l) {
            int is = l / 16;
            const int8_t q1 = (int8_t)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int8_t q2 = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int8_t q3 = (int8_t)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int8_t q4 = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l + 0] = d * sc[is + 0] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
          }
          y += 128;
          ql += 64;
          qh += 32;
          sc += 8;
        }
      }
    } break;
    case T_Q8_K: {
      auto* x = (const block_q8_K*)vx;
      for (int64_t i = 0; i < n / QK_K; ++i)
        for (int j = 0; j < QK_K; ++j) y[i * QK_K + j] = x[i].d * x[i].qs[j];
    } break;
    default: break;
  }
}

// ---------------------------------------------------------------- repacking (eight-row groups)

// nrows rows (src_stride bytes apart) -> groups of eight, each block of a group holding
// the same block of its eight rows (pack_block8)
template <class BX, class BR>
static void repack_groups(const void* src, int64_t src_stride, void* dst, int64_t nb, int64_t nrows) {
  BX* out = (BX*)dst;
  for (int64_t g = 0; g < nrows / 8; ++g) {
    const BR* rows[8];
    for (int r = 0; r < 8; ++r) rows[r] = (const BR*)((const char*)src + (g * 8 + r) * src_stride);
    for (int64_t b = 0; b < nb; ++b, ++out)
      for (int r = 0; r < 8; ++r) pack_block8(*out, rows[r][b], r);
  }
}

void repack_rows8(int32_t type, const void* src, int64_t src_stride, void* dst, int64_t n, int64_t nrows) {
  switch (type) {
    case T_Q4_0: return repack_groups<block_q4_0x8, block_q4_0>(src, src_stride, dst, n / QK4_0, nrows);
    case T_Q8_0: return repack_groups<block_q8_0x8, block_q8_0>(src, src_stride, dst, n / QK8_0, nrows);
    case T_Q4_K: return repack_groups<block_q4_Kx8, block_q4_K>(src, src_stride, dst, n / QK_K, nrows);
    default: return;
  }
}

}  // namespace weft
