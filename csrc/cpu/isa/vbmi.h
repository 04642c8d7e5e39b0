// AVX-512 VBMI block primitives: dequantization by byte planes and arithmetic exact
// nearest quantization. Compiled only into the avx512vbmi build; the results are the bits
// of dequantize_scaled and quantize_scaled (blockquant.h), which remain the specification
// and serve every block these cannot (maps without RunTables, non-finite or tiny absmax).
#pragma once
#include "blockquant.h"

#if defined(__AVX512VBMI__)
#include <immintrin.h>

namespace bnbf {
namespace BNBF_ISA_NS {

#define BNBF_HAVE_VBMI_PRIMITIVES 1

// ---- dequantization -----------------------------------------------------------------------
// Byte b of the 64 values code[c[i]] is one vpermi2b over each half of plane b (QuantMap::
// planes), blended on the code's top bit. Unpacking the four byte vectors (bytes to words
// to dwords) works within 128-bit lanes, so the codes are first permuted (a 4x4 transpose
// of 4-byte groups) for the floats to come out in order.
inline __m512i plane_order() {
  alignas(64) static const uint8_t order[64] = {
      0,  1,  2,  3,  16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51,
      4,  5,  6,  7,  20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55,
      8,  9,  10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59,
      12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  return _mm512_load_si512((const void*)order);
}

// out[0..n) = code[c[0..n)] * scale, n <= 64. A short block (TAIL) loads and stores under
// masks: no byte past c + n or out + n is touched.
template <bool TAIL>
inline void dequantize64(const QuantMap& m, const uint8_t* c, __m512 scale, float* out,
                         int n = 64) {
  const __mmask64 valid = TAIL ? (1ull << n) - 1 : ~0ull;  // TAIL: n < 64
  const __m512i raw = TAIL ? _mm512_maskz_loadu_epi8(valid, c) : _mm512_loadu_si512(c);
  const __m512i codes = _mm512_permutexvar_epi8(plane_order(), raw);
  const __mmask64 high = _mm512_movepi8_mask(codes), low = ~high;
  __m512i b[4];
  for (int i = 0; i < 4; ++i) {
    const uint8_t* pl = m.planes[i];
    // Two merge-masked permutes, no blend: the first writes the upper half's bytes and
    // keeps the codes elsewhere, which then index the lower half (vpermi2b reads 7 bits).
    const __m512i hi = _mm512_mask2_permutex2var_epi8(_mm512_load_si512(pl + 128), codes, high,
                                                      _mm512_load_si512(pl + 192));
    b[i] = _mm512_mask2_permutex2var_epi8(_mm512_load_si512(pl), hi, low,
                                          _mm512_load_si512(pl + 64));
  }
  const __m512i w01lo = _mm512_unpacklo_epi8(b[0], b[1]), w01hi = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i w23lo = _mm512_unpacklo_epi8(b[2], b[3]), w23hi = _mm512_unpackhi_epi8(b[2], b[3]);
  const __m512i v[4] = {_mm512_unpacklo_epi16(w01lo, w23lo), _mm512_unpackhi_epi16(w01lo, w23lo),
                        _mm512_unpacklo_epi16(w01hi, w23hi), _mm512_unpackhi_epi16(w01hi, w23hi)};
  for (int k = 0; k < 4; ++k) {
    const __m512 r = _mm512_mul_ps(_mm512_castsi512_ps(v[k]), scale);
    if (TAIL) _mm512_mask_storeu_ps(out + 16 * k, (__mmask16)(valid >> (16 * k)), r);
    else _mm512_storeu_ps(out + 16 * k, r);
  }
}

// out[i] = code[c[i]] * absmax, as dequantize_scaled
inline void dequantize_planes(const QuantMap& m, const uint8_t* c, float absmax, float* out,
                              int64_t n) {
  const __m512 s = _mm512_set1_ps(absmax);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) dequantize64<false>(m, c + i, s, out + i);
  if (i < n) dequantize64<true>(m, c + i, s, out + i, (int)(n - i));
}

// ---- 4-bit codes: the 16-value map is one register ----------------------------------------
// 64 elements from 32 bytes, the element order of nibble_at (blockquant.h): vpermps reads
// only bits 0..3 of each 32-bit index, so a byte needs no masking and its high nibble is the
// byte shifted right by 4 within its 16-bit word (the bits shifted in from the neighbour
// land above bit 3). Interleaving high and low nibbles per 128-bit lane gives elements
// 0..15 | 32..47 and 16..31 | 48..63; each 16 are widened to dwords and permuted.
template <bool TAIL>
inline void dequantize_nibbles64(__m512 map, const uint8_t* p, __m512 scale, float* out,
                                 int n = 64) {
  const __m256i b = TAIL ? _mm256_maskz_loadu_epi8((__mmask32)((1ull << ((n + 1) >> 1)) - 1), p)
                         : _mm256_loadu_si256((const __m256i*)p);
  const __m256i high = _mm256_srli_epi16(b, 4);
  const __m256i e0 = _mm256_unpacklo_epi8(high, b), e1 = _mm256_unpackhi_epi8(high, b);
  const __m128i q[4] = {_mm256_castsi256_si128(e0), _mm256_castsi256_si128(e1),
                        _mm256_extracti128_si256(e0, 1), _mm256_extracti128_si256(e1, 1)};
  for (int k = 0; k < 4; ++k) {
    const __m512 r = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(q[k]), map), scale);
    if (TAIL) {
      const int left = n - 16 * k;
      if (left <= 0) break;
      _mm512_mask_storeu_ps(out + 16 * k, (__mmask16)((1u << std::min(left, 16)) - 1), r);
    } else {
      _mm512_storeu_ps(out + 16 * k, r);
    }
  }
}

