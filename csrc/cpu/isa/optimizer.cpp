// Fused optimizer updates, 8-bit blockwise and 32-bit state, for every optimizer rule.
//
// One template (run_blocks) serves all optimizers: the rule (csrc/common/optim_rule.h) is a
// template parameter, and so are the parameter dtype, the state precision and whether the
// call only computes norms. Work goes in blocks of 256 elements (the 8-bit quantization
// block, also used for 32-bit state so both paths share the loop). Per block:
//   1. one pass over the block in lanes of 8 (csrc/cpu/isa/lanes.h; a scalar tail): load p and
//      g, dequantize the state codes, apply the rule where the gradient is finite, store p,
//      keep the new fp32 state in L1 buffers and track each state's absmax;
//   2. requantize each state buffer with the block's new scale (state_scale.h: idempotent,
//      so a skipped element's codes and the block's absmax stay as they were).
// 32-bit state is read and written in place in step 1 and has no step 2. Memory is
// therefore touched once per step: read p, g, codes, absmax; write p, codes, absmax.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "codec.h"
#include "kernels.h"
#include "lanes.h"
#include "norm_order.h"
#include "optim_rule.h"
#include "runtime.h"
#include "state_scale.h"

namespace bnbf {
namespace BNBF_ISA_NS {
namespace {

// Blocks per thread chunk: 64 blocks = 16k elements, so tensors below that stay on the
// calling thread (waking the pool costs more than the work).
constexpr int64_t kGrainBlocks = 64;

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

// Where one block's elements live during step 1: p and g in the caller's tensors, the
// states either in the caller's fp32 tensors (32-bit) or in L1 buffers that step 1 fills
// by dequantizing and step 2 requantizes (8-bit).
struct BlockRefs {
  void* p;
  const void* g;
  int64_t start;                 // first element of the block in p and g
  const uint8_t *c1, *c1b, *c2;  // 8-bit: the block's codes
  float a1, a1b, a2;             // 8-bit: the block's absmax before the update
  float *s1, *s1b, *s2;          // the fp32 states, indexed from the block start
  float *d, *pp;                 // norms: direction and parameter, 0 where g is not finite
};

// Step 1 for the W elements at offset i of a block.
template <int OPT, int DT, bool Q8, bool NORMS, bool SCALE_G, class L>
inline __attribute__((always_inline)) void update_lanes(
    const BlockRefs& r, int64_t i, const bnbf_optim_args& a, const QuantMap* map1,
    const QuantMap* map2, typename Lanes<L>::AbsAcc& m1, typename Lanes<L>::AbsAcc& m1b,
    typename Lanes<L>::AbsAcc& m2) {
  using T = OptTraits<OPT>;
  using V = Lanes<L>;
  const L g = V::template load<DT>(r.g, r.start + i);
  const L p = V::template load<DT>(r.p, r.start + i);
  L s1, s1b{}, s2{};
  if constexpr (Q8 && !kStatesBuffered) {
    s1 = V::dequantize(map1->code, r.c1 + i, r.a1);
    if (T::has_m2) s1b = V::dequantize(map1->code, r.c1b + i, r.a1b);
    if (T::two_state) s2 = V::dequantize(map2->code, r.c2 + i, r.a2);
  } else {
    s1 = V::template load<BNBF_F32>(r.s1, i);
    if (T::has_m2) s1b = V::template load<BNBF_F32>(r.s1b, i);
    if (T::two_state) s2 = V::template load<BNBF_F32>(r.s2, i);
  }
  L np = p, n1 = s1, n1b = s1b, n2 = s2;
  // g * 1 is g for every finite g (and non-finite ones are skipped): one multiply saved
  // in the common case, where the loop is FP-throughput-bound
  const L d = opt_rule<OPT>(np, SCALE_G ? g * a.gnorm_scale : g, n1, n1b, n2, a);
  // Skipped: a non-finite gradient, or a step that would make a state non-finite (g*g
  // overflowing in a second moment); one infinite value would turn its 8-bit block NaN.
  typename V::Mask ok = V::both(V::finite(g), V::finite(n1));
  if (T::has_m2) ok = V::both(ok, V::finite(n1b));
  if (T::two_state) ok = V::both(ok, V::finite(n2));
  if (NORMS) {
    const L zero{};
    V::template store<BNBF_F32>(r.d, i, V::select(ok, d, zero));
    V::template store<BNBF_F32>(r.pp, i, V::select(ok, p, zero));
    return;
  }
  V::template store<DT>(r.p, r.start + i, V::select(ok, np, p));
  n1 = V::select(ok, n1, s1);
  V::template store<BNBF_F32>(r.s1, i, n1);
  if (Q8) m1 = V::abs_max(m1, n1);
  if (T::has_m2) {
    n1b = V::select(ok, n1b, s1b);
    V::template store<BNBF_F32>(r.s1b, i, n1b);
    if (Q8) m1b = V::abs_max(m1b, n1b);
  }
  if (T::two_state) {
    n2 = V::select(ok, n2, s2);
    V::template store<BNBF_F32>(r.s2, i, n2);
    if (Q8) m2 = V::abs_max(m2, n2);
  }
}

// Step 1 over len elements: vector lanes, then the scalar tail; returns the extremes of
// the new states (8-bit).
template <int OPT, int DT, bool Q8, bool NORMS>
void update_block(const BlockRefs& r, int64_t len, const bnbf_optim_args& a,
                  const QuantMap* map1, const QuantMap* map2, SignedMax out[3]) {
  using VL = Lanes<VecLane>;
  typename VL::AbsAcc v1 = VL::abs_init(), v1b = v1, v2 = v1;
  int64_t i = 0;
  if (a.gnorm_scale == 1.f) {
    for (; i + VL::W <= len; i += VL::W)
      update_lanes<OPT, DT, Q8, NORMS, false, VecLane>(r, i, a, map1, map2, v1, v1b, v2);
  } else {
    for (; i + VL::W <= len; i += VL::W)
      update_lanes<OPT, DT, Q8, NORMS, true, VecLane>(r, i, a, map1, map2, v1, v1b, v2);
  }
  using SL = Lanes<float>;
  SL::AbsAcc t1 = SL::abs_init(), t1b = t1, t2 = t1;
  for (; i < len; ++i)
    update_lanes<OPT, DT, Q8, NORMS, true, float>(r, i, a, map1, map2, t1, t1b, t2);
  auto join = [](SignedMax x, SignedMax y) {
    return SignedMax{std::max(x.pos_bits, y.pos_bits), std::max(x.neg_bits, y.neg_bits)};
  };
  out[0] = join(VL::abs_reduce(v1), SL::abs_reduce(t1));
  out[1] = join(VL::abs_reduce(v1b), SL::abs_reduce(t1b));
  out[2] = join(VL::abs_reduce(v2), SL::abs_reduce(t2));
}

template <int OPT, int DT, bool Q8, bool NORMS>
void run_blocks(const Ctx& c, int64_t b0, int64_t b1) {
  using T = OptTraits<OPT>;
  alignas(64) float S1[kOptimBlock], S1B[kOptimBlock], S2[kOptimBlock], D[kOptimBlock],
      PP[kOptimBlock];
  uint8_t* codes1 = (uint8_t*)c.s1;
  uint8_t* codes2 = (uint8_t*)c.s2;
  const bnbf_optim_args a = *c.args;  // a local copy: provably not aliased by the stores
  std::optional<BlockEncoder> encode1, encode2;  // one setup for all blocks of the chunk
  if constexpr (Q8 && !NORMS) {
    encode1.emplace(*c.map1);
    if (T::two_state) encode2.emplace(*c.map2);
  }
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kOptimBlock, len = std::min(kOptimBlock, c.n - start);
    BlockRefs r{c.p, c.g, start, nullptr, nullptr, nullptr, 0.f, 0.f, 0.f,
                S1, S1B, S2, D, PP};
    if (Q8) {
      r.c1 = codes1 + start;
      r.a1 = c.absmax1[b];
      if (T::has_m2) {
        r.c1b = codes1 + c.n + start;
        r.a1b = c.absmax1[c.nblocks + b];
      }
      if (T::two_state) {
        r.c2 = codes2 + start;
        r.a2 = c.absmax2[b];
      }
    } else {
      r.s1 = (float*)c.s1 + start;
      if (T::has_m2) r.s1b = (float*)c.s1 + c.n + start;
      if (T::two_state) r.s2 = (float*)c.s2 + start;
    }
    if constexpr (Q8 && kStatesBuffered) {  // the states to fp32 buffers first (vbmi.h)
      decode_block(*c.map1, r.c1, r.a1, S1, len);
      if (T::has_m2) decode_block(*c.map1, r.c1b, r.a1b, S1B, len);
      if (T::two_state) decode_block(*c.map2, r.c2, r.a2, S2, len);
    }
    SignedMax ext[3];
    update_block<OPT, DT, Q8, NORMS>(r, len, a, c.map1, c.map2, ext);
    if (NORMS) {  // step 1 of norm_order.h: the block's terms in element order
      double sd = 0.0, sp = 0.0;
      for (int64_t i = 0; i < len; ++i) {
        sd += (double)D[i] * (double)D[i];
        sp += (double)PP[i] * (double)PP[i];
      }
      c.partial[2 * b] = sd;
      c.partial[2 * b + 1] = sp;
      continue;
    }
    if (Q8) {
      const QuantMap &q1 = *c.map1, *q2 = c.map2;
      float m = state_scale(ext[0].pos_bits, ext[0].neg_bits, q1.q_pos, q1.q_neg);
      c.absmax1[b] = m;
      (*encode1)(S1, m, codes1 + start, len, T::keep_positive1, ext[0].neg_bits == 0);
      if (T::has_m2) {
        m = state_scale(ext[1].pos_bits, ext[1].neg_bits, q1.q_pos, q1.q_neg);
        c.absmax1[c.nblocks + b] = m;
        (*encode1)(S1B, m, codes1 + c.n + start, len, T::keep_positive1, ext[1].neg_bits == 0);
      }
      if (T::two_state) {
        m = state_scale(ext[2].pos_bits, ext[2].neg_bits, q2->q_pos, q2->q_neg);
        c.absmax2[b] = m;
        (*encode2)(S2, m, codes2 + start, len, T::keep_positive2, ext[2].neg_bits == 0);
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
    // Block partials, then group sums, then the groups in order (norm_order.h): the result
    // depends neither on the thread count nor, since the CUDA kernels sum the same way, on
    // the device.
    for (int64_t grp = 0; grp < norm_groups(c.nblocks); ++grp) {
      double s[2];
      norm_group_sum(partial.data(), c.nblocks, grp, s);
      out[0] += s[0];
      out[1] += s[1];
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
