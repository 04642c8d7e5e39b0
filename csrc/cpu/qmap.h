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

// Arithmetic exact nearest (the AVX-512 VBMI kernels, csrc/cpu/isa/vbmi.h), for maps whose
// codes are ascending. With z = the index nearest 0 and P_j = thr[z + j] the positive
// thresholds, the index of y >= 0 is z + #{j : P_j <= y}, and of y < 0 it is
// z - #{negative thresholds whose magnitude is below |y|}; the negative magnitudes equal
// the P_j to within an ulp (checked at build; lanes that close to a threshold are redone
// exactly), so both count P_j <= m for m = |y|, and the index is clamped at 0.
// The P_j fall into at most 32 runs of (almost exactly) equal spacing. In run r, which
// starts at P_{j_r}, the count is floor(m * C[r] - D[r]); a run serves m from just above
// the previous run's last threshold to just above its own last one (build_runs checks
// that the formula needs no clamp there). The run of m comes from its binary octave
// (exponent field, at least 96, & 31; all m < 2^-30 share octave 0): octave o starts in
// run run_lo[o] and holds at most two run selections, at bound1[o] and bound2[o] (+inf if
// none), each 2^-21 relatively above the earlier run's last threshold, so that lanes near
// it stay in the earlier run, where they are near an integer and get flagged. A lane is
// flagged, and redone with exact division and threshold count, when m * C - D lies within
// 2^-11 of an integer. build_runs proves that margin covers the model error, the
// reciprocal-multiply error and float rounding.
struct RunTables {
  bool usable = false;
  int32_t zero_index;             // z
  alignas(64) float bound1[32], bound2[32];  // per octave
  alignas(64) int32_t run_lo[32]; // per octave
  alignas(64) float C[32], D[32]; // per run
};

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
  // code[c] == (c - 127) / 127 in float32 for c < 255 and code[255] == 1 (bnbfuse's int8
  // table map): without byte permutes, computing the value beats loading it (blockquant.h).
  bool int8_linear;
  // planes[b][k]: byte b of code[k]'s float bits (dequantization by byte permutes).
  alignas(64) uint8_t planes[4][256];
  RunTables runs;

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
