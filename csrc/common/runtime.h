// Runtime services shared by every CPU kernel: error reporting, the thread pool, ISA choice.
#pragma once
#include <cstdint>
#include <functional>

namespace bnbf {

// Records a printf-style message for bnbf_last_error() and returns `code`.
int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// Runs fn(begin, end) over [0, n) split into at most `num_threads` contiguous chunks whose
// sizes are multiples of `grain` (the last may be shorter). The calling thread takes the
// first chunk; the pool's threads sleep between calls, so while a kernel runs torch's own
// pool is idle (the caller is blocked in it) and the machine is not oversubscribed.
void parallel_for(int64_t n, int64_t grain, int num_threads,
                  const std::function<void(int64_t, int64_t)>& fn);

enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };
Isa active_isa();
const char* isa_name(Isa isa);
bool force_isa(const char* name);  // nullptr = detect again; false if unknown/unsupported

}  // namespace bnbf
