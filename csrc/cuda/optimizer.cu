// CUDA optimizer updates: the rules of csrc/common/optim_rule.h (the same code as the CPU
// kernels, compiled with --fmad=false so results match the CPU and the reference bit for
// bit), 8-bit blockwise state and 32-bit state, plus the norms used for trust ratios and
// max_unorm.
//
// 8-bit: one thread block of 256 threads per 256-element quantization block (a grid capped
// at a few blocks per SM loops over the rest, so the shared-memory maps are built once per
// thread block); each thread owns one element: dequantize, update, block-reduce the new
// absmax (warp shuffles, then shared memory), requantize with exact nearest rounding.
// 32-bit: grid-stride, one element per thread per iteration.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "bnbfuse.h"
#include "common.cuh"
#include "optim_check.h"
#include "optim_quant.cuh"
#include "optim_rule.h"
#include "errors.h"

namespace bnbf {
namespace cuda {
namespace {

constexpr int kThreads = 256;
static_assert(kThreads == kOptimBlock, "one thread per element of a quantization block");
static_assert(kThreads == kMapThreads, "build_map needs one thread per map value");

template <int DT>
__device__ __forceinline__ float load(const void* p, int64_t i) {
  if (DT == BNBF_F32) return ((const float*)p)[i];
  if (DT == BNBF_F16) return __half2float(((const __half*)p)[i]);
  return __bfloat162float(((const __nv_bfloat16*)p)[i]);
}

// Stores with common.cuh's conversions, whose NaN payloads match the CPU kernels'.
template <int DT>
__device__ __forceinline__ void store(void* p, int64_t i, float v) {
  if (DT == BNBF_F32) ((float*)p)[i] = v;
  else if (DT == BNBF_F16) ((__half*)p)[i] = from_f32<__half>(v);
  else ((__nv_bfloat16*)p)[i] = from_f32<__nv_bfloat16>(v);
}

// Block-wide max of |x| for up to three values at once, NaN if any is NaN (like the CPU's
// block_absmax). All threads get the results. Uses red[3][8].
__device__ __forceinline__ void block_absmax3(float a[3], float (*red)[kThreads / 32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  bool nan[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    nan[k] = isnan(a[k]);
    a[k] = fabsf(a[k]);
    for (int off = 16; off > 0; off >>= 1) a[k] = fmaxf(a[k], __shfl_xor_sync(0xffffffffu, a[k], off));
  }
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < 3; ++k) red[k][warp] = a[k];
  // Each __syncthreads_or is also the barrier that publishes red[].
  const bool n0 = __syncthreads_or(nan[0]), n1 = __syncthreads_or(nan[1]),
             n2 = __syncthreads_or(nan[2]);
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    float m = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) m = fmaxf(m, red[k][w]);
    a[k] = m;
  }
  const float qnan = __int_as_float(0x7fc00000);
  if (n0) a[0] = qnan;
  if (n1) a[1] = qnan;
  if (n2) a[2] = qnan;
}

__device__ __forceinline__ float divisor_of(float absmax) { return absmax == 0.f ? 1.f : absmax; }

// Block-wide sum of two doubles in a fixed order; thread 0 writes them to partial[0..1].
__device__ __forceinline__ void block_sum2(double a, double b, double* partial,
                                           double (*red)[kThreads / 32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  if (lane == 0) {
    red[0][warp] = a;
    red[1][warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double s0 = 0.0, s1 = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) {
      s0 += red[0][w];
      s1 += red[1][w];
    }
    partial[0] = s0;
    partial[1] = s1;
  }
}

// One warp adds the thread blocks' partial sums, in block order, to out[0..1]. Summing them
// with atomicAdd would make the norms' last bits depend on which block finished first; this
// way they are the same on every run (as on the CPU, whose blocks are summed in order too).
__global__ void k_sum_partials(const double* __restrict__ partial, int64_t count,
                               double* __restrict__ out) {
  double a = 0.0, b = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += 32) {
    a += partial[2 * i];
    b += partial[2 * i + 1];
  }
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  if (threadIdx.x == 0) {
    out[0] += a;
    out[1] += b;
  }
}

template <int OPT, int DT, bool NORMS>
__global__ void __launch_bounds__(kThreads)
k_optimizer_8bit(void* __restrict__ p, const void* __restrict__ g, uint8_t* __restrict__ c1,
                 uint8_t* __restrict__ c2, float* __restrict__ absmax1,
                 float* __restrict__ absmax2, const float* __restrict__ qmap1,
                 const float* __restrict__ qmap2, const bnbf_optim_args a, int64_t n,
                 int64_t nblocks, double* __restrict__ partial) {
  using T = OptTraits<OPT>;
  __shared__ SharedMap map1;
  __shared__ SharedMap map2;
  __shared__ float red[3][kThreads / 32];
  __shared__ double dred[2][kThreads / 32];
  build_map(map1, qmap1);
  if (T::two_state) build_map(map2, qmap2);
  double acc_d = 0.0, acc_p = 0.0;
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
      if (ok) {
        acc_d += (double)d * (double)d;
        acc_p += (double)pv * (double)pv;
      }
      continue;
    }
    if (ok) {
      s1 = n1;
      s1b = n1b;
      s2 = n2;
      store<DT>(p, i, np);  // a non-finite gradient leaves p's bits alone
    }
    float m[3] = {s1, s1b, s2};
    block_absmax3(m, red);
    if (in) {
      c1[i] = quantize_value(map1, s1, divisor_of(m[0]), T::keep_positive1);
      if (T::has_m2) c1[n + i] = quantize_value(map1, s1b, divisor_of(m[1]), T::keep_positive1);
      if (T::two_state) c2[i] = quantize_value(map2, s2, divisor_of(m[2]), T::keep_positive2);
    }
    if (threadIdx.x == 0) {
      absmax1[b] = m[0];
      if (T::has_m2) absmax1[nblocks + b] = m[1];
      if (T::two_state) absmax2[b] = m[2];
    }
    __syncthreads();  // red[] is reused by the next block
  }
  if (NORMS) block_sum2(acc_d, acc_p, partial + 2 * blockIdx.x, dred);
}

