// MUL_MAT inner products. Each kernel has a portable body; the AVX2 level either adds
// hand-written intrinsics (Q8_0, Q4_0, F32, F16, BF16: the hot decode paths) or compiles
// the same body with AVX2/FMA enabled so the compiler vectorises it (K-quants). Which
// level runs is decided at run time from CPU features, never from build flags, so one
// binary runs on any x86-64.
#include "kernels.h"
#include <immintrin.h>
#include <algorithm>

#define WEFT_AVX2 __attribute__((target("avx2,fma,f16c")))
#ifdef WEFT_EMULATE_AVX512
// Test build only (scripts/build-native.js --emulate-avx512, compiled with -mavx2): SIMDe
// implements the AVX-512 intrinsics on AVX2, so the AVX-512 level's logic runs through
// the op matrix on a machine without AVX-512.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define WEFT_AVX512 WEFT_AVX2
#define WEFT_AVX512BF16 WEFT_AVX2
#else
#define WEFT_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define WEFT_AVX512BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")))
#endif
#define WEFT_INLINE inline __attribute__((always_inline))

namespace weft {

int32_t vec_dot_type(int32_t t) {
  switch (t) {
    case T_Q8_0: case T_Q4_0: return T_Q8_0S;
    case T_Q4_K: case T_Q6_K: return T_Q8_K;
    case T_BF16: return kernels().bf16 ? T_BF16 : T_F32;
    default: return T_F32;
  }
}

// ---------------------------------------------------------------- portable bodies

static WEFT_INLINE float dot_f32_body(int64_t n, const float* x, const float* y) {
  float s[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += x[i + k] * y[i + k];
  float r = 0;
  for (int k = 0; k < 8; ++k) r += s[k];
  for (; i < n; ++i) r += x[i] * y[i];
  return r;
}

static float dot_f32_scalar(int64_t n, const void* w, const void* a) { return dot_f32_body(n, (const float*)w, (const float*)a); }

static float dot_f16_scalar(int64_t n, const void* w, const void* a) {
  const uint16_t* x = (const uint16_t*)w;
  const float* y = (const float*)a;
  float s[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += fp16_to_fp32(x[i + k]) * y[i + k];
  float r = 0;
  for (int k = 0; k < 8; ++k) r += s[k];
  for (; i < n; ++i) r += fp16_to_fp32(x[i]) * y[i];
  return r;
}

static float dot_bf16_scalar(int64_t n, const void* w, const void* a) {
  const uint16_t* x = (const uint16_t*)w;
  const float* y = (const float*)a;
  float s[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += bf16_to_fp32(x[i + k]) * y[i + k];
  float r = 0;
  for (int k = 0; k < 8; ++k) r += s[k];
  for (; i < n; ++i) r += bf16_to_fp32(x[i]) * y[i];
  return r;
}

static float dot_q8_0_scalar(int64_t n, const void* w, const void* a) {
  const block_q8_0* x = (const block_q8_0*)w;
  const block_q8_0s* y = (const block_q8_0s*)a;
  float sum = 0;
  for (int64_t i = 0; i < n / QK8_0; ++i) {
    int s = 0;
    for (int j = 0; j < QK8_0; ++j) s += x[i].qs[j] * y[i].qs[j];
    sum += s * fp16_to_fp32(x[i].d) * y[i].d;
  }
  return sum;
}

static float dot_q4_0_scalar(int64_t n, const void* w, const void* a) {
  const block_q4_0* x = (const block_q4_0*)w;
  const block_q8_0s* y = (const block_q8_0s*)a;
  float sum = 0;
  for (int64_t i = 0; i < n / QK4_0; ++i) {
    int s = 0;
    for (int j = 0; j < QK4_0 / 2; ++j) s += (x[i].qs[j] & 0x0F) * y[i].qs[j] + (x[i].qs[j] >> 4) * y[i].qs[j + QK4_0 / 2];
    const float dx = fp16_to_fp32(x[i].d);
    sum += s * dx * y[i].d - 8 * dx * y[i].s;  // (q − 8)·y = q·y − 8·Σy
  }
  return sum;
}

// Q4_K: 8 sub-blocks of 32 with 6-bit scale and min. Integer sums per sub-block, then
// d * Σ sc·Σqa − dmin * Σ m·Σa (the activation sums come precomputed in bsums).
static WEFT_INLINE float dot_q4_K_body(int64_t n, const void* w, const void* a) {
  const block_q4_K* x = (const block_q4_K*)w;
  const block_q8_K* y = (const block_q8_K*)a;
  float sum = 0;
  for (int64_t i = 0; i < n / QK_K; ++i) {
    uint8_t sc[8], mn[8];
    unpack_q4_K_scales(x[i].scales, sc, mn);
    int32_t isum = 0, msum = 0;
    const uint8_t* q = x[i].qs;
    const int8_t* q8 = y[i].qs;
    for (int j = 0; j < 4; ++j) {  // 64 values: low nibbles then high nibbles of 32 bytes
      int32_t lo = 0, hi = 0;
      for (int l = 0; l < 32; ++l) { lo += (q[l] & 0xF) * q8[l]; hi += (q[l] >> 4) * q8[l + 32]; }
      isum += lo * sc[2 * j] + hi * sc[2 * j + 1];
      q += 32;
      q8 += 64;
    }
    for (int j = 0; j < 8; ++j) msum += mn[j] * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
    sum += y[i].d * (fp16_to_fp32(x[i].d) * isum - fp16_to_fp32(x[i].dmin) * msum);
  }
  return sum;
}

// Q6_K: 16 groups of 16 with int8 scales; values 6-bit offset by 32.
static WEFT_INLINE float dot_q6_K_body(int64_t n, const void* w, const void* a) {
  const block_q6_K* x = (const block_q6_K*)w;
  const block_q8_K* y = (const block_q8_K*)a;
  float sum = 0;
  for (int64_t i = 0; i < n / QK_K; ++i) {
    int8_t v[QK_K];
    const uint8_t* ql = x[i].ql;
    const uint8_t* qh = x[i].qh;
    for (int k = 0; k < QK_K; k += 128) {
      for (int l = 0; l < 32; ++l) {
        v[k + l + 0] = (int8_t)(((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
        v[k + l + 32] = (int8_t)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
        v[k + l + 64] = (int8_t)(((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
        v[k + l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
      }
      ql += 64;
      qh += 32;
    }
    int32_t isum = 0;
    for (int g = 0; g < 16; ++g) {
      int32_t s = 0;
      for (int l = 0; l < 16; ++l) s += v[16 * g + l] * y[i].qs[16 * g + l];
      isum += s * x[i].scales[g];
    }
    sum += fp16_to_fp32(x[i].d) * y[i].d * isum;
  }
  return sum;
}

static float dot_q4_K_scalar(int64_t n, const void* w, const void* a) { return dot_q4_K_body(n, w, a); }

static float dot_q6_K_scalar(int64_t n, const void* w, const void* a) { return dot_q6_K_body(n, w, a); }

// Repacked weights at the portable level: each row's block is taken back out of its group
// (unpack_block8) and multiplied by the row kernel, block by block.
template <class BX, class BR, class BA, int QK, float (*Dot)(int64_t, const void*, const void*)>
static void gemv8_scalar(int64_t n, const void* w, int64_t groups, const void* a, float* out) {
  const BX* x = (const BX*)w;
  const BA* y = (const BA*)a;
  const int64_t nb = n / QK;
  for (int64_t g = 0; g < groups; ++g, x += nb)
    for (int r = 0; r < 8; ++r) {
      float sum = 0;
      for (int64_t b = 0; b < nb; ++b) {
        BR row;
        unpack_block8(x[b], r, row);
        sum += Dot(QK, &row, y + b);
      }
      out[8 * g + r] = sum;
    }
}

// Activation conversion (fast Q8_0: same rounding as the reference).
static WEFT_INLINE void act_q8_0_body(const float* x, void* vy, int64_t n) {
  block_q8_0* y = (block_q8_0*)vy;
  for (int64_t i = 0; i < n / QK8_0; ++i) {
    float amax = 0;
    for (int j = 0; j < QK8_0; ++j) amax = std::max(amax, std::fabs(x[i * QK8_0 + j]));
    const float d = amax / 127;
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    for (int j = 0; j < QK8_0; ++j) y[i].qs[j] = (int8_t)std::nearbyint(x[i * QK8_0 + j] * id);
  }
}
// Q8_0S: the same int8 values and scale (rounded through fp16 exactly as Q8_0's), plus d·Σqs.
static WEFT_INLINE void act_q8_0s_body(const float* x, void* vy, int64_t n) {
  block_q8_0s* y = (block_q8_0s*)vy;
  for (int64_t i = 0; i < n / QK8_0; ++i) {
    block_q8_0 b;
    act_q8_0_body(x + i * QK8_0, &b, QK8_0);
    int s = 0;
    for (int j = 0; j < QK8_0; ++j) { y[i].qs[j] = b.qs[j]; s += b.qs[j]; }
    y[i].d = fp16_to_fp32(b.d);
    y[i].s = y[i].d * (float)s;
  }
}
static void act_q8_0s_scalar(const float* x, void* y, int64_t n) { act_q8_0s_body(x, y, n); }
static void act_q8_K(const float* x, void* y, int64_t n) { quantize_row(T_Q8_K, x, y, n); }
static void act_f32(const float* x, void* y, int64_t n) { std::memcpy(y, x, n * 4); }

// ---------------------------------------------------------------- AVX2 / FMA

WEFT_AVX2 static inline float hsum128(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
WEFT_AVX2 static inline float hsum256(__m256 v) {
  return hsum128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

// An empty asm that claims to change v: GCC must then finish v's additions in program order
// and hold v in a register. Without it, in unrolled loops it regroups chains of integer adds
// into trees that need more than AVX2's 16 registers and spill (gemm8 Q4_0: 99 -> 138
// GFLOP/s with it, 2048x8192 at 128 tokens).
WEFT_AVX2 static inline void keep_order(__m256i& v) { __asm__("" : "+x"(v)); }

// The weight stream is read exactly once per token; hinting 2 KiB ahead keeps a single
// core's loads in flight (interleaved A/B runs: ~20 % over no hint, 5-15 % over 1 KiB;
// 3-6 KiB were no better).
static inline void prefetch_ahead(const void* p, int lines) {
  for (int k = 0; k < lines; ++k) _mm_prefetch((const char*)p + 2048 + 64 * k, _MM_HINT_T0);
}

WEFT_AVX2 static float dot_f32_avx2(int64_t n, const void* w, const void* a) {
  const float* x = (const float*)w;
  const float* y = (const float*)a;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    prefetch_ahead(x + i, 2);
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(y + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(y + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0);
  float r = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) r += x[i] * y[i];
  return r;
}

WEFT_AVX2 static float dot_f16_avx2(int64_t n, const void* w, const void* a) {
  const uint16_t* x = (const uint16_t*)w;
  const float* y = (const float*)a;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    prefetch_ahead(x + i, 1);
    s0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + i))), _mm256_loadu_ps(y + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + i + 8))), _mm256_loadu_ps(y + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + i + 16))), _mm256_loadu_ps(y + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + i + 24))), _mm256_loadu_ps(y + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + i))), _mm256_loadu_ps(y + i), s0);
  float r = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) r += fp16_to_fp32(x[i]) * y[i];
  return r;
}

