// A 256-value quantization map prepared for exact round-to-nearest.
//
// Nearest rounding in a sorted map is a count of thresholds: x maps to sorted index
// j = #{k : thr[k] <= x}, where thr[k] is the smallest float32 >= the exact midpoint of
// sorted[k] and sorted[k+1] (midpoints of two floats are exact in double; rounding up
// keeps "x >= midpoint" exact for float32 x, and makes ties go to the larger value).
//
// `guess[b]` is that count for the lowest float whose top 16 bits are b, so the true
// index is guess[b] or guess[b] + 1 whenever no 16-bit bin holds two thresholds
// (`one_step`, checked when the map is built; otherwise kernels binary-search).
#pragma once
#include <cstdint>

namespace bnbf {

struct QuantMap {
  float code[256];            // as given (index = stored code)
  float sorted[256];          // ascending
  uint8_t sorted_to_code[256 + 4];  // +4: 32-bit gathers may read past the end
  float thr[256];             // 255 thresholds; thr[255] = NaN (never <= x)
  alignas(64) uint8_t guess[65536 + 4];  // +4: 32-bit gathers may read past the end
  bool one_step;
  bool identity;              // code is already ascending: sorted_to_code[i] == i
  // The second-moment policy (docs/optimizers.md, "No blow-ups"): a positive value whose nearest
  // code is the zero code is stored as the smallest positive code instead.
  uint8_t zero_code;          // code of the value nearest 0
  uint8_t min_positive_code;  // code of the smallest value > 0 (zero_code if none)
  // The map's extremes for the state scale (csrc/common/state_scale.h): the largest value
  // and the magnitude of the smallest, 1 for a side without values.
  float q_pos;
  float q_neg;

  // Exact nearest index (into code) of a float; used by scalar tails and as the spec.
  inline uint8_t nearest(float x) const {
    uint32_t bits;
    __builtin_memcpy(&bits, &x, 4);
    int j = guess[bits >> 16];
    if (one_step) {
      j += (x >= thr[j]);
    } else {
      int lo = 0, hi = 255;  // count of thr[0..254] <= x by binary search
      while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (thr[mid] <= x) lo = mid + 1; else hi = mid;
      }
      j = lo;
    }
    return sorted_to_code[j];
  }

  inline uint8_t nearest_keep_positive(float x, float original) const {
    uint8_t c = nearest(x);
    return (c == zero_code && original > 0.f) ? min_positive_code : c;
  }
};

// Cached per distinct 256-float map; thread-safe; the reference stays valid forever.
const QuantMap& quant_map(const float* code);

}  // namespace bnbf
