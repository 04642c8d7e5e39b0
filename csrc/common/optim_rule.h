// The per-element optimizer update rules, shared by the CPU kernels (csrc/cpu/isa/optimizer.cpp)
// and the CUDA kernels (csrc/cuda/optimizer.cu).
//
// Each rule is the same sequence of float32 operations as `optimizer_rule` in
// bnbfuse/backends/reference.py, with the host scalars of bnbf_optim_args (computed in double
// by bnbfuse and rounded once to float32). Contraction is disabled on both compilers
// (-ffp-contract=off, --fmad=false), so every multiply and add rounds on its own, exactly as
// the reference's separate tensor ops do: the results are bit-identical.
#pragma once
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "bnbfuse.h"

#if defined(__CUDACC__)
#define BNBF_HD __host__ __device__ __forceinline__
#else
#define BNBF_HD inline __attribute__((always_inline))
#endif

namespace bnbf {

// Optimizer state is quantized in blocks of this many elements of the flattened tensor.
constexpr int64_t kOptimBlock = BNBF_OPTIM_BLOCKSIZE;

// The one table of optimizer kinds on the C++ side, indexed by enum bnbf_optimizer. The
// Python twin is bnbfuse/ops/rules.py (RULES); tests/ops/test_rules.py compares the two
// through bnbf_optimizer_traits.
struct OptimizerKind {
  const char* name;
  int states;           // 1 or 2 state tensors
  bool has_m2;          // state1 stacks two moments (AdEMAMix: m1 then m2)
  // docs/optimizers.md, "No blow-ups": second-moment-like 8-bit states never round a
  // positive value to the zero code (see QuantMap::nearest_keep_positive).
  bool keep_positive1;
  bool keep_positive2;
};

constexpr OptimizerKind kOptimizerKinds[] = {
    /* BNBF_OPT_ADAM     */ {"adam", 2, false, false, true},
    /* BNBF_OPT_ADAMW    */ {"adamw", 2, false, false, true},
    /* BNBF_OPT_ADEMAMIX */ {"ademamix", 2, true, false, true},
    /* BNBF_OPT_LAMB     */ {"lamb", 2, false, false, true},
    /* BNBF_OPT_SGD      */ {"sgd", 1, false, false, false},
    /* BNBF_OPT_RMSPROP  */ {"rmsprop", 1, false, true, false},
    /* BNBF_OPT_ADAGRAD  */ {"adagrad", 1, false, true, false},
    /* BNBF_OPT_LION     */ {"lion", 1, false, false, false},
    /* BNBF_OPT_LARS     */ {"lars", 1, false, false, false},
};
constexpr int kNumOptimizers = sizeof(kOptimizerKinds) / sizeof(kOptimizerKinds[0]);
static_assert(kNumOptimizers == BNBF_OPT_LARS + 1, "one row per enum bnbf_optimizer value");

template <int OPT>
struct OptTraits {
  static_assert(OPT >= 0 && OPT < kNumOptimizers, "unknown optimizer id");
  static constexpr bool two_state = kOptimizerKinds[OPT].states == 2;
  static constexpr bool has_m2 = kOptimizerKinds[OPT].has_m2;
  static constexpr bool keep_positive1 = kOptimizerKinds[OPT].keep_positive1;
  static constexpr bool keep_positive2 = kOptimizerKinds[OPT].keep_positive2;
};

inline bool valid_optimizer(int opt) { return opt >= 0 && opt < kNumOptimizers; }
inline bool optimizer_two_state(int opt) {
  return valid_optimizer(opt) && kOptimizerKinds[opt].states == 2;
}
inline const char* optimizer_name(int opt) {
  return valid_optimizer(opt) ? kOptimizerKinds[opt].name : "?";
}

// |g| <= FLT_MAX: false for NaN and +-inf; a compare the vectorisers handle.
BNBF_HD bool opt_finite(float g) { return fabsf(g) <= 3.40282347e+38f; }

// The skip policy (docs/optimizers.md): an element is updated only when its gradient is
// finite and the update leaves every state finite (g*g can overflow in a second moment).
template <int OPT>
BNBF_HD bool opt_states_finite(float s1, float s1b, float s2) {
  return opt_finite(s1) && (!OptTraits<OPT>::has_m2 || opt_finite(s1b)) &&
         (!OptTraits<OPT>::two_state || opt_finite(s2));
}

// ok ? a : b as bit operations. A plain ternary whose false arm is the value just loaded
// from the destination becomes a conditional store in GCC, which blocks vectorisation.
BNBF_HD float opt_select(bool ok, float a, float b) {
  const uint32_t m = 0u - (uint32_t)ok;
  uint32_t ua, ub;
  __builtin_memcpy(&ua, &a, 4);
  __builtin_memcpy(&ub, &b, 4);
  const uint32_t r = (ua & m) | (ub & ~m);
  float f;
  __builtin_memcpy(&f, &r, 4);
  return f;
}

// torch.sign for float: (0 < x) - (x < 0); NaN gives 0.
BNBF_HD float opt_sign(float x) { return (x > 0.f ? 1.f : 0.f) - (x < 0.f ? 1.f : 0.f); }
BNBF_HD float opt_sqrt(float x) { return sqrtf(x); }

// One update of one element, or of a vector of elements: F is float (CUDA, scalar CPU
// code) or a CPU lane type (csrc/cpu/isa/lanes.h) whose operators are the same IEEE float32
// operations lane by lane, with opt_sqrt/opt_sign overloads found by argument-dependent
// lookup. g is already multiplied by gnorm_scale. Updates p and the states in place and
// returns the update direction before the learning rate (what the norms ops sum; see
// optimizer_norms_32bit in the reference for each optimizer's choice).
template <int OPT, class F = float>
BNBF_HD F opt_rule(F& p, F g, F& s1, F& s1b, F& s2, const bnbf_optim_args& a) {
  if (OPT == BNBF_OPT_ADAM || OPT == BNBF_OPT_ADAMW || OPT == BNBF_OPT_LAMB) {
    if (OPT == BNBF_OPT_ADAM) g = g + p * a.weight_decay;
    if (OPT == BNBF_OPT_ADAMW) p = p * a.decay;
    s1 = s1 * a.beta1 + g * a.one_minus_beta1;
    s2 = s2 * a.beta2 + (g * g) * a.one_minus_beta2;
    const F denom = opt_sqrt(s2) * a.inv_sqrt_bc2 + a.eps;
    if (OPT == BNBF_OPT_LAMB) {
      const F u = (s1 * a.inv_bc1) / denom + p * a.weight_decay;
      p = p - u * a.step_size;
      return u;
    }
    const F u = s1 / denom;
    p = p - u * a.step_size;
    return u * a.inv_bc1;
  } else if (OPT == BNBF_OPT_ADEMAMIX) {
    s1 = s1 * a.beta1 + g * a.one_minus_beta1;
    s1b = s1b * a.beta3 + g * a.one_minus_beta3;
    s2 = s2 * a.beta2 + (g * g) * a.one_minus_beta2;
    const F denom = opt_sqrt(s2) * a.inv_sqrt_bc2 + a.eps;
    const F u = (s1 * a.inv_bc1 + s1b * a.alpha) / denom;
    p = p * a.decay - u * a.step_size;
    return u;
  } else if (OPT == BNBF_OPT_SGD) {
    F d = g + p * a.weight_decay;
    s1 = a.step == 1 ? d : s1 * a.beta1 + d * a.dampening_factor;
    d = a.nesterov ? d + s1 * a.beta1 : s1;
    p = p - d * a.step_size;
    return d;
  } else if (OPT == BNBF_OPT_RMSPROP || OPT == BNBF_OPT_ADAGRAD) {
    g = g + p * a.weight_decay;
    if (OPT == BNBF_OPT_RMSPROP) s1 = s1 * a.beta1 + (g * g) * a.one_minus_beta1;
    else s1 = s1 + g * g;
    const F u = g / (opt_sqrt(s1) + a.eps);
    p = p - u * a.step_size;
    return u;
  } else if (OPT == BNBF_OPT_LION) {
    const F u = opt_sign(s1 * a.beta1 + g * a.one_minus_beta1);
    p = p * a.decay - u * a.step_size;
    s1 = s1 * a.beta2 + g * a.one_minus_beta2;
    return u;
  } else {  // LARS (bitsandbytes' algorithm): a plain momentum buffer, the step clipped by
    // the caller's update_scale = min(1, max_unorm * ||p|| / ||buf||) folded into step_size.
    const F d = g + p * a.weight_decay;
    s1 = s1 * a.beta1 + d;
    p = p - s1 * a.step_size;
    return s1;
  }
}

// Calls f(std::integral_constant<int, OPT>()) for a runtime optimizer id; false if unknown.
template <typename F>
inline bool dispatch_optimizer(int opt, F&& f) {
#define BNBF_OPT_CASE(X) \
  case X: f(std::integral_constant<int, X>()); return true;
  switch (opt) {
    BNBF_OPT_CASE(BNBF_OPT_ADAM)
    BNBF_OPT_CASE(BNBF_OPT_ADAMW)
    BNBF_OPT_CASE(BNBF_OPT_ADEMAMIX)
    BNBF_OPT_CASE(BNBF_OPT_LAMB)
    BNBF_OPT_CASE(BNBF_OPT_SGD)
    BNBF_OPT_CASE(BNBF_OPT_RMSPROP)
    BNBF_OPT_CASE(BNBF_OPT_ADAGRAD)
    BNBF_OPT_CASE(BNBF_OPT_LION)
    BNBF_OPT_CASE(BNBF_OPT_LARS)
    default: return false;
  }
#undef BNBF_OPT_CASE
}

}  // namespace bnbf
