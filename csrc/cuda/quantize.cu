// Blockwise quantize / dequantize on CUDA, bit-identical to the CPU kernels and to the
// pure-PyTorch reference (bnbfuse/backends/reference.py):
//   absmax[b] = max |x| over block b (NaN if the block holds a NaN),
//   code      = index of the map value nearest x / (absmax or 1 when absmax == 0),
// where "nearest" counts the thresholds t_k <= x, t_k being the smallest float32 >= the
// exact midpoint of the k-th and (k+1)-th sorted map values (ties go to the larger value;
// see csrc/cpu/qmap.h). The division is IEEE (__fdiv_rn) and the build uses
// --fmad=false, so every step rounds exactly as on the CPU.
//
// Work layout: a group of G threads (32..256) handles one quantization block at a time,
// kThreads / G groups per CUDA block, grid-striding over the blocks. Each CUDA block first
// builds the sorted thresholds of the map in shared memory; the grid is one wave of
// resident blocks (occupancy measured per kernel, launch.cuh) so that this 256-element
// sort is paid a few hundred times, not once per quantization block.
//
// Few huge blocks (a blocksize of at least the tensor's size, say) would leave that layout
// with one CUDA block per quantization block, i.e. a handful of multiprocessors doing all
// the work. Such calls take the grid-wide path instead: the blocks are cut into chunks of
// kChunk elements spread over the whole grid, a first kernel merges the chunks' maxima
// into absmax with integer atomicMax (exact and order-independent: non-negative floats
// order as their bits), and a second one quantizes every chunk with its block's absmax.
#include <climits>

#include "ceil_div.h"
#include "common.cuh"
#include "launch.cuh"

