// Device-side exact nearest quantization for the optimizer kernels (csrc/cuda/optimizer.cu).
//
// A thread block builds, once, the same sorted thresholds as the CPU's QuantMap
// (csrc/cpu/qmap.h): thr[k] is the smallest float32 >= the exact midpoint of the k-th and
// (k+1)-th sorted map values, so nearest(x) = order[#{k < 255 : thr[k] <= x}] is exact, with
// ties going to the larger value. The count is a binary search over thr in shared memory.
#pragma once
#include <stdint.h>

namespace bnbf {
namespace cuda {

constexpr int kMapThreads = 256;  // build_map needs exactly one thread per map value

struct SharedMap {
  float code[256];
  float sorted[256];
  float thr[256];
  uint8_t order[256];        // sorted index -> code index
  uint8_t zero_code;         // code of the value nearest 0
  uint8_t min_positive_code; // code of the smallest value > 0 (zero_code if none)
  // The map's extremes for the state scale (csrc/common/state_scale.h), as QuantMap's in
  // csrc/cpu/qmap.cpp: the largest value and the magnitude of the smallest, 1 for a side
  // without values.
  float q_pos;
  float q_neg;
};

// Call with blockDim.x == 256, from all threads (contains __syncthreads).
__device__ inline void build_map(SharedMap& m, const float* __restrict__ code) {
  const int t = threadIdx.x;
  const float v = code[t];
  m.code[t] = v;
  // A map holding NaN has no consistent order, so ranks can collide and leave slots
  // unwritten; these defaults keep every slot defined and every code in range. (bnbfuse
  // refuses such maps before the launch: bnbfuse/ops/quantize.py, check_map_has_no_nan.)
  m.sorted[t] = __int_as_float(0x7fc00000);
  m.order[t] = 0;
  __syncthreads();
  int rank = 0;  // stable rank: equal values keep their index order
  for (int j = 0; j < 256; ++j) {
    const float w = m.code[j];
    rank += (w < v) || (w == v && j < t);
  }
  m.sorted[rank] = v;
  m.order[rank] = (uint8_t)t;
  __syncthreads();
  if (t < 255) {
    const double mid = ((double)m.sorted[t] + (double)m.sorted[t + 1]) * 0.5;
    float th = __double2float_rn(mid);
    if ((double)th < mid) th = nextafterf(th, __int_as_float(0x7f800000));
    m.thr[t] = th;
  } else {
    m.thr[255] = __int_as_float(0x7fc00000);  // never <= x
  }
  __syncthreads();
  if (t == 0) {
    int lo = 0, hi = 255;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (m.thr[mid] <= 0.f) lo = mid + 1; else hi = mid;
    }
    m.zero_code = m.order[lo];
    m.min_positive_code = m.zero_code;
    for (int k = 0; k < 256; ++k)
      if (m.sorted[k] > 0.f) {
        m.min_positive_code = m.order[k];
        break;
      }
    m.q_pos = m.sorted[255] > 0.f ? m.sorted[255] : 1.f;
    m.q_neg = m.sorted[0] < 0.f ? -m.sorted[0] : 1.f;
  }
  __syncthreads();
}

// Index of the map value nearest x (exact; NaN maps to the smallest value).
__device__ inline uint8_t nearest(const SharedMap& m, float x) {
  int lo = 0, hi = 255;
#pragma unroll
  for (int it = 0; it < 8; ++it) {  // 255 thresholds: 8 halvings
    const int mid = (lo + hi) >> 1;
    const bool le = m.thr[mid] <= x;
    if (lo < hi) {
      if (le) lo = mid + 1; else hi = mid;
    }
  }
  return m.order[lo];
}

// keep_positive: the second-moment policy (a positive value never gets the zero code).
__device__ inline uint8_t quantize_value(const SharedMap& m, float x, float divisor,
                                         bool keep_positive) {
  const uint8_t c = nearest(m, x / divisor);
  return (keep_positive && c == m.zero_code && x > 0.f) ? m.min_positive_code : c;
}

}  // namespace cuda
}  // namespace bnbf
