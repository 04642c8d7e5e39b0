// Inline block primitives: absmax, exact nearest quantization and dequantization of fp32
// values. Used by the quantize kernels and fused into the optimizer kernels.
#pragma once
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "qmap.h"
#include "simd.h"

namespace bnbf {
namespace BNBF_ISA_NS {

// max |x|; NaN if any x is NaN (the block's codes are then unspecified but in range).
inline float block_absmax(const float* x, int64_t n) {
  float m = 0.f;
  bool nan = false;
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  __m256 acc = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_max_ps(acc, abs8(v));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  m = hmax8(acc);
  nan = _mm256_movemask_ps(bad) != 0;
#endif
  for (; i < n; ++i) {
    float a = std::fabs(x[i]);
    nan |= std::isnan(a);
    m = a > m ? a : m;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// ---- one-gather nearest rounding ----------------------------------------------------------
// Floats ordered as unsigned integers: ukey(x) = bits ^ 0x80000000 for x >= +0 and ~bits for
// x < 0, so x <= y <=> ukey(x) <= ukey(y) (-0 is first turned into +0 by adding +0).
// For each 16-bit bin B of ukeys (the floats whose ukey >> 16 == B) `entry[B]` packs
//   code_lo << 24 | code_hi << 16 | t,
// where t is the low 16 bits of the one threshold inside the bin (if any): a float x of
// the bin rounds to code_hi if (ukey(x) & 0xFFFF) >= t, else to code_lo; a bin without a
// threshold has code_lo == code_hi. That is QuantMap's count of thresholds <= x, with the
// guess, the threshold and the stored code in one 4-byte lookup instead of three. Usable
// when no bin holds two thresholds and none is NaN (true for the dynamic maps); NaN inputs
// get the code of the smallest value, as QuantMap::nearest gives them.
// This is the one exact table behind quantize_scaled (functional quantize and the optimizer
// requantization). The table spans 256 KiB, but values of one block scaled by its absmax lie
// in [-1, 1] and mostly within a few decades, so the bins actually touched are a few KiB and
// stay in L1/L2 beside the kernels' buffers; it beat a 32 KiB clamped-exponent variant inside
// the optimizer step (fewer instructions per lookup, same number of gathers).
struct PackedNearest {
  bool usable = false;
  uint8_t nan_code = 0;
  alignas(64) uint32_t entry[65536];
};

inline uint32_t float_ukey(float x) {
  x += 0.f;
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

inline void build_packed(const QuantMap& m, PackedNearest& p) {
  p.nan_code = m.sorted_to_code[0];
  uint32_t tk[255];
  for (int k = 0; k < 255; ++k) {
    if (std::isnan(m.thr[k])) return;  // unusable
    tk[k] = float_ukey(m.thr[k]);
    if (k > 0 && tk[k] < tk[k - 1]) return;
  }
  int k = 0;
  for (uint32_t B = 0; B < 65536; ++B) {
    const uint32_t lo = B << 16, hi = lo | 0xFFFFu;
    while (k < 255 && tk[k] < lo) ++k;  // k = thresholds below the bin
    int inside = 0;
    while (k + inside < 255 && tk[k + inside] <= hi) ++inside;
    if (inside > 1) return;  // unusable: two thresholds in one bin
    const uint32_t code_lo = m.sorted_to_code[k];
    const uint32_t code_hi = inside ? m.sorted_to_code[k + 1] : code_lo;
    const uint32_t t = inside ? (tk[k] & 0xFFFFu) : 0u;
    p.entry[B] = code_lo << 24 | code_hi << 16 | t;
  }
  p.usable = true;
}

// The packed table of a map, built once and cached for the map's lifetime (QuantMaps are
// never freed). Looked up once per block by the optimizer kernels, so the common case is
// a lock-free scan of a few slots; the mutex is taken only to build.
inline const PackedNearest& packed_nearest(const QuantMap& m) {
  constexpr int kSlots = 16;
  static std::atomic<const QuantMap*> keys[kSlots];
  static std::atomic<const PackedNearest*> values[kSlots];
  for (int i = 0; i < kSlots; ++i) {
    const QuantMap* k = keys[i].load(std::memory_order_acquire);
    if (k == &m) return *values[i].load(std::memory_order_acquire);
    if (!k) break;
  }
  static std::mutex mu;
  static std::vector<std::pair<const QuantMap*, std::unique_ptr<PackedNearest>>> all;
  std::lock_guard<std::mutex> lk(mu);
  for (auto& kv : all)
    if (kv.first == &m) return *kv.second;
  auto p = std::make_unique<PackedNearest>();
  build_packed(m, *p);
  const PackedNearest* result = p.get();
  all.emplace_back(&m, std::move(p));
  for (int i = 0; i < kSlots; ++i) {
    if (keys[i].load(std::memory_order_relaxed) == nullptr) {
      values[i].store(result, std::memory_order_release);
      keys[i].store(&m, std::memory_order_release);
      break;
    }
  }
  return *result;
}

#if defined(BNBF_SIMD8)
// Stored codes of the map values nearest each lane of q, one gather (see PackedNearest).
inline __m256i nearest8_packed(const PackedNearest& p, __m256 q) {
  q = _mm256_add_ps(q, _mm256_setzero_ps());  // -0 -> +0
  const __m256i b = _mm256_castps_si256(q);
  const __m256i flip = _mm256_or_si256(_mm256_srai_epi32(b, 31), _mm256_set1_epi32((int)0x80000000u));
  const __m256i ukey = _mm256_xor_si256(b, flip);
  const __m256i e = _mm256_i32gather_epi32((const int*)p.entry, _mm256_srli_epi32(ukey, 16), 4);
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  const __m256i below = _mm256_cmpgt_epi32(_mm256_and_si256(e, low16), _mm256_and_si256(ukey, low16));
  const __m256i code_lo = _mm256_srli_epi32(e, 24);
  const __m256i code_hi = _mm256_and_si256(_mm256_srli_epi32(e, 16), _mm256_set1_epi32(0xFF));
  __m256i c = _mm256_blendv_epi8(code_hi, code_lo, below);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(q, q, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(c, _mm256_set1_epi32(p.nan_code), nan);
}

// Sorted-map index nearest to each lane (see qmap.h), then the stored code.
inline __m256i nearest8(const QuantMap& m, __m256 x) {
  const __m256i low_byte = _mm256_set1_epi32(0xFF);
  __m256i bin = _mm256_srli_epi32(_mm256_castps_si256(x), 16);
  __m256i g = _mm256_and_si256(_mm256_i32gather_epi32((const int*)m.guess, bin, 1), low_byte);
  __m256 t = _mm256_i32gather_ps(m.thr, g, 4);
  g = _mm256_sub_epi32(g, _mm256_castps_si256(_mm256_cmp_ps(x, t, _CMP_GE_OQ)));
  if (!m.identity)
    g = _mm256_and_si256(_mm256_i32gather_epi32((const int*)m.sorted_to_code, g, 1), low_byte);
  return g;
}

inline void store_bytes8(uint8_t* out, __m256i idx) {
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  __m256i p = _mm256_shuffle_epi8(idx, pick);
  uint32_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(p));
  uint32_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(p, 1));
  std::memcpy(out, &lo, 4);
  std::memcpy(out + 4, &hi, 4);
}

inline __m256 dequant8(const QuantMap& m, const uint8_t* codes, __m256 scale) {
  __m128i c8 = _mm_loadl_epi64((const __m128i*)codes);
  __m256 v = _mm256_i32gather_ps(m.code, _mm256_cvtepu8_epi32(c8), 4);
  return _mm256_mul_ps(v, scale);
}
#endif

// The divisor of a block: its absmax, or 1 for an all-zero block (so 0/0 never happens).
inline float block_divisor(float absmax) { return absmax == 0.f ? 1.f : absmax; }

// out[i] = code index nearest x[i] / divisor. With keep_positive (second moments), a
// positive x never gets the zero code (QuantMap::min_positive_code instead).
inline void quantize_scaled(const QuantMap& m, const float* x, float absmax, uint8_t* out,
                            int64_t n, bool keep_positive = false) {
  const float d = block_divisor(absmax);
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  const PackedNearest& packed = packed_nearest(m);
  if (packed.usable) {
    const __m256 dv = _mm256_set1_ps(d);
    const __m256i zero_code = _mm256_set1_epi32(m.zero_code);
    const __m256i min_pos = _mm256_set1_epi32(m.min_positive_code);
    auto codes8 = [&](int64_t j) {
      __m256 v = _mm256_loadu_ps(x + j);
      __m256i c = nearest8_packed(packed, _mm256_div_ps(v, dv));
      if (keep_positive) {
        __m256i fix = _mm256_and_si256(
            _mm256_cmpeq_epi32(c, zero_code),
            _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ)));
        c = _mm256_blendv_epi8(c, min_pos, fix);
      }
      return c;
    };
    // 32 codes per store: two saturating packs (values are 0..255, so nothing saturates)
    // interleave the 128-bit lanes; one cross-lane permute restores the order.
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; i + 32 <= n; i += 32) {
      __m256i ab = _mm256_packus_epi32(codes8(i), codes8(i + 8));
      __m256i cd = _mm256_packus_epi32(codes8(i + 16), codes8(i + 24));
      __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
      _mm256_storeu_si256((__m256i*)(out + i), bytes);
    }
    for (; i + 8 <= n; i += 8) store_bytes8(out + i, codes8(i));
  } else if (m.one_step) {
    const __m256 dv = _mm256_set1_ps(d);
    const __m256i zero_code = _mm256_set1_epi32(m.zero_code);
    const __m256i min_pos = _mm256_set1_epi32(m.min_positive_code);
    for (; i + 8 <= n; i += 8) {
      __m256 v = _mm256_loadu_ps(x + i);
      __m256i c = nearest8(m, _mm256_div_ps(v, dv));
      if (keep_positive) {
        __m256i fix = _mm256_and_si256(
            _mm256_cmpeq_epi32(c, zero_code),
            _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ)));
        c = _mm256_blendv_epi8(c, min_pos, fix);
      }
      store_bytes8(out + i, c);
    }
  }
#endif
  if (keep_positive)
    for (; i < n; ++i) out[i] = m.nearest_keep_positive(x[i] / d, x[i]);
  else
    for (; i < n; ++i) out[i] = m.nearest(x[i] / d);
}

// out[i] = code[c[i]] * absmax
inline void dequantize_scaled(const QuantMap& m, const uint8_t* c, float absmax, float* out,
                              int64_t n) {
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  const __m256 s = _mm256_set1_ps(absmax);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, dequant8(m, c + i, s));
#endif
  for (; i < n; ++i) out[i] = m.code[c[i]] * absmax;
}

}  // namespace BNBF_ISA_NS
}  // namespace bnbf