WEFT_AVX2 static inline __m256 bf16x8_to_f32(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

WEFT_AVX2 static float dot_bf16_avx2(int64_t n, const void* w, const void* a) {
  const uint16_t* x = (const uint16_t*)w;
  const float* y = (const float*)a;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    prefetch_ahead(x + i, 1);
    s0 = _mm256_fmadd_ps(bf16x8_to_f32(x + i), _mm256_loadu_ps(y + i), s0);
    s1 = _mm256_fmadd_ps(bf16x8_to_f32(x + i + 8), _mm256_loadu_ps(y + i + 8), s1);
    s2 = _mm256_fmadd_ps(bf16x8_to_f32(x + i + 16), _mm256_loadu_ps(y + i + 16), s2);
    s3 = _mm256_fmadd_ps(bf16x8_to_f32(x + i + 24), _mm256_loadu_ps(y + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(bf16x8_to_f32(x + i), _mm256_loadu_ps(y + i), s0);
  float r = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) r += bf16_to_fp32(x[i]) * y[i];
  return r;
}

// signed int8 x signed int8, 32 lanes -> 8 int32 partial sums, as float
WEFT_AVX2 static inline __m256 mul_sum_i8(__m256i x, __m256i y) {
  const __m256i ax = _mm256_sign_epi8(x, x);
  const __m256i sy = _mm256_sign_epi8(y, x);
  const __m256i dot16 = _mm256_maddubs_epi16(ax, sy);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(dot16, _mm256_set1_epi16(1)));
}

// Four independent accumulators keep the FMA latency chain off the critical path. The
// activations' scales come as floats (Q8_0S): one fp16 conversion per block, not two.
WEFT_AVX2 static float dot_q8_0_avx2(int64_t n, const void* w, const void* a) {
  const block_q8_0* x = (const block_q8_0*)w;
  const block_q8_0s* y = (const block_q8_0s*)a;
  const int64_t nb = n / QK8_0;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
#define Q8B(k) acc##k = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(x[i + k].d) * y[i + k].d), \
    mul_sum_i8(_mm256_loadu_si256((const __m256i*)x[i + k].qs), _mm256_loadu_si256((const __m256i*)y[i + k].qs)), acc##k)
  for (; i + 4 <= nb; i += 4) {
    prefetch_ahead(x + i, 2);
    Q8B(0); Q8B(1); Q8B(2); Q8B(3);
  }
  for (; i < nb; ++i) Q8B(0);
#undef Q8B
  return hsum256(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

WEFT_AVX2 static inline __m256i q4_0_unpack(const uint8_t* qs) {
  const __m128i t = _mm_loadu_si128((const __m128i*)qs);
  const __m256i b = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
  return _mm256_sub_epi8(_mm256_and_si256(b, _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(8));
}

// Q4_0 against Q8_0S: (q − 8)·y = q·y − 8·Σy, where Σy comes with the activations, so a
// block is one maddubs of the unsigned nibbles; the −8·Σy terms add up in a scalar.
WEFT_AVX2 static inline __m256 q4_0_block(const block_q4_0* x, const block_q8_0s* y) {
  const __m128i t = _mm_loadu_si128((const __m128i*)x->qs);
  const __m256i q = _mm256_and_si256(_mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1), _mm256_set1_epi8(0x0F));
  const __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i*)y->qs));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

WEFT_AVX2 static float dot_q4_0_avx2(int64_t n, const void* w, const void* a) {
  const block_q4_0* x = (const block_q4_0*)w;
  const block_q8_0s* y = (const block_q8_0s*)a;
  const int64_t nb = n / QK4_0;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  float off = 0;
  int64_t i = 0;
#define Q4B(k) do { const float dx = _cvtsh_ss(x[i + k].d); off += dx * y[i + k].s; \
    acc##k = _mm256_fmadd_ps(_mm256_set1_ps(dx * y[i + k].d), q4_0_block(x + i + k, y + i + k), acc##k); } while (0)
  for (; i + 4 <= nb; i += 4) {
    prefetch_ahead(x + i, 1);
    Q4B(0); Q4B(1); Q4B(2); Q4B(3);
  }
  for (; i < nb; ++i) {
    const float dx = _cvtsh_ss(x[i].d);
    off += dx * y[i].s;
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(dx * y[i].d), q4_0_block(x + i, y + i), acc0);
  }
#undef Q4B
  return hsum256(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3))) - 8 * off;
}

