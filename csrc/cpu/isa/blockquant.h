// Inline block primitives: absmax, exact nearest quantization and dequantization of fp32
// values. Used by the quantize kernels and fused into the optimizer kernels.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>

#include "qmap.h"
#include "simd.h"

namespace bnbf {
namespace BNBF_ISA_NS {

// Block absmax as the bits of |x| compared as integers: for non-negative floats integer
// order is float order, and every NaN (0x7F800001 and above once the sign is cleared)
// compares above +inf, so one integer max gives the absmax and propagates NaN.
inline uint32_t abs_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b & 0x7FFFFFFFu;
}

// The absmax of accumulated abs bits: a quiet NaN if any value was NaN.
inline float absmax_from_bits(uint32_t b) {
  if (b > 0x7F800000u) b = 0x7FC00000u;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

#if defined(BNBF_SIMD8)
inline __m256i abs_bits8(__m256 x) {
  return _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFFFFFF));
}

inline uint32_t hmax8_u32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
  return (uint32_t)_mm_cvtsi128_si32(m);
}

inline int32_t hmax8_i32(__m256i v) {
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
  return _mm_cvtsi128_si32(m);
}
#endif

// max |x|; NaN if any x is NaN (the block's codes are then unspecified but in range).
inline float block_absmax(const float* x, int64_t n) {
  uint32_t m = 0;
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  __m256i acc = _mm256_setzero_si256();
  for (; i + 8 <= n; i += 8) acc = _mm256_max_epu32(acc, abs_bits8(_mm256_loadu_ps(x + i)));
  m = hmax8_u32(acc);
#endif
  for (; i < n; ++i) m = std::max(m, abs_bits(x[i]));
  return absmax_from_bits(m);
}

// ---- one-lookup nearest rounding: PackedNearest (qmap.h), built once per map ----------

// ---- table lookups as scalar loads ----------------------------------------------------
// On Zen 3 an 8-lane vpgatherdd from an L1-resident table costs ~2.2 cycles per element;
// eight scalar loads (indices extracted by shifts from one 64-bit load) joined by shuffles
// cost ~0.7. Both the nearest-code entries and the dequantization values are fetched so.
#if defined(BNBF_SIMD8)
inline __m256 join8(__m128 a0, __m128 a1, __m128 a2, __m128 a3, __m128 a4, __m128 a5,
                    __m128 a6, __m128 a7) {
  const __m128 lo = _mm_movelh_ps(_mm_unpacklo_ps(a0, a1), _mm_unpacklo_ps(a2, a3));
  const __m128 hi = _mm_movelh_ps(_mm_unpacklo_ps(a4, a5), _mm_unpacklo_ps(a6, a7));
  return _mm256_set_m128(hi, lo);
}

// table[c[0..8)] (c: 8 bytes)
inline __m256 lookup8_bytes(const float* table, const uint8_t* c) {
  uint64_t w;
  std::memcpy(&w, c, 8);
  return join8(_mm_load_ss(table + (w & 0xFF)), _mm_load_ss(table + ((w >> 8) & 0xFF)),
               _mm_load_ss(table + ((w >> 16) & 0xFF)), _mm_load_ss(table + ((w >> 24) & 0xFF)),
               _mm_load_ss(table + ((w >> 32) & 0xFF)), _mm_load_ss(table + ((w >> 40) & 0xFF)),
               _mm_load_ss(table + ((w >> 48) & 0xFF)), _mm_load_ss(table + (w >> 56)));
}

// table[key[0..8) >> 16] (key: 32-bit ukeys; the bin is the top half)
inline __m256i lookup8_bins(const uint32_t* table, const uint32_t* key) {
  uint64_t w0, w1, w2, w3;
  std::memcpy(&w0, key, 8);
  std::memcpy(&w1, key + 2, 8);
  std::memcpy(&w2, key + 4, 8);
  std::memcpy(&w3, key + 6, 8);
  const float* t = (const float*)table;
  return _mm256_castps_si256(join8(
      _mm_load_ss(t + ((w0 >> 16) & 0xFFFF)), _mm_load_ss(t + (w0 >> 48)),
      _mm_load_ss(t + ((w1 >> 16) & 0xFFFF)), _mm_load_ss(t + (w1 >> 48)),
      _mm_load_ss(t + ((w2 >> 16) & 0xFFFF)), _mm_load_ss(t + (w2 >> 48)),
      _mm_load_ss(t + ((w3 >> 16) & 0xFFFF)), _mm_load_ss(t + (w3 >> 48))));
}
#endif

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

