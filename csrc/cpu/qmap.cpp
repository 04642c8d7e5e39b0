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

const QuantMap& quant_map(const float* code) {
  static std::mutex mu;
  static std::vector<std::unique_ptr<QuantMap>> cache;
  static const QuantMap* last = nullptr;
  std::lock_guard<std::mutex> lk(mu);
  if (last && std::memcmp(last->code, code, sizeof(last->code)) == 0) return *last;
  for (auto& m : cache)
    if (std::memcmp(m->code, code, sizeof(m->code)) == 0) return *(last = m.get());
  auto m = std::make_unique<QuantMap>();
  build(*m, code);
  cache.push_back(std::move(m));  // never evicted: callers keep references
  return *(last = cache.back().get());
}

}  // namespace bnbf
