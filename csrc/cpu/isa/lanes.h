// Lane types of the CPU optimizer kernels: `float` (one element) and, with AVX2, `F8`
// (eight elements in a __m256). The update rules (csrc/common/optim_rule.h) are templates
// over the lane type, so one rule source serves the scalar tails, the vector body and CUDA.
//
// Every F8 operator is the single IEEE float32 instruction of its scalar counterpart
// (contraction is off, see CMakeLists.txt), so a lane of F8 computes bit for bit what the
// float code computes. Lanes<L> gathers what the kernel needs besides arithmetic: loads and
// stores in the parameter dtype, the state dequantization, the finite-gradient mask and
// the running extremes of the new states (integer bits; see SignedMax).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "blockquant.h"
#include "optim_rule.h"
#include "simd.h"

namespace bnbf {
namespace BNBF_ISA_NS {

// A state's largest non-negative value and largest negative magnitude, as float bits: one
// signed max (negative floats are negative integers, below every non-negative one) and one
// unsigned max (any negative float, bits >= 0x80000000, lies above every non-negative one).
// NaN of either sign shows as magnitude bits above 0x7F800000.
struct SignedMax {
  uint32_t pos_bits, neg_bits;
};

inline SignedMax signed_max_of(int32_t smax, uint32_t umax) {
  return {(uint32_t)std::max(smax, 0), umax >= 0x80000000u ? umax & 0x7FFFFFFFu : 0u};
}

template <class L>
struct Lanes;

template <>
struct Lanes<float> {
  static constexpr int W = 1;
  using Mask = bool;
  struct AbsAcc {
    int32_t smax = 0;
    uint32_t umax = 0;
  };
  template <int DT>
  static float load(const void* p, int64_t i) { return load1<DT>(p, i); }
  template <int DT>
  static void store(void* p, int64_t i, float v) { store1<DT>(p, i, v); }
  static float dequantize(const float* code, const uint8_t* c, float absmax) {
    return code[*c] * absmax;
  }
  static Mask finite(float g) { return opt_finite(g); }
  static Mask both(Mask a, Mask b) { return a && b; }
  static float select(Mask m, float a, float b) { return opt_select(m, a, b); }
  static AbsAcc abs_init() { return {}; }
  static AbsAcc abs_max(AbsAcc acc, float x) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    return {std::max(acc.smax, (int32_t)b), std::max(acc.umax, b)};
  }
  static SignedMax abs_reduce(AbsAcc acc) { return signed_max_of(acc.smax, acc.umax); }
};

#define BNBF_LANE inline __attribute__((always_inline))
#if defined(BNBF_SIMD8)

struct F8 {
  __m256 v;
};
BNBF_LANE F8 operator+(F8 a, F8 b) { return {_mm256_add_ps(a.v, b.v)}; }
BNBF_LANE F8 operator-(F8 a, F8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
BNBF_LANE F8 operator*(F8 a, F8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
BNBF_LANE F8 operator/(F8 a, F8 b) { return {_mm256_div_ps(a.v, b.v)}; }
BNBF_LANE F8 operator+(F8 a, float b) { return a + F8{_mm256_set1_ps(b)}; }
BNBF_LANE F8 operator-(F8 a, float b) { return a - F8{_mm256_set1_ps(b)}; }
BNBF_LANE F8 operator*(F8 a, float b) { return a * F8{_mm256_set1_ps(b)}; }
BNBF_LANE F8 operator/(F8 a, float b) { return a / F8{_mm256_set1_ps(b)}; }
BNBF_LANE F8 opt_sqrt(F8 a) { return {_mm256_sqrt_ps(a.v)}; }
// (x > 0) - (x < 0) lane by lane, as the scalar opt_sign; NaN gives 0.
BNBF_LANE F8 opt_sign(F8 x) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  return F8{_mm256_and_ps(_mm256_cmp_ps(x.v, zero, _CMP_GT_OQ), one)} -
         F8{_mm256_and_ps(_mm256_cmp_ps(x.v, zero, _CMP_LT_OQ), one)};
}

template <>
struct Lanes<F8> {
  static constexpr int W = 8;
  using Mask = __m256;
  struct AbsAcc {
    __m256i smax, umax;
  };
  template <int DT>
  static F8 load(const void* p, int64_t i) { return {load8<DT>(p, i)}; }
  template <int DT>
  static void store(void* p, int64_t i, F8 v) { store8<DT>(p, i, v.v); }
  static F8 dequantize(const float* code, const uint8_t* c, float absmax) {
    return F8{lookup8_bytes(code, c)} * absmax;
  }
  static Mask finite(F8 g) {
    const __m256 abs = _mm256_and_ps(g.v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
    return _mm256_cmp_ps(abs, _mm256_set1_ps(3.40282347e+38f), _CMP_LE_OQ);
  }
  static Mask both(Mask a, Mask b) { return _mm256_and_ps(a, b); }
  static F8 select(Mask m, F8 a, F8 b) { return {_mm256_blendv_ps(b.v, a.v, m)}; }
  static AbsAcc abs_init() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  static AbsAcc abs_max(AbsAcc acc, F8 x) {
    const __m256i b = _mm256_castps_si256(x.v);
    return {_mm256_max_epi32(acc.smax, b), _mm256_max_epu32(acc.umax, b)};
  }
  static SignedMax abs_reduce(AbsAcc acc) {
    return signed_max_of(hmax8_i32(acc.smax), hmax8_u32(acc.umax));
  }
};
#endif  // BNBF_SIMD8

#if defined(BNBF_SIMD16)
struct F16 {
  __m512 v;
};
BNBF_LANE F16 operator+(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
BNBF_LANE F16 operator-(F16 a, F16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
BNBF_LANE F16 operator*(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
BNBF_LANE F16 operator/(F16 a, F16 b) { return {_mm512_div_ps(a.v, b.v)}; }
BNBF_LANE F16 operator+(F16 a, float b) { return a + F16{_mm512_set1_ps(b)}; }
BNBF_LANE F16 operator-(F16 a, float b) { return a - F16{_mm512_set1_ps(b)}; }
BNBF_LANE F16 operator*(F16 a, float b) { return a * F16{_mm512_set1_ps(b)}; }
BNBF_LANE F16 operator/(F16 a, float b) { return a / F16{_mm512_set1_ps(b)}; }
BNBF_LANE F16 opt_sqrt(F16 a) { return {_mm512_sqrt_ps(a.v)}; }
BNBF_LANE F16 opt_sign(F16 x) {
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  return F16{_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, zero, _CMP_GT_OQ), one)} -
         F16{_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, zero, _CMP_LT_OQ), one)};
}

// The avx512vbmi lanes. Their 8-bit states come dequantized in buffers (vbmi.h), so there is
// no dequantize here.
template <>
struct Lanes<F16> {
  static constexpr int W = 16;
  using Mask = __mmask16;
  struct AbsAcc {
    __m512i smax, umax;
  };
  template <int DT>
  static F16 load(const void* p, int64_t i) { return {load16<DT>(p, i)}; }
  template <int DT>
  static void store(void* p, int64_t i, F16 v) { store16<DT>(p, i, v.v); }
  // one vfpclassps (NaN of either kind, +inf, -inf) instead of an abs and a compare
  static Mask finite(F16 g) { return (Mask)~_mm512_fpclass_ps_mask(g.v, 0x99); }
  static Mask both(Mask a, Mask b) { return a & b; }
  static F16 select(Mask m, F16 a, F16 b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }
  static AbsAcc abs_init() { return {_mm512_setzero_si512(), _mm512_setzero_si512()}; }
  static AbsAcc abs_max(AbsAcc acc, F16 x) {
    const __m512i b = _mm512_castps_si512(x.v);
    return {_mm512_max_epi32(acc.smax, b), _mm512_max_epu32(acc.umax, b)};
  }
  static SignedMax abs_reduce(AbsAcc acc) {
    return signed_max_of(_mm512_reduce_max_epi32(acc.smax), (uint32_t)_mm512_reduce_max_epu32(acc.umax));
  }
};
using VecLane = F16;
constexpr bool kStatesBuffered = true;  // 8-bit states are dequantized before the rule
#elif defined(BNBF_SIMD8)
using VecLane = F8;
constexpr bool kStatesBuffered = false;
#else
using VecLane = float;
constexpr bool kStatesBuffered = false;
#endif
#undef BNBF_LANE

}  // namespace BNBF_ISA_NS
}  // namespace bnbf
