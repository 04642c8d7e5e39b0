// Fused gather + dequantize of embedding rows with new-token routing (FusionEmbedding).
//
// Only the rows a batch gathers are touched: a token's row is copied (fusion table or a float
// base) or dequantized block by block (int8 / NF4 base) straight into the output, by the
// block codecs every CPU kernel uses (codec.h: byte planes and a one-register 16-value map
// on AVX-512 VBMI, blockquant.h's loops otherwise).
#include <algorithm>
#include <cstring>

#include "ceil_div.h"
#include "codec.h"
#include "kernels.h"
#include "runtime.h"
#include "simd.h"

namespace bnbf {
namespace BNBF_ISA_NS {

// Ids are random, so the hardware prefetchers only start on a row once it is being read
// and every row begins with misses; asking for the row two tokens ahead hides them (4096
// fresh random ids, 1 KiB int8 rows, one thread on a Xeon with AVX-512: 1.7 ms -> 1.3 ms on
// both the avx2 and avx512vbmi paths; 1 to 4 tokens ahead measured the same, 8 slower).
// Normal stores, not streaming ones: the 16 MiB output of such a batch stays in that CPU's
// large L3, and streaming it out measured no faster (slower without the prefetch).
static constexpr int64_t kAhead = 2;

// The first 4 KiB of [p, p + n): beyond them the hardware's stream prefetch has the row.
// always_inline: GCC finds a function of prefetches free of side effects and deletes its
// calls when it does not inline them (seen at -O3 in this kernel: no prefetch was left).
__attribute__((always_inline)) static inline void prefetch_bytes(const void* p, int64_t n) {
  const char* c = (const char*)p;
  n = std::min<int64_t>(n, 4096);
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(c + o);
  __builtin_prefetch(c + n - 1);  // the last line when p is not line-aligned
}

void fusion_embedding_lookup(const int64_t* ids, int64_t n, const void* base, int bits,
                             const float* absmax, const QuantMap* map, const float* qmap,
                             int64_t vocab_size, const void* fusion, int64_t embed_dim,
                             int64_t blocksize, void* out, int dtype, int num_threads) {
  const int64_t D = embed_dim;
  const int64_t esize = dtype == BNBF_F32 ? 4 : 2;
  const int64_t row_bytes = D * esize;
  const int64_t nblk = bits ? ceil_div(D, blocksize) : 0;
  const int64_t code_cols = bits == 8 ? D : (D + 1) / 2;
  // ~16 KiB of output per chunk keeps the pool's overhead small for narrow tables.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_bytes));
  dispatch_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    parallel_for(n, grain, num_threads, [&](int64_t t0, int64_t t1) {
      alignas(64) float buf[256];
      for (int64_t t = t0; t < t1; ++t) {
        if (t + kAhead < t1) {
          const int64_t next = ids[t + kAhead];
          if (next >= vocab_size) {
            prefetch_bytes((const char*)fusion + (next - vocab_size) * row_bytes, row_bytes);
          } else if (bits == 0) {
            prefetch_bytes((const char*)base + next * row_bytes, row_bytes);
          } else {
            prefetch_bytes((const uint8_t*)base + next * code_cols, code_cols);
            prefetch_bytes(absmax + next * nblk, nblk * 4);
          }
        }
        const int64_t id = ids[t];
        char* dst = (char*)out + t * row_bytes;
        if (id >= vocab_size) {
          std::memcpy(dst, (const char*)fusion + (id - vocab_size) * row_bytes, row_bytes);
          continue;
        }
        if (bits == 0) {
          std::memcpy(dst, (const char*)base + id * row_bytes, row_bytes);
          continue;
        }
        const uint8_t* row = (const uint8_t*)base + id * code_cols;
        const float* am = absmax + id * nblk;
        for (int64_t b = 0; b < nblk; ++b) {
          const int64_t j0 = b * blocksize, len = std::min(blocksize, D - j0);
          // Half-type output goes through the L1 buffer in pieces of 256 (any blocksize).
          for (int64_t k = 0; k < len; k += 256) {
            const int64_t kl = std::min<int64_t>(256, len - k);
            float* f = DT == BNBF_F32 ? (float*)out + t * D + j0 + k : buf;
            if (bits == 8) decode_block(*map, row + j0 + k, am[b], f, kl);
            else decode_nibbles(qmap, row, j0 + k, am[b], f, kl);
            if (DT != BNBF_F32) store_f32<DT>(buf, out, t * D + j0 + k, kl);
          }
        }
      }
    });
  });
}

}  // namespace BNBF_ISA_NS
}  // namespace bnbf
