// Shared helpers of the CUDA kernels: error reporting, argument checks, launch geometry,
// element conversion. Included by every csrc/cuda/*.cu file.
//
// The CUDA library is a separate shared object from the CPU one; both compile
// csrc/common/errors.cpp, so each has its own bnbf::fail / bnbf_last_error.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "bnbfuse.h"
#include "errors.h"

namespace bnbf {

namespace cuda {

// BNBF_E_CUDA with cudaGetErrorString(err) and what was being done.
int fail_cuda(cudaError_t err, const char* what);

// Checks that p is device (or managed) memory and returns its device in *dev. Host
// pointers are rejected here, because a kernel dereferencing one would fault.
int device_of(const void* p, const char* name, int* dev);

// The one device of the non-null buffers ptrs[0..count) (named by names[]): each must be
// device memory, all of the same GPU. The entry points launch there, under a DeviceGuard.
int common_device(int count, const void* const* ptrs, const char* const* names, int* dev);

// Number of multiprocessors of `dev` (cached).
int sm_count(int dev);

// Makes `dev` the current device for the lifetime of the guard (kernels must be launched
// on the device of their tensors and of the stream, which need not be the current one).
class DeviceGuard {
 public:
  explicit DeviceGuard(int dev) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != dev) err_ = cudaSetDevice(dev);
  }
  ~DeviceGuard() {
    int cur = -1;
    if (prev_ >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  cudaError_t error() const { return err_; }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
  cudaError_t err_ = cudaSuccess;
};

// ---- element conversion (round to nearest even, bit-identical to csrc/cpu/isa/simd.h) ----
template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  // Written out (not __float2bfloat16_rn) so that NaN payloads match the CPU kernels too.
  uint32_t b = __float_as_uint(v);
  uint16_t h;
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) {
    h = (uint16_t)((b >> 16) | 0x40u);
  } else {
    b += 0x7FFFu + ((b >> 16) & 1u);
    h = (uint16_t)(b >> 16);
  }
  return __ushort_as_bfloat16(h);
}

// Calls f(T{}) with T the element type of a BNBF_* dtype code; false if unknown.
template <typename F>
inline bool dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case BNBF_F32: f(float{}); return true;
    case BNBF_F16: f(__half{}); return true;
    case BNBF_BF16: f(__nv_bfloat16{}); return true;
    default: return false;
  }
}

}  // namespace cuda
}  // namespace bnbf
