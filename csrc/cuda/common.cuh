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

// ---- element conversion, bit-identical to the x86 CPU kernels (csrc/cpu/isa/simd.h) ----
// Finite values round to nearest even, as everywhere. NaN follows the x86 conversion
// instructions that the CPU kernels' vector bodies use (F16C vcvtph2ps / vcvtps2ph; the
// scalar tails and the generic build do the same in integers): fp16 -> fp32 keeps the sign
// and payload and sets the quiet bit; fp32 -> fp16 keeps the sign and the top 10 payload
// bits and sets the quiet bit (0x7E00 | sign for the usual NaNs); fp32 -> bf16 keeps the
// sign and the top 7 payload bits and sets the quiet bit. The CUDA intrinsics differ
// (__float2half_rn gives 0x7FFF for every NaN), hence the NaN branches below.
template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) {
  const uint32_t h = __half_as_ushort(v);
  if ((h & 0x7C00u) == 0x7C00u && (h & 0x3FFu) != 0u)
    return __uint_as_float(((h & 0x8000u) << 16) | 0x7FC00000u | ((h & 0x3FFu) << 13));
  return __half2float(v);  // exact for every non-NaN half
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __uint_as_float((uint32_t)__bfloat16_as_ushort(v) << 16);  // exact, NaN bits too
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  const uint32_t b = __float_as_uint(v);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u)
    return __ushort_as_half((uint16_t)(((b >> 16) & 0x8000u) | 0x7E00u | ((b >> 13) & 0x3FFu)));
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  // Written out (not __float2bfloat16_rn) so that NaN bits match the CPU kernels too.
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

// ---- NaN results as x86 computes them ------------------------------------------------------
// GPU float arithmetic returns one canonical NaN (0x7FFFFFFF) whatever its inputs; x86 SSE/AVX
// returns the NaN operand, quieted (the first one if both are NaN), and for an invalid
// operation on non-NaN operands (0 * inf, inf - inf) its default NaN, 0xFFC00000 (negative).
// Outputs whose NaN bits the CPU kernels define are rebuilt with these, so that a NaN
// parameter, absmax or table scale comes out of the CUDA kernels with the CPU's bits.
constexpr uint32_t kX86DefaultNaN = 0xFFC00000u;

__device__ __forceinline__ float quieted(float x) {
  return __uint_as_float(__float_as_uint(x) | 0x00400000u);
}

// r = a op b (any operation whose only possible NaN operands are a and b): r with x86's
// NaN bits.
__device__ __forceinline__ float x86_nan_result(float r, float a, float b) {
  if (!isnan(r)) return r;
  if (isnan(a)) return quieted(a);
  if (isnan(b)) return quieted(b);
  return __uint_as_float(kX86DefaultNaN);
}

// a * b with x86's NaN bits (dequantization: map value times block scale).
__device__ __forceinline__ float mul_x86(float a, float b) {
  return x86_nan_result(__fmul_rn(a, b), a, b);
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
