// C API of the blockwise quantization kernels: argument checks, then the active ISA.
#include "bnbfuse.h"
#include "kernels.h"
#include "qmap.h"
#include "runtime.h"

using namespace bnbf;

static int check_common(const float* code, const void* A, const float* absmax, const void* out,
                        int dtype, int64_t blocksize, int64_t n) {
  if (n < 0) return fail(BNBF_E_ARG, "n must be >= 0, got %lld", (long long)n);
  if (blocksize < 1) return fail(BNBF_E_ARG, "blocksize must be >= 1, got %lld", (long long)blocksize);
  if (dtype != BNBF_F32 && dtype != BNBF_F16 && dtype != BNBF_BF16)
    return fail(BNBF_E_ARG, "unsupported dtype code %d", dtype);
  if (n > 0 && (!code || !A || !absmax || !out)) return fail(BNBF_E_ARG, "null pointer");
  return BNBF_OK;
}

BNBF_API int bnbf_cpu_quantize_blockwise(const float* code, const void* A, int dtype,
                                         float* absmax, uint8_t* out, int64_t blocksize,
                                         int64_t n, int num_threads) {
  if (int rc = check_common(code, A, absmax, out, dtype, blocksize, n)) return rc;
  if (n == 0) return BNBF_OK;
  BNBF_CPU_CALL(quantize_blockwise, *quant_map(code), A, dtype, absmax, out, blocksize, n,
                num_threads);
  return BNBF_OK;
}

BNBF_API int bnbf_cpu_dequantize_blockwise(const float* code, const uint8_t* A,
                                           const float* absmax, void* out, int dtype,
                                           int64_t blocksize, int64_t n, int num_threads) {
  if (int rc = check_common(code, A, absmax, out, dtype, blocksize, n)) return rc;
  if (n == 0) return BNBF_OK;
  BNBF_CPU_CALL(dequantize_blockwise, *quant_map(code), A, absmax, out, dtype, blocksize, n,
                num_threads);
  return BNBF_OK;
}

BNBF_API int bnbf_cpu_qmap_cache_size(void) { return quant_map_cache_size(); }