// Q4_K: nibbles are unsigned, so maddubs(q, y) needs no sign tricks; the 6-bit scale of
// each 32-value sub-block multiplies the int16 pair sums in madd (cut from the 8 scales by
// a byte shuffle); the mins meet Q8_K's per-16 sums in one madd.
WEFT_AVX2 static float dot_q4_K_avx2(int64_t n, const void* w, const void* a) {
  const block_q4_K* x = (const block_q4_K*)w;
  const block_q8_K* y = (const block_q8_K*)a;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i pick0 = _mm256_set1_epi16(0x0100);  // bytes (0,1): int16 scale 0 in every lane
  const __m256i two = _mm256_set1_epi8(2);
  __m256 acc = _mm256_setzero_ps();
  __m128 acc_m = _mm_setzero_ps();
  for (int64_t i = 0; i < n / QK_K; ++i) {
    prefetch_ahead(x + i, 3);
    uint32_t sc[2], mn[2];
    unpack_q4_K_words(x[i].scales, sc, mn);
    const __m128i mn16 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)mn[1], (int)mn[0]));
    const __m128i bs_lo = _mm_loadu_si128((const __m128i*)y[i].bsums), bs_hi = _mm_loadu_si128((const __m128i*)(y[i].bsums + 8));
    const __m128i prod = _mm_madd_epi16(mn16, _mm_hadd_epi16(bs_lo, bs_hi));  // min·(sum of its 32 values), 4 lanes
    // d and dmin sit side by side: both scaled by dy in one conversion; the mins' products
    // stay a vector until the end instead of a horizontal sum per super-block
    uint32_t dd;
    std::memcpy(&dd, &x[i].d, 4);
    const __m128 dm = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int)dd)), _mm_set1_ps(y[i].d));
    acc_m = _mm_fmadd_ps(_mm_shuffle_ps(dm, dm, 0x55), _mm_cvtepi32_ps(prod), acc_m);
    const __m256i scv = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)sc[1], (int)sc[0])));
    __m256i pick = pick0;
    __m256i sumi = _mm256_setzero_si256();
    const uint8_t* q = x[i].qs;
    const int8_t* q8 = y[i].qs;
    for (int j = 0; j < 4; ++j) {
      const __m256i qb = _mm256_loadu_si256((const __m256i*)(q + 32 * j));
      const __m256i lo = _mm256_and_si256(qb, m4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
      const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)(q8 + 64 * j)));
      const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(q8 + 64 * j + 32)));
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(plo, _mm256_shuffle_epi8(scv, pick)));
      pick = _mm256_add_epi8(pick, two);
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(phi, _mm256_shuffle_epi8(scv, pick)));
      pick = _mm256_add_epi8(pick, two);
    }
    acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dm), _mm256_cvtepi32_ps(sumi), acc);
  }
  return hsum256(acc) - hsum128(acc_m);
}