namespace bnbf {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // threads per CUDA block; also the map size
constexpr int kCache = 16;     // elements per thread kept in registers between the passes
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = (int64_t)kThreads * kCache;  // grid-wide path: elements per chunk

// G: a power of two in [32, kThreads], so a warp never straddles two groups; it grows with
// the blocksize to give each thread about 4 elements (up to 16 at blocksize 4096).
int group_size(int64_t blocksize) {
  int g = 32;
  while (g < kThreads && (int64_t)g * 4 < blocksize) g *= 2;
  return g;
}

struct SharedMap {
  float thr[256];          // thr[k] separates sorted values k and k+1; thr[255] unused
  uint8_t code_of[256];    // sorted position -> stored code
};

// All kThreads threads build the thresholds of the 256-value map `code` (any order).
// A stable rank sort: position of value i = #{j: v_j < v_i} + #{j < i: v_j == v_i}, the
// same order as std::stable_sort on the CPU.
__device__ void build_map(const float* __restrict__ code, SharedMap& m, float* s_values,
                          float* s_sorted) {
  const int t = threadIdx.x;
  const float v = code[t];
  s_values[t] = v;
  // A map holding NaN has no consistent order; the ranks may then collide, and these
  // defaults keep every slot defined (codes stay in range).
  s_sorted[t] = __int_as_float(0x7fc00000);
  m.code_of[t] = 0;
  __syncthreads();
  int rank = 0;
  for (int j = 0; j < 256; ++j) {
    const float w = s_values[j];
    rank += (w < v) || (w == v && j < t);
  }
  s_sorted[rank] = v;
  m.code_of[rank] = (uint8_t)t;
  __syncthreads();
  if (t < 255) {
    // The midpoint of two floats is exact in double; rounding it up to float keeps
    // "x >= thr" exact for float x and sends ties to the larger value.
    const double mid = ((double)s_sorted[t] + (double)s_sorted[t + 1]) * 0.5;
    float f = __double2float_rn(mid);
    if ((double)f < mid) f = nextafterf(f, __int_as_float(0x7f800000));
    m.thr[t] = f;
  } else {
    m.thr[255] = __int_as_float(0x7fc00000);
  }
  __syncthreads();
}

// Stored code of the map value nearest x: the count of thresholds <= x (0..255) found by
// a branch-free binary search over thr[0..254]; NaN counts 0, as on the CPU.
__device__ __forceinline__ uint8_t nearest(const SharedMap& m, float x) {
  int j = 0;
#pragma unroll
  for (int s = 128; s > 0; s >>= 1) j += (m.thr[j + s - 1] <= x) ? s : 0;
  return m.code_of[j];
}

// At least 4 resident blocks per SM (<= 64 registers): enough loads in flight to stream.
template <typename T>
__global__ void __launch_bounds__(kThreads, 4)
quantize_kernel(const float* __restrict__ code, const T* __restrict__ A,
                float* __restrict__ absmax, uint8_t* __restrict__ out, int64_t blocksize,
                int64_t n, int group) {
  __shared__ SharedMap m;
  __shared__ float s_values[256], s_sorted[256];
  __shared__ float s_warp_max[kThreads / 32];
  __shared__ int s_warp_nan[kThreads / 32];
  build_map(code, m, s_values, s_sorted);

  const int groups = kThreads / group, warps_per_group = group / 32;
  const int gid = threadIdx.x / group, lane = threadIdx.x % group, warp = threadIdx.x / 32;
  const int64_t nblocks = ceil_div(n, blocksize);
  const int64_t rounds = ceil_div(nblocks, groups);
  // Every thread runs the same number of rounds (the __syncthreads below need that);
  // groups past the last block just have nothing to do.
  for (int64_t r = blockIdx.x; r < rounds; r += gridDim.x) {
    const int64_t b = r * groups + gid;
    const bool active = b < nblocks;
    const int64_t start = active ? b * blocksize : 0;
    const int64_t len = active ? (n - start < blocksize ? n - start : blocksize) : 0;
    const T* x = A + start;
    const bool cached = len <= (int64_t)kCache * group;

    float v[kCache];
    float mx = 0.f;
    bool nan = false;
    if (cached) {  // len <= kCache * group fits an int
      const int ilen = (int)len;
#pragma unroll
      for (int k = 0; k < kCache; ++k) {
        const int i = lane + k * group;
        v[k] = i < ilen ? to_f32<T>(x[i]) : 0.f;
        nan |= isnan(v[k]);
        mx = fmaxf(mx, fabsf(v[k]));  // fmaxf ignores NaN; `nan` records it
      }
    } else {
      for (int64_t i = lane; i < len; i += group) {
        const float a = to_f32<T>(x[i]);
        nan |= isnan(a);
        mx = fmaxf(mx, fabsf(a));
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    nan = __any_sync(0xffffffffu, nan);
    if (warps_per_group > 1) {  // uniform over the CUDA block
      if ((threadIdx.x & 31) == 0) {
        s_warp_max[warp] = mx;
        s_warp_nan[warp] = nan;
      }
      __syncthreads();
      for (int w = gid * warps_per_group; w < (gid + 1) * warps_per_group; ++w) {
        mx = fmaxf(mx, s_warp_max[w]);
        nan |= s_warp_nan[w] != 0;
      }
      __syncthreads();  // the next round overwrites s_warp_*
    }
    const float amax = nan ? __int_as_float(0x7fc00000) : mx;
    if (active && lane == 0) absmax[b] = amax;
    const float d = amax == 0.f ? 1.f : amax;  // all-zero block: 0/1, never 0/0

    uint8_t* o = out + start;
    if (cached) {
      const int ilen = (int)len;
#pragma unroll
      for (int k = 0; k < kCache; ++k) {
        const int i = lane + k * group;
        if (i < ilen) o[i] = nearest(m, __fdiv_rn(v[k], d));
      }
    } else {
      for (int64_t i = lane; i < len; i += group) o[i] = nearest(m, __fdiv_rn(to_f32<T>(x[i]), d));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
dequantize_kernel(const float* __restrict__ code, const uint8_t* __restrict__ A,
                  const float* __restrict__ absmax, T* __restrict__ out, int64_t blocksize,
                  int64_t n, int group) {
  __shared__ float s_code[256];
  s_code[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int groups = kThreads / group;
  const int gid = threadIdx.x / group, lane = threadIdx.x % group;
  const int64_t nblocks = ceil_div(n, blocksize);
  for (int64_t b = (int64_t)blockIdx.x * groups + gid; b < nblocks; b += (int64_t)gridDim.x * groups) {
    const int64_t start = b * blocksize;
    const int64_t len = n - start < blocksize ? n - start : blocksize;
    const float s = absmax[b];
    const uint8_t* a = A + start;
    T* o = out + start;
    for (int64_t i = lane; i < len; i += group) o[i] = from_f32<T>(mul_x86(s_code[a[i]], s));
  }
}

// ---- the grid-wide path (few huge blocks) ------------------------------------------------
// Work unit u is chunk u % chunks of quantization block u / chunks (chunks per block =
// ceil(blocksize / kChunk)); elements [start, end) of the flattened tensor.
struct Unit {
  int64_t block, start, end;
};

__device__ __forceinline__ Unit unit_of(int64_t u, int64_t chunks, int64_t blocksize, int64_t n) {
  const int64_t b = u / chunks, k = u % chunks;
  const int64_t block_end = n - b * blocksize < blocksize ? n : b * blocksize + blocksize;
  const int64_t start = b * blocksize + k * kChunk;
  return {b, start, block_end - start < kChunk ? block_end : start + kChunk};
}

__device__ __forceinline__ uint32_t abs_bits(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }

// absmax_bits (zeroed by the caller) gets the max of |x| bits over each block; NaN shows as
// bits above 0x7F800000 (made canonical by canonical_absmax_kernel).
template <typename T>
__global__ void __launch_bounds__(kThreads)
absmax_units_kernel(const T* __restrict__ A, uint32_t* __restrict__ absmax_bits,
                    int64_t blocksize, int64_t n, int64_t chunks, int64_t units) {
  __shared__ uint32_t s_warp[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const Unit w = unit_of(u, chunks, blocksize, n);
    uint32_t m = 0;
    for (int64_t i = w.start + threadIdx.x; i < w.end; i += kThreads)
      m = max(m, abs_bits(to_f32<T>(A[i])));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (lane == 0) s_warp[warp] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int k = 0; k < kWarps; ++k) m = max(m, s_warp[k]);
      if (m) atomicMax(absmax_bits + w.block, m);  // 0 is the initial value already
    }
    __syncthreads();  // s_warp is rewritten for the next unit
  }
}

__device__ __forceinline__ float absmax_of_bits(uint32_t b) {
  return b > 0x7F800000u ? __int_as_float(0x7fc00000) : __uint_as_float(b);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
quantize_units_kernel(const float* __restrict__ code, const T* __restrict__ A,
                      const uint32_t* __restrict__ absmax_bits, uint8_t* __restrict__ out,
                      int64_t blocksize, int64_t n, int64_t chunks, int64_t units) {
  __shared__ SharedMap m;
  __shared__ float s_values[256], s_sorted[256];
  build_map(code, m, s_values, s_sorted);
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const Unit w = unit_of(u, chunks, blocksize, n);
    const float amax = absmax_of_bits(absmax_bits[w.block]);
    const float d = amax == 0.f ? 1.f : amax;
    for (int64_t i = w.start + threadIdx.x; i < w.end; i += kThreads)
      out[i] = nearest(m, __fdiv_rn(to_f32<T>(A[i]), d));
  }
}

// The NaN absmax of the grid-wide path as the other paths write it (0x7FC00000).
__global__ void canonical_absmax_kernel(float* __restrict__ absmax, int64_t nblocks) {
  const int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (b < nblocks) absmax[b] = absmax_of_bits(__float_as_uint(absmax[b]));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
dequantize_units_kernel(const float* __restrict__ code, const uint8_t* __restrict__ A,
                        const float* __restrict__ absmax, T* __restrict__ out,
                        int64_t blocksize, int64_t n, int64_t chunks, int64_t units) {
  __shared__ float s_code[256];
  s_code[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const Unit w = unit_of(u, chunks, blocksize, n);
    const float s = absmax[w.block];
    for (int64_t i = w.start + threadIdx.x; i < w.end; i += kThreads)
      out[i] = from_f32<T>(mul_x86(s_code[A[i]], s));
  }
}

// Whether the grid-wide path serves a call: blocks too long for the register cache (the
// block path reads them twice too) and too few of them to give every resident CUDA block
// of the block path its own.
template <auto BlockKernel>
bool use_units(int64_t blocksize, int64_t nblocks, int dev) {
  return blocksize > kChunk &&
         nblocks < (int64_t)sm_count(dev) * blocks_per_sm<BlockKernel>(dev, kThreads);
}

int check_args(const float* code, const void* A, const float* absmax, const void* out,
               int dtype, int64_t blocksize, int64_t n) {
  if (n < 0) return fail(BNBF_E_ARG, "n must be >= 0, got %lld", (long long)n);
  if (blocksize < 1)
    return fail(BNBF_E_ARG, "blocksize must be >= 1, got %lld", (long long)blocksize);
  if (dtype != BNBF_F32 && dtype != BNBF_F16 && dtype != BNBF_BF16)
    return fail(BNBF_E_ARG, "unsupported dtype code %d", dtype);
  if (n > 0 && (!code || !A || !absmax || !out)) return fail(BNBF_E_ARG, "null pointer");
  return BNBF_OK;
}

// The prologue of the entry points: a valid device made current (launches go to the
// buffers' GPU, whatever the caller's current device is).
#define BNBF_ENTER_DEVICE(dev, what)                                          \
  if (int rc_ = check_device(dev, what)) return rc_;                          \
  DeviceGuard guard_(dev);                                                    \
  if (guard_.error() != cudaSuccess) return fail_cuda(guard_.error(), what);

template <typename T>
int quantize(const float* code, const T* A, float* absmax, uint8_t* out, int64_t blocksize,
             int64_t n, int dev, cudaStream_t s) {
  const char* what = "quantize_blockwise";
  const int64_t nblocks = ceil_div(n, blocksize);
  if (use_units<quantize_kernel<T>>(blocksize, nblocks, dev)) {
    const int64_t chunks = ceil_div(blocksize, kChunk), units = nblocks * chunks;
    uint32_t* bits = reinterpret_cast<uint32_t*>(absmax);  // the maxima as integers first
    const cudaError_t err = cudaMemsetAsync(bits, 0, (size_t)nblocks * sizeof(float), s);
    if (err != cudaSuccess) return fail_cuda(err, what);
    absmax_units_kernel<T><<<grid_for<absmax_units_kernel<T>>(units, dev, kThreads), kThreads, 0,
                             s>>>(A, bits, blocksize, n, chunks, units);
    if (int rc = check_launch(what)) return rc;
    quantize_units_kernel<T><<<grid_for<quantize_units_kernel<T>>(units, dev, kThreads),
                               kThreads, 0, s>>>(code, A, bits, out, blocksize, n, chunks, units);
    if (int rc = check_launch(what)) return rc;
    canonical_absmax_kernel<<<(unsigned)ceil_div(nblocks, kThreads), kThreads, 0, s>>>(absmax,
                                                                                      nblocks);
    return check_launch(what);
  }
  const int group = group_size(blocksize);
  const int64_t rounds = ceil_div(nblocks, kThreads / group);
  quantize_kernel<T><<<grid_for<quantize_kernel<T>>(rounds, dev, kThreads), kThreads, 0, s>>>(
      code, A, absmax, out, blocksize, n, group);
  return check_launch(what);
}

template <typename T>
int dequantize(const float* code, const uint8_t* A, const float* absmax, T* out,
               int64_t blocksize, int64_t n, int dev, cudaStream_t s) {
  const char* what = "dequantize_blockwise";
  const int64_t nblocks = ceil_div(n, blocksize);
  if (use_units<dequantize_kernel<T>>(blocksize, nblocks, dev)) {
    const int64_t chunks = ceil_div(blocksize, kChunk), units = nblocks * chunks;
    dequantize_units_kernel<T><<<grid_for<dequantize_units_kernel<T>>(units, dev, kThreads),
                                 kThreads, 0, s>>>(code, A, absmax, out, blocksize, n, chunks,
                                                   units);
    return check_launch(what);
  }
  const int group = group_size(blocksize);
  const int64_t rounds = ceil_div(nblocks, kThreads / group);
  dequantize_kernel<T><<<grid_for<dequantize_kernel<T>>(rounds, dev, kThreads), kThreads, 0,
                         s>>>(code, A, absmax, out, blocksize, n, group);
  return check_launch(what);
}

}  // namespace
}  // namespace cuda
}  // namespace bnbf

using namespace bnbf::cuda;
using bnbf::ceil_div;

// A block longer than the tensor is the tensor (one block): the kernels then never form
// b * blocksize for a blocksize near INT64_MAX.
static int64_t effective_blocksize(int64_t blocksize, int64_t n) {
  return blocksize < n ? blocksize : n;
}

BNBF_API int bnbf_cuda_quantize_blockwise(const float* code, const void* A, int dtype,
                                          float* absmax, uint8_t* out, int64_t blocksize,
                                          int64_t n, int device, void* stream) {
  if (int rc = check_args(code, A, absmax, out, dtype, blocksize, n)) return rc;
  if (n == 0) return BNBF_OK;
  BNBF_ENTER_DEVICE(device, "quantize_blockwise")
  const int64_t bs = effective_blocksize(blocksize, n);
  int rc = BNBF_OK;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    rc = quantize<T>(code, (const T*)A, absmax, out, bs, n, device, (cudaStream_t)stream);
  });
  return rc;
}

BNBF_API int bnbf_cuda_dequantize_blockwise(const float* code, const uint8_t* A,
                                            const float* absmax, void* out, int dtype,
                                            int64_t blocksize, int64_t n, int device,
                                            void* stream) {
  if (int rc = check_args(code, A, absmax, out, dtype, blocksize, n)) return rc;
  if (n == 0) return BNBF_OK;
  BNBF_ENTER_DEVICE(device, "dequantize_blockwise")
  const int64_t bs = effective_blocksize(blocksize, n);
  int rc = BNBF_OK;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    rc = dequantize<T>(code, A, absmax, (T*)out, bs, n, device, (cudaStream_t)stream);
  });
  return rc;
}
