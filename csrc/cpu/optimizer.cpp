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
#include <type_traits>
#include <vector>

#include "blockquant.h"
#include "kernels.h"
#include "optim_rule.h"
#include "runtime.h"

namespace bnbf {
namespace BNBF_ISA_NS {
namespace {

// Blocks per thread chunk: 64 blocks = 16k elements, so tensors below that stay on the
// calling thread (waking the pool costs more than the work).
constexpr int64_t kGrainBlocks = 64;

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
  const bnbf_optim_args* args;
  int64_t n, nblocks;
  double* partial;  // norms: 2 doubles per block
};

// Software prefetch of a block a few blocks ahead. Each block is read in short bursts per
// stream (p, g, the codes) separated by compute on L1 buffers, which the hardware
// prefetchers follow poorly: without this the rule loop stalls on p and g.
constexpr int64_t kPrefetchBlocks = 8;

template <int OPT, int DT, bool Q8>
inline void prefetch_block(const Ctx& c, int64_t start) {
  using T = OptTraits<OPT>;
  constexpr int64_t es = DT == BNBF_F32 ? 4 : 2;
  const char* p = (const char*)c.p + start * es;
  const char* g = (const char*)c.g + start * es;
  for (int64_t o = 0; o < kOptimBlock * es; o += 64) {
    __builtin_prefetch(p + o, 1);
    __builtin_prefetch(g + o, 0);
  }
  const int64_t ss = Q8 ? 1 : 4;
  const char* s1 = (const char*)c.s1 + start * ss;
  const char* s2 = (const char*)c.s2 + start * ss;
  for (int64_t o = 0; o < kOptimBlock * ss; o += 64) {
    __builtin_prefetch(s1 + o, 1);
    if (T::has_m2) __builtin_prefetch(s1 + c.n * ss + o, 1);
    if (T::two_state) __builtin_prefetch(s2 + o, 1);
  }
}

template <int OPT, int DT, bool Q8, bool NORMS>
void run_blocks(const Ctx& c, int64_t b0, int64_t b1) {
  using T = OptTraits<OPT>;
  alignas(64) float P[kOptimBlock], G[kOptimBlock], S1[kOptimBlock], S1B[kOptimBlock],
      S2[kOptimBlock], D[kOptimBlock], PP[kOptimBlock];
  uint8_t* codes1 = (uint8_t*)c.s1;
  uint8_t* codes2 = (uint8_t*)c.s2;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kOptimBlock, len = std::min(kOptimBlock, c.n - start);
    if (b + kPrefetchBlocks < c.nblocks) prefetch_block<OPT, DT, Q8>(c, start + kPrefetchBlocks * kOptimBlock);
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
      quantize_scaled(*c.map1, S1, m, codes1 + start, len, T::keep_positive1);
      if (T::has_m2) {
        m = block_absmax(S1B, len);
        c.absmax1[c.nblocks + b] = m;
        quantize_scaled(*c.map1, S1B, m, codes1 + c.n + start, len, T::keep_positive1);
      }
      if (T::two_state) {
        m = block_absmax(S2, len);
        c.absmax2[b] = m;
        quantize_scaled(*c.map2, S2, m, codes2 + start, len, T::keep_positive2);
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
  Ctx c{p, g, state1, state2, absmax1, absmax2, &map1, map2, &args, n, 0, nullptr};
  return run<true, false>(opt, dtype, c, num_threads, nullptr);
}

bool optimizer_update_32bit(int opt, void* p, const void* g, int dtype, float* state1,
                            float* state2, const bnbf_optim_args& args, int64_t n,
                            int num_threads) {
  Ctx c{p, g, state1, state2, nullptr, nullptr, nullptr, nullptr, &args, n, 0, nullptr};
  return run<false, false>(opt, dtype, c, num_threads, nullptr);
}

bool optimizer_norms_8bit(int opt, const void* p, const void* g, int dtype, const uint8_t* state1,
                          const uint8_t* state2, const float* absmax1, const float* absmax2,
                          const QuantMap& map1, const QuantMap* map2, const bnbf_optim_args& args,
                          int64_t n, double* out, int num_threads) {
  // The norms path only reads: the const_casts just share the Ctx with the update path.
  Ctx c{const_cast<void*>(p), g, const_cast<uint8_t*>(state1), const_cast<uint8_t*>(state2),
        const_cast<float*>(absmax1), const_cast<float*>(absmax2), &map1, map2, &args, n, 0, nullptr};
  return run<true, true>(opt, dtype, c, num_threads, out);
}

bool optimizer_norms_32bit(int opt, const void* p, const void* g, int dtype, const float* state1,
                           const float* state2, const bnbf_optim_args& args, int64_t n,
                           double* out, int num_threads) {
  Ctx c{const_cast<void*>(p), g, const_cast<float*>(state1), const_cast<float*>(state2),
        nullptr, nullptr, nullptr, nullptr, &args, n, 0, nullptr};
  return run<false, true>(opt, dtype, c, num_threads, out);
}

}  // namespace BNBF_ISA_NS
}  // namespace bnbf