// Q6_K: 6-bit values 0..63 are unsigned for maddubs; the −32 offset is folded in with
// Q8_K's per-16 sums (one madd over all 16 scale groups). Each 32-lane product spans two
// 16-value scale groups: its int16 scale vector is cut from the 16 scales by a shuffle.
WEFT_AVX2 static float dot_q6_K_avx2(int64_t n, const void* w, const void* a) {
  const block_q6_K* x = (const block_q6_K*)w;
  const block_q8_K* y = (const block_q8_K*)a;
  const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
  // byte shuffles that broadcast int16 scale k (lanes 0-7) and k+1 (lanes 8-15) of a 128-bit row
  const __m256i pick0 = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
  const __m256i two = _mm256_set1_epi8(4);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n / QK_K; ++i) {
    prefetch_ahead(x + i, 4);
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)x[i].scales));
    const __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i*)y[i].bsums));
    __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 5));
    const uint8_t* ql = x[i].ql;
    const uint8_t* qh = x[i].qh;
    const int8_t* q8 = y[i].qs;
    for (int h = 0; h < 2; ++h) {
      // scales 8h..8h+7 in both 128-bit halves, then 2 per chunk via shuffles
      const __m128i s8 = h == 0 ? _mm256_castsi256_si128(sc16) : _mm256_extracti128_si256(sc16, 1);
      const __m256i sc = _mm256_broadcastsi128_si256(s8);
      __m256i pick = pick0;
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(ql + 64 * h));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(ql + 64 * h + 32));
      const __m256i hb = _mm256_loadu_si256((const __m256i*)(qh + 32 * h));
      const __m256i qs[4] = {
        _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4)),
        _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m3), 4)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m3), 4)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m3), 4)),
      };
      for (int k = 0; k < 4; ++k) {
        const __m256i p = _mm256_maddubs_epi16(qs[k], _mm256_loadu_si256((const __m256i*)(q8 + 128 * h + 32 * k)));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, _mm256_shuffle_epi8(sc, pick)));
        pick = _mm256_add_epi8(pick, two);
      }
    }
    const float d = _cvtsh_ss(x[i].d) * y[i].d;
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
  }
  return hsum256(acc);
}
// ---------------------------------------------------------------- AVX2 row-group dots (decode)
// Four weight rows against one activation row. Four rows read at once are four streams in
// flight, which is what lets one core approach its read bandwidth (one row at a time
// stalls at ~65 %: A/B runs on a 2048-wide F16 stream), and the activation's share of the
// work (its loads, |y|, its scale) is paid once per four rows.

// While four rows are read, the next four are fetched at the same pace: each step takes
// 4·(block size) bytes from the group and hints the same amount of the next group, whose
// four rows lie back to back right after this one. Without it the four interleaved streams
// reached 45-65 % of the bandwidth at K = 2048 (rows of 1-2 KiB confuse the hardware
// prefetcher); with it 70-80 % (A/B runs against per-row hints 2 KiB ahead: worse).
template <class B>
static inline void prefetch_next_group(const void* w, int64_t ws, int64_t b) {
  const char* p = (const char*)w + 4 * ws + b * 4 * (int64_t)sizeof(B);
  for (size_t o = 0; o < 4 * sizeof(B); o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

// Four weight rows ws bytes apart, as arrays of blocks B.
template <class B> struct RowGroup {
  const B* row[4];
  RowGroup(const void* w, int64_t ws) { for (int r = 0; r < 4; ++r) row[r] = (const B*)((const char*)w + r * ws); }
  // the fp16 scales of block b of the four rows, as floats in one conversion
  WEFT_AVX2 __m128 scales(int64_t b) const {
    const uint64_t h = (uint64_t)row[0][b].d | (uint64_t)row[1][b].d << 16 | (uint64_t)row[2][b].d << 32 | (uint64_t)row[3][b].d << 48;
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h));
  }
};

// Q8_0: x·y = maddubs(|y|, sign(x, y)), so |y| is computed once for the four rows.
WEFT_AVX2 static void dot4_q8_0_avx2(int64_t n, const void* w, int64_t ws, const void* a, float* out) {
  const block_q8_0s* y = (const block_q8_0s*)a;
  const RowGroup<block_q8_0> x(w, ws);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  alignas(16) float sc[4];
  for (int64_t b = 0; b < n / QK8_0; ++b) {
    prefetch_next_group<block_q8_0>(w, ws, b);
    const __m256i yv = _mm256_loadu_si256((const __m256i*)y[b].qs);
    const __m256i ay = _mm256_sign_epi8(yv, yv);
    _mm_store_ps(sc, _mm_mul_ps(x.scales(b), _mm_set1_ps(y[b].d)));
#define ROW(r) acc##r = _mm256_fmadd_ps(_mm256_set1_ps(sc[r]), _mm256_cvtepi32_ps(_mm256_madd_epi16( \
    _mm256_maddubs_epi16(ay, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)x.row[r][b].qs), yv)), ones)), acc##r)
    ROW(0); ROW(1); ROW(2); ROW(3);
#undef ROW
  }
  out[0] = hsum256(acc0); out[1] = hsum256(acc1); out[2] = hsum256(acc2); out[3] = hsum256(acc3);
}

// Q4_0: two rows share each vector: row r's 16 bytes in the low half and row r+1's in the
// high half give, masked, elements 0-15 of both rows, and shifted, elements 16-31; they
// meet the activation's first and second 16 bytes broadcast to both halves. The two int16
// products add without overflow (4·15·127 < 2^15), so one madd, one conversion and one FMA
// serve two rows. The −8·Σy terms of the four rows add up in one vector.
WEFT_AVX2 static void dot4_q4_0_avx2(int64_t n, const void* w, int64_t ws, const void* a, float* out) {
  const block_q8_0s* y = (const block_q8_0s*)a;
  const RowGroup<block_q4_0> x(w, ws);
  const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
  const __m256i pick01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), pick23 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  __m256 acc01 = _mm256_setzero_ps(), acc23 = acc01;
  __m128 off = _mm_setzero_ps();
  for (int64_t b = 0; b < n / QK4_0; ++b) {
    prefetch_next_group<block_q4_0>(w, ws, b);
    const __m256i ylo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)y[b].qs));
    const __m256i yhi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(y[b].qs + 16)));
    const __m128 dx = x.scales(b);
    off = _mm_fmadd_ps(dx, _mm_set1_ps(y[b].s), off);
    const __m256 sc = _mm256_castps128_ps256(_mm_mul_ps(dx, _mm_set1_ps(y[b].d)));