#endif

// The divisor of a block: its absmax, or 1 for an all-zero block (so 0/0 never happens).
inline float block_divisor(float absmax) { return absmax == 0.f ? 1.f : absmax; }

// Lookup key of y for PackedNearest: its ukey, or 0 for NaN. Bin 0 holds no threshold (no
// threshold is NaN) and starts below every float, so its entry is the code of the smallest
// value: the NaN code, without a separate select.
inline uint32_t packed_key(float y) { return std::isnan(y) ? 0u : float_ukey(y); }

inline uint32_t packed_index(uint32_t entry, uint32_t key) {
  return (entry + (key & 0xFFFFu)) >> 16;
}

// Elements per pass of the buffered quantization (keys and entries stay in L1).
constexpr int64_t kQuantChunk = 256;

// out[i] = code index nearest x[i] / divisor. With keep_positive (second moments), a
// positive x never gets the zero code (QuantMap::min_positive_code instead). `absmax` is
// the block's absmax, NaN if any x is NaN (as block_absmax gives).
inline void quantize_scaled(const QuantMap& m, const float* x, float absmax, uint8_t* out,
                            int64_t n, bool keep_positive = false) {
  const float d = block_divisor(absmax);
  const PackedNearest& packed = m.packed_nearest();
  if (packed.usable) {
    // A finite absmax means every x, hence every x / d, is finite: the keys need no NaN
    // mask, and no "+ 0" where -0 already shares +0's index.
    const bool plain = std::fabs(absmax) <= 3.40282347e+38f && packed.zero_safe;
    // Two passes per chunk: keys (SIMD, all divisions in a row), then the table entries by
    // scalar loads (see lookup8_bins) and the sorted indices.
    alignas(64) uint32_t key[kQuantChunk];
    for (int64_t c0 = 0; c0 < n; c0 += kQuantChunk) {
      const int64_t len = std::min(kQuantChunk, n - c0);
      const float* xc = x + c0;
      uint8_t* oc = out + c0;
      int64_t i = 0;
#if defined(BNBF_SIMD8)
      const __m256 dv = _mm256_set1_ps(d);
      const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
      auto key8 = [&](__m256 q) {
        const __m256i b = _mm256_castps_si256(q);
        return _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32(b, 31), sign));
      };
      if (plain) {
        for (; i + 8 <= len; i += 8)
          _mm256_store_si256((__m256i*)(key + i), key8(_mm256_div_ps(_mm256_loadu_ps(xc + i), dv)));
      } else {
        for (; i + 8 <= len; i += 8) {
          const __m256 q = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(xc + i), dv),
                                         _mm256_setzero_ps());  // -0 -> +0
          const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(q, q, _CMP_UNORD_Q));
          _mm256_store_si256((__m256i*)(key + i), _mm256_andnot_si256(nan, key8(q)));
        }
      }
#endif
      for (; i < len; ++i) key[i] = packed_key(xc[i] / d);
      i = 0;
#if defined(BNBF_SIMD8)
      if (m.identity) {  // the sorted index is the code (other maps: the scalar loop)
        const __m256i low16 = _mm256_set1_epi32(0xFFFF);
        const __m256i zero_code = _mm256_set1_epi32(m.zero_code);
        const __m256i min_pos = _mm256_set1_epi32(m.min_positive_code);
        auto codes8 = [&](int64_t j) {
          const __m256i e = lookup8_bins(packed.entry, key + j);
          const __m256i k = _mm256_load_si256((const __m256i*)(key + j));
          __m256i c = _mm256_srli_epi32(_mm256_add_epi32(e, _mm256_and_si256(k, low16)), 16);
          if (keep_positive) {
            const __m256i fix = _mm256_and_si256(
                _mm256_cmpeq_epi32(c, zero_code),
                _mm256_castps_si256(_mm256_cmp_ps(_mm256_loadu_ps(xc + j), _mm256_setzero_ps(),
                                                  _CMP_GT_OQ)));
            c = _mm256_blendv_epi8(c, min_pos, fix);
          }
          return c;
        };
        // 32 codes per store: two saturating packs (values are 0..255, so nothing
        // saturates) interleave the 128-bit lanes; one cross-lane permute restores the order.
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (; i + 32 <= len; i += 32) {
          __m256i ab = _mm256_packus_epi32(codes8(i), codes8(i + 8));
          __m256i cd = _mm256_packus_epi32(codes8(i + 16), codes8(i + 24));
          __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
          _mm256_storeu_si256((__m256i*)(oc + i), bytes);
        }
        for (; i + 8 <= len; i += 8) store_bytes8(oc + i, codes8(i));
      }
