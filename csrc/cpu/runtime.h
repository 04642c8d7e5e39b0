// Runtime services of the CPU library: the thread pool and the ISA choice.
#pragma once
#include <cstdint>
#include <functional>

#include "errors.h"

namespace bnbf {

// Runs fn(begin, end) over [0, n) split into at most `num_threads` contiguous chunks whose
// sizes are multiples of `grain` (the last may be shorter). The calling thread takes the
// first chunk; the pool's threads sleep between calls, so while a kernel runs torch's own
// pool is idle (the caller is blocked in it) and the machine is not oversubscribed.
void parallel_for(int64_t n, int64_t grain, int num_threads,
                  const std::function<void(int64_t, int64_t)>& fn);

enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2, avx512vbmi = 3 };
Isa active_isa();
const char* isa_name(Isa isa);
bool force_isa(const char* name);  // nullptr = detect again; false if unknown/unsupported

}  // namespace bnbf