#define PAIR(r, s, acc, pick) do { \
    const __m256i v = _mm256_loadu2_m128i((const __m128i*)x.row[s][b].qs, (const __m128i*)x.row[r][b].qs); \
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, m4), ylo), \
                                       _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), yhi)); \
    acc = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(sc, pick), _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), acc); } while (0)
    PAIR(0, 1, acc01, pick01);
    PAIR(2, 3, acc23, pick23);
#undef PAIR
  }
  const __m128 r01 = _mm_hadd_ps(_mm256_castps256_ps128(acc01), _mm256_extractf128_ps(acc01, 1));
  const __m128 r23 = _mm_hadd_ps(_mm256_castps256_ps128(acc23), _mm256_extractf128_ps(acc23, 1));
  _mm_storeu_ps(out, _mm_sub_ps(_mm_hadd_ps(r01, r23), _mm_mul_ps(_mm_set1_ps(8), off)));
}

WEFT_AVX2 static inline void load8x32(const void* p, __m256i v[8]) {
  for (int k = 0; k < 8; ++k) v[k] = _mm256_loadu_si256((const __m256i*)((const char*)p + 32 * k));
}
// Eight chunks v[k], each holding four bytes of each of eight rows (32-bit lane r = row r)
// -> rows[r]: row r's chunks in order (an 8×8 transpose of 32-bit lanes).
WEFT_AVX2 static inline void transpose8x32(const __m256i v[8], __m256i rows[8]) {
  const __m256i a0 = _mm256_unpacklo_epi32(v[0], v[1]), a1 = _mm256_unpackhi_epi32(v[0], v[1]);
  const __m256i a2 = _mm256_unpacklo_epi32(v[2], v[3]), a3 = _mm256_unpackhi_epi32(v[2], v[3]);
  const __m256i a4 = _mm256_unpacklo_epi32(v[4], v[5]), a5 = _mm256_unpackhi_epi32(v[4], v[5]);
  const __m256i a6 = _mm256_unpacklo_epi32(v[6], v[7]), a7 = _mm256_unpackhi_epi32(v[6], v[7]);
  // c[r] / e[r]: rows r (low 128 bits) and r + 4 (high), chunks 0-3 / chunks 4-7
  const __m256i c[4] = {_mm256_unpacklo_epi64(a0, a2), _mm256_unpackhi_epi64(a0, a2), _mm256_unpacklo_epi64(a1, a3), _mm256_unpackhi_epi64(a1, a3)};
  const __m256i e[4] = {_mm256_unpacklo_epi64(a4, a6), _mm256_unpackhi_epi64(a4, a6), _mm256_unpacklo_epi64(a5, a7), _mm256_unpackhi_epi64(a5, a7)};
  for (int r = 0; r < 4; ++r) {
    rows[r] = _mm256_permute2x128_si256(c[r], e[r], 0x20);
    rows[r + 4] = _mm256_permute2x128_si256(c[r], e[r], 0x31);
  }
}

WEFT_AVX2 static void act_q8_0s_avx2(const float* x, void* y, int64_t n) { act_q8_0s_body(x, y, n); }

// ---------------------------------------------------------------- AVX2 tiles (batched MUL_MAT)
// An RM×RN tile: RM weight rows against RN activation columns, each weight block decoded
// once and each activation block loaded once per tile instead of once per dot product
// (tinyBLAS-style register blocking). Int8 × int8 blocks of 32 with Q8_0 activations.

// A tile kernel run on two weight rows at a time, for tiles whose int32 and float
// accumulators together outgrow AVX2's 16 registers at RM = 4 (KDec: 2·4·3): two passes
// over the activations (from L1) cost less than the spills. With keep_order on the int32
// sums, Q4_K/Q6_K at 128 tokens went from 66-68 to 80-92 GFLOP/s. The int8 row tile
// (TileI8) gained nothing from it.
template <class K> struct RowPairs {
template <int RM, int RN>
static void run(int64_t n, const char* w, int64_t ws, const char* a, int64_t as, float* out, int64_t os) {
  if constexpr (RM > 2) {
    K::template run<2, RN>(n, w, ws, a, as, out, os);
    K::template run<RM - 2, RN>(n, w + 2 * ws, ws, a, as, out + 2, os);
  } else {
    K::template run<RM, RN>(n, w, ws, a, as, out, os);
  }
}
};

// One selector for every tile kernel: instantiates K::run<RM, RN> for each tile size up
// to TILE_RM × TILE_RN and picks the one the caller's remainder needs.
template <class K>
static void tile_select(int64_t n, const void* w, int64_t ws, const void* a, int64_t as, float* out, int64_t os, int rm, int rn) {
#define T(R, C) case R * 8 + C: return K::template run<R, C>(n, (const char*)w, ws, (const char*)a, as, out, os);
  switch (rm * 8 + rn) {
    T(1, 1) T(1, 2) T(1, 3) T(2, 1) T(2, 2) T(2, 3) T(3, 1) T(3, 2) T(3, 3) T(4, 1) T(4, 2) T(4, 3)
    default: break;
  }
#undef T
}

#define I8_NS avx2
#define I8_TARGET WEFT_AVX2
#define I8_VNNI 0
#include "kernels_i8.inc"
#undef I8_NS
#undef I8_TARGET
#undef I8_VNNI
#define I8_NS vnni
#define I8_TARGET WEFT_AVX512
#define I8_VNNI 1
#include "kernels_i8.inc"
#undef I8_NS
#undef I8_TARGET
#undef I8_VNNI

// Q4_0 rows -> Q8_0 rows ((q - 8) as int8, same scale): batched products decode a block of
// weight rows once per work unit and reuse it for every activation column.
WEFT_AVX2 static void decode_q4_0_q8_avx2(const void* w, void* out, int64_t n) {
  const block_q4_0* x = (const block_q4_0*)w;
  block_q8_0* y = (block_q8_0*)out;
  for (int64_t i = 0; i < n / 32; ++i) {
    y[i].d = x[i].d;
    _mm256_storeu_si256((__m256i*)y[i].qs, q4_0_unpack(x[i].qs));
  }
}

