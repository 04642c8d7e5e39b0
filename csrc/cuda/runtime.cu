// Runtime services of the CUDA library (device checks, SM counts), its introspection entry
// points and the driver/runtime probe bnbfuse runs before it registers the CUDA kernels; the
// error channel is csrc/common/errors.cpp, compiled into both libraries.
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstring>

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

// ---- probe ------------------------------------------------------------------------------
// Compiled for exactly the architectures of every other kernel of this library (one CMake
// target, one CUDA_ARCHITECTURES list), so "the driver finds an image of this kernel for
// device d" stands for all of them. Never launched: cudaFuncGetAttributes only loads it.
__global__ void bnbf_probe_kernel() {}

namespace {

void probe_message(bnbf_cuda_probe_info* info, const char* fmt, ...)
    __attribute__((format(printf, 2, 3)));
void probe_message(bnbf_cuda_probe_info* info, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(info->message, sizeof(info->message), fmt, ap);
  va_end(ap);
}

int probe_fail(bnbf_cuda_probe_info* info) {
  return bnbf::fail(BNBF_E_CUDA, "%s", info->message);
}

}  // namespace

BNBF_API const char* bnbf_cuda_error_string(int error) {
  static thread_local char buf[256];
  cudaError_t err = static_cast<cudaError_t>(error);
  snprintf(buf, sizeof(buf), "%s: %s", cudaGetErrorName(err), cudaGetErrorString(err));
  return buf;
}

BNBF_API int bnbf_cuda_probe(bnbf_cuda_probe_info* info, int64_t info_size, int flags) {
  if (!info) return bnbf::fail(BNBF_E_ARG, "bnbf_cuda_probe: info is a null pointer");
  if (info_size != static_cast<int64_t>(sizeof(bnbf_cuda_probe_info)))
    return bnbf::fail(BNBF_E_ARG,
                      "bnbf_cuda_probe: info_size %lld, but this library's "
                      "bnbf_cuda_probe_info has %zu bytes (mismatched bnbfuse/_native.py)",
                      static_cast<long long>(info_size), sizeof(bnbf_cuda_probe_info));
  memset(info, 0, sizeof(*info));
  for (int i = 0; i < BNBF_CUDA_PROBE_MAX_DEVICES; ++i) {
    info->compute_capability[i] = -1;
    info->image_error[i] = -1;
  }
  // Neither call needs a driver: the version of a missing driver is 0 (and success).
  int driver = 0, runtime = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
  (void)cudaGetLastError();
  info->driver_version = driver;
  info->runtime_version = runtime;

  // cudaGetDeviceCount initializes the driver (cuInit), as torch.cuda.is_available() does;
  // it creates no context. Without libcuda it fails cleanly (cudaErrorInsufficientDriver).
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  (void)cudaGetLastError();  // a failed initialization must not leak into a later check
  info->device_count_error = static_cast<int32_t>(err);
  info->device_count = err == cudaSuccess ? count : 0;
  info->devices_probed =
      info->device_count < BNBF_CUDA_PROBE_MAX_DEVICES ? info->device_count
                                                       : BNBF_CUDA_PROBE_MAX_DEVICES;
  for (int d = 0; d < info->devices_probed; ++d) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d) == cudaSuccess)
      info->compute_capability[d] = 10 * major + minor;
    (void)cudaGetLastError();
  }

  // A CUDA X.y runtime runs on any driver of CUDA X.0 or newer (minor version compatibility).
  const int needed = runtime / 1000 * 1000;
  if (driver == 0) {
    probe_message(info, "no NVIDIA driver found (libcuda could not be loaded: %s); the CUDA "
                  "%d.%d runtime of this library needs a CUDA %d.0 driver or newer",
                  cudaGetErrorName(err), runtime / 1000, runtime % 1000 / 10, runtime / 1000);
    return probe_fail(info);
  }
  if (driver < needed) {
    probe_message(info, "driver too old: the NVIDIA driver supports CUDA %d.%d, the CUDA %d.%d "
                  "runtime of this library needs a CUDA %d.0 driver or newer",
                  driver / 1000, driver % 1000 / 10, runtime / 1000, runtime % 1000 / 10,
                  runtime / 1000);
    return probe_fail(info);
  }
  if (err != cudaSuccess || count == 0) {
    probe_message(info, "no usable CUDA device: cudaGetDeviceCount: %s (%s)",
                  err == cudaSuccess ? "0 devices" : cudaGetErrorString(err),
                  cudaGetErrorName(err));
    return probe_fail(info);
  }

  if (flags & BNBF_CUDA_PROBE_LOAD_IMAGES) {
    info->images_checked = 1;
    int first_bad = -1;
    for (int d = 0; d < info->devices_probed; ++d) {
      bnbf::cuda::DeviceGuard guard(d);  // restores the caller's device
      cudaError_t e = guard.error();
      if (e == cudaSuccess) {
        cudaFuncAttributes attr;
        e = cudaFuncGetAttributes(&attr, bnbf_probe_kernel);
      }
      (void)cudaGetLastError();  // image errors are not sticky; clear them all the same
      info->image_error[d] = static_cast<int32_t>(e);
      if (e != cudaSuccess && first_bad < 0) first_bad = d;
    }
    if (first_bad >= 0) {
      char arch[32] = "compute capability unknown";
      if (info->compute_capability[first_bad] >= 0)
        snprintf(arch, sizeof(arch), "sm_%d", info->compute_capability[first_bad]);
      probe_message(info, "no kernel image for device %d (%s): %s (%s); the library is "
                    "built for %s", first_bad, arch,
                    cudaGetErrorString(static_cast<cudaError_t>(info->image_error[first_bad])),
                    cudaGetErrorName(static_cast<cudaError_t>(info->image_error[first_bad])),
                    BNBF_CUDA_ARCHS);
      return probe_fail(info);
    }
  }
  probe_message(info, "CUDA driver %d.%d, runtime %d.%d, %d device(s)%s", driver / 1000,
                driver % 1000 / 10, runtime / 1000, runtime % 1000 / 10, count,
                info->images_checked ? ", kernel images load on all" : "");
  return BNBF_OK;
}
