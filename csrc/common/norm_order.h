// The summation order of the optimizer norms ops (sum(direction^2), sum(p^2) in double),
// shared by the CPU kernels (csrc/cpu/isa/optimizer.cpp) and the CUDA kernels
// (csrc/cuda/optimizer.cu), so that both give the same bits whatever the thread count, the
// number of multiprocessors or the grid size (LAMB's and LARS's trust ratios and max_unorm
// clipping then do not depend on the machine):
//   1. a partial per 256-element optimizer block: the block's terms (double)x * (double)x
//      added in element order, starting from 0.0;
//   2. a sum per group of kNormGroupBlocks consecutive blocks: their partials added in
//      block order, starting from 0.0;
//   3. out[k] += each group's sum, in group order.
// Steps 1 and 2 run in parallel over blocks and groups; only step 3 is sequential, over
// n / 65536 groups. (One sequence over every block would cost a GPU a serial chain of
// n / 256 double adds: over a millisecond for a 100M-element tensor.)
#pragma once
#include <stdint.h>

#include "bnbfuse.h"
#include "ceil_div.h"

#if defined(__CUDACC__)
#define BNBF_NORM_HD __host__ __device__ __forceinline__
#else
#define BNBF_NORM_HD inline
#endif

namespace bnbf {

constexpr int64_t kNormGroupBlocks = BNBF_NORM_GROUP_BLOCKS;

BNBF_NORM_HD int64_t norm_groups(int64_t nblocks) { return ceil_div(nblocks, kNormGroupBlocks); }

// Step 2 for group g: s[0..1] = the sums of partial[2b], partial[2b + 1] over its blocks.
BNBF_NORM_HD void norm_group_sum(const double* partial, int64_t nblocks, int64_t g, double s[2]) {
  const int64_t b0 = g * kNormGroupBlocks;
  const int64_t b1 = b0 + kNormGroupBlocks < nblocks ? b0 + kNormGroupBlocks : nblocks;
  double a = 0.0, c = 0.0;
  for (int64_t b = b0; b < b1; ++b) {
    a += partial[2 * b];
    c += partial[2 * b + 1];
  }
  s[0] = a;
  s[1] = c;
}

}  // namespace bnbf
