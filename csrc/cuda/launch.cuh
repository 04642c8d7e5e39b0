// Launch helpers of the CUDA entry points: the caller's device index, checked once per call
// without touching its buffers, and grids sized from each kernel's measured occupancy.
//
// The entry points used to find their GPU from the buffers (cudaPointerGetAttributes, up to
// nine driver calls per optimizer step and parameter). bnbfuse's Python side knows the
// device of every tensor it passes and checks that they agree (bnbfuse/backends/native.py),
// so it passes the index, and the library only validates it against the device count.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>

#include "common.cuh"

namespace bnbf {
namespace cuda {

// BNBF_E_ARG unless 0 <= dev < the number of CUDA devices (counted once per process);
// BNBF_E_CUDA if the runtime cannot count them (no driver, no GPU). `what` names the call.
int check_device(int dev, const char* what);

// Devices whose occupancy is cached; a larger index is still served, just not cached.
constexpr int kCachedDevices = 64;

// Resident blocks per multiprocessor of `Kernel` launched with `threads` threads (a multiple
// of 32, at most 1024) and no dynamic shared memory, on the current device `dev`: what
// cudaOccupancyMaxActiveBlocksPerMultiprocessor reports, cached per kernel, device and block
// size (a kernel's registers and shared memory never change at run time). At least 1.
template <auto Kernel>
int blocks_per_sm(int dev, int threads) {
  static std::atomic<int> cache[kCachedDevices][32];
  const int slot = threads / 32 - 1;
  const bool cacheable = dev >= 0 && dev < kCachedDevices && threads % 32 == 0 && slot >= 0 &&
                         slot < 32;
  if (cacheable) {
    const int v = cache[dev][slot].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, Kernel, threads, 0) != cudaSuccess ||
      v < 1) {
    (void)cudaGetLastError();
    v = 1;  // only sizes the grid: every kernel is correct for any grid size
  }
  if (cacheable) cache[dev][slot].store(v, std::memory_order_relaxed);
  return v;
}

// One wave of `Kernel` on device `dev` (every multiprocessor full), never more blocks than
// work items, at least 1 and at most INT_MAX. The kernels loop (grid-stride) over the rest,
// so per-block setup such as building a quantization map in shared memory is paid once per
// resident block.
template <auto Kernel>
unsigned grid_for(int64_t work_items, int dev, int threads) {
  const int64_t wave = (int64_t)sm_count(dev) * blocks_per_sm<Kernel>(dev, threads);
  int64_t g = work_items < wave ? work_items : wave;
  if (g < 1) g = 1;
  if (g > INT_MAX) g = INT_MAX;
  return (unsigned)g;
}

// The prologue of every entry point, after its argument checks:
//   if (int rc = check_device(dev, what)) return rc;
//   DeviceGuard guard(dev);  // launches go to the buffers' GPU, not the current one
//   if (guard.error() != cudaSuccess) return fail_cuda(guard.error(), what);

// BNBF_E_CUDA with the launch's error, if the last launch failed.
inline int check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? BNBF_OK : fail_cuda(err, what);
}

}  // namespace cuda
}  // namespace bnbf
