// Runtime services of the CUDA library (device checks, SM counts) and its introspection
// entry point; the error channel is csrc/common/errors.cpp, compiled into both libraries.
#include <atomic>

#include "common.cuh"

#ifndef BNBF_CUDA_ARCHS
#error "BNBF_CUDA_ARCHS must be defined by the build (CMakeLists.txt)"
#endif

namespace bnbf {

namespace cuda {

int fail_cuda(cudaError_t err, const char* what) {
  // Reset the last-error state so that a later, unrelated check does not report it again.
  (void)cudaGetLastError();
  return fail(BNBF_E_CUDA, "%s: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err));
}

int device_of(const void* p, const char* name, int* dev) {
  cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) return fail_cuda(err, name);
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return fail(BNBF_E_ARG, "%s is not CUDA device memory", name);
  *dev = attr.device;
  return BNBF_OK;
}

int common_device(int count, const void* const* ptrs, const char* const* names, int* dev) {
  int first = -1;
  for (int i = 0; i < count; ++i) {
    if (!ptrs[i]) continue;
    int d = -1;
    if (int rc = device_of(ptrs[i], names[i], &d)) return rc;
    if (first < 0) {
      first = i;
      *dev = d;
    } else if (d != *dev) {
      return fail(BNBF_E_ARG, "%s is on cuda:%d but %s is on cuda:%d", names[i], d,
                  names[first], *dev);
    }
  }
  if (first < 0) return fail(BNBF_E_ARG, "no device buffer given");
  return BNBF_OK;
}

int sm_count(int dev) {
  static std::atomic<int> cache[128];
  if (dev >= 0 && dev < 128) {
    int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v < 1) {
    (void)cudaGetLastError();
    v = 1;  // only sizes the grid; kernels are correct for any grid size
  }
  if (dev >= 0 && dev < 128) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

}  // namespace cuda
}  // namespace bnbf

BNBF_API const char* bnbf_cuda_archs(void) { return BNBF_CUDA_ARCHS; }
