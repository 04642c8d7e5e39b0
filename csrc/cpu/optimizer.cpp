// Fused optimizer updates, 8-bit blockwise and 32-bit state, for every optimizer rule.
//
// One template (run_blocks) serves all optimizers: the rule (csrc/common/optim_rule.h) is a
// template parameter, and so are the parameter dtype, the state precision and whether the
// call only computes norms. Work goes in blocks of 256 elements (the 8-bit quantization
// block, also used for 32-bit state so both paths share the loop): per block, p/g and the
// dequantized state are brought into fp32 buffers on the stack, the rule runs over them in
// a loop the compiler vectorises (no branches: the non-finite-gradient policy is a select),
// and p and the requantized state are written back. Memory is therefore touched once per
// step: read p, g, codes, absmax; write p, codes, absmax.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "blockquant.h"
#include "kernels.h"
#include "optim_rule.h"
#include "runtime.h"

namespace bnbf {
namespace BNBF_ISA_NS {
namespace {

// ---- fast exact requantization ---------------------------------------------------------
// QuantMap::nearest needs two table lookups per element (a 64 KB guess table, then the
// threshold), and the guess table does not stay in L1 beside the optimizer's buffers. Here
// one 32 KB table answers with one lookup, still exactly: the key of y = x/absmax
// (|y| <= 1) is sign | clamp(exponent - 96, 0, 31) | top 7 mantissa bits, i.e. the same
// 16-bit bins as QuantMap's guess table for |y| >= 2^-30 and one merged bin per sign below.
// An entry holds the code of the bin's lowest value (bits 16..23), the code one threshold up
// (bits 24..31) and the low 16 bits of the one threshold inside the bin (bits 0..15), which
// shares the bin's top 16 bits, so `x >= thr` is an integer compare of the low halves.
// Usable when no bin holds two thresholds and no threshold is below 2^-30 in magnitude
// (true for the dynamic maps); otherwise the kernels use quantize_scaled.
struct FastQuant {
  bool usable = false;
  uint8_t zero_code = 0, min_positive_code = 0;
  alignas(64) uint32_t entry[8192];
};

constexpr int kFastExpBase = 96;

inline uint32_t fast_key(uint32_t bits) {
  const uint32_t s = bits >> 31, e = (bits >> 23) & 0xFFu, m7 = (bits >> 16) & 0x7Fu;
  int ec = (int)e - kFastExpBase;
  ec = ec < 0 ? 0 : (ec > 31 ? 31 : ec);
  return (s << 12) | ((uint32_t)ec << 7) | m7;
}

void build_fast(FastQuant& f, const QuantMap& m) {
  f.zero_code = m.zero_code;
  f.min_positive_code = m.min_positive_code;
  auto count_leq = [&](float x) {
    int c = 0;
    for (int k = 0; k < 255; ++k) c += m.thr[k] <= x;
    return c;
  };
  for (int k = 0; k < 255; ++k) {
    uint32_t b;
    std::memcpy(&b, &m.thr[k], 4);
    if ((int)((b >> 23) & 0xFFu) <= kFastExpBase) return;  // a threshold in the merged bin
  }
  for (uint32_t key = 0; key < 8192; ++key) {
    const uint32_t s = key >> 12, ec = (key >> 7) & 31u, m7 = key & 0x7Fu;
    const uint32_t top16 = (s << 15) | ((ec + kFastExpBase) << 7) | m7;
    int n_in = 0;
    uint32_t low = 0;
    float t_in = 0.f;
    for (int k = 0; k < 255; ++k) {
      uint32_t b;
      std::memcpy(&b, &m.thr[k], 4);
      if (ec > 0 && (b >> 16) == top16) {
        ++n_in;
        low = b & 0xFFFFu;
        t_in = m.thr[k];
      }
    }
    if (n_in > 1) return;
    float lowest;  // the bin's smallest value (bits with the largest magnitude if negative)
    if (ec == 0) {
      lowest = 0.f;
    } else {
      const uint32_t lb = (top16 << 16) | (s ? 0xFFFFu : 0u);
      std::memcpy(&lowest, &lb, 4);
    }
    // thresholds below the bin; the one inside it (even if equal to `lowest`) is the compare
    const int j = count_leq(lowest) - (n_in && t_in <= lowest ? 1 : 0);
    const uint8_t lo_code = m.sorted_to_code[j];
    const uint8_t hi_code = n_in ? m.sorted_to_code[std::min(j + 1, 255)] : lo_code;
    f.entry[key] = (uint32_t)hi_code << 24 | (uint32_t)lo_code << 16 | low;
  }
  f.usable = true;
}

const FastQuant* fast_quant(const QuantMap& m) {
  static std::mutex mu;
  static std::unordered_map<const QuantMap*, std::unique_ptr<FastQuant>> cache;
  std::lock_guard<std::mutex> lk(mu);
  auto& slot = cache[&m];  // QuantMaps live forever, so their address is a stable key
  if (!slot) {
    slot.reset(new FastQuant());
    build_fast(*slot, m);
  }
  return slot->usable ? slot.get() : nullptr;
}

inline uint8_t fast_nearest(const FastQuant& f, float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, 4);
  const uint32_t e = f.entry[fast_key(bits)];
  const uint32_t low = bits & 0xFFFFu, tl = e & 0xFFFFu;
  const bool up = (bits >> 31) ? low <= tl : low >= tl;
  return (uint8_t)(up ? e >> 24 : (e >> 16) & 0xFFu);
}

// Exact nearest codes of x[i] / divisor(absmax): same result as quantize_scaled.
void quantize_fast(const FastQuant& f, const float* x, float absmax, uint8_t* out, int64_t n,
                   bool keep_positive) {
  const float d = block_divisor(absmax);
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  const __m256 dv = _mm256_set1_ps(d);
  const __m256i k0xff = _mm256_set1_epi32(0xFF), k0xffff = _mm256_set1_epi32(0xFFFF),
                k0x7f = _mm256_set1_epi32(0x7F), kbase = _mm256_set1_epi32(kFastExpBase),
                k31 = _mm256_set1_epi32(31), kzero = _mm256_setzero_si256();
  const __m256i zero_code = _mm256_set1_epi32(f.zero_code),
                min_pos = _mm256_set1_epi32(f.min_positive_code);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256i bits = _mm256_castps_si256(_mm256_div_ps(v, dv));
    const __m256i sgn = _mm256_srli_epi32(bits, 31);
    __m256i ec = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), k0xff), kbase);
    ec = _mm256_min_epi32(_mm256_max_epi32(ec, kzero), k31);
    const __m256i key = _mm256_or_si256(
        _mm256_or_si256(_mm256_slli_epi32(sgn, 12), _mm256_slli_epi32(ec, 7)),
        _mm256_and_si256(_mm256_srli_epi32(bits, 16), k0x7f));
    const __m256i e = _mm256_i32gather_epi32((const int*)f.entry, key, 4);
    const __m256i low = _mm256_and_si256(bits, k0xffff), tl = _mm256_and_si256(e, k0xffff);
    // positive: low >= tl; negative: low <= tl (values are < 2^16: signed compares are fine)
    const __m256i ge = _mm256_cmpgt_epi32(tl, low);   // low < tl
    const __m256i le = _mm256_cmpgt_epi32(low, tl);   // low > tl
    const __m256i neg = _mm256_cmpgt_epi32(sgn, kzero);
    const __m256i up = _mm256_andnot_si256(_mm256_blendv_epi8(ge, le, neg), _mm256_set1_epi32(-1));
    __m256i c = _mm256_blendv_epi8(_mm256_and_si256(_mm256_srli_epi32(e, 16), k0xff),
                                   _mm256_srli_epi32(e, 24), up);
    if (keep_positive) {
      const __m256i fix = _mm256_and_si256(
          _mm256_cmpeq_epi32(c, zero_code),
          _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ)));
      c = _mm256_blendv_epi8(c, min_pos, fix);
    }
    store_bytes8(out + i, c);
  }
