// CUDA optimizer updates: the rules of csrc/common/optim_rule.h (the same code as the CPU
// kernels, compiled with --fmad=false so results match the CPU and the reference bit for
// bit), 8-bit blockwise and 32-bit state, plus the norms used for trust ratios and
// max_unorm.
//
// Both kernels walk the tensor in the 256-element optimizer blocks, one thread per element:
// a grid of one wave (occupancy measured per kernel, launch.cuh) loops over the blocks, so
// the 8-bit kernel's shared-memory maps are built once per resident thread block.
// 8-bit, per block: dequantize, update, block-reduce the new states' extremes (largest
// non-negative bits, largest negative magnitude bits), take the idempotent state scale of
// csrc/common/state_scale.h (as the CPU does), requantize with exact nearest rounding.
// Norms, per block: the block's terms summed in element order into one partial per block,
// then the fixed grouping of csrc/common/norm_order.h; the result is the CPU's, bit for bit,
// on every GPU and grid size.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "bnbfuse.h"
#include "ceil_div.h"
#include "common.cuh"
#include "errors.h"
#include "launch.cuh"
#include "norm_order.h"
#include "optim_check.h"
#include "optim_quant.cuh"
#include "optim_rule.h"
#include "state_scale.h"

namespace bnbf {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads == kOptimBlock, "one thread per element of a quantization block");
static_assert(kThreads == kMapThreads, "build_map needs one thread per map value");

template <int DT>
__device__ __forceinline__ float load(const void* p, int64_t i) {
  if (DT == BNBF_F32) return ((const float*)p)[i];
  if (DT == BNBF_F16) return to_f32<__half>(((const __half*)p)[i]);
  return to_f32<__nv_bfloat16>(((const __nv_bfloat16*)p)[i]);
}

// Stores with common.cuh's conversions, whose NaN bits match the CPU kernels'.
template <int DT>
__device__ __forceinline__ void store(void* p, int64_t i, float v) {
  if (DT == BNBF_F32) ((float*)p)[i] = v;
  else if (DT == BNBF_F16) ((__half*)p)[i] = from_f32<__half>(v);
  else ((__nv_bfloat16*)p)[i] = from_f32<__nv_bfloat16>(v);
}

// The value the CPU kernels store for a parameter: the rule's result where the element is
// updated, else the loaded value (both kernels write every element back, so a signalling
// fp16/bf16 NaN is quieted on either device). A NaN result gets x86's bits: every rule that
// updates a NaN parameter ends in `p - x` or `p * decay - x` with p as the first operand,
// so x86 returns p's NaN quieted; with p not NaN the NaN came from an invalid operation
// (inf - inf, 0 * inf, 0 / 0) and is x86's default NaN. (Hyper-parameters are finite.)
__device__ __forceinline__ float stored_param(bool ok, float np, float pv) {
  if (!ok) return pv;
  if (!isnan(np)) return np;
  return isnan(pv) ? quieted(pv) : __uint_as_float(kX86DefaultNaN);
}

// The extremes of one state over a block, as csrc/cpu/isa/lanes.h's SignedMax: the bits of
// the largest non-negative value and of the largest negative magnitude (NaN of either sign
// shows as bits above 0x7F800000).
struct Extremes {
  uint32_t pos_bits, neg_bits;
};

// Block-wide extremes of K values per thread (threads past the tensor's end pass 0). A
// signed integer max of the bits finds the largest non-negative value (negative floats are
// negative integers), an unsigned one the largest negative magnitude (negative floats lie
// above every non-negative one). All threads get the results. Uses red[2K][kWarps]; the
// caller syncs before red is written again.
template <int K>
__device__ __forceinline__ void block_extremes(const float (&x)[K], uint32_t (*red)[kWarps],
                                               Extremes (&out)[K]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int32_t smax[K];
  uint32_t umax[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const uint32_t b = __float_as_uint(x[k]);
    smax[k] = max((int32_t)b, 0);
    umax[k] = b;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      smax[k] = max(smax[k], (int32_t)__shfl_xor_sync(0xffffffffu, smax[k], off));
      umax[k] = max(umax[k], (uint32_t)__shfl_xor_sync(0xffffffffu, umax[k], off));
    }
  }
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      red[2 * k][warp] = (uint32_t)smax[k];
      red[2 * k + 1][warp] = umax[k];
    }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int32_t sm = 0;
    uint32_t um = 0;
    for (int w = 0; w < kWarps; ++w) {
      sm = max(sm, (int32_t)red[2 * k][w]);
      um = max(um, red[2 * k + 1][w]);
    }
    out[k].pos_bits = (uint32_t)sm;
    out[k].neg_bits = um >= 0x80000000u ? um & 0x7FFFFFFFu : 0u;
  }
}

