// Block counts for CPU and CUDA code alike.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define BNBF_CEIL_DIV_HD __host__ __device__
#else
#define BNBF_CEIL_DIV_HD
#endif

namespace bnbf {

// ceil(a / b) for a >= 0 and b >= 1. Written so that it cannot overflow: (a + b - 1) / b
// does for a huge b (a blocksize near INT64_MAX), giving no blocks and unwritten outputs.
BNBF_CEIL_DIV_HD inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

}  // namespace bnbf