// out[i] = map16[nibble e0 + i] * absmax, as dequantize_nibbles_scaled
inline void dequantize_nibbles_perm(const float* map16, const uint8_t* packed, int64_t e0,
                                    float absmax, float* out, int64_t n) {
  int64_t i = 0;
  if (n > 0 && (e0 & 1)) {  // an odd start: one element, then whole bytes
    out[0] = map16[nibble_at(packed, e0)] * absmax;
    i = 1;
  }
  const __m512 map = _mm512_loadu_ps(map16), s = _mm512_set1_ps(absmax);
  const uint8_t* p = packed + ((e0 + i) >> 1);
  for (; i + 64 <= n; i += 64, p += 32) dequantize_nibbles64<false>(map, p, s, out + i);
  if (i < n) dequantize_nibbles64<true>(map, p, s, out + i, (int)(n - i));
}

// ---- arithmetic exact nearest (RunTables, qmap.h) -----------------------------------------
struct RunRegs {
  __m512 bound1[2], bound2[2], C[2], D[2];
  __m512i run_lo[2];
  __m512i zero_index, zero_code, min_positive_code;
  bool unsigned_like;  // zero code 0 and smallest positive code 1 (the unsigned maps)
  explicit RunRegs(const QuantMap& m) {
    const RunTables& t = m.runs;
    for (int h = 0; h < 2; ++h) {
      bound1[h] = _mm512_load_ps(t.bound1 + 16 * h);
      bound2[h] = _mm512_load_ps(t.bound2 + 16 * h);
      // times 2^11 (exact): nearest16's u then carries the flag margin in its low integer bits
      C[h] = _mm512_mul_ps(_mm512_load_ps(t.C + 16 * h), _mm512_set1_ps(2048.f));
      D[h] = _mm512_mul_ps(_mm512_load_ps(t.D + 16 * h), _mm512_set1_ps(2048.f));
      run_lo[h] = _mm512_load_si512(t.run_lo + 16 * h);
    }
    zero_index = _mm512_set1_epi32(t.zero_index);
    zero_code = _mm512_set1_epi32(m.zero_code);
    min_positive_code = _mm512_set1_epi32(m.min_positive_code);
    unsigned_like = m.zero_code == 0 && m.min_positive_code == 1;
  }
};

