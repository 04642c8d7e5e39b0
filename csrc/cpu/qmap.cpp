#include "qmap.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <vector>

namespace bnbf {

static float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

static int count_leq(const float* thr, float x) {  // #{k < 255 : thr[k] <= x}
  return int(std::upper_bound(thr, thr + 255, x) - thr);
}

// See RunTables (qmap.h). Leaves runs.usable false when the map does not fit the model.
static void build_runs(QuantMap& m) {
  RunTables& t = m.runs;
  t.usable = false;
  if (!m.identity) return;
  for (int k = 0; k < 255; ++k)
    if (!std::isfinite(m.thr[k])) return;
  const int z = count_leq(m.thr, 0.f);
  const int np = 255 - z;
  if (np < 1 || z > np) return;
  std::vector<double> P(np);
  for (int j = 0; j < np; ++j) P[j] = m.thr[z + j];
  // Negative magnitudes: within 2 ulps of the positive ones (and no fewer of them matter).
  for (int j = 0; j < z; ++j) {
    const double n = -(double)m.thr[z - 1 - j];
    if (std::fabs(n - P[j]) > 2.5 * std::ldexp(P[j], -23)) return;
  }
  if (P[0] < std::ldexp(1.0, -30)) return;  // m < 2^-31 must count nothing
  const double kMargin = std::ldexp(1.0, -11);  // RunTables: the flag distance
  const double kLower = std::ldexp(1.0, -21);   // run starts lowered by this, relatively
  int nruns = 0;
  int jr = 0;
  std::vector<int> starts;
  while (jr < np) {
    if (nruns == 32) return;
    // Longest run from jr whose linear model is accurate to a sixteenth of the margin.
    int len = 1;
    const double A = P[jr];
    double H = jr + 1 < np ? P[jr + 1] - P[jr] : P[jr];
    for (int L = 2; jr + L <= np; ++L) {
      const double h = (P[jr + L - 1] - P[jr]) / (L - 1);
      bool ok = true;
      for (int k = 0; k < L && ok; ++k)
        ok = std::fabs((P[jr + k] - A) / h - k) <= kMargin / 16;
      if (!ok) break;
      len = L;
      H = h;
    }
    // What else moves u = m * C - D off the exact count, for the m this run serves (below
    // the next run's start, or about 1): the reciprocal multiply (|y' - y| <= 2^-22 m) and
    // the negative thresholds' distance from the positive ones (2.5 ulps), together below
    // 2^-20 m; C, D and the fused multiply-subtract rounded to float (2^-24 relative each,
    // counted as 2^-23); and the lowered run start (kLower m / H below an integer).
    const double top = (jr + len < np ? P[jr + len] : 1.0) / H;
    const double d_abs = A / H + jr + 1, u_abs = top + jr + 2;
    const double err = kMargin / 16 + top * std::ldexp(1.0, -20) +
                       (top + d_abs + u_abs) * std::ldexp(1.0, -23) + top * kLower;
    if (err > 0.75 * kMargin) return;
    // No clamp to the run: m below its first threshold (down to just above the previous
    // run's last one) must still count jr, and m above its last (up to the next run's
    // selection, or up to about 1 in the last run) must count jr + len.
    const double below = jr == 0 ? A : A - P[jr - 1];
    const double last = A + (len - 1) * H;
    const double above = (jr + len < np ? P[jr + len - 1] * (1 + kLower) : 1.0 + 0x1p-21) - last;
    // (below <= H puts the region's lowest u at or above jr; up to kMargin / 8 more puts it
    // within the margin of jr, where lanes are flagged.)
    if (below > H * (1 + kMargin / 8) || above > H * (1 - 2 * kMargin)) return;
    t.C[nruns] = (float)(1.0 / H);
    t.D[nruns] = (float)(A / H - 1.0 - jr);
    starts.push_back(jr);
    ++nruns;
    jr += len;
  }
  for (int r = nruns; r < 32; ++r) {
    t.C[r] = 0.f;
    t.D[r] = 0.f;
  }
  // Run q serves m from just above the previous run's last threshold (lowered bound:
  // lanes between that threshold and the bound are near an integer in the earlier run).
  auto selects = [&](int q) { return P[starts[q] - 1] * (1 + kLower); };
  for (int o = 0; o < 32; ++o) {
    const double lo = std::ldexp(1.0, o - 31), hi = 2 * lo;  // exponent field 96 + o
    int r = 0;
    while (r + 1 < nruns && selects(r + 1) <= lo) ++r;
    t.run_lo[o] = r;
    t.bound1[o] = t.bound2[o] = std::numeric_limits<float>::infinity();
    int inside = 0;
    for (int q = r + 1; q < nruns && selects(q) < hi; ++q) {
      if (++inside > 2) return;
      (inside == 1 ? t.bound1 : t.bound2)[o] = (float)selects(q);
    }
  }
  t.zero_index = z;
  t.usable = true;
}

static void build(QuantMap& m, const float* code) {
  std::memcpy(m.code, code, sizeof(m.code));
  int order[256];
  std::iota(order, order + 256, 0);
  std::stable_sort(order, order + 256, [&](int a, int b) { return code[a] < code[b]; });
  m.identity = true;
  for (int i = 0; i < 256; ++i) {
    m.sorted[i] = code[order[i]];
    m.sorted_to_code[i] = (uint8_t)order[i];
    m.identity &= (order[i] == i);
  }
  for (int k = 0; k < 255; ++k) {
    double mid = ((double)m.sorted[k] + (double)m.sorted[k + 1]) * 0.5;
    float t = (float)mid;
    if ((double)t < mid) t = std::nextafter(t, std::numeric_limits<float>::infinity());
    m.thr[k] = t;
  }
  m.thr[255] = std::numeric_limits<float>::quiet_NaN();
  m.zero_code = m.sorted_to_code[count_leq(m.thr, 0.f)];
  m.min_positive_code = m.zero_code;
  for (int i = 0; i < 256; ++i)
    if (m.sorted[i] > 0.f) {
      m.min_positive_code = m.sorted_to_code[i];
      break;
    }
  m.q_pos = m.sorted[255] > 0.f ? m.sorted[255] : 1.f;
  m.q_neg = m.sorted[0] < 0.f ? -m.sorted[0] : 1.f;
  for (int k = 0; k < 256; ++k) {
    uint32_t b;
    std::memcpy(&b, &code[k], 4);
    for (int i = 0; i < 4; ++i) m.planes[i][k] = (uint8_t)(b >> (8 * i));
  }
  // Exact comparison: the float32 division is correctly rounded, so where this holds the
  // computed value is the table entry bit for bit.
  m.int8_linear = code[255] == 1.f;
  for (int c = 0; c < 255; ++c) m.int8_linear &= code[c] == (float)(c - 127) / 127.f;
  build_runs(m);
  m.one_step = true;
  for (uint32_t b = 0; b < 65536; ++b) {
    uint32_t lo_bits = b << 16, hi_bits = (b << 16) | 0xFFFFu;
    float lo = bits_to_float(lo_bits), hi = bits_to_float(hi_bits);
    if (b & 0x8000u) std::swap(lo, hi);  // negative floats decrease as their bits grow
    int g = 0;
    if (!std::isnan(lo)) {
      g = std::min(count_leq(m.thr, lo), 255);
      int g_hi = std::min(count_leq(m.thr, hi), 255);
      if (g_hi - g > 1) m.one_step = false;
    }
    m.guess[b] = (uint8_t)g;
  }
  std::memset(m.guess + 65536, 0, 4);
}

static void build_packed(const QuantMap& m, PackedNearest& p) {
  uint32_t tk[255];
  for (int k = 0; k < 255; ++k) {
    if (std::isnan(m.thr[k])) return;  // unusable
    tk[k] = float_ukey(m.thr[k]);
    if (k > 0 && tk[k] < tk[k - 1]) return;
  }
  int k = 0;
  for (uint32_t B = 0; B < 65536; ++B) {
    const uint32_t lo = B << 16, hi = lo | 0xFFFFu;
    while (k < 255 && tk[k] < lo) ++k;  // k = thresholds below the bin
    int inside = 0;
    while (k + inside < 255 && tk[k + inside] <= hi) ++inside;
    if (inside > 1) return;  // unusable: two thresholds in one bin
    const uint32_t t = inside ? (tk[k] & 0xFFFFu) : 0u;
    if (!inside) p.entry[B] = (uint32_t)k << 16;
    else if (t == 0) p.entry[B] = (uint32_t)(k + 1) << 16;
    else p.entry[B] = ((uint32_t)k << 16) | (0x10000u - t);
  }
  // -0 and +0 share an index unless a threshold key lies in (ukey(-0), ukey(+0)].
  p.zero_safe = true;
  for (int j = 0; j < 255; ++j)
    if (tk[j] == 0x80000000u) p.zero_safe = false;
  p.usable = true;
}

const PackedNearest& QuantMap::packed_nearest() const {
  std::call_once(packed_once_, [this] {
    auto p = std::make_unique<PackedNearest>();
    build_packed(*this, *p);
    packed_ = std::move(p);
  });
  return *packed_;
}

namespace {

struct CacheEntry {
  uint64_t hash;
  std::shared_ptr<const QuantMap> map;
};

// FNV-1a over the 1 KiB of map bits: a cheap filter before the full compare.
uint64_t hash_code(const float* code) {
  unsigned char bytes[256 * sizeof(float)];
  std::memcpy(bytes, code, sizeof(bytes));
  uint64_t h = 1469598103934665603ull;
  for (unsigned char b : bytes) h = (h ^ b) * 1099511628211ull;
  return h;
}

std::mutex cache_mu;
std::vector<CacheEntry> cache;  // most recently used first

}  // namespace

std::shared_ptr<const QuantMap> quant_map(const float* code) {
  const uint64_t h = hash_code(code);
  {
    std::lock_guard<std::mutex> lk(cache_mu);
    for (size_t i = 0; i < cache.size(); ++i) {
      if (cache[i].hash != h || std::memcmp(cache[i].map->code, code, 256 * sizeof(float)))
        continue;
      if (i) std::rotate(cache.begin(), cache.begin() + i, cache.begin() + i + 1);
      return cache.front().map;
    }
  }
  // Built outside the lock (about a millisecond); two threads may build the same map, and
  // the second insertion then finds the first.
  auto built = std::make_shared<QuantMap>();
  build(*built, code);
  std::lock_guard<std::mutex> lk(cache_mu);
  for (size_t i = 0; i < cache.size(); ++i)
    if (cache[i].hash == h && !std::memcmp(cache[i].map->code, code, 256 * sizeof(float)))
      return cache[i].map;
  cache.insert(cache.begin(), CacheEntry{h, built});
  if ((int)cache.size() > kQuantMapCacheSize) cache.pop_back();  // freed when its last user ends
  return built;
}

int quant_map_cache_size() {
  std::lock_guard<std::mutex> lk(cache_mu);
  return (int)cache.size();
}

}  // namespace bnbf
