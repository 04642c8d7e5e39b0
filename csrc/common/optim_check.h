// Argument checks of the optimizer C API, shared by the CPU (api_optimizer.cpp) and CUDA
// (csrc/cuda/optimizer.cu) entry points so both reject the same inputs with the same text.
#pragma once
#include <stdint.h>

#include "bnbfuse.h"
#include "optim_rule.h"
#include "errors.h"

namespace bnbf {

// `eight_bit` adds the absmax/qmap pointers; `norms_out` is checked when `norms` is set.
inline int check_optimizer_args(int opt, const void* p, const void* g, int dtype,
                                const void* state1, const void* state2,
                                const bnbf_optim_args* args, int64_t n, bool eight_bit,
                                const void* absmax1, const void* absmax2, const void* qmap1,
                                const void* qmap2, bool norms = false,
                                const void* norms_out = nullptr) {
  if (!valid_optimizer(opt)) return fail(BNBF_E_ARG, "unknown optimizer id %d", opt);
  if (n < 0) return fail(BNBF_E_ARG, "n must be >= 0, got %lld", (long long)n);
  if (n > INT64_MAX / 4) return fail(BNBF_E_ARG, "n = %lld is too large", (long long)n);
  if (dtype != BNBF_F32 && dtype != BNBF_F16 && dtype != BNBF_BF16)
    return fail(BNBF_E_ARG, "unsupported dtype code %d", dtype);
  if (!args) return fail(BNBF_E_ARG, "args is a null pointer");
  if (args->step < 1)
    return fail(BNBF_E_ARG, "step must be >= 1, got %lld", (long long)args->step);
  if (norms && !norms_out) return fail(BNBF_E_ARG, "out is a null pointer");
  if (n == 0) return BNBF_OK;
  if (!p || !g || !state1) return fail(BNBF_E_ARG, "null pointer among p, g, state1");
  const bool two = optimizer_two_state(opt);
  if (two && !state2)
    return fail(BNBF_E_ARG, "%s needs state2 (null pointer)", optimizer_name(opt));
  if (eight_bit) {
    if (!absmax1 || !qmap1) return fail(BNBF_E_ARG, "null pointer among absmax1, qmap1");
    if (two && (!absmax2 || !qmap2))
      return fail(BNBF_E_ARG, "%s needs absmax2 and qmap2 (null pointer)", optimizer_name(opt));
  }
  return BNBF_OK;
}

}  // namespace bnbf
