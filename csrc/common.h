// Shared definitions of the native CPU backend: type ids (equal to GGUF's), block layouts,
// and float16/bfloat16 conversions that round exactly like ggml's reference code.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cstddef>

namespace weft {

enum Type : int32_t {
  T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14, T_Q8_K = 15,
  T_I8 = 24, T_I16 = 25, T_I32 = 26, T_I64 = 27, T_F64 = 28, T_BF16 = 30,
  // internal activation form for Q4_0 weights, never a tensor type (type_info says unknown)
  T_Q8_0S = 31,
};

constexpr int QK8_0 = 32, QK4_0 = 32, QK_K = 256;

struct block_q8_0 { uint16_t d; int8_t qs[QK8_0]; };
struct block_q4_0 { uint16_t d; uint8_t qs[QK4_0 / 2]; };
struct block_q4_K { uint16_t d; uint16_t dmin; uint8_t scales[12]; uint8_t qs[QK_K / 2]; };
struct block_q6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; uint16_t d; };
struct block_q8_K { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; };
// Q8_0 with its scale as float and the block sum d·Σqs precomputed: a Q4_0 dot then needs
// no "−8·Σy" product per weight block (the activation row is reused by every weight row).
struct block_q8_0s { float d; float s; int8_t qs[QK8_0]; };
// Q4_0 repacked for one-token products (lib/cpu/repack.ts): block b of eight consecutive
// rows. d[r] is row r's scale; qs holds four 32-byte chunks, chunk c being bytes 4c..4c+3
// of each row in turn (row r at 32c + 4r). A 256-bit load then gives one 32-bit lane per
// row, so the int8 sums end as one lane per row, and one conversion and one FMA serve
// eight rows. A group of eight rows takes as many bytes as the eight rows did.
struct block_q4_0x8 { uint16_t d[8]; uint8_t qs[128]; };
static_assert(sizeof(block_q4_0x8) == 8 * 18, "q4_0x8 layout");
// Q8_0 repacked the same way: qs[32c + 4r + t] is row r's qs[4c + t], eight chunks.
struct block_q8_0x8 { uint16_t d[8]; int8_t qs[256]; };
static_assert(sizeof(block_q8_0x8) == 8 * 34, "q8_0x8 layout");
// Q4_K repacked: super-block b of eight rows. The six-bit scales and mins are unpacked to
// bytes (scales[8j + r]: sub-block j of row r; mins[16p + 2r + e]: sub-block 2p + e of
// row r), so a group needs no per-row unpacking; qs[256i + 32k + 4r + t] is row r's
// qs[32i + 4k + t] (one 32-bit lane per row, as block_q4_0x8). 148 bytes per row and
// super-block instead of 144: 3 % more to read for a third less work.
struct block_q4_Kx8 { uint16_t d[8]; uint16_t dmin[8]; uint8_t scales[64]; uint8_t mins[64]; uint8_t qs[1024]; };
static_assert(sizeof(block_q4_Kx8) == 8 * 148, "q4_Kx8 layout");
// where the min of sub-block j of row r lies in block_q4_Kx8::mins
inline int q4_Kx8_min_at(int j, int r) { return 16 * (j / 2) + 2 * r + j % 2; }
static_assert(sizeof(block_q8_0) == 34, "q8_0 layout");
static_assert(sizeof(block_q4_0) == 18, "q4_0 layout");
static_assert(sizeof(block_q4_K) == 144, "q4_K layout");
static_assert(sizeof(block_q6_K) == 210, "q6_K layout");
static_assert(sizeof(block_q8_K) == 292, "q8_K layout");

struct TypeInfo { int32_t id; int64_t blck; int64_t size; bool known; };
inline TypeInfo type_info(int32_t t) {
  switch (t) {
    case T_F32: return {t, 1, 4, true};
    case T_F16: return {t, 1, 2, true};
    case T_BF16: return {t, 1, 2, true};
    case T_Q4_0: return {t, QK4_0, sizeof(block_q4_0), true};
    case T_Q8_0: return {t, QK8_0, sizeof(block_q8_0), true};
    case T_Q4_K: return {t, QK_K, sizeof(block_q4_K), true};
    case T_Q6_K: return {t, QK_K, sizeof(block_q6_K), true};
    case T_Q8_K: return {t, QK_K, sizeof(block_q8_K), true};
    case T_Q8_0S: return {t, QK8_0, sizeof(block_q8_0s), false};
    case T_I8: return {t, 1, 1, true};
    case T_I16: return {t, 1, 2, true};
    case T_I32: return {t, 1, 4, true};
    case T_I64: return {t, 1, 8, true};
    case T_F64: return {t, 1, 8, true};
    default: return {t, 0, 0, false};
  }
}
inline int64_t row_bytes(int32_t t, int64_t n) { TypeInfo ti = type_info(t); return n / ti.blck * ti.size; }

inline float f32_from_bits(uint32_t w) { float f; std::memcpy(&f, &w, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t w; std::memcpy(&w, &f, 4); return w; }

// IEEE half <-> float, round to nearest even, denormals handled; same results as
// ggml_compute_fp16_to_fp32 / ggml_compute_fp32_to_fp16 (and as F16C hardware).
inline float fp16_to_fp32_calc(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized));
  return f32_from_bits(result);
}
inline uint16_t fp32_to_fp16(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
// Lookup table for the hot paths (filled once at load; 256 KiB).
extern float g_fp16_table[65536];
inline float fp16_to_fp32(uint16_t h) { return g_fp16_table[h]; }

inline float bf16_to_fp32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }
inline uint16_t fp32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);  // quiet NaN
  return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1))) >> 16);
}

