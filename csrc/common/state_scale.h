// The absmax of an 8-bit optimizer state block: the scale that makes requantization
// idempotent. Shared by the CPU kernels (csrc/cpu/isa/optimizer.cpp) and the CUDA kernels
// (csrc/cuda/optimizer.cu); the specification is `state_absmax` in
// bnbfuse/backends/reference/optimizer.py.
//
// Plain absmax (max |x|) is not a fixed point when the map is asymmetric: the signed dynamic
// map's most negative value is q- = -0.9929..., not -1, so a block whose largest-magnitude
// value is negative stores it as q- * absmax, and the next requantization of that unchanged
// value finds an absmax 0.7% smaller (a skipped step would shrink the block every step).
// Instead the scale of a block is S = max(scale_for(maxpos, q+), scale_for(maxneg, q-)),
// with q+/q- the largest value and the magnitude of the smallest value of the map (1 for a
// side without codes), and scale_for(m, q) the smallest float32 S with fl(q * S) >= m. The
// extreme value then dequantizes to fl(q * S) >= m, and requantizing gives back the same S:
// a smaller S' would have fl(q * S') >= fl(q * S) >= m, contradicting minimality. For the
// dynamic maps q+ = 1, so a block whose extreme is positive keeps the plain absmax, and
// bitsandbytes' state (absmax = max |x|) loads as it is.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define BNBF_SCALE_HD __host__ __device__ __forceinline__
#else
#define BNBF_SCALE_HD inline
#endif

namespace bnbf {

BNBF_SCALE_HD float scale_bits_to_float(uint32_t b) {
  float f;
  memcpy(&f, &b, 4);
  return f;
}

// Smallest float32 S with fl(q * S) >= m, for 0 <= m <= +inf and q > 0. A finite m whose S
// would overflow gets FLT_MAX (fl(q * FLT_MAX) < m; the block then settles one step later).
BNBF_SCALE_HD float scale_for(float m, float q) {
  const float kMax = 3.40282347e+38f;
  if (q == 1.f || m == 0.f || !(m <= kMax)) return m;  // also +inf and NaN unchanged
  float s = m / q;
  if (!(s <= kMax)) return kMax;
  while (q * s < m) {
    if (s == kMax) return kMax;
    s = nextafterf(s, INFINITY);
  }
  for (;;) {  // m / q is within an ulp or two of S: step down while still >= m
    const float lower = nextafterf(s, 0.f);
    if (lower == s || !(q * lower >= m)) return s;
    s = lower;
  }
}

// The block scale from the block's largest non-negative value and the largest magnitude of
// its negative values, both as the bits of |x| (NaN: bits above 0x7F800000).
BNBF_SCALE_HD float state_scale(uint32_t pos_bits, uint32_t neg_bits, float q_pos, float q_neg) {
  if (pos_bits > 0x7F800000u || neg_bits > 0x7F800000u) return scale_bits_to_float(0x7FC00000u);
  const float a = scale_for(scale_bits_to_float(pos_bits), q_pos);
  const float b = scale_for(scale_bits_to_float(neg_bits), q_neg);
  return a > b ? a : b;
}

}  // namespace bnbf