// K-quant tiles: each super-block of a weight row is decoded once per work unit into KDec
// (values as bytes in order, per-32 scale vectors ready for madd, min/offset terms), then
// an RM×RN tile runs maddubs/madd on it against Q8_K activations. The offset term
// (Q4_K mins, Q6_K's -32) uses the activations' per-16 sums, exactly as the dot kernels.
struct alignas(32) KDec {
  __m256i scv[8];     // int16 lanes: the scale of each value pair of 32-value chunk c
  uint8_t q[256];     // unsigned values (Q4_K 0..15, Q6_K 0..63)
  int16_t mins[16];   // per 16 values: Q4_K min, Q6_K 32·scale
  float d, dmin;      // value = d·scale·q − dmin·min
};

WEFT_AVX2 static void decode_q4_K_kdec(const void* w, void* out, int64_t n) {
  const block_q4_K* x = (const block_q4_K*)w;
  KDec* o = (KDec*)out;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t i = 0; i < n / QK_K; ++i) {
    uint8_t sc[8], mn[8];
    unpack_q4_K_scales(x[i].scales, sc, mn);
    for (int c = 0; c < 8; ++c) o[i].scv[c] = _mm256_set1_epi16(sc[c]);
    for (int g = 0; g < 16; ++g) o[i].mins[g] = mn[g / 2];
    for (int j = 0; j < 4; ++j) {
      const __m256i qb = _mm256_loadu_si256((const __m256i*)(x[i].qs + 32 * j));
      _mm256_storeu_si256((__m256i*)(o[i].q + 64 * j), _mm256_and_si256(qb, m4));
      _mm256_storeu_si256((__m256i*)(o[i].q + 64 * j + 32), _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4));
    }
    o[i].d = fp16_to_fp32(x[i].d);
    o[i].dmin = fp16_to_fp32(x[i].dmin);
  }
}

// One repacked Q4_K group -> eight KDec rows. The eight 32-byte chunks of a 64-value
// slice hold four bytes of every row per chunk; the transpose gives each row its 32 bytes
// in order, whose nibbles are the slice's two sub-blocks.
WEFT_AVX2 static void unpack8_q4_K_kdec(const void* w, void* out, int64_t n) {
  const block_q4_Kx8* x = (const block_q4_Kx8*)w;
  const int64_t nb = n / QK_K;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const block_q4_Kx8& xb = x[b];
    KDec* o[8];
    for (int r = 0; r < 8; ++r) o[r] = (KDec*)out + r * nb + b;
    for (int i = 0; i < 4; ++i) {
      __m256i v[8], rows[8];
      load8x32(xb.qs + 256 * i, v);
      transpose8x32(v, rows);
      for (int r = 0; r < 8; ++r) {
        uint8_t* q = o[r]->q + 64 * i;
        _mm256_storeu_si256((__m256i*)q, _mm256_and_si256(rows[r], m4));
        _mm256_storeu_si256((__m256i*)(q + 32), _mm256_and_si256(_mm256_srli_epi16(rows[r], 4), m4));
      }
    }
    for (int r = 0; r < 8; ++r) {
      for (int j = 0; j < 8; ++j) o[r]->scv[j] = _mm256_set1_epi16(xb.scales[8 * j + r]);
      for (int g = 0; g < 16; ++g) o[r]->mins[g] = xb.mins[q4_Kx8_min_at(g / 2, r)];
      o[r]->d = fp16_to_fp32(xb.d[r]);
      o[r]->dmin = fp16_to_fp32(xb.dmin[r]);
    }
  }
}

WEFT_AVX2 static void decode_q6_K_kdec(const void* w, void* out, int64_t n) {
  const block_q6_K* x = (const block_q6_K*)w;
  KDec* o = (KDec*)out;
  const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
  for (int64_t i = 0; i < n / QK_K; ++i) {
    const int8_t* sc = x[i].scales;
    for (int c = 0; c < 8; ++c) o[i].scv[c] = _mm256_setr_m128i(_mm_set1_epi16(sc[2 * c]), _mm_set1_epi16(sc[2 * c + 1]));
    for (int g = 0; g < 16; ++g) o[i].mins[g] = (int16_t)(32 * sc[g]);
    for (int h = 0; h < 2; ++h) {
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(x[i].ql + 64 * h));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(x[i].ql + 64 * h + 32));
      const __m256i hb = _mm256_loadu_si256((const __m256i*)(x[i].qh + 32 * h));
      uint8_t* q = o[i].q + 128 * h;
      _mm256_storeu_si256((__m256i*)(q + 0), _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4)));
      _mm256_storeu_si256((__m256i*)(q + 32), _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m3), 4)));
      _mm256_storeu_si256((__m256i*)(q + 64), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m3), 4)));
      _mm256_storeu_si256((__m256i*)(q + 96), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m3), 4)));
    }
    o[i].d = o[i].dmin = fp16_to_fp32(x[i].d);
  }
}

struct TileKDec {
template <int RM, int RN>
WEFT_AVX2 static void run(int64_t n, const char* w, int64_t ws, const char* a, int64_t as, float* out, int64_t os) {
  const int64_t nsb = n / QK_K;
  __m256 accf[RM][RN];
  for (int i = 0; i < RM; ++i) for (int j = 0; j < RN; ++j) accf[i][j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nsb; ++b) {
    const KDec* x[RM];
    const block_q8_K* y[RN];
    for (int i = 0; i < RM; ++i) x[i] = (const KDec*)(w + i * ws) + b;
    for (int j = 0; j < RN; ++j) y[j] = (const block_q8_K*)(a + j * as) + b;
    __m256i acc[RM][RN];
    for (int i = 0; i < RM; ++i) for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      __m256i q[RM];
      for (int i = 0; i < RM; ++i) q[i] = _mm256_load_si256((const __m256i*)(x[i]->q + 32 * c));
      for (int j = 0; j < RN; ++j) {
        const __m256i yv = _mm256_loadu_si256((const __m256i*)(y[j]->qs + 32 * c));
        for (int i = 0; i < RM; ++i) {
          acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(_mm256_maddubs_epi16(q[i], yv), _mm256_load_si256(&x[i]->scv[c])));
          keep_order(acc[i][j]);
        }
      }
    }
    for (int j = 0; j < RN; ++j) {
      const __m256i bs = _mm256_loadu_si256((const __m256i*)y[j]->bsums);
      const float dy = y[j]->d;
      for (int i = 0; i < RM; ++i) {
        const __m256i mv = _mm256_madd_epi16(_mm256_load_si256((const __m256i*)x[i]->mins), bs);
        accf[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(x[i]->d * dy), _mm256_cvtepi32_ps(acc[i][j]), accf[i][j]);
        accf[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(-x[i]->dmin * dy), _mm256_cvtepi32_ps(mv), accf[i][j]);
      }
    }
  }
  for (int i = 0; i < RM; ++i) for (int j = 0; j < RN; ++j) out[j * os + i] = hsum256(accf[i][j]);
}
};

