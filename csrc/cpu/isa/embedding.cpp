// Fused gather + dequantize of embedding rows with new-token routing (FusionEmbedding).
//
// Only the rows a batch gathers are touched: a token's row is copied (fusion table or a float
// base) or dequantized block by block (int8 / NF4 base) straight into the output.
#include <algorithm>
#include <cstring>

#include "ceil_div.h"
#include "kernels.h"
#include "runtime.h"
#include "simd.h"

namespace bnbf {
namespace BNBF_ISA_NS {

// fp32 values of `len` elements of one row, starting at element `j0` (a block start).
// Table loads are scalar: vgatherdps is microcoded and slower than 8 loads on several CPUs
// (AMD Zen); the multiply is vectorised.
static inline void dequant_int8(const uint8_t* codes, const float* qmap, float scale, float* dst,
                                int64_t len) {
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  const __m256 s = _mm256_set1_ps(scale);
  for (; i + 8 <= len; i += 8) {
    __m256 v = _mm256_setr_ps(qmap[codes[i]], qmap[codes[i + 1]], qmap[codes[i + 2]],
                              qmap[codes[i + 3]], qmap[codes[i + 4]], qmap[codes[i + 5]],
                              qmap[codes[i + 6]], qmap[codes[i + 7]]);
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(v, s));
  }
#endif
  for (; i < len; ++i) dst[i] = qmap[codes[i]] * scale;
}

// bnbfuse's int8 table map is value(c) = (c - 127) / 127 (c = 255 repeats 1). For it the value
// is computed, not loaded: the float32 division is correctly rounded, so this equals the
// table entry bit for bit (the map was built by the same division in float32).
static bool is_linear_int8_map(const float* qmap) {
  for (int c = 0; c < 255; ++c)
    if (qmap[c] != (float)(c - 127) / 127.f) return false;
  return qmap[255] == 1.f;
}

static inline void dequant_int8_linear(const uint8_t* codes, float scale, float* dst,
                                       int64_t len) {
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  const __m256 s = _mm256_set1_ps(scale), d = _mm256_set1_ps(127.f), one = _mm256_set1_ps(1.f);
  const __m256i z = _mm256_set1_epi32(127);
  for (; i + 8 <= len; i += 8) {
    __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(codes + i)));
    __m256 v = _mm256_div_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, z)), d);
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_min_ps(v, one), s));
  }
#endif
  for (; i < len; ++i) {
    float v = (float)((int)codes[i] - 127) / 127.f;
    dst[i] = (v > 1.f ? 1.f : v) * scale;
  }
}

// NF4: element e of the row sits in byte e/2, high nibble when e is even.
static inline float nf4_at(const uint8_t* row, const float* qmap, int64_t e) {
  uint8_t b = row[e >> 1];
  return qmap[(e & 1) ? (b & 15) : (b >> 4)];
}

static inline void dequant_nf4(const uint8_t* row, const float* qmap, float scale, float* dst,
                               int64_t j0, int64_t len) {
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  if ((j0 & 1) == 0) {
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 lo_map = _mm256_loadu_ps(qmap), hi_map = _mm256_loadu_ps(qmap + 8);
    // bytes b0 b0 b1 b1 b2 b2 b3 b3 -> 8 lanes; even lanes shift by 4 (high nibble first)
    const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    const __m256i nib = _mm256_set1_epi32(15), seven = _mm256_set1_epi32(7);
    const uint8_t* p = row + (j0 >> 1);
    for (; i + 8 <= len; i += 8) {
      uint32_t four;
      std::memcpy(&four, p + (i >> 1), 4);
      __m128i b = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)four), dup);
      __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), shifts), nib);
      __m256 lo = _mm256_permutevar8x32_ps(lo_map, idx);
      __m256 hi = _mm256_permutevar8x32_ps(hi_map, idx);
      __m256 high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_blendv_ps(lo, hi, high), s));
    }
  }
#endif
  for (; i < len; ++i) dst[i] = nf4_at(row, qmap, j0 + i) * scale;
}

void fusion_embedding_lookup(const int64_t* ids, int64_t n, const void* base, int bits,
                             const float* absmax, const float* qmap, int64_t vocab_size,
                             const void* fusion, int64_t embed_dim, int64_t blocksize, void* out,
                             int dtype, int num_threads) {
  const int64_t D = embed_dim;
  const int64_t esize = dtype == BNBF_F32 ? 4 : 2;
  const int64_t row_bytes = D * esize;
  const int64_t nblk = bits ? ceil_div(D, blocksize) : 0;
  const int64_t code_cols = bits == 8 ? D : (D + 1) / 2;
  // No base rows (vocab_size 0): qmap may be null, and is never read.
  const bool linear = bits == 8 && vocab_size > 0 && is_linear_int8_map(qmap);
  // ~16 KiB of output per chunk keeps the pool's overhead small for narrow tables.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_bytes));
  dispatch_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    parallel_for(n, grain, num_threads, [&](int64_t t0, int64_t t1) {
      alignas(64) float buf[256];
      for (int64_t t = t0; t < t1; ++t) {
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
          // A block goes through the stack buffer in pieces of 256 (any blocksize works).
          for (int64_t k = 0; k < len; k += 256) {
            const int64_t kl = std::min<int64_t>(256, len - k);
            // float32 output is written in place; half types go through the buffer.
            float* dst = DT == BNBF_F32 ? (float*)out + t * D + j0 + k : buf;
            if (linear) dequant_int8_linear(row + j0 + k, am[b], dst, kl);
            else if (bits == 8) dequant_int8(row + j0 + k, qmap, am[b], dst, kl);
            else dequant_nf4(row, qmap, am[b], dst, j0 + k, kl);
            if (DT != BNBF_F32) store_f32<DT>(buf, out, t * D + j0 + k, kl);
          }
        }
      }
    });
  });
}

}  // namespace BNBF_ISA_NS
}  // namespace bnbf
