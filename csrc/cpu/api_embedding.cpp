// C API of the FusionEmbedding lookup: argument and id checks, then the active ISA.
#include "bnbfuse.h"
#include "embedding_check.h"
#include "kernels.h"
#include "runtime.h"

using namespace bnbf;

BNBF_API int bnbf_cpu_fusion_embedding_lookup(const int64_t* ids, int64_t n, const void* base,
                                              int bits, const float* absmax, const float* qmap,
                                              int64_t vocab_size, const void* fusion,
                                              int64_t fusion_vocab_size, int64_t embed_dim,
                                              int64_t blocksize, void* out, int dtype,
                                              int num_threads) {
  if (int rc = bnbf::check_lookup_args(ids, n, base, bits, absmax, qmap, vocab_size, fusion,
                                       fusion_vocab_size, embed_dim, blocksize, out, dtype))
    return rc;
  if (n == 0) return BNBF_OK;
  // One cheap pass over the ids before any row is read: the kernel never indexes out of
  // bounds, and the message names the first bad position.
  const int64_t total = vocab_size + fusion_vocab_size;
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= total)
      return fail(BNBF_E_INDEX, "token id %lld at flat position %lld is out of range [0, %lld)",
                  (long long)ids[i], (long long)i, (long long)total);
  }
  // An 8-bit base decodes through the prepared map (byte planes), cached per distinct map
  // like the quantize and optimizer kernels' maps, and held for the call (the cache may
  // evict it meanwhile). No base rows: qmap may be null.
  const auto map = bits == 8 && vocab_size > 0 ? quant_map(qmap) : nullptr;
  BNBF_CPU_CALL(fusion_embedding_lookup, ids, n, base, bits, absmax, map.get(), qmap, vocab_size,
                fusion, embed_dim, blocksize, out, dtype, num_threads);
  return BNBF_OK;
}
