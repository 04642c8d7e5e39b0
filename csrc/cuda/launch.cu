// The device-index check of the CUDA entry points (launch.cuh).
#include "launch.cuh"

namespace bnbf {
namespace cuda {

int check_device(int dev, const char* what) {
  // The count cannot change while the process runs (CUDA_VISIBLE_DEVICES is read once, at
  // the runtime's initialisation), so one cudaGetDeviceCount serves every later call.
  if (dev < 0) return fail(BNBF_E_ARG, "%s: no CUDA device %d", what, dev);
  static std::atomic<int> count{-1};
  int c = count.load(std::memory_order_relaxed);
  if (c < 0) {
    const cudaError_t err = cudaGetDeviceCount(&c);
    if (err != cudaSuccess) return fail_cuda(err, what);
    count.store(c, std::memory_order_relaxed);
  }
  if (dev >= c)
    return fail(BNBF_E_ARG, "%s: no CUDA device %d (%d present)", what, dev, c);
  return BNBF_OK;
}

}  // namespace cuda
}  // namespace bnbf
