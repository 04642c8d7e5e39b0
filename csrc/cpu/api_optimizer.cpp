// C API of the optimizer update kernels: every argument is checked here, then the active
// ISA's kernel runs (csrc/cpu/isa/optimizer.cpp).
#include <cmath>
#include <cstdint>

#include "bnbfuse.h"
#include "kernels.h"
#include "optim_check.h"
#include "optim_rule.h"
#include "runtime.h"

using namespace bnbf;

namespace {

int unknown(int opt) { return fail(BNBF_E_ARG, "unknown optimizer id %d", opt); }

}  // namespace

BNBF_API int bnbf_optimizer_traits(int optimizer, const char** name, int* states, int* has_m2,
                                   int* keep_positive_mask) {
  if (!valid_optimizer(optimizer)) return unknown(optimizer);
  if (!name || !states || !has_m2 || !keep_positive_mask)
    return fail(BNBF_E_ARG, "null pointer among the outputs");
  const OptimizerKind& k = kOptimizerKinds[optimizer];
  *name = k.name;
  *states = k.states;
  *has_m2 = k.has_m2;
  *keep_positive_mask = (k.keep_positive1 ? 1 : 0) | (k.keep_positive2 ? 2 : 0);
  return BNBF_OK;
}

BNBF_API int bnbf_cpu_optimizer_update_8bit_blockwise(
    int optimizer, void* p, const void* g, int dtype, uint8_t* state1, uint8_t* state2,
    float* absmax1, float* absmax2, const float* qmap1, const float* qmap2,
    const bnbf_optim_args* args, int64_t n, int num_threads) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, true, absmax1,
                          absmax2, qmap1, qmap2))
    return rc;
  if (n == 0) return BNBF_OK;
  const bool two = optimizer_two_state(optimizer);
  // Held for the call: the map cache may evict them meanwhile (qmap.h).
  const auto map1 = quant_map(qmap1);
  const auto map2 = two ? quant_map(qmap2) : nullptr;
  if (!BNBF_CPU_CALL(optimizer_update_8bit, optimizer, p, g, dtype, state1, two ? state2 : nullptr,
                     absmax1, two ? absmax2 : nullptr, *map1, map2.get(), *args, n,
                     num_threads))
    return unknown(optimizer);
  return BNBF_OK;
}

BNBF_API int bnbf_cpu_optimizer_update_32bit(int optimizer, void* p, const void* g, int dtype,
                                             float* state1, float* state2,
                                             const bnbf_optim_args* args, int64_t n,
                                             int num_threads) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, false, nullptr,
                          nullptr, nullptr, nullptr))
    return rc;
  if (n == 0) return BNBF_OK;
  const bool two = optimizer_two_state(optimizer);
  if (!BNBF_CPU_CALL(optimizer_update_32bit, optimizer, p, g, dtype, state1,
                     two ? state2 : nullptr, *args, n, num_threads))
    return unknown(optimizer);
  return BNBF_OK;
}

BNBF_API int bnbf_cpu_optimizer_norms_8bit_blockwise(
    int optimizer, const void* p, const void* g, int dtype, const uint8_t* state1,
    const uint8_t* state2, const float* absmax1, const float* absmax2, const float* qmap1,
    const float* qmap2, const bnbf_optim_args* args, int64_t n, double* out, int num_threads) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, true, absmax1,
                          absmax2, qmap1, qmap2, true, out))
    return rc;
  if (n == 0) return BNBF_OK;
  const bool two = optimizer_two_state(optimizer);
  const auto map1 = quant_map(qmap1);
  const auto map2 = two ? quant_map(qmap2) : nullptr;
  if (!BNBF_CPU_CALL(optimizer_norms_8bit, optimizer, p, g, dtype, state1, two ? state2 : nullptr,
                     absmax1, two ? absmax2 : nullptr, *map1, map2.get(), *args, n, out,
                     num_threads))
    return unknown(optimizer);
  return BNBF_OK;
}

BNBF_API int bnbf_cpu_optimizer_norms_32bit(int optimizer, const void* p, const void* g,
                                            int dtype, const float* state1, const float* state2,
                                            const bnbf_optim_args* args, int64_t n, double* out,
                                            int num_threads) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, false, nullptr,
                          nullptr, nullptr, nullptr, true, out))
    return rc;
  if (n == 0) return BNBF_OK;
  const bool two = optimizer_two_state(optimizer);
  if (!BNBF_CPU_CALL(optimizer_norms_32bit, optimizer, p, g, dtype, state1,
                     two ? state2 : nullptr, *args, n, out, num_threads))
    return unknown(optimizer);
  return BNBF_OK;
}