__device__ __forceinline__ float divisor_of(float absmax) { return absmax == 0.f ? 1.f : absmax; }

// Step 1 of norm_order.h for one block: d and pv are the thread's direction and parameter
// (0 where the element is skipped or past the end); the partials of the block's `len`
// elements go to partial[0..1]. One thread of each of two warps adds them in element order,
// as the CPU does. Call from all threads (contains __syncthreads).
struct NormShared {
  float d[kThreads];
  float p[kThreads];
};

__device__ __forceinline__ void norm_block(NormShared& sh, float d, float pv, int len,
                                           double* __restrict__ partial) {
  sh.d[threadIdx.x] = d;
  sh.p[threadIdx.x] = pv;
  __syncthreads();
  if (threadIdx.x == 0 || threadIdx.x == 32) {
    const float* v = threadIdx.x == 0 ? sh.d : sh.p;
    double acc = 0.0;
    for (int i = 0; i < len; ++i) acc += (double)v[i] * (double)v[i];
    partial[threadIdx.x == 0 ? 0 : 1] = acc;
  }
  __syncthreads();  // sh is rewritten for the next block
}

// Step 2 of norm_order.h: one thread per group of blocks.
__global__ void k_norm_groups(const double* __restrict__ partial, int64_t nblocks,
                              double* __restrict__ groups) {
  const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (g < norm_groups(nblocks)) norm_group_sum(partial, nblocks, g, groups + 2 * g);
}

// Step 3: out[k] += each group's sum, in group order (one thread: a fixed order, and only
// n / 65536 adds). Loads are issued eight groups ahead of the adds that use them.
__global__ void k_norm_total(const double* __restrict__ groups, int64_t ngroups,
                             double* __restrict__ out) {
  double a = out[0], b = out[1];
  int64_t g = 0;
  for (; g + 8 <= ngroups; g += 8) {
    double v[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) v[k] = groups[2 * g + k];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      a += v[2 * k];
      b += v[2 * k + 1];
    }
  }
  for (; g < ngroups; ++g) {
    a += groups[2 * g];
    b += groups[2 * g + 1];
  }
  out[0] = a;
  out[1] = b;
}