// Q4_K's 12 scale bytes as 32-bit words: 8 six-bit scales (sc, one byte each) and 8
// six-bit mins (mn), unpacked with word masks (the AVX2 dot uses the words directly).
inline void unpack_q4_K_words(const uint8_t* s, uint32_t sc[2], uint32_t mn[2]) {
  uint32_t a, b, c;
  std::memcpy(&a, s, 4); std::memcpy(&b, s + 4, 4); std::memcpy(&c, s + 8, 4);
  sc[0] = a & 0x3f3f3f3f;
  mn[0] = b & 0x3f3f3f3f;
  sc[1] = (c & 0x0f0f0f0f) | (((a >> 6) & 0x03030303) << 4);
  mn[1] = ((c >> 4) & 0x0f0f0f0f) | (((b >> 6) & 0x03030303) << 4);
}
inline void unpack_q4_K_scales(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
  uint32_t w[2], m[2];
  unpack_q4_K_words(s, w, m);
  std::memcpy(sc, w, 8);
  std::memcpy(mn, m, 8);
}

// Reference quantizers (bit-exact with ggml's *_ref) and dequantizers, quants.cpp.
void quantize_row(int32_t type, const float* x, void* y, int64_t n);
void dequantize_row(int32_t type, const void* x, float* y, int64_t n);
bool type_is_quantizable(int32_t type);
// Row r's block <-> its place in a repacked block. Every repacked type puts row r's qs
// bytes 4c..4c+3 at 32c + 4r; Q4_K also unpacks its six-bit scales and mins to bytes.
template <class BX, class BR> inline void pack_lanes(BX& o, const BR& x, int r) {
  for (size_t c = 0; c < sizeof(x.qs) / 4; ++c) std::memcpy(o.qs + 32 * c + 4 * r, x.qs + 4 * c, 4);
}
template <class BX, class BR> inline void unpack_lanes(const BX& o, BR& x, int r) {
  for (size_t c = 0; c < sizeof(x.qs) / 4; ++c) std::memcpy(x.qs + 4 * c, o.qs + 32 * c + 4 * r, 4);
}
inline void pack_block8(block_q4_0x8& o, const block_q4_0& x, int r) { o.d[r] = x.d; pack_lanes(o, x, r); }
inline void pack_block8(block_q8_0x8& o, const block_q8_0& x, int r) { o.d[r] = x.d; pack_lanes(o, x, r); }
inline void pack_block8(block_q4_Kx8& o, const block_q4_K& x, int r) {
  o.d[r] = x.d;
  o.dmin[r] = x.dmin;
  uint8_t sc[8], mn[8];
  unpack_q4_K_scales(x.scales, sc, mn);
  for (int j = 0; j < 8; ++j) { o.scales[8 * j + r] = sc[j]; o.mins[q4_Kx8_min_at(j, r)] = mn[j]; }
  pack_lanes(o, x, r);
}
inline void unpack_block8(const block_q4_0x8& o, int r, block_q4_0& x) { x.d = o.d[r]; unpack_lanes(o, x, r); }
inline void unpack_block8(const block_q8_0x8& o, int r, block_q8_0& x) { x.d = o.d[r]; unpack_lanes(o, x, r); }
inline void unpack_block8(const block_q4_Kx8& o, int r, block_q4_K& x) {
  x.d = o.d[r];
  x.dmin = o.dmin[r];
  for (int j = 0; j < 4; ++j) {  // the six-bit packing unpack_q4_K_words reads
    const uint8_t s0 = o.scales[8 * j + r], s1 = o.scales[8 * (j + 4) + r];
    const uint8_t m0 = o.mins[q4_Kx8_min_at(j, r)], m1 = o.mins[q4_Kx8_min_at(j + 4, r)];
    x.scales[j] = (uint8_t)(s0 | (s1 >> 4) << 6);
    x.scales[j + 4] = (uint8_t)(m0 | (m1 >> 4) << 6);
    x.scales[j + 8] = (uint8_t)((s1 & 0x0F) | (m1 & 0x0F) << 4);
  }
  unpack_lanes(o, x, r);
}

// Weight types MUL_MAT can read in eight-row repacked groups (repack_rows8 accepts them),
// and the bytes one row takes in that form (lib/cpu/repack.ts mirrors both).
inline bool type_is_repackable(int32_t type) { return type == T_Q4_0 || type == T_Q8_0 || type == T_Q4_K; }
inline int64_t repacked_row_bytes(int32_t type, int64_t n) {
  return type == T_Q4_K ? n / QK_K * (int64_t)(sizeof(block_q4_Kx8) / 8) : row_bytes(type, n);
}
// nrows (a multiple of 8) rows of n elements, src_stride bytes apart -> repacked groups
void repack_rows8(int32_t type, const void* src, int64_t src_stride, void* dst, int64_t n, int64_t nrows);

}  // namespace weft
