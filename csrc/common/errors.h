// The error channel of the C ABI, shared by the CPU and the CUDA library: every entry point
// returns 0 or a negative BNBF_E* code and leaves its message for bnbf_last_error().
#pragma once

namespace bnbf {

// Records a printf-style message for bnbf_last_error() and returns `code`.
int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

}  // namespace bnbf
