// Paged optimizer state: CUDA managed memory that the driver may evict to host memory under
// pressure, handed to PyTorch as a DLPack tensor (so the tensor's deleter frees it), and
// prefetched to the GPU (or to the host) on a stream before the step that reads it.
#include <cstdlib>

#include "common.cuh"

namespace {

// The DLPack ABI (dlpack.h, v0.8 and later: stable since 2017), declared here so that the
// library needs no header beyond the CUDA runtime.
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};
constexpr int32_t kDLCUDA = 2;  // managed memory is valid device memory on every GPU
constexpr uint8_t kDLUInt = 1;

// One allocation: the DLPack record and the shape it points to live together.
struct PagedBuffer {
  DLManagedTensor managed;
  int64_t shape[1];
};

void free_paged(DLManagedTensor* self) {
  if (self == nullptr) return;
  auto* buf = static_cast<PagedBuffer*>(self->manager_ctx);
  // cudaFree synchronizes the device, so no kernel still reads the pages being freed.
  (void)cudaFree(buf->managed.dl_tensor.data);
  (void)cudaGetLastError();
  std::free(buf);
}

bool supports_prefetch(int device) {
  int concurrent = 0;
  if (cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return concurrent != 0;
}

}  // namespace

BNBF_API int bnbf_cuda_paged_alloc(int64_t nbytes, int32_t device, void** out) {
  using namespace bnbf;
  if (out == nullptr) return fail(BNBF_E_ARG, "bnbf_cuda_paged_alloc: out is NULL");
  *out = nullptr;
  if (nbytes < 1) return fail(BNBF_E_ARG, "bnbf_cuda_paged_alloc: nbytes must be >= 1, got %lld",
                              static_cast<long long>(nbytes));
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return cuda::fail_cuda(err, "bnbf_cuda_paged_alloc");
  if (device < 0 || device >= count)
    return fail(BNBF_E_ARG, "bnbf_cuda_paged_alloc: no CUDA device %d (%d present)", device,
                count);
  auto* buf = static_cast<PagedBuffer*>(std::calloc(1, sizeof(PagedBuffer)));
  if (buf == nullptr) return fail(BNBF_E_ARG, "bnbf_cuda_paged_alloc: out of host memory");
  void* data = nullptr;
  {
    cuda::DeviceGuard guard(device);
    err = cudaMallocManaged(&data, static_cast<size_t>(nbytes), cudaMemAttachGlobal);
  }
  if (err != cudaSuccess) {
    std::free(buf);
    return cuda::fail_cuda(err, "bnbf_cuda_paged_alloc: cudaMallocManaged");
  }
  buf->shape[0] = nbytes;
  DLTensor& t = buf->managed.dl_tensor;
  t.data = data;
  t.device = DLDevice{kDLCUDA, device};
  t.ndim = 1;
  t.dtype = DLDataType{kDLUInt, 8, 1};
  t.shape = buf->shape;
  t.strides = nullptr;  // compact
  t.byte_offset = 0;
  buf->managed.manager_ctx = buf;
  buf->managed.deleter = free_paged;
  *out = &buf->managed;
  return BNBF_OK;
}

// For a DLPack record that was never handed to a consumer (the caller's error path).
BNBF_API void bnbf_cuda_paged_free(void* managed) {
  free_paged(static_cast<DLManagedTensor*>(managed));
}

BNBF_API int bnbf_cuda_prefetch(const void* ptr, int64_t nbytes, int32_t device, void* stream) {
  using namespace bnbf;
  if (ptr == nullptr || nbytes < 1) return BNBF_OK;  // nothing to move
  cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) return cuda::fail_cuda(err, "bnbf_cuda_prefetch");
  if (attr.type != cudaMemoryTypeManaged)
    return fail(BNBF_E_ARG, "bnbf_cuda_prefetch: the buffer is not CUDA managed memory");
  // Without concurrent managed access (some platforms) the driver migrates pages on demand
  // only; a prefetch would fail, and skipping it is correct.
  int probe = device >= 0 ? device : attr.device;
  if (probe < 0) (void)cudaGetDevice(&probe);
  if (!supports_prefetch(probe)) return BNBF_OK;
  auto s = static_cast<cudaStream_t>(stream);
#if CUDART_VERSION >= 13000
  cudaMemLocation where{};
  where.type = device >= 0 ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
  where.id = device >= 0 ? device : 0;
  err = cudaMemPrefetchAsync(ptr, static_cast<size_t>(nbytes), where, 0, s);
#else
  err = cudaMemPrefetchAsync(ptr, static_cast<size_t>(nbytes),
                             device >= 0 ? device : cudaCpuDeviceId, s);
#endif
  if (err != cudaSuccess) return cuda::fail_cuda(err, "bnbf_cuda_prefetch: cudaMemPrefetchAsync");
  return BNBF_OK;
}
