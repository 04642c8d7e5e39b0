// Argument checks of the fusion-embedding lookup C API, shared by the CPU
// (api_embedding.cpp) and CUDA (csrc/cuda/embedding.cu) entry points so both reject the
// same inputs with the same text. Ids themselves are bounds-checked by each kernel.
#pragma once
#include <stdint.h>

#include "bnbfuse.h"
#include "errors.h"

namespace bnbf {

inline int check_lookup_args(const int64_t* ids, int64_t n, const void* base, int bits,
                             const float* absmax, const float* qmap, int64_t vocab_size,
                             const void* fusion, int64_t fusion_vocab_size, int64_t embed_dim,
                             int64_t blocksize, const void* out, int dtype) {
  if (n < 0) return fail(BNBF_E_ARG, "n must be >= 0, got %lld", (long long)n);
  if (bits != 0 && bits != 4 && bits != 8)
    return fail(BNBF_E_ARG, "bits must be 0, 4 or 8, got %d", bits);
  if (dtype != BNBF_F32 && dtype != BNBF_F16 && dtype != BNBF_BF16)
    return fail(BNBF_E_ARG, "unsupported dtype code %d", dtype);
  if (vocab_size < 0 || fusion_vocab_size < 0 || embed_dim < 1 ||
      vocab_size > INT64_MAX - fusion_vocab_size)
    return fail(BNBF_E_ARG, "bad table sizes: vocab %lld, fusion %lld, dim %lld",
                (long long)vocab_size, (long long)fusion_vocab_size, (long long)embed_dim);
  if (bits != 0 && blocksize < 1)
    return fail(BNBF_E_ARG, "blocksize must be >= 1, got %lld", (long long)blocksize);
  if (n == 0) return BNBF_OK;
  if (!ids || !out) return fail(BNBF_E_ARG, "null ids or out");
  if (vocab_size > 0 && (!base || (bits != 0 && (!absmax || !qmap))))
    return fail(BNBF_E_ARG, "null base table, absmax or qmap");
  if (fusion_vocab_size > 0 && !fusion) return fail(BNBF_E_ARG, "null fusion table");
  return BNBF_OK;
}

}  // namespace bnbf