template <int OPT, int DT, bool NORMS>
__global__ void __launch_bounds__(kThreads)
k_optimizer_8bit(void* __restrict__ p, const void* __restrict__ g, uint8_t* __restrict__ c1,
                 uint8_t* __restrict__ c2, float* __restrict__ absmax1,
                 float* __restrict__ absmax2, const float* __restrict__ qmap1,
                 const float* __restrict__ qmap2, const bnbf_optim_args a, int64_t n,
                 int64_t nblocks, double* __restrict__ partial) {
  using T = OptTraits<OPT>;
  constexpr int K = 1 + (T::has_m2 ? 1 : 0) + (T::two_state ? 1 : 0);  // states per element
  __shared__ SharedMap map1;
  __shared__ SharedMap map2;
  __shared__ uint32_t red[2 * K][kWarps];
  __shared__ NormShared nsh;  // NORMS only (the update instantiations never touch it)
  build_map(map1, qmap1);
  if (T::two_state) build_map(map2, qmap2);
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t i = b * kOptimBlock + threadIdx.x;
    const bool in = i < n;
    float pv = 0.f, gv = 0.f, s1 = 0.f, s1b = 0.f, s2 = 0.f;
    if (in) {
      pv = load<DT>(p, i);
      gv = load<DT>(g, i);
      s1 = map1.code[c1[i]] * absmax1[b];
      if (T::has_m2) s1b = map1.code[c1[n + i]] * absmax1[nblocks + b];
      if (T::two_state) s2 = map2.code[c2[i]] * absmax2[b];
    }
    float np = pv, n1 = s1, n1b = s1b, n2 = s2;
    const float d = opt_rule<OPT>(np, gv * a.gnorm_scale, n1, n1b, n2, a);
    const bool ok = in && opt_finite(gv) && opt_states_finite<OPT>(n1, n1b, n2);
    if (NORMS) {
      const int len = (int)(n - b * kOptimBlock < kOptimBlock ? n - b * kOptimBlock : kOptimBlock);
      norm_block(nsh, ok ? d : 0.f, ok ? pv : 0.f, len, partial + 2 * b);
      continue;
    }
    if (in) store<DT>(p, i, stored_param(ok, np, pv));
    if (ok) {  // a skipped element keeps its state values (requantized below, idempotently)
      s1 = n1;
      s1b = n1b;
      s2 = n2;
    }
    float x[K];
    x[0] = s1;
    if (T::has_m2) x[1] = s1b;
    if (T::two_state) x[K - 1] = s2;
    Extremes e[K];
    block_extremes<K>(x, red, e);
    const float m1 = state_scale(e[0].pos_bits, e[0].neg_bits, map1.q_pos, map1.q_neg);
    const float m1b =
        T::has_m2 ? state_scale(e[1].pos_bits, e[1].neg_bits, map1.q_pos, map1.q_neg) : 0.f;
    const float m2 = T::two_state ? state_scale(e[K - 1].pos_bits, e[K - 1].neg_bits,
                                                map2.q_pos, map2.q_neg)
                                  : 0.f;
    if (in) {
      c1[i] = quantize_value(map1, s1, divisor_of(m1), T::keep_positive1);
      if (T::has_m2) c1[n + i] = quantize_value(map1, s1b, divisor_of(m1b), T::keep_positive1);
      if (T::two_state) c2[i] = quantize_value(map2, s2, divisor_of(m2), T::keep_positive2);
    }
    if (threadIdx.x == 0) {
      absmax1[b] = m1;
      if (T::has_m2) absmax1[nblocks + b] = m1b;
      if (T::two_state) absmax2[b] = m2;
    }
    __syncthreads();  // red[] is reused by the next block
  }
}

template <int OPT, int DT, bool NORMS>
__global__ void __launch_bounds__(kThreads)
k_optimizer_32bit(void* __restrict__ p, const void* __restrict__ g, float* __restrict__ st1,
                  float* __restrict__ st2, const bnbf_optim_args a, int64_t n, int64_t nblocks,
                  double* __restrict__ partial) {
  using T = OptTraits<OPT>;
  __shared__ NormShared nsh;  // NORMS only
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t i = b * kOptimBlock + threadIdx.x;
    const bool in = i < n;
    float pv = 0.f, np = 0.f, d = 0.f, n1 = 0.f, n1b = 0.f, n2 = 0.f;
    bool ok = false;
    if (in) {
      pv = load<DT>(p, i);
      const float gv = load<DT>(g, i);
      n1 = st1[i];
      if (T::has_m2) n1b = st1[n + i];
      if (T::two_state) n2 = st2[i];
      np = pv;
      d = opt_rule<OPT>(np, gv * a.gnorm_scale, n1, n1b, n2, a);
      ok = opt_finite(gv) && opt_states_finite<OPT>(n1, n1b, n2);
    }
    if (NORMS) {
      const int len = (int)(n - b * kOptimBlock < kOptimBlock ? n - b * kOptimBlock : kOptimBlock);
      norm_block(nsh, ok ? d : 0.f, ok ? pv : 0.f, len, partial + 2 * b);
      continue;
    }
    if (!in) continue;  // the update path has no barriers: threads may leave early
    store<DT>(p, i, stored_param(ok, np, pv));
    if (!ok) continue;  // skipped element: its state is left as it was
    st1[i] = n1;
    if (T::has_m2) st1[n + i] = n1b;
    if (T::two_state) st2[i] = n2;
  }
}

// The launch of one kernel instantiation: a grid of one wave, sized from its occupancy.
template <auto Kernel, typename... Args>
int launch(int64_t nblocks, int dev, cudaStream_t stream, const char* what, Args... args) {
  const unsigned grid = grid_for<Kernel>(nblocks, dev, kThreads);
  Kernel<<<grid, kThreads, 0, stream>>>(args...);
  return check_launch(what);
}

