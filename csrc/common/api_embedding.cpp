// C API of the FusionEmbedding lookup: argument and id checks, then the active ISA.
#include "bnbfuse.h"
#include "kernels.h"
#include "runtime.h"

using namespace bnbf;

BNBF_API int bnbf_cpu_fusion_embedding_lookup(const int64_t* ids, int64_t n, const void* base,
                                              int bits, const float* absmax, const float* qmap,
                                              int64_t vocab_size, const void* fusion,
                                              int64_t fusion_vocab_size, int64_t embed_dim,
                                              int64_t blocksize, void* out, int dtype,
                                              int num_threads) {
  if (n < 0) return fail(BNBF_E_ARG, "n must be >= 0, got %lld", (long long)n);
  if (bits != 0 && bits != 4 && bits != 8) return fail(BNBF_E_ARG, "bits must be 0, 4 or 8, got %d", bits);
  if (dtype != BNBF_F32 && dtype != BNBF_F16 && dtype != BNBF_BF16)
    return fail(BNBF_E_ARG, "unsupported dtype code %d", dtype);
  if (vocab_size < 0 || fusion_vocab_size < 0 || embed_dim < 1)
    return fail(BNBF_E_ARG, "bad table sizes: vocab %lld, fusion %lld, dim %lld",
                (long long)vocab_size, (long long)fusion_vocab_size, (long long)embed_dim);
  if (bits != 0 && blocksize < 1)
    return fail(BNBF_E_ARG, "blocksize must be >= 1, got %lld", (long long)blocksize);
  if (n == 0) return BNBF_OK;
  if (!ids || !out) return fail(BNBF_E_ARG, "null ids or out");
  if (vocab_size > 0 && (!base || (bits != 0 && (!absmax || !qmap))))
    return fail(BNBF_E_ARG, "null base table, absmax or qmap");
  if (fusion_vocab_size > 0 && !fusion) return fail(BNBF_E_ARG, "null fusion table");
  // One cheap pass over the ids before any row is read: the kernel never indexes out of
  // bounds, and the message names the first bad position.
  const int64_t total = vocab_size + fusion_vocab_size;
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= total)
      return fail(BNBF_E_INDEX, "token id %lld at flat position %lld is out of range [0, %lld)",
                  (long long)ids[i], (long long)i, (long long)total);
  }
  BNBF_CPU_CALL(fusion_embedding_lookup, ids, n, base, bits, absmax, qmap, vocab_size, fusion,
                embed_dim, blocksize, out, dtype, num_threads);
  return BNBF_OK;
}