// ---------------------------------------------------------------- AVX2 float tiles and vector math

// Float weights (F32/F16/BF16) against F32 activations: 8 lanes per FMA, RM×RN accumulators.
struct LoadF32 { WEFT_AVX2 static inline __m256 v(const char* p, int64_t k) { return _mm256_loadu_ps((const float*)p + k); }
                 static inline float s(const char* p, int64_t k) { return ((const float*)p)[k]; } };
struct LoadF16 { WEFT_AVX2 static inline __m256 v(const char* p, int64_t k) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + k))); }
                 static inline float s(const char* p, int64_t k) { return fp16_to_fp32(((const uint16_t*)p)[k]); } };
struct LoadBF16 { WEFT_AVX2 static inline __m256 v(const char* p, int64_t k) { return bf16x8_to_f32((const uint16_t*)p + k); }
                  static inline float s(const char* p, int64_t k) { return bf16_to_fp32(((const uint16_t*)p)[k]); } };

template <class W> struct TileF {
template <int RM, int RN>
WEFT_AVX2 static void run(int64_t n, const char* w, int64_t ws, const char* a, int64_t as, float* out, int64_t os) {
  __m256 acc[RM][RN];
  for (int i = 0; i < RM; ++i) for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    __m256 y[RN];
    for (int j = 0; j < RN; ++j) y[j] = _mm256_loadu_ps((const float*)(a + j * as) + k);
    for (int i = 0; i < RM; ++i) {
      const __m256 x = W::v(w + i * ws, k);
      for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_fmadd_ps(x, y[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) {
      float r = hsum256(acc[i][j]);
      for (int64_t kk = k; kk < n; ++kk) r += W::s(w + i * ws, kk) * ((const float*)(a + j * as))[kk];
      out[j * os + i] = r;
    }
}
};

#define TILE_FN(name, K) static void name(int64_t n, const void* w, int64_t ws, const void* a, int64_t as, float* o, int64_t os, int rm, int rn) { tile_select<K>(n, w, ws, a, as, o, os, rm, rn); }
TILE_FN(tile_f32_avx2, TileF<LoadF32>)
TILE_FN(tile_f16_avx2, TileF<LoadF16>)
TILE_FN(tile_bf16_avx2, TileF<LoadBF16>)
TILE_FN(tile_kdec_avx2, RowPairs<TileKDec>)
// one-token products on a tile kernel: four rows against one activation row
template <class K> static void dot4_tile(int64_t n, const void* w, int64_t ws, const void* a, float* out) {
  K::template run<4, 1>(n, (const char*)w, ws, (const char*)a, 0, out, 1);
}

// ---------------------------------------------------------------- AVX512-BF16

// BF16 weights against activations rounded to BF16 (ggml's vec_dot_type for BF16): vdpbf16ps
// multiplies 16 pairs and adds each pair into one of 8 float lanes, so one instruction does
// the work of two FMAs and the bf16 -> f32 widening. The rounding is the portable one
// (fp32_to_bf16, nearest even, denormals kept) rather than vcvtneps2bf16, which flushes
// denormals, so real hardware and the emulated test build produce the same activations.
static void act_bf16(const float* x, void* y, int64_t n) {
  uint16_t* o = (uint16_t*)y;
  for (int64_t i = 0; i < n; ++i) o[i] = fp32_to_bf16(x[i]);
}

WEFT_AVX512BF16 static inline __m256bh as_bf16x16(const void* p) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  __m256bh r;
  std::memcpy(&r, &v, sizeof r);  // a register move: __m256bh's definition differs by compiler and in SIMDe
  return r;
}

struct TileBF16 {
template <int RM, int RN>
WEFT_AVX512BF16 static void run(int64_t n, const char* w, int64_t ws, const char* a, int64_t as, float* out, int64_t os) {
  __m256 acc[RM][RN];
  for (int i = 0; i < RM; ++i) for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    __m256bh y[RN];
    for (int j = 0; j < RN; ++j) y[j] = as_bf16x16((const uint16_t*)(a + j * as) + k);
    for (int i = 0; i < RM; ++i) {
      if (RN == 1 && (k & 31) == 0) prefetch_ahead((const uint16_t*)(w + i * ws) + k, 1);
      const __m256bh x = as_bf16x16((const uint16_t*)(w + i * ws) + k);
      for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_dpbf16_ps(acc[i][j], x, y[j]);
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) {
      const uint16_t* wr = (const uint16_t*)(w + i * ws);
      const uint16_t* ar = (const uint16_t*)(a + j * as);
      float r = hsum256(acc[i][j]);
      for (int64_t kk = k; kk < n; ++kk) r += bf16_to_fp32(wr[kk]) * bf16_to_fp32(ar[kk]);
      out[j * os + i] = r;
    }
}
};
TILE_FN(tile_bf16_dp, TileBF16)
#undef TILE_FN
static float dot_bf16_dp(int64_t n, const void* w, const void* a) {
  float r;
  TileBF16::run<1, 1>(n, (const char*)w, 0, (const char*)a, 0, &r, 1);
  return r;
}

// exp(x) for 8 lanes: x = k·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor polynomial
// (relative error ≈ 1e-7, about one float ulp), 2^k through the exponent bits. Inputs below
// -87.3 (including -inf from attention masks) give exactly 0.
WEFT_AVX2 static inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), x);     // ln2 split in a high part
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187e-06f), r);          // and a low part
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^k in two halves so k = 128 (x near 88.3) does not overflow the exponent field
  const __m256i ki = _mm256_cvtps_epi32(k);
  const __m256i k1 = _mm256_srai_epi32(ki, 1), k2 = _mm256_sub_epi32(ki, k1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, _mm256_set1_epi32(127)), 23));
  return _mm256_andnot_ps(under, _mm256_mul_ps(_mm256_mul_ps(p, s1), s2));
}