#endif
  for (; i < n; ++i) {
    uint8_t c = fast_nearest(f, x[i] / d);
    if (keep_positive && c == f.zero_code && x[i] > 0.f) c = f.min_positive_code;
    out[i] = c;
  }
}

inline void requantize(const FastQuant* f, const QuantMap& m, const float* x, float absmax,
                       uint8_t* out, int64_t n, bool keep_positive) {
  if (f) quantize_fast(*f, x, absmax, out, n, keep_positive);
  else quantize_scaled(m, x, absmax, out, n, keep_positive);
}

// Blocks per thread chunk: 64 blocks = 16k elements, so tensors below that stay on the
// calling thread (waking the pool costs more than the work).
constexpr int64_t kGrainBlocks = 64;

template <int DT>
void load_f32(const void* src, int64_t off, float* buf, int64_t len) {
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  for (; i + 8 <= len; i += 8) _mm256_storeu_ps(buf + i, load8<DT>(src, off + i));
#endif
  for (; i < len; ++i) buf[i] = load1<DT>(src, off + i);
}

template <int DT>
void store_f32(const float* buf, void* dst, int64_t off, int64_t len) {
  int64_t i = 0;
#if defined(BNBF_SIMD8)
  for (; i + 8 <= len; i += 8) store8<DT>(dst, off + i, _mm256_loadu_ps(buf + i));
#endif
  for (; i < len; ++i) store1<DT>(dst, off + i, buf[i]);
}

