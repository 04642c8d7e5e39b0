// FusionEmbedding lookup on CUDA: fused gather + dequantize with new-token routing.
//
// One thread block per token (grid-stride over tokens), threads over the row. Everything is
// decided on the device, so the launch needs no host sync; an id out of range (which the
// Python side asserts asynchronously) gets a zero row instead of an out-of-bounds read.
#include <algorithm>

#include "ceil_div.h"
#include "common.cuh"
#include "embedding_check.h"
#include "launch.cuh"

namespace bnbf {
namespace cuda {
namespace {

template <typename T>
__global__ void fusion_lookup_kernel(const int64_t* __restrict__ ids, int64_t n,
                                     const void* __restrict__ base, int bits,
                                     const float* __restrict__ absmax,
                                     const float* __restrict__ qmap, int64_t vocab_size,
                                     const T* __restrict__ fusion, int64_t fusion_vocab_size,
                                     int64_t D, int64_t blocksize, T* __restrict__ out) {
  __shared__ float smap[256];
  // No base rows (vocab_size 0): qmap may be null, and is never needed.
  const int map_size = vocab_size == 0 ? 0 : (bits == 8 ? 256 : (bits == 4 ? 16 : 0));
  for (int i = threadIdx.x; i < map_size; i += blockDim.x) smap[i] = qmap[i];
  __syncthreads();
  const int64_t nblk = bits ? ceil_div(D, blocksize) : 0;
  const int64_t code_cols = bits == 8 ? D : (D + 1) / 2;
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const int64_t id = ids[t];
    T* dst = out + t * D;
    if (id < 0 || id >= vocab_size + fusion_vocab_size) {
      for (int64_t j = threadIdx.x; j < D; j += blockDim.x) dst[j] = from_f32<T>(0.f);
    } else if (id >= vocab_size) {
      const T* src = fusion + (id - vocab_size) * D;
      for (int64_t j = threadIdx.x; j < D; j += blockDim.x) dst[j] = src[j];
    } else if (bits == 0) {
      const T* src = (const T*)base + id * D;
      for (int64_t j = threadIdx.x; j < D; j += blockDim.x) dst[j] = src[j];
    } else {
      const uint8_t* row = (const uint8_t*)base + id * code_cols;
      const float* am = absmax + id * nblk;
      for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
        int c;
        if (bits == 8) {
          c = row[j];
        } else {
          const uint8_t b = row[j >> 1];
          c = (j & 1) ? (b & 15) : (b >> 4);
        }
        dst[j] = from_f32<T>(mul_x86(smap[c], am[j / blocksize]));  // CPU NaN bits
      }
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace bnbf

using namespace bnbf;
using namespace bnbf::cuda;

BNBF_API int bnbf_cuda_fusion_embedding_lookup(const int64_t* ids, int64_t n, const void* base,
                                               int bits, const float* absmax, const float* qmap,
                                               int64_t vocab_size, const void* fusion,
                                               int64_t fusion_vocab_size, int64_t embed_dim,
                                               int64_t blocksize, void* out, int dtype,
                                               int device, void* stream) {
  if (int rc = bnbf::check_lookup_args(ids, n, base, bits, absmax, qmap, vocab_size, fusion,
                                       fusion_vocab_size, embed_dim, blocksize, out, dtype))
    return rc;
  if (n == 0) return BNBF_OK;
  const char* what = "fusion_embedding_lookup";
  if (int rc = check_device(device, what)) return rc;
  DeviceGuard guard(device);  // launch on the buffers' GPU, whatever the current one is
  if (guard.error() != cudaSuccess) return fail_cuda(guard.error(), what);
  const int threads = (int)std::min<int64_t>(256, ((embed_dim + 31) / 32) * 32);
  cudaStream_t s = (cudaStream_t)stream;
  bool known = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    // One wave; the kernel grid-strides over the tokens.
    const unsigned grid = grid_for<fusion_lookup_kernel<T>>(n, device, threads);
    fusion_lookup_kernel<T><<<grid, threads, 0, s>>>(
        ids, n, base, bits, absmax, qmap, vocab_size, (const T*)fusion, fusion_vocab_size,
        embed_dim, blocksize, (T*)out);
  });
  if (!known) return fail(BNBF_E_ARG, "unsupported dtype code %d", dtype);
  return check_launch(what);
}
