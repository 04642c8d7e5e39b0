// The block codecs every CPU kernel uses (quantize/dequantize, the optimizer's state, the
// embedding lookup): the AVX-512 VBMI primitives where this build has them (vbmi.h),
// blockquant.h's otherwise. Both give the same bits.
#pragma once
#include "blockquant.h"
#include "vbmi.h"

namespace bnbf {
namespace BNBF_ISA_NS {

// Quantizes blocks with one map: out[i] = code index nearest x[i] / absmax (see
// quantize_scaled). Built once for many blocks, since what the VBMI encoder keeps in
// registers (RunRegs) costs about as much to set up as a small block to encode.
// nonnegative: a hint that no x has its sign bit set.
class BlockEncoder {
 public:
  explicit BlockEncoder(const QuantMap& m)
      : m_(m)
#if defined(BNBF_HAVE_VBMI_PRIMITIVES)
        , regs_(m)
#endif
  {
  }
  void operator()(const float* x, float absmax, uint8_t* out, int64_t n,
                  bool keep_positive = false, bool nonnegative = false) const {
#if defined(BNBF_HAVE_VBMI_PRIMITIVES)
    quantize_fast(m_, regs_, x, absmax, out, n, keep_positive, nonnegative);
#else
    (void)nonnegative;
    quantize_scaled(m_, x, absmax, out, n, keep_positive);
#endif
  }

 private:
  const QuantMap& m_;
#if defined(BNBF_HAVE_VBMI_PRIMITIVES)
  RunRegs regs_;
#endif
};

// One block: BlockEncoder(m)(x, absmax, out, n, ...)
inline void encode_block(const QuantMap& m, const float* x, float absmax, uint8_t* out,
                         int64_t n, bool keep_positive = false, bool nonnegative = false) {
  BlockEncoder{m}(x, absmax, out, n, keep_positive, nonnegative);
}

// out[i] = code[c[i]] * absmax
inline void decode_block(const QuantMap& m, const uint8_t* c, float absmax, float* out,
                         int64_t n) {
#if defined(BNBF_HAVE_VBMI_PRIMITIVES)
  dequantize_planes(m, c, absmax, out, n);
#else
  dequantize_scaled(m, c, absmax, out, n);
#endif
}

// out[i] = map16[nibble e0 + i] * absmax: 4-bit codes, two per byte (nibble_at), 16 values
inline void decode_nibbles(const float* map16, const uint8_t* packed, int64_t e0, float absmax,
                           float* out, int64_t n) {
#if defined(BNBF_HAVE_VBMI_PRIMITIVES)
  dequantize_nibbles_perm(map16, packed, e0, absmax, out, n);
#else
  dequantize_nibbles_scaled(map16, packed, e0, absmax, out, n);
#endif
}

}  // namespace BNBF_ISA_NS
}  // namespace bnbf
