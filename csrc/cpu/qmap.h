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
#include <cstring>
#include <memory>
#include <mutex>

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

// One-lookup nearest rounding (the AVX2 kernels, csrc/cpu/isa/blockquant.h).
// Floats ordered as unsigned integers: ukey(x) = bits ^ 0x80000000 for x >= +0 and ~bits for
// x < 0, so x <= y <=> ukey(x) <= ukey(y) (-0 is first turned into +0 by adding +0).
// The nearest sorted index of x is the count of thresholds <= x (qmap.h). For each 16-bit
// bin B of ukeys (the floats whose ukey >> 16 == B), `entry[B]` holds that count in one add:
//   entry[B] = base << 16 | (0x10000 - t)   (t: low 16 bits of the one threshold in the bin)
//   entry[B] = base << 16                    (no threshold in the bin, or t == 0 counted
//                                             in base)
// where base counts the thresholds below the bin, so that
//   sorted index = (entry[B] + (ukey & 0xFFFF)) >> 16,
// the carry out of the low half being exactly [ukey & 0xFFFF >= t]. Usable when no bin
// holds two thresholds and none is NaN (true for the dynamic maps); NaN inputs use key 0,
// whose bin holds no threshold and starts below every float: the index of the smallest
// value, as QuantMap::nearest gives. Maps whose codes are not already ascending translate
// the index through sorted_to_code afterwards.
// This is the one exact table behind quantize_scaled (functional quantize and the optimizer
// requantization). The table spans 256 KiB, but values of one block scaled by its absmax lie
// in [-1, 1] and mostly within a few decades, so the bins actually touched are a few KiB and
// stay in L1/L2 beside the kernels' buffers.
struct PackedNearest {
  bool usable = false;
  // No threshold lies between -0 and the smallest positive subnormal: -0 then needs no
  // "+ 0" to share +0's index (its ukey sits one below +0's, in the bin below).
  bool zero_safe = false;
  alignas(64) uint32_t entry[65536];
};

inline uint32_t float_ukey(float x) {
  x += 0.f;
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

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

 private:
  mutable std::once_flag packed_once_;
  mutable std::unique_ptr<PackedNearest> packed_;

 public:

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

  // The packed table, built on first use (only the AVX2 kernels need it; 256 KiB) and owned
  // by the map, so it lives exactly as long as the map.
  const PackedNearest& packed_nearest() const;

  inline uint8_t nearest_keep_positive(float x, float original) const {
    uint8_t c = nearest(x);
    return (c == zero_code && original > 0.f) ? min_positive_code : c;
  }
};

// The prepared map of a 256-float code, from a cache of the most recently used maps (at most
// kQuantMapCacheSize; a program that quantizes with ever new maps stays bounded). The
// caller holds the returned reference for the duration of its kernel call, so eviction by
// another thread never frees a map in use. Thread-safe.
constexpr int kQuantMapCacheSize = 64;
std::shared_ptr<const QuantMap> quant_map(const float* code);
// Number of maps the cache holds now (tests).
int quant_map_cache_size();

}  // namespace bnbf
