// Element conversion and 8-lane vector helpers shared by the CPU kernels.
//
// Every file in csrc/cpu/isa/ is compiled once per instruction set (see CMakeLists.txt) inside
// namespace bnbf::BNBF_ISA_NS. The AVX2 intrinsics below serve both the avx2 and the
// avx512 builds (the latter also lets the compiler widen the plain loops to 512 bits); the
// generic build uses the scalar code, which is also the specification of every helper.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bnbfuse.h"

#if defined(__AVX2__)
#include <immintrin.h>
#define BNBF_SIMD8 1
#endif
// The avx512vbmi build: 16-lane optimizer lanes and the VBMI primitives (vbmi.h).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define BNBF_SIMD16 1
#endif

namespace bnbf {
namespace BNBF_ISA_NS {

// ---- scalar conversions (round to nearest even, like torch) ----
inline float bf16_to_f32(uint16_t h) {
  uint32_t b = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if (std::isnan(f)) return (uint16_t)((b >> 16) | 0x40);  // keep sign, force quiet
  b += 0x7FFFu + ((b >> 16) & 1u);
  return (uint16_t)(b >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    // inf, or NaN made quiet with its payload kept: what F16C's vcvtph2ps (the vector
    // bodies) gives, so that tails and the generic build write the same bits.
    bits = sign | 0x7F800000u | (man << 13) | (man ? 0x00400000u : 0u);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: value = man * 2^-24, exact in float
    float v = (float)man * 5.9604644775390625e-8f;
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  uint32_t sign = (b >> 16) & 0x8000u;
  uint32_t abs = b & 0x7FFFFFFFu;
  // NaN: quiet, with the sign and the top 10 payload bits, as vcvtps2ph (0x7E00 | sign for
  // the usual NaNs). The CUDA kernels convert the same way (csrc/cuda/common.cuh).
  if (abs > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
  if (abs == 0x7F800000u) return (uint16_t)(sign | 0x7C00u);
  if (abs >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // result is subnormal or zero: round man * 2^-24
    float a;
    std::memcpy(&a, &abs, 4);
    // Adding 0.5 (2^-1) aligns the binary point so that the FPU does the RNE rounding.
    float r = a + 0.5f;
    uint32_t rb;
    std::memcpy(&rb, &r, 4);
    return (uint16_t)(sign | (rb - 0x3F000000u));
  }
  uint32_t man_odd = (abs >> 13) & 1u;
  abs += 0xFFFu + man_odd - (112u << 23);
  return (uint16_t)(sign | (abs >> 13));
}

template <int DT>
inline float load1(const void* p, int64_t i) {
  if (DT == BNBF_F32) return ((const float*)p)[i];
  if (DT == BNBF_BF16) return bf16_to_f32(((const uint16_t*)p)[i]);
  return f16_to_f32(((const uint16_t*)p)[i]);
}

template <int DT>
inline void store1(void* p, int64_t i, float v) {
  if (DT == BNBF_F32) ((float*)p)[i] = v;
  else if (DT == BNBF_BF16) ((uint16_t*)p)[i] = f32_to_bf16(v);
  else ((uint16_t*)p)[i] = f32_to_f16(v);
}

#if defined(BNBF_SIMD8)
template <int DT>
inline __m256 load8(const void* p, int64_t i) {
  if (DT == BNBF_F32) return _mm256_loadu_ps((const float*)p + i);
  __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
  if (DT == BNBF_F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int DT>
inline void store8(void* p, int64_t i, __m256 v) {
  if (DT == BNBF_F32) {
    _mm256_storeu_ps((float*)p + i, v);
  } else if (DT == BNBF_F16) {
    _mm_storeu_si128((__m128i*)((uint16_t*)p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    __m256i b = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb);
    r = _mm256_srli_epi32(r, 16);
    // NaN: keep the sign and the top mantissa bits, force quiet.
    __m256 isnan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(isnan));
    __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
    _mm_storeu_si128((__m128i*)((uint16_t*)p + i), _mm_packus_epi32(lo, hi));
  }
}

#endif

#if defined(BNBF_SIMD16)
template <int DT>
inline __m512 load16(const void* p, int64_t i) {
  if (DT == BNBF_F32) return _mm512_loadu_ps((const float*)p + i);
  const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i));
  if (DT == BNBF_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// As store8 (vcvtneps2bf16 would flush subnormals, so bf16 rounds in integers).
template <int DT>
inline void store16(void* p, int64_t i, __m512 v) {
  if (DT == BNBF_F32) {
    _mm512_storeu_ps((float*)p + i, v);
  } else if (DT == BNBF_F16) {
    _mm256_storeu_si256((__m256i*)((uint16_t*)p + i), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __mmask16 isnan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, isnan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i*)((uint16_t*)p + i), _mm512_cvtepi32_epi16(r));
  }
}
#endif

// buf[0..len) = fp32 of src[off..off+len) (any dtype), and back (RNE like torch).
template <int DT>
inline void load_f32(const void* src, int64_t off, float* buf, int64_t len) {
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  for (; i + 8 <= len; i += 8) _mm256_storeu_ps(buf + i, load8<DT>(src, off + i));
#endif
  for (; i < len; ++i) buf[i] = load1<DT>(src, off + i);
}

template <int DT>
inline void store_f32(const float* buf, void* dst, int64_t off, int64_t len) {
  int64_t i = 0;
#if defined(BNBF_SIMD16)
  for (; i + 16 <= len; i += 16) store16<DT>(dst, off + i, _mm512_loadu_ps(buf + i));
#endif
#if defined(BNBF_SIMD8)
  for (; i + 8 <= len; i += 8) store8<DT>(dst, off + i, _mm256_loadu_ps(buf + i));
#endif
  for (; i < len; ++i) store1<DT>(dst, off + i, buf[i]);
}

// Calls f.template operator()<DT>() for the runtime dtype; returns false if unknown.
template <typename F>
inline bool dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case BNBF_F32: f(std::integral_constant<int, BNBF_F32>()); return true;
    case BNBF_F16: f(std::integral_constant<int, BNBF_F16>()); return true;
    case BNBF_BF16: f(std::integral_constant<int, BNBF_BF16>()); return true;
    default: return false;
  }
}

}  // namespace BNBF_ISA_NS
}  // namespace bnbf