// Steps 2 and 3 of norm_order.h over the per-block partials at scratch[0, 2 * nblocks);
// the group sums go to scratch[2 * nblocks, 2 * (nblocks + groups)).
int finish_norms(double* scratch, int64_t nblocks, double* out, cudaStream_t stream,
                 const char* what) {
  const int64_t groups = norm_groups(nblocks);
  double* sums = scratch + 2 * nblocks;
  k_norm_groups<<<(unsigned)ceil_div(groups, kThreads), kThreads, 0, stream>>>(scratch, nblocks,
                                                                               sums);
  if (int rc = check_launch(what)) return rc;
  k_norm_total<<<1, 1, 0, stream>>>(sums, groups, out);
  return check_launch(what);
}

// Calls f(std::integral_constant<int, DT>()) for a (checked) dtype code.
template <typename F>
void dispatch_dt(int dtype, F&& f) {
  switch (dtype) {
    case BNBF_F32: f(std::integral_constant<int, BNBF_F32>()); break;
    case BNBF_F16: f(std::integral_constant<int, BNBF_F16>()); break;
    default: f(std::integral_constant<int, BNBF_BF16>());
  }
}

// The prologue of every entry point, after the argument checks: a valid device made current
// (launches go to the buffers' GPU, whatever the caller's current device is).
#define BNBF_ENTER_DEVICE(dev, what)                                          \
  if (int rc_ = check_device(dev, what)) return rc_;                          \
  DeviceGuard guard_(dev);                                                    \
  if (guard_.error() != cudaSuccess) return fail_cuda(guard_.error(), what);

template <bool NORMS>
int run_8bit(int opt, void* p, const void* g, int dtype, uint8_t* c1, uint8_t* c2,
             float* absmax1, float* absmax2, const float* qmap1, const float* qmap2,
             const bnbf_optim_args& a, int64_t n, double* out, double* scratch, int dev,
             cudaStream_t stream, const char* what) {
  BNBF_ENTER_DEVICE(dev, what)
  const int64_t nblocks = ceil_div(n, kOptimBlock);
  int rc = BNBF_OK;
  const bool known = dispatch_optimizer(opt, [&](auto o) {
    dispatch_dt(dtype, [&](auto dt) {
      constexpr int OPT = decltype(o)::value, DT = decltype(dt)::value;
      rc = launch<k_optimizer_8bit<OPT, DT, NORMS>>(nblocks, dev, stream, what, p, g, c1, c2,
                                                    absmax1, absmax2, qmap1, qmap2, a, n,
                                                    nblocks, scratch);
    });
  });
  if (!known) return fail(BNBF_E_ARG, "unknown optimizer id %d", opt);
  if (rc || !NORMS) return rc;
  return finish_norms(scratch, nblocks, out, stream, what);
}

template <bool NORMS>
int run_32bit(int opt, void* p, const void* g, int dtype, float* s1, float* s2,
              const bnbf_optim_args& a, int64_t n, double* out, double* scratch, int dev,
              cudaStream_t stream, const char* what) {
  BNBF_ENTER_DEVICE(dev, what)
  const int64_t nblocks = ceil_div(n, kOptimBlock);
  int rc = BNBF_OK;
  const bool known = dispatch_optimizer(opt, [&](auto o) {
    dispatch_dt(dtype, [&](auto dt) {
      constexpr int OPT = decltype(o)::value, DT = decltype(dt)::value;
      rc = launch<k_optimizer_32bit<OPT, DT, NORMS>>(nblocks, dev, stream, what, p, g, s1, s2,
                                                     a, n, nblocks, scratch);
    });
  });
  if (!known) return fail(BNBF_E_ARG, "unknown optimizer id %d", opt);
  if (rc || !NORMS) return rc;
  return finish_norms(scratch, nblocks, out, stream, what);
}