#endif
      for (; i < len; ++i) {
        uint8_t c = m.sorted_to_code[packed_index(packed.entry[key[i] >> 16], key[i])];
        if (keep_positive && c == m.zero_code && xc[i] > 0.f) c = m.min_positive_code;
        oc[i] = c;
      }
    }
    return;
  }
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

// out[i] = code[c[i]] * absmax (map values by scalar loads, see lookup8_bytes). For the
// int8 table map (QuantMap::int8_linear) the value (c - 127) / 127 is computed instead: one
// division per 8 lanes is about a quarter faster than the 8 loads (embedding lookups, 1 KiB
// rows, Xeon with AVX-512), and gives the entry's bits (the map was built by that division).
inline void dequantize_scaled(const QuantMap& m, const uint8_t* c, float absmax, float* out,
                              int64_t n) {
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  const __m256 s = _mm256_set1_ps(absmax);
  if (m.int8_linear) {
    const __m256 d = _mm256_set1_ps(127.f), one = _mm256_set1_ps(1.f);
    const __m256i z = _mm256_set1_epi32(127);
    for (; i + 8 <= n; i += 8) {
      const __m256i k = _mm256_sub_epi32(
          _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(c + i))), z);
      const __m256 v = _mm256_min_ps(_mm256_div_ps(_mm256_cvtepi32_ps(k), d), one);  // c = 255
      _mm256_storeu_ps(out + i, _mm256_mul_ps(v, s));
    }
  }
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(lookup8_bytes(m.code, c + i), s));
#endif
  for (; i < n; ++i) out[i] = m.code[c[i]] * absmax;
}

// ---- 4-bit codes ------------------------------------------------------------------------
// Two codes per byte, element e in byte e / 2: the high nibble when e is even, the low one
// when odd (row_quantization.py); the map has 16 values.
inline uint8_t nibble_at(const uint8_t* packed, int64_t e) {
  const uint8_t b = packed[e >> 1];
  return (e & 1) ? (b & 15) : (b >> 4);
}

// out[i] = map16[nibble e0 + i] * absmax. AVX2: the two halves of the map in two registers,
// vpermps on each and a blend on the index's bit 3.
inline void dequantize_nibbles_scaled(const float* map16, const uint8_t* packed, int64_t e0,
                                      float absmax, float* out, int64_t n) {
  int64_t i = 0;
  if (n > 0 && (e0 & 1)) {  // an odd start: one element, then whole bytes
    out[0] = map16[nibble_at(packed, e0)] * absmax;
    i = 1;
  }
#if defined(BNBF_SIMD8)
  const __m256 s = _mm256_set1_ps(absmax);
  const __m256 lo_map = _mm256_loadu_ps(map16), hi_map = _mm256_loadu_ps(map16 + 8);
  // bytes b0 b0 b1 b1 b2 b2 b3 b3 -> 8 lanes; even lanes shift by 4 (high nibble first)
  const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  const __m256i nib = _mm256_set1_epi32(15), seven = _mm256_set1_epi32(7);
  for (; i + 8 <= n; i += 8) {
    uint32_t four;
    std::memcpy(&four, packed + ((e0 + i) >> 1), 4);
    const __m128i b = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)four), dup);
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), shifts), nib);
    const __m256 lo = _mm256_permutevar8x32_ps(lo_map, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(hi_map, idx);
    const __m256 high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_blendv_ps(lo, hi, high), s));
  }
#endif
  for (; i < n; ++i) out[i] = map16[nibble_at(packed, e0 + i)] * absmax;
}

}  // namespace BNBF_ISA_NS
}  // namespace bnbf