// The rule over one block, in place. Distinct tensors never overlap, hence __restrict.
template <int OPT>
void update_loop(float* __restrict P, const float* __restrict G, float* __restrict S1,
                 float* __restrict S1B, float* __restrict S2, int64_t len,
                 const bnbf_optim_args& args) {
  using T = OptTraits<OPT>;
  const bnbf_optim_args a = args;  // a local copy: provably not aliased by the stores
  for (int64_t i = 0; i < len; ++i) {
    const float g = G[i];
    const bool ok = opt_finite(g);
    const float p = P[i], s1 = S1[i];
    const float s1b = T::has_m2 ? S1B[i] : 0.f, s2 = T::two_state ? S2[i] : 0.f;
    float np = p, n1 = s1, n1b = s1b, n2 = s2;
    opt_rule<OPT>(np, g * a.gnorm_scale, n1, n1b, n2, a);
    P[i] = opt_select(ok, np, p);
    S1[i] = opt_select(ok, n1, s1);
    if (T::has_m2) S1B[i] = opt_select(ok, n1b, s1b);
    if (T::two_state) S2[i] = opt_select(ok, n2, s2);
  }
}

// Directions and parameters of one block for the norms (0 where the gradient is not finite).
template <int OPT>
void norms_loop(const float* __restrict P, const float* __restrict G, const float* __restrict S1,
                const float* __restrict S1B, const float* __restrict S2, int64_t len,
                const bnbf_optim_args& args, float* __restrict D, float* __restrict PP) {
  using T = OptTraits<OPT>;
  const bnbf_optim_args a = args;
  for (int64_t i = 0; i < len; ++i) {
    const float g = G[i];
    const bool ok = opt_finite(g);
    float p = P[i], s1 = S1[i];
    float s1b = T::has_m2 ? S1B[i] : 0.f, s2 = T::two_state ? S2[i] : 0.f;
    const float p0 = p;
    const float d = opt_rule<OPT>(p, g * a.gnorm_scale, s1, s1b, s2, a);
    D[i] = ok ? d : 0.f;
    PP[i] = ok ? p0 : 0.f;
  }
}

struct Ctx {
  void* p;
  const void* g;
  void* s1;  // uint8_t* codes (8-bit) or float* (32-bit)
  void* s2;
  float* absmax1;
  float* absmax2;
  const QuantMap* map1;
  const QuantMap* map2;
  const FastQuant* fast1;  // null: use quantize_scaled
  const FastQuant* fast2;
  const bnbf_optim_args* args;
  int64_t n, nblocks;
  double* partial;  // norms: 2 doubles per block
};

template <int OPT, int DT, bool Q8, bool NORMS>
void run_blocks(const Ctx& c, int64_t b0, int64_t b1) {
  using T = OptTraits<OPT>;
  alignas(64) float P[kOptimBlock], G[kOptimBlock], S1[kOptimBlock], S1B[kOptimBlock],
      S2[kOptimBlock], D[kOptimBlock], PP[kOptimBlock];
  uint8_t* codes1 = (uint8_t*)c.s1;
  uint8_t* codes2 = (uint8_t*)c.s2;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kOptimBlock, len = std::min(kOptimBlock, c.n - start);
    float* pp = P;
    const float* gp = G;
    if (DT == BNBF_F32) {
      pp = (float*)c.p + start;
      gp = (const float*)c.g + start;
    } else {
      load_f32<DT>(c.p, start, P, len);
      load_f32<DT>(c.g, start, G, len);
    }
    float *s1p = S1, *s1bp = S1B, *s2p = S2;
    if (Q8) {
      dequantize_scaled(*c.map1, codes1 + start, c.absmax1[b], S1, len);
      if (T::has_m2)
        dequantize_scaled(*c.map1, codes1 + c.n + start, c.absmax1[c.nblocks + b], S1B, len);
      if (T::two_state) dequantize_scaled(*c.map2, codes2 + start, c.absmax2[b], S2, len);
    } else {
      s1p = (float*)c.s1 + start;
      if (T::has_m2) s1bp = (float*)c.s1 + c.n + start;
      if (T::two_state) s2p = (float*)c.s2 + start;
    }
    if (NORMS) {
      norms_loop<OPT>(pp, gp, s1p, s1bp, s2p, len, *c.args, D, PP);
      double sd = 0.0, sp = 0.0;
      for (int64_t i = 0; i < len; ++i) {
        sd += (double)D[i] * (double)D[i];
        sp += (double)PP[i] * (double)PP[i];
      }
      c.partial[2 * b] = sd;
      c.partial[2 * b + 1] = sp;
      continue;
    }
    update_loop<OPT>(pp, gp, s1p, s1bp, s2p, len, *c.args);
    if (DT != BNBF_F32) store_f32<DT>(P, c.p, start, len);
    if (Q8) {
      float m = block_absmax(S1, len);
      c.absmax1[b] = m;
      requantize(c.fast1, *c.map1, S1, m, codes1 + start, len, T::keep_positive1);
      if (T::has_m2) {
        m = block_absmax(S1B, len);
        c.absmax1[c.nblocks + b] = m;
        requantize(c.fast1, *c.map1, S1B, m, codes1 + c.n + start, len, T::keep_positive1);
      }
      if (T::two_state) {
        m = block_absmax(S2, len);
        c.absmax2[b] = m;
        requantize(c.fast2, *c.map2, S2, m, codes2 + start, len, T::keep_positive2);
      }
    }
  }
}