// The norms' scratch: 2 doubles per block, then 2 per group of blocks.
int check_scratch(const double* scratch, int64_t scratch_len, int64_t n) {
  const int64_t nblocks = ceil_div(n, kOptimBlock);
  const int64_t need = 2 * (nblocks + norm_groups(nblocks));
  if (!scratch || scratch_len < need)
    return fail(BNBF_E_ARG, "the norms scratch must hold %lld doubles for n = %lld, got %lld%s",
                (long long)need, (long long)n, (long long)scratch_len,
                scratch ? "" : " (null pointer)");
  return BNBF_OK;
}
}  // namespace
}  // namespace cuda
}  // namespace bnbf

using namespace bnbf;

BNBF_API int bnbf_cuda_optimizer_update_8bit_blockwise(
    int optimizer, void* p, const void* g, int dtype, uint8_t* state1, uint8_t* state2,
    float* absmax1, float* absmax2, const float* qmap1, const float* qmap2,
    const bnbf_optim_args* args, int64_t n, int device, void* stream) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, true,
                                    absmax1, absmax2, qmap1, qmap2))
    return rc;
  if (n == 0) return BNBF_OK;
  const bool two = optimizer_two_state(optimizer);
  return cuda::run_8bit<false>(optimizer, p, g, dtype, state1, two ? state2 : nullptr, absmax1,
                               two ? absmax2 : nullptr, qmap1, two ? qmap2 : nullptr, *args, n,
                               nullptr, nullptr, device, (cudaStream_t)stream,
                               "optimizer_update_8bit_blockwise");
}

BNBF_API int bnbf_cuda_optimizer_update_32bit(int optimizer, void* p, const void* g, int dtype,
                                              float* state1, float* state2,
                                              const bnbf_optim_args* args, int64_t n,
                                              int device, void* stream) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, false,
                                    nullptr, nullptr, nullptr, nullptr))
    return rc;
  if (n == 0) return BNBF_OK;
  const bool two = optimizer_two_state(optimizer);
  return cuda::run_32bit<false>(optimizer, p, g, dtype, state1, two ? state2 : nullptr, *args, n,
                                nullptr, nullptr, device, (cudaStream_t)stream,
                                "optimizer_update_32bit");
}

BNBF_API int bnbf_cuda_optimizer_norms_8bit_blockwise(
    int optimizer, const void* p, const void* g, int dtype, const uint8_t* state1,
    const uint8_t* state2, const float* absmax1, const float* absmax2, const float* qmap1,
    const float* qmap2, const bnbf_optim_args* args, int64_t n, double* out, double* scratch,
    int64_t scratch_len, int device, void* stream) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, true,
                                    absmax1, absmax2, qmap1, qmap2, true, out))
    return rc;
  if (n == 0) return BNBF_OK;
  if (int rc = cuda::check_scratch(scratch, scratch_len, n)) return rc;
  const bool two = optimizer_two_state(optimizer);
  // The NORMS instantiation never writes p, the codes or absmax.
  return cuda::run_8bit<true>(optimizer, const_cast<void*>(p), g, dtype,
                              const_cast<uint8_t*>(state1),
                              two ? const_cast<uint8_t*>(state2) : nullptr,
                              const_cast<float*>(absmax1),
                              two ? const_cast<float*>(absmax2) : nullptr, qmap1,
                              two ? qmap2 : nullptr, *args, n, out, scratch, device,
                              (cudaStream_t)stream, "optimizer_norms_8bit_blockwise");
}

BNBF_API int bnbf_cuda_optimizer_norms_32bit(int optimizer, const void* p, const void* g,
                                             int dtype, const float* state1, const float* state2,
                                             const bnbf_optim_args* args, int64_t n,
                                             double* out, double* scratch, int64_t scratch_len,
                                             int device, void* stream) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, false,
                                    nullptr, nullptr, nullptr, nullptr, true, out))
    return rc;
  if (n == 0) return BNBF_OK;
  if (int rc = cuda::check_scratch(scratch, scratch_len, n)) return rc;
  const bool two = optimizer_two_state(optimizer);
  return cuda::run_32bit<true>(optimizer, const_cast<void*>(p), g, dtype,
                               const_cast<float*>(state1),
                               two ? const_cast<float*>(state2) : nullptr, *args, n, out,
                               scratch, device, (cudaStream_t)stream, "optimizer_norms_32bit");
}