template <int OPT, int DT, bool NORMS>
__global__ void __launch_bounds__(kThreads)
k_optimizer_32bit(void* __restrict__ p, const void* __restrict__ g, float* __restrict__ st1,
                  float* __restrict__ st2, const bnbf_optim_args a, int64_t n,
                  double* __restrict__ partial) {
  using T = OptTraits<OPT>;
  __shared__ double dred[2][kThreads / 32];
  double acc_d = 0.0, acc_p = 0.0;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float pv = load<DT>(p, i), gv = load<DT>(g, i);
    const float s1 = st1[i];
    const float s1b = T::has_m2 ? st1[n + i] : 0.f, s2 = T::two_state ? st2[i] : 0.f;
    float np = pv, n1 = s1, n1b = s1b, n2 = s2;
    const float d = opt_rule<OPT>(np, gv * a.gnorm_scale, n1, n1b, n2, a);
    const bool ok = opt_finite(gv) && opt_states_finite<OPT>(n1, n1b, n2);
    if (NORMS) {
      if (ok) {
        acc_d += (double)d * (double)d;
        acc_p += (double)pv * (double)pv;
      }
      continue;
    }
    if (!ok) continue;  // skipped element: nothing is written
    store<DT>(p, i, np);
    st1[i] = n1;
    if (T::has_m2) st1[n + i] = n1b;
    if (T::two_state) st2[i] = n2;
  }
  if (NORMS) block_sum2(acc_d, acc_p, partial + 2 * blockIdx.x, dred);
}

// The one GPU of the buffers an optimizer call reads (all device memory of that GPU); the
// launch happens there, whatever the caller's current device is.
int optimizer_device(const void* p, const void* g, const void* s1, const void* s2,
                     const void* a1, const void* a2, const void* q1, const void* q2,
                     const void* out, int* dev) {
  const void* ptrs[9] = {p, g, s1, s2, a1, a2, q1, q2, out};
  const char* names[9] = {"p", "g", "state1", "state2", "absmax1", "absmax2", "qmap1",
                          "qmap2", "out"};
  return common_device(9, ptrs, names, dev);
}

int check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return fail(BNBF_E_CUDA, "%s: CUDA error %s (%s)", what, cudaGetErrorName(err),
                cudaGetErrorString(err));
  return BNBF_OK;
}