template <bool Q8, bool NORMS>
bool run(int opt, int dtype, Ctx& c, int num_threads, double* out) {
  c.nblocks = (c.n + kOptimBlock - 1) / kOptimBlock;
  std::vector<double> partial(NORMS ? 2 * c.nblocks : 0);
  c.partial = partial.data();
  bool known = dispatch_optimizer(opt, [&](auto o) {
    dispatch_dtype(dtype, [&](auto dt) {
      constexpr int OPT = decltype(o)::value, DT = decltype(dt)::value;
      // Chunks are claimed from a counter rather than split evenly up front: on a busy
      // machine a descheduled thread then delays nothing, the running ones take its share.
      // Blocks are independent (norms go to per-block partials), so the result does not
      // depend on who ran what.
      const int64_t nchunks = (c.nblocks + kGrainBlocks - 1) / kGrainBlocks;
      const int nt = (int)std::min<int64_t>(std::max(num_threads, 1), nchunks);
      std::atomic<int64_t> next{0};
      parallel_for(nt, 1, nt, [&](int64_t, int64_t) {
        for (;;) {
          const int64_t k = next.fetch_add(1, std::memory_order_relaxed);
          if (k >= nchunks) break;
          run_blocks<OPT, DT, Q8, NORMS>(c, k * kGrainBlocks,
                                         std::min(c.nblocks, (k + 1) * kGrainBlocks));
        }
      });
    });
  });
  if (NORMS && known) {
    // Summed in block order: the result does not depend on the thread count.
    for (int64_t b = 0; b < c.nblocks; ++b) {
      out[0] += partial[2 * b];
      out[1] += partial[2 * b + 1];
    }
  }
  return known;
}

}  // namespace

bool optimizer_update_8bit(int opt, void* p, const void* g, int dtype, uint8_t* state1,
                           uint8_t* state2, float* absmax1, float* absmax2, const QuantMap& map1,
                           const QuantMap* map2, const bnbf_optim_args& args, int64_t n,
                           int num_threads) {
  Ctx c{p, g, state1, state2, absmax1, absmax2, &map1, map2, fast_quant(map1),
        map2 ? fast_quant(*map2) : nullptr, &args, n, 0, nullptr};
  return run<true, false>(opt, dtype, c, num_threads, nullptr);
}

bool optimizer_update_32bit(int opt, void* p, const void* g, int dtype, float* state1,
                            float* state2, const bnbf_optim_args& args, int64_t n,
                            int num_threads) {
  Ctx c{p, g, state1, state2, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, &args, n, 0,
        nullptr};
  return run<false, false>(opt, dtype, c, num_threads, nullptr);
}

bool optimizer_norms_8bit(int opt, const void* p, const void* g, int dtype, const uint8_t* state1,
                          const uint8_t* state2, const float* absmax1, const float* absmax2,
                          const QuantMap& map1, const QuantMap* map2, const bnbf_optim_args& args,
                          int64_t n, double* out, int num_threads) {
  // The norms path only reads: the const_casts just share the Ctx with the update path.
  Ctx c{const_cast<void*>(p), g, const_cast<uint8_t*>(state1), const_cast<uint8_t*>(state2),
        const_cast<float*>(absmax1), const_cast<float*>(absmax2), &map1, map2, nullptr, nullptr,
        &args, n, 0, nullptr};
  return run<true, true>(opt, dtype, c, num_threads, out);
}

bool optimizer_norms_32bit(int opt, const void* p, const void* g, int dtype, const float* state1,
                           const float* state2, const bnbf_optim_args& args, int64_t n,
                           double* out, int num_threads) {
  Ctx c{const_cast<void*>(p), g, const_cast<float*>(state1), const_cast<float*>(state2),
        nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, &args, n, 0, nullptr};
  return run<false, true>(opt, dtype, c, num_threads, out);
}

}  // namespace BNBF_ISA_NS
}  // namespace bnbf
