// Declarations of the per-ISA CPU kernels. Each is defined once in csrc/cpu/isa/*.cpp and
// compiled into bnbf::generic, bnbf::avx2, bnbf::avx512 and bnbf::avx512vbmi; csrc/cpu/api_*.cpp pick
// one at run time. Arguments are validated by the API layer before these are called.
#pragma once
#include <cstdint>

#include "bnbfuse.h"
#include "qmap.h"

#define BNBF_CPU_KERNELS                                                                  \
  void quantize_blockwise(const QuantMap& map, const void* A, int dtype, float* absmax,   \
                          uint8_t* out, int64_t blocksize, int64_t n, int num_threads);  \
  void dequantize_blockwise(const QuantMap& map, const uint8_t* A, const float* absmax,   \
                            void* out, int dtype, int64_t blocksize, int64_t n,           \
                            int num_threads);                                             \
  /* quantize one block of fp32 values already known: writes codes, returns absmax */     \
  float quantize_block_f32(const QuantMap& map, const float* x, uint8_t* out, int64_t n); \
  /* optimizer updates (csrc/cpu/isa/optimizer.cpp); map2/state2 unused by 1-state rules;  */  \
  /* norms accumulate [sum(dir^2), sum(p^2)] into out (double[2])                      */  \
  bool optimizer_update_8bit(int opt, void* p, const void* g, int dtype, uint8_t* state1, \
                             uint8_t* state2, float* absmax1, float* absmax2,             \
                             const QuantMap& map1, const QuantMap* map2,                  \
                             const bnbf_optim_args& args, int64_t n, int num_threads);    \
  bool optimizer_update_32bit(int opt, void* p, const void* g, int dtype, float* state1,   \
                              float* state2, const bnbf_optim_args& args, int64_t n,       \
                              int num_threads);                                            \
  bool optimizer_norms_8bit(int opt, const void* p, const void* g, int dtype,              \
                            const uint8_t* state1, const uint8_t* state2,                  \
                            const float* absmax1, const float* absmax2,                    \
                            const QuantMap& map1, const QuantMap* map2,                    \
                            const bnbf_optim_args& args, int64_t n, double* out,           \
                            int num_threads);                                              \
  bool optimizer_norms_32bit(int opt, const void* p, const void* g, int dtype,             \
                             const float* state1, const float* state2,                     \
                             const bnbf_optim_args& args, int64_t n, double* out,          \
                             int num_threads);  \
  /* FusionEmbedding rows: ids already validated by the API layer (csrc/cpu/isa/embedding.cpp); */ \
  /* map: the 256-value map of an 8-bit base; qmap: the 16 values of a 4-bit one            */ \
  void fusion_embedding_lookup(const int64_t* ids, int64_t n, const void* base, int bits,    \
                               const float* absmax, const QuantMap* map, const float* qmap,  \
                               int64_t vocab_size, const void* fusion, int64_t embed_dim,    \
                               int64_t blocksize, void* out, int dtype, int num_threads);

namespace bnbf {
namespace generic { BNBF_CPU_KERNELS }
namespace avx2 { BNBF_CPU_KERNELS }
namespace avx512 { BNBF_CPU_KERNELS }
namespace avx512vbmi { BNBF_CPU_KERNELS }
}  // namespace bnbf

// Calls the active ISA's version of a kernel: BNBF_CPU_CALL(quantize_blockwise, args...).
#if defined(BNBF_HAVE_avx2) && defined(BNBF_HAVE_avx512) && defined(BNBF_HAVE_avx512vbmi)
#define BNBF_CPU_CALL(fn, ...)                                                         \
  (::bnbf::active_isa() == ::bnbf::Isa::avx512vbmi ? ::bnbf::avx512vbmi::fn(__VA_ARGS__) \
   : ::bnbf::active_isa() == ::bnbf::Isa::avx512   ? ::bnbf::avx512::fn(__VA_ARGS__)     \
   : ::bnbf::active_isa() == ::bnbf::Isa::avx2     ? ::bnbf::avx2::fn(__VA_ARGS__)       \
                                                   : ::bnbf::generic::fn(__VA_ARGS__))
#else
#define BNBF_CPU_CALL(fn, ...) ::bnbf::generic::fn(__VA_ARGS__)
#endif