// Code indexes of 16 values x (finite, |x| <= about 1 / r), as dwords; *redo gets the lanes
// to redo exactly. A negative index means 0: the caller packs with unsigned saturation.
// NONNEG: the caller knows no x has its sign bit set (a second moment).
template <bool KEEP_POSITIVE, bool NONNEG>
inline __attribute__((always_inline)) __m512i nearest16(const RunRegs& R, __m512 x, __m512 r,
                                                        __mmask16* redo) {
  const __m512 y = _mm512_mul_ps(x, r);
  const __m512i yb = _mm512_castps_si512(y);
  const __m512i mb = NONNEG ? yb : _mm512_and_si512(yb, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512 m = _mm512_castsi512_ps(mb);
  // The octave is the low 5 bits of the exponent field, raised to at least 96 (2^-31).
  const __m512i e = _mm512_max_epi32(_mm512_srli_epi32(mb, 23), _mm512_set1_epi32(96));
  const __m512 bound1 = _mm512_permutex2var_ps(R.bound1[0], e, R.bound1[1]);
  const __m512 bound2 = _mm512_permutex2var_ps(R.bound2[0], e, R.bound2[1]);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i run = _mm512_permutex2var_epi32(R.run_lo[0], e, R.run_lo[1]);
  run = _mm512_mask_add_epi32(run, _mm512_cmp_ps_mask(m, bound1, _CMP_GE_OQ), run, one);
  run = _mm512_mask_add_epi32(run, _mm512_cmp_ps_mask(m, bound2, _CMP_GE_OQ), run, one);
  // u = 2^11 (m C - D) exactly (C, D scaled in RunRegs; m C - D >= 0, build_runs), rounded to
  // an integer k: the count is k >> 11 unless m C - D lies within the margin 2^-11 of an
  // integer. Such lanes have k mod 2^11 in {2046, 2047, 0, 1} and are redone exactly (this
  // flags every lane the margin needs and as many again); an unflagged lane's k >> 11 is
  // trunc(m C - D). Integer ops here cost less than a vreduceps, an abs and a float compare
  // on the FP pipes, which the encoder saturates.
  const __m512 u = _mm512_fmsub_ps(m, _mm512_permutex2var_ps(R.C[0], run, R.C[1]),
                                   _mm512_permutex2var_ps(R.D[0], run, R.D[1]));
  const __m512i k = _mm512_cvt_roundps_epi32(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i cnt = _mm512_srai_epi32(k, 11);
  *redo = _mm512_testn_epi32_mask(_mm512_add_epi32(k, _mm512_set1_epi32(2)),
                                  _mm512_set1_epi32(2044));
  __m512i idx = _mm512_add_epi32(R.zero_index, cnt);
  if (!NONNEG) idx = _mm512_mask_sub_epi32(idx, _mm512_movepi32_mask(yb), R.zero_index, cnt);
  if (KEEP_POSITIVE) {
    const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
    if (R.unsigned_like) {  // zero code 0 -> 1 where x > 0
      idx = _mm512_mask_max_epi32(idx, positive, idx, one);
    } else {
      // a negative idx (read as 0) is never the zero code of a map with zero_index > 0
      const __mmask16 fix = _mm512_cmpeq_epi32_mask(idx, R.zero_code) & positive;
      idx = _mm512_mask_mov_epi32(idx, fix, R.min_positive_code);
    }
  }
  return idx;
}

// 64 code bytes in element order from four vectors of 16 dword indexes (negative -> 0):
// the saturating packs interleave 4-element groups per 128-bit lane, one vpermd undoes it.
inline __attribute__((always_inline)) __m512i pack_codes64(__m512i a, __m512i b, __m512i c,
                                                           __m512i d) {
  const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
  return _mm512_permutexvar_epi32(
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), bytes);
}

// quantize_scaled's result, by nearest16 where the map and the block allow it.
template <bool KEEP_POSITIVE, bool NONNEG>
inline void quantize_runs_impl(const QuantMap& m, const RunRegs& R, const float* x, float absmax,
                               uint8_t* out, int64_t n) {
  const float d = absmax;
  const __m512 r = _mm512_set1_ps(1.f / absmax);
  auto exact = [&](int64_t i) {
    out[i] = KEEP_POSITIVE ? m.nearest_keep_positive(x[i] / d, x[i]) : m.nearest(x[i] / d);
  };
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __mmask16 redo[4];
    __m512i idx[4];
    for (int k = 0; k < 4; ++k)
      idx[k] = nearest16<KEEP_POSITIVE, NONNEG>(R, _mm512_loadu_ps(x + i + 16 * k), r, &redo[k]);
    _mm512_storeu_si512(out + i, pack_codes64(idx[0], idx[1], idx[2], idx[3]));
    const uint64_t all = (uint64_t)redo[0] | (uint64_t)redo[1] << 16 | (uint64_t)redo[2] << 32 |
                         (uint64_t)redo[3] << 48;
    for (uint64_t k = all; k; k &= k - 1) exact(i + __builtin_ctzll(k));
  }
  for (; i + 16 <= n; i += 16) {
    __mmask16 redo;
    const __m512i idx = nearest16<KEEP_POSITIVE, NONNEG>(R, _mm512_loadu_ps(x + i), r, &redo);
    _mm_storeu_si128((__m128i*)(out + i), _mm512_cvtusepi32_epi8(_mm512_max_epi32(idx, _mm512_setzero_si512())));
    for (unsigned k = redo; k; k &= k - 1) exact(i + __builtin_ctz(k));
  }
  for (; i < n; ++i) exact(i);
}

// nonnegative: no x has its sign bit set (the caller tracked it, as the optimizer does).
// R: RunRegs(m), built once for many blocks.
inline void quantize_fast(const QuantMap& m, const RunRegs& R, const float* x, float absmax,
                          uint8_t* out, int64_t n, bool keep_positive = false,
                          bool nonnegative = false) {
  // 1 / absmax must be finite and x * (1 / absmax) within about 1: other blocks (zero,
  // tiny, non-finite absmax) take the exact path.
  if (!m.runs.usable || !(absmax >= 0x1p-100f && absmax <= 3.40282347e+38f)) {
    quantize_scaled(m, x, absmax, out, n, keep_positive);
    return;
  }
  if (keep_positive) {
    if (nonnegative) quantize_runs_impl<true, true>(m, R, x, absmax, out, n);
    else quantize_runs_impl<true, false>(m, R, x, absmax, out, n);
  } else {
    if (nonnegative) quantize_runs_impl<false, true>(m, R, x, absmax, out, n);
    else quantize_runs_impl<false, false>(m, R, x, absmax, out, n);
  }
}

}  // namespace BNBF_ISA_NS
}  // namespace bnbf
#endif
