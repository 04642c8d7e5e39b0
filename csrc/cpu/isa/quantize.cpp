// Blockwise quantize / dequantize of fp32, fp16 and bf16 tensors (one pass each).
#include <algorithm>

#include "codec.h"
#include "ceil_div.h"
#include "kernels.h"
#include "runtime.h"

namespace bnbf {
namespace BNBF_ISA_NS {

// Blocks are processed in tiles of at most this many elements through an fp32 buffer on
// the stack, so a 4096-element block costs no heap allocation.
static constexpr int64_t kTile = 4096;

float quantize_block_f32(const QuantMap& map, const float* x, uint8_t* out, int64_t n) {
  float absmax = block_absmax(x, n);
  encode_block(map, x, absmax, out, n);
  return absmax;
}

// load_f32 and block_absmax in one pass (same result as the two calls).
template <int DT>
static float to_f32_absmax(const void* A, int64_t off, float* buf, int64_t len) {
  int64_t i = 0;
  uint32_t m = 0;
#if defined(BNBF_SIMD8)
  __m256i acc = _mm256_setzero_si256();
  for (; i + 8 <= len; i += 8) {
    const __m256 v = load8<DT>(A, off + i);
    _mm256_storeu_ps(buf + i, v);
    acc = _mm256_max_epu32(acc, abs_bits8(v));
  }
  m = hmax8_u32(acc);
#endif
  for (; i < len; ++i) {
    buf[i] = load1<DT>(A, off + i);
    m = std::max(m, abs_bits(buf[i]));
  }
  return absmax_from_bits(m);
}

void quantize_blockwise(const QuantMap& map, const void* A, int dtype, float* absmax,
                        uint8_t* out, int64_t blocksize, int64_t n, int num_threads) {
  const int64_t nblocks = ceil_div(n, blocksize);
  dispatch_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    parallel_for(nblocks, std::max<int64_t>(1, 16384 / blocksize), num_threads,
                 [&](int64_t b0, int64_t b1) {
      alignas(64) float buf[kTile];
      const BlockEncoder encode(map);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
        if (DT == BNBF_F32 && len <= kTile) {
          absmax[b] = quantize_block_f32(map, (const float*)A + start, out + start, len);
          continue;
        }
        if (len <= kTile) {  // convert once (with the absmax); then codes from the tile
          const float m = to_f32_absmax<DT>(A, start, buf, len);
          absmax[b] = m;
          encode(buf, m, out + start, len);
          continue;
        }
        // Larger blocks: two passes over the (cache-resident) block, absmax then codes.
        float m = 0.f;
        for (int64_t t = 0; t < len; t += kTile) {
          int64_t tl = std::min(kTile, len - t);
          load_f32<DT>(A, start + t, buf, tl);
          float mt = block_absmax(buf, tl);
          m = (std::isnan(mt) || mt > m) ? mt : m;
        }
        absmax[b] = m;
        for (int64_t t = 0; t < len; t += kTile) {
          int64_t tl = std::min(kTile, len - t);
          load_f32<DT>(A, start + t, buf, tl);
          encode(buf, m, out + start + t, tl);
        }
      }
    });
  });
}

void dequantize_blockwise(const QuantMap& map, const uint8_t* A, const float* absmax, void* out,
                          int dtype, int64_t blocksize, int64_t n, int num_threads) {
  const int64_t nblocks = ceil_div(n, blocksize);
  dispatch_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    parallel_for(nblocks, std::max<int64_t>(1, 16384 / blocksize), num_threads,
                 [&](int64_t b0, int64_t b1) {
      alignas(64) float buf[kTile];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
        for (int64_t t = 0; t < len; t += kTile) {
          int64_t tl = std::min(kTile, len - t);
          if (DT == BNBF_F32) {
            decode_block(map, A + start + t, absmax[b], (float*)out + start + t, tl);
          } else {
            decode_block(map, A + start + t, absmax[b], buf, tl);
            store_f32<DT>(buf, out, start + t, tl);
          }
        }
      }
    });
  });
}

}  // namespace BNBF_ISA_NS
}  // namespace bnbf
