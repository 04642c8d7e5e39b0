// The error channel of the C ABI: bnbf::fail records a message for bnbf_last_error().
// Compiled into both the CPU and the CUDA library (each gets its own per-thread buffer).
#include <cstdarg>
#include <cstdio>

#include "bnbfuse.h"
#include "errors.h"

namespace bnbf {

static thread_local char g_error[512] = "";

int fail(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, ap);
  va_end(ap);
  return code;
}

}  // namespace bnbf

BNBF_API const char* bnbf_last_error(void) { return bnbf::g_error; }
BNBF_API const char* bnbf_version(void) { return "0.1.0"; }