WEFT_AVX2 static double exp_sum_avx2(float* w, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 s = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(w + i), m));
    _mm256_storeu_ps(w + i, e);
    s = _mm256_add_ps(s, e);
  }
  double sum = hsum256(s);
  for (; i < n; ++i) { w[i] = expf(w[i] - mx); sum += w[i]; }
  return sum;
}
static double exp_sum_scalar(float* w, int64_t n, float mx) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) { w[i] = expf(w[i] - mx); sum += w[i]; }
  return sum;
}

WEFT_AVX2 static void swiglu_avx2(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
static void swiglu_scalar(const float* g, const float* u, float* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

int64_t tile_row_bytes(int32_t t, int64_t n) {
  const int64_t d = decoded_row_bytes(t, n);
  return d ? d : row_bytes(t, n);
}

int64_t decoded_row_bytes(int32_t t, int64_t n) {
  switch (t) {
    case T_Q4_0: return row_bytes(T_Q8_0, n);
    case T_Q4_K: case T_Q6_K: return n / QK_K * (int64_t)sizeof(KDec);
    default: return 0;
  }
}

// ---------------------------------------------------------------- dispatch

static KernelTable make_table(int level) {
  KernelTable t{};
  t.level = level;
  t.bf16 = level >= LEVEL_AVX512 && detected_bf16();
  t.act[T_F32] = act_f32;
  t.act[T_Q8_K] = act_q8_K;
  if (level >= LEVEL_AVX2) {
    t.dot[T_F32] = dot_f32_avx2; t.dot[T_F16] = dot_f16_avx2; t.dot[T_BF16] = dot_bf16_avx2;
    t.dot[T_Q8_0] = dot_q8_0_avx2; t.dot[T_Q4_0] = dot_q4_0_avx2;
    t.dot[T_Q4_K] = dot_q4_K_avx2; t.dot[T_Q6_K] = dot_q6_K_avx2;
    t.act[T_Q8_0S] = act_q8_0s_avx2;
    t.tile[T_Q8_0] = avx2::tile_q8_0; t.tile[T_Q4_0] = avx2::tile_q8_0; t.decode[T_Q4_0] = decode_q4_0_q8_avx2;
    t.tile[T_Q4_K] = tile_kdec_avx2; t.decode[T_Q4_K] = decode_q4_K_kdec;
    t.tile[T_Q6_K] = tile_kdec_avx2; t.decode[T_Q6_K] = decode_q6_K_kdec;
    t.tile[T_F32] = tile_f32_avx2; t.tile[T_F16] = tile_f16_avx2; t.tile[T_BF16] = tile_bf16_avx2;
    t.dot4[T_Q8_0] = dot4_q8_0_avx2; t.dot4[T_Q4_0] = dot4_q4_0_avx2;
    t.gemv8[T_Q4_0] = avx2::gemv8_q4_0;
    t.gemv8[T_Q4_K] = avx2::gemv8_q4_K; t.unpack8[T_Q4_K] = unpack8_q4_K_kdec;
    t.gemv8[T_Q8_0] = avx2::gemv8_q8_0;
    t.gemm8[T_Q4_0] = avx2::gemm8_q4_0; t.gemm8[T_Q8_0] = avx2::gemm8_q8_0;
    t.dot4[T_F32] = dot4_tile<TileF<LoadF32>>; t.dot4[T_F16] = dot4_tile<TileF<LoadF16>>; t.dot4[T_BF16] = dot4_tile<TileF<LoadBF16>>;
    t.exp_sum = exp_sum_avx2; t.swiglu = swiglu_avx2;
  }
  if (level >= LEVEL_AVX512) {  // the int8 products with VNNI; everything else as AVX2
    t.tile[T_Q8_0] = vnni::tile_q8_0; t.tile[T_Q4_0] = vnni::tile_q8_0;
    t.gemv8[T_Q4_0] = vnni::gemv8_q4_0; t.gemv8[T_Q8_0] = vnni::gemv8_q8_0; t.gemv8[T_Q4_K] = vnni::gemv8_q4_K;
    t.gemm8[T_Q4_0] = vnni::gemm8_q4_0; t.gemm8[T_Q8_0] = vnni::gemm8_q8_0;
  }
  if (t.bf16) {  // BF16 weights take BF16 activations (vec_dot_type reads t.bf16)
    t.act[T_BF16] = act_bf16;
    t.dot[T_BF16] = dot_bf16_dp; t.dot4[T_BF16] = dot4_tile<TileBF16>; t.tile[T_BF16] = tile_bf16_dp;
  }
  if (level < LEVEL_AVX2) {
    t.dot[T_F32] = dot_f32_scalar; t.dot[T_F16] = dot_f16_scalar; t.dot[T_BF16] = dot_bf16_scalar;
    t.dot[T_Q8_0] = dot_q8_0_scalar; t.dot[T_Q4_0] = dot_q4_0_scalar;
    t.dot[T_Q4_K] = dot_q4_K_scalar; t.dot[T_Q6_K] = dot_q6_K_scalar;
    t.act[T_Q8_0S] = act_q8_0s_scalar;
    // no tiles at this level, so no unpack8
    t.gemv8[T_Q4_0] = gemv8_scalar<block_q4_0x8, block_q4_0, block_q8_0s, QK4_0, dot_q4_0_scalar>;
    t.gemv8[T_Q8_0] = gemv8_scalar<block_q8_0x8, block_q8_0, block_q8_0s, QK8_0, dot_q8_0_scalar>;
    t.gemv8[T_Q4_K] = gemv8_scalar<block_q4_Kx8, block_q4_K, block_q8_K, QK_K, dot_q4_K_scalar>;
    t.exp_sum = exp_sum_scalar; t.swiglu = swiglu_scalar;
  }
  return t;
}

int detected_level() {
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) return LEVEL_SCALAR;
#ifdef WEFT_EMULATE_AVX512
  return LEVEL_AVX512;
#else
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni"))
    return LEVEL_AVX512;
  return LEVEL_AVX2;
#endif
}

bool detected_bf16() {
#ifdef WEFT_EMULATE_AVX512
  return detected_level() >= LEVEL_AVX512;
#else
  return detected_level() >= LEVEL_AVX512 && __builtin_cpu_supports("avx512bf16");
#endif
}

static KernelTable g_table = make_table(detected_level());
const KernelTable& kernels() { return g_table; }

int set_kernel_level(int level) {
  level = std::max(0, std::min(level, detected_level()));
  g_table = make_table(level);
  return level;
}

}  // namespace weft