// The NORMS kernels write one pair of partial sums per thread block into scratch memory,
// stream-ordered (calls on other streams get their own), which k_sum_partials then adds to
// out in block order. The update kernels get partial == nullptr.
int alloc_partials(bool norms, int64_t grid, cudaStream_t stream, double** partial) {
  *partial = nullptr;
  if (!norms) return BNBF_OK;
  const cudaError_t err =
      cudaMallocAsync((void**)partial, (size_t)grid * 2 * sizeof(double), stream);
  return err == cudaSuccess ? BNBF_OK : fail_cuda(err, "allocate the norm partials");
}

// Checks the optimizer kernel's launch, then sums the partials into out and frees them.
int finish_launch(int rc, double* partial, int64_t grid, double* out, cudaStream_t stream,
                  const char* what) {
  if (!rc) rc = check_launch(what);
  if (!partial) return rc;
  if (!rc) {
    k_sum_partials<<<1, 32, 0, stream>>>(partial, grid, out);
    rc = check_launch(what);
  }
  const cudaError_t freed = cudaFreeAsync(partial, stream);
  if (!rc && freed != cudaSuccess) rc = fail_cuda(freed, "free the norm partials");
  return rc;
}

template <bool NORMS>
int launch_8bit(int opt, void* p, const void* g, int dtype, uint8_t* c1, uint8_t* c2,
                float* absmax1, float* absmax2, const float* qmap1, const float* qmap2,
                const bnbf_optim_args& a, int64_t n, double* out, cudaStream_t stream,
                const char* what) {
  int dev = 0;
  if (int rc = optimizer_device(p, g, c1, c2, absmax1, absmax2, qmap1, qmap2, out, &dev))
    return rc;
  DeviceGuard guard(dev);
  if (guard.error() != cudaSuccess) return fail_cuda(guard.error(), "set device");
  const int64_t nblocks = (n + kOptimBlock - 1) / kOptimBlock;
  // Enough thread blocks to fill the GPU; each builds its maps once, then loops.
  const int64_t grid = std::min<int64_t>(nblocks, (int64_t)sm_count(dev) * 8);
  double* partial;
  if (int rc = alloc_partials(NORMS, grid, stream, &partial)) return rc;
  bool known = dispatch_optimizer(opt, [&](auto o) {
    constexpr int OPT = decltype(o)::value;
    switch (dtype) {
      case BNBF_F32:
        k_optimizer_8bit<OPT, BNBF_F32, NORMS><<<(unsigned)grid, kThreads, 0, stream>>>(
            p, g, c1, c2, absmax1, absmax2, qmap1, qmap2, a, n, nblocks, partial);
        break;
      case BNBF_F16:
        k_optimizer_8bit<OPT, BNBF_F16, NORMS><<<(unsigned)grid, kThreads, 0, stream>>>(
            p, g, c1, c2, absmax1, absmax2, qmap1, qmap2, a, n, nblocks, partial);
        break;
      default:
        k_optimizer_8bit<OPT, BNBF_BF16, NORMS><<<(unsigned)grid, kThreads, 0, stream>>>(
            p, g, c1, c2, absmax1, absmax2, qmap1, qmap2, a, n, nblocks, partial);
    }
  });
  const int rc = known ? BNBF_OK : fail(BNBF_E_ARG, "unknown optimizer id %d", opt);
  return finish_launch(rc, partial, grid, out, stream, what);
}

template <bool NORMS>
int launch_32bit(int opt, void* p, const void* g, int dtype, float* s1, float* s2,
                 const bnbf_optim_args& a, int64_t n, double* out, cudaStream_t stream,
                 const char* what) {
  int dev = 0;
  if (int rc = optimizer_device(p, g, s1, s2, nullptr, nullptr, nullptr, nullptr, out, &dev))
    return rc;
  DeviceGuard guard(dev);
  if (guard.error() != cudaSuccess) return fail_cuda(guard.error(), "set device");
  const int64_t grid =
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads,
                                             (int64_t)sm_count(dev) * 16));
  double* partial;
  if (int rc = alloc_partials(NORMS, grid, stream, &partial)) return rc;
  bool known = dispatch_optimizer(opt, [&](auto o) {
    constexpr int OPT = decltype(o)::value;
    switch (dtype) {
      case BNBF_F32:
        k_optimizer_32bit<OPT, BNBF_F32, NORMS><<<(unsigned)grid, kThreads, 0, stream>>>(
            p, g, s1, s2, a, n, partial);
        break;
      case BNBF_F16:
        k_optimizer_32bit<OPT, BNBF_F16, NORMS><<<(unsigned)grid, kThreads, 0, stream>>>(
            p, g, s1, s2, a, n, partial);
        break;
      default:
        k_optimizer_32bit<OPT, BNBF_BF16, NORMS><<<(unsigned)grid, kThreads, 0, stream>>>(
            p, g, s1, s2, a, n, partial);
    }
  });
  const int rc = known ? BNBF_OK : fail(BNBF_E_ARG, "unknown optimizer id %d", opt);
  return finish_launch(rc, partial, grid, out, stream, what);
}

}  // namespace
}  // namespace cuda
}  // namespace bnbf

