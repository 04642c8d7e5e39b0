// Inline block primitives: absmax, exact nearest quantization and dequantization of fp32
// values. Used by the quantize kernels and fused into the optimizer kernels.
#pragma once
#include <cmath>
#include <limits>

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

#if defined(BNBF_SIMD8)
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
  if (m.one_step) {
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