using namespace bnbf;

BNBF_API int bnbf_cuda_optimizer_update_8bit_blockwise(
    int optimizer, void* p, const void* g, int dtype, uint8_t* state1, uint8_t* state2,
    float* absmax1, float* absmax2, const float* qmap1, const float* qmap2,
    const bnbf_optim_args* args, int64_t n, void* stream) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, true,
                                    absmax1, absmax2, qmap1, qmap2))
    return rc;
  if (n == 0) return BNBF_OK;
  const bool two = optimizer_two_state(optimizer);
  return cuda::launch_8bit<false>(optimizer, p, g, dtype, state1, two ? state2 : nullptr,
                                  absmax1, two ? absmax2 : nullptr, qmap1,
                                  two ? qmap2 : nullptr, *args, n, nullptr,
                                  (cudaStream_t)stream, "optimizer_update_8bit_blockwise");
}

BNBF_API int bnbf_cuda_optimizer_update_32bit(int optimizer, void* p, const void* g, int dtype,
                                              float* state1, float* state2,
                                              const bnbf_optim_args* args, int64_t n,
                                              void* stream) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, false,
                                    nullptr, nullptr, nullptr, nullptr))
    return rc;
  if (n == 0) return BNBF_OK;
  const bool two = optimizer_two_state(optimizer);
  return cuda::launch_32bit<false>(optimizer, p, g, dtype, state1, two ? state2 : nullptr, *args,
                                   n, nullptr, (cudaStream_t)stream, "optimizer_update_32bit");
}

BNBF_API int bnbf_cuda_optimizer_norms_8bit_blockwise(
    int optimizer, const void* p, const void* g, int dtype, const uint8_t* state1,
    const uint8_t* state2, const float* absmax1, const float* absmax2, const float* qmap1,
    const float* qmap2, const bnbf_optim_args* args, int64_t n, double* out, void* stream) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, true,
                                    absmax1, absmax2, qmap1, qmap2, true, out))
    return rc;
  if (n == 0) return BNBF_OK;
  const bool two = optimizer_two_state(optimizer);
  // The NORMS instantiation never writes p, the codes or absmax.
  return cuda::launch_8bit<true>(optimizer, const_cast<void*>(p), g, dtype,
                                 const_cast<uint8_t*>(state1),
                                 two ? const_cast<uint8_t*>(state2) : nullptr,
                                 const_cast<float*>(absmax1),
                                 two ? const_cast<float*>(absmax2) : nullptr, qmap1,
                                 two ? qmap2 : nullptr, *args, n, out, (cudaStream_t)stream,
                                 "optimizer_norms_8bit_blockwise");
}

BNBF_API int bnbf_cuda_optimizer_norms_32bit(int optimizer, const void* p, const void* g,
                                             int dtype, const float* state1, const float* state2,
                                             const bnbf_optim_args* args, int64_t n,
                                             double* out, void* stream) {
  if (int rc = check_optimizer_args(optimizer, p, g, dtype, state1, state2, args, n, false,
                                    nullptr, nullptr, nullptr, nullptr, true, out))
    return rc;
  if (n == 0) return BNBF_OK;
  const bool two = optimizer_two_state(optimizer);
  return cuda::launch_32bit<true>(optimizer, const_cast<void*>(p), g, dtype,
                                  const_cast<float*>(state1),
                                  two ? const_cast<float*>(state2) : nullptr, *args, n, out,
                                  (cudaStream_t)stream, "optimizer_norms_32bit");
}
