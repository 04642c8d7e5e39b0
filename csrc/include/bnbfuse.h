/* bnbfuse native library: plain C ABI, loaded from Python with ctypes (bnbfuse/_native.py).
 *
 * Conventions
 *  - Every entry point returns 0 on success and a negative BNBF_E* code on bad input; the
 *    message is available from bnbf_last_error(). Kernels validate sizes and indices
 *    themselves: they never read or write out of bounds, even when Python forgot a check.
 *  - All lengths and indices are int64_t.
 *  - `dtype` is one of BNBF_F32 / BNBF_F16 / BNBF_BF16; all tensors are contiguous.
 *  - CPU entry points take `num_threads` (bnbfuse passes torch.get_num_threads()); CUDA
 *    entry points end with `device` and `stream`: the index of the GPU that holds every
 *    buffer of the call, and the cudaStream_t (of that GPU) to launch on, as void*. The
 *    library checks that `device` exists and launches there whatever the caller's current
 *    device is; it does not inspect the buffers (that would cost a driver call per pointer
 *    and call), so the caller guarantees they are device memory of `device` (bnbfuse's
 *    Python side checks every tensor's device before the call).
 */
#ifndef BNBFUSE_H
#define BNBFUSE_H

#include <stdint.h>

#ifdef __cplusplus
#define BNBF_EXTERN extern "C"
#else
#define BNBF_EXTERN
#endif
#define BNBF_API BNBF_EXTERN __attribute__((visibility("default")))

enum bnbf_dtype { BNBF_F32 = 0, BNBF_F16 = 1, BNBF_BF16 = 2 };

enum bnbf_status {
  BNBF_OK = 0,
  BNBF_E_ARG = -1,      /* invalid argument (null pointer, bad size, bad dtype) */
  BNBF_E_INDEX = -2,    /* an index (token id) out of range */
  BNBF_E_CUDA = -3,     /* a CUDA runtime error */
  BNBF_E_UNSUPPORTED = -4,
};

/* Optimizer kinds; one kernel template per state count, the rule is a parameter. */
enum bnbf_optimizer {
  BNBF_OPT_ADAM = 0,      /* 2-state; weight decay coupled (L2 into the gradient) */
  BNBF_OPT_ADAMW = 1,     /* 2-state; weight decay decoupled (p *= 1 - lr*wd first) */
  BNBF_OPT_ADEMAMIX = 2,  /* 2-state buffers; state1 holds m1 then m2 (2*n values) */
  BNBF_OPT_LAMB = 3,      /* 2-state; Adam update scaled by the trust ratio (update_scale) */
  BNBF_OPT_SGD = 4,       /* 1-state: SGD with momentum (and dampening, Nesterov) */
  BNBF_OPT_RMSPROP = 5,   /* 1-state */
  BNBF_OPT_ADAGRAD = 6,   /* 1-state */
  BNBF_OPT_LION = 7,      /* 1-state */
  BNBF_OPT_LARS = 8,      /* 1-state: momentum SGD, the step clipped by update_scale */
};

/* Scalars of one update, computed by the caller in double and rounded once to float32
 * (bnbfuse/backends/reference.py: optimizer_scalars), so that the native kernels and the
 * pure-PyTorch reference apply the same float32 values. Fields an optimizer does not use are
 * ignored. Layout is mirrored by bnbfuse/_native.py (OptimizerArgs). */
typedef struct bnbf_optim_args {
  float gnorm_scale;      /* gradient multiplier (percentile clipping); 1 when off */
  float beta1;            /* Adam/Lion beta1; SGD/LARS momentum; RMSprop alpha */
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float beta3;            /* AdEMAMix slow EMA (already scheduled) */
  float one_minus_beta3;
  float alpha;            /* AdEMAMix mixing coefficient (already scheduled) */
  float eps;
  float weight_decay;
  float dampening_factor; /* SGD: 1 - dampening */
  float decay;            /* 1 - lr*weight_decay (decoupled decay: AdamW, AdEMAMix, Lion) */
  float inv_bc1;          /* 1 / (1 - beta1^step) */
  float inv_sqrt_bc2;     /* 1 / sqrt(1 - beta2^step) */
  float step_size;        /* Adam/AdamW: lr*update_scale/(1-beta1^step);
                             others: lr*update_scale */
  float lr;
  float update_scale;     /* trust ratio / max_unorm factor (in step_size) */
  int64_t step;           /* 1-based step count after this update (any count below 2^63) */
  int32_t nesterov;       /* SGD */
} bnbf_optim_args;

/* ---- introspection ---- */
BNBF_API const char* bnbf_version(void);
BNBF_API const char* bnbf_last_error(void);
BNBF_API const char* bnbf_cpu_isa(void);          /* "avx512", "avx2" or "generic" */
BNBF_API const char* bnbf_cpu_isas_compiled(void);
BNBF_API int bnbf_cpu_force_isa(const char* isa); /* tests/benchmarks: pin an ISA; NULL = auto */
/* The native optimizer traits table (csrc/common/optim_rule.h) row of `optimizer`: its name,
 * state count (1 or 2), whether state1 stacks two moments (AdEMAMix) and a bit mask of the
 * states requantized with keep_positive (bit 0: state1, bit 1: state2). Returns BNBF_E_ARG
 * for an unknown id. bnbfuse's tests compare it with bnbfuse/ops/rules.py. */
BNBF_API int bnbf_optimizer_traits(int optimizer, const char** name, int* states, int* has_m2,
                                   int* keep_positive_mask);

/* ---- blockwise quantization (CPU) ----
 * code: 256 float32 map values (any order); out[i] = index of the map value nearest to
 * A[i]/absmax[block] (ties to the larger value; blocks whose absmax is 0 give the index
 * of the value nearest 0). absmax has ceil(n/blocksize) entries. */
BNBF_API int bnbf_cpu_quantize_blockwise(const float* code, const void* A, int dtype,
                                         float* absmax, uint8_t* out, int64_t blocksize,
                                         int64_t n, int num_threads);
BNBF_API int bnbf_cpu_dequantize_blockwise(const float* code, const uint8_t* A,
                                           const float* absmax, void* out, int dtype,
                                           int64_t blocksize, int64_t n, int num_threads);
/* Number of prepared maps the CPU library caches now (bounded; most recently used kept). */
BNBF_API int bnbf_cpu_qmap_cache_size(void);

/* ---- CUDA library: what it was built for, and whether it can run here ----
 * bnbf_cuda_archs: the GPU code compiled in, from the build's CMAKE_CUDA_ARCHITECTURES, e.g.
 * "sm_75 sm_80 sm_90 sm_100 sm_120 compute_120" (sm_XY: machine code for compute capability
 * X.Y and, within major X, newer minors; compute_XY: PTX the driver compiles for X.Y and newer).
 *
 * bnbf_cuda_probe: asks the statically linked CUDA runtime whether this library can run on
 * this machine, without launching anything. It never crashes: without libcuda (no NVIDIA
 * driver) it reports driver_version 0 and the runtime's error for the device count.
 * Without BNBF_CUDA_PROBE_LOAD_IMAGES it creates no CUDA context (driver version, device count
 * and compute capabilities only), so bnbfuse can run it at import; with it, it also asks each
 * device (cudaFuncGetAttributes on a tiny kernel) whether the driver finds a kernel image for
 * it, which creates that device's primary context (`python -m bnbfuse` does this). The
 * calling thread's current device is restored.
 * Returns BNBF_OK when the driver is new enough for the runtime, at least one device is
 * visible and (when checked) every device loads the kernels; BNBF_E_CUDA otherwise, with the
 * reason in info->message and bnbf_last_error(); BNBF_E_ARG for a NULL info or a size other
 * than sizeof(bnbf_cuda_probe_info) (a Python mirror out of step with this header). */
#define BNBF_CUDA_PROBE_MAX_DEVICES 64
#define BNBF_CUDA_PROBE_LOAD_IMAGES 1
typedef struct bnbf_cuda_probe_info {
  int32_t driver_version;     /* cudaDriverGetVersion: 1000*major + 10*minor of the newest CUDA
                                 the driver supports; 0 when no driver is installed */
  int32_t runtime_version;    /* cudaRuntimeGetVersion of the runtime linked into the library */
  int32_t device_count;       /* cudaGetDeviceCount; 0 when it failed */
  int32_t device_count_error; /* the cudaError_t of cudaGetDeviceCount (0: success) */
  int32_t devices_probed;     /* min(device_count, BNBF_CUDA_PROBE_MAX_DEVICES) */
  int32_t images_checked;     /* 1 when image_error[] was filled (BNBF_CUDA_PROBE_LOAD_IMAGES) */
  int32_t compute_capability[BNBF_CUDA_PROBE_MAX_DEVICES]; /* 10*major + minor; -1 unknown */
  int32_t image_error[BNBF_CUDA_PROBE_MAX_DEVICES]; /* cudaError_t of loading the probe kernel
                                 on that device (0: an image loads, e.g. 209:
                                 cudaErrorNoKernelImageForDevice); -1 when not checked */
  char message[512];          /* one-line summary: what failed, or the versions found */
} bnbf_cuda_probe_info;
BNBF_API int bnbf_cuda_probe(bnbf_cuda_probe_info* info, int64_t info_size, int flags);
/* "cudaErrorName: description" of a cudaError_t value (for the codes in the probe info). */
BNBF_API const char* bnbf_cuda_error_string(int error);

/* ---- blockwise quantization (CUDA) ---- */
BNBF_API int bnbf_cuda_quantize_blockwise(const float* code, const void* A, int dtype,
                                          float* absmax, uint8_t* out, int64_t blocksize,
                                          int64_t n, int device, void* stream);
BNBF_API int bnbf_cuda_dequantize_blockwise(const float* code, const uint8_t* A,
                                            const float* absmax, void* out, int dtype,
                                            int64_t blocksize, int64_t n, int device,
                                            void* stream);

/* ---- optimizer updates ----
 * One fused pass per parameter: read p, g (dtype `dtype`, n elements) and the state, write p
 * and the state. 8-bit state: uint8 codes in blocks of 256 of the flattened tensor with one
 * float32 absmax per block; state1 uses qmap1, state2 qmap2 (256 float32 values each). 32-bit
 * state: float32. AdEMAMix keeps m1 then m2 in state1 (2n codes / values; absmax1 holds the
 * ceil(n/256) m1 blocks then the m2 blocks). state2/absmax2/qmap2 are only read for 2-state
 * optimizers (may be NULL otherwise).
 * Non-finite gradient elements leave their parameter and state values unchanged.
 * Norms: out[0] += sum(direction^2), out[1] += sum(p^2) over finite-gradient elements, in
 * double (the caller zeroes out); nothing else is written. */
#define BNBF_OPTIM_BLOCKSIZE 256
/* Norms are summed per block, then per group of this many consecutive blocks, then over the
 * groups in order (csrc/common/norm_order.h), on the CPU and on CUDA alike. */
#define BNBF_NORM_GROUP_BLOCKS 256
BNBF_API int bnbf_cpu_optimizer_update_8bit_blockwise(
    int optimizer, void* p, const void* g, int dtype, uint8_t* state1, uint8_t* state2,
    float* absmax1, float* absmax2, const float* qmap1, const float* qmap2,
    const bnbf_optim_args* args, int64_t n, int num_threads);
BNBF_API int bnbf_cpu_optimizer_update_32bit(int optimizer, void* p, const void* g, int dtype,
                                             float* state1, float* state2,
                                             const bnbf_optim_args* args, int64_t n,
                                             int num_threads);
BNBF_API int bnbf_cpu_optimizer_norms_8bit_blockwise(
    int optimizer, const void* p, const void* g, int dtype, const uint8_t* state1,
    const uint8_t* state2, const float* absmax1, const float* absmax2, const float* qmap1,
    const float* qmap2, const bnbf_optim_args* args, int64_t n, double* out, int num_threads);
BNBF_API int bnbf_cpu_optimizer_norms_32bit(int optimizer, const void* p, const void* g,
                                            int dtype, const float* state1, const float* state2,
                                            const bnbf_optim_args* args, int64_t n, double* out,
                                            int num_threads);

/* ---- optimizer updates (CUDA): the CPU's arguments, then device and stream ----
 * The norms also take `scratch`, device memory of at least
 * 2 * (nblocks + ceil(nblocks / BNBF_NORM_GROUP_BLOCKS)) doubles (nblocks = ceil(n / 256)),
 * for the per-block partial sums; the caller allocates it (through torch's allocator, so it
 * is stream-ordered and capturable in CUDA graphs) and keeps it alive until the stream
 * has run the call. out is device memory too. */
BNBF_API int bnbf_cuda_optimizer_update_8bit_blockwise(
    int optimizer, void* p, const void* g, int dtype, uint8_t* state1, uint8_t* state2,
    float* absmax1, float* absmax2, const float* qmap1, const float* qmap2,
    const bnbf_optim_args* args, int64_t n, int device, void* stream);
BNBF_API int bnbf_cuda_optimizer_update_32bit(int optimizer, void* p, const void* g, int dtype,
                                              float* state1, float* state2,
                                              const bnbf_optim_args* args, int64_t n,
                                              int device, void* stream);
BNBF_API int bnbf_cuda_optimizer_norms_8bit_blockwise(
    int optimizer, const void* p, const void* g, int dtype, const uint8_t* state1,
    const uint8_t* state2, const float* absmax1, const float* absmax2, const float* qmap1,
    const float* qmap2, const bnbf_optim_args* args, int64_t n, double* out, double* scratch,
    int64_t scratch_len, int device, void* stream);
BNBF_API int bnbf_cuda_optimizer_norms_32bit(int optimizer, const void* p, const void* g,
                                             int dtype, const float* state1, const float* state2,
                                             const bnbf_optim_args* args, int64_t n,
                                             double* out, double* scratch, int64_t scratch_len,
                                             int device, void* stream);

/* ---- paged optimizer state (CUDA managed memory) ----
 * bnbf_cuda_paged_alloc: nbytes of managed memory (the driver may evict it to host memory
 * under GPU memory pressure) as a DLPack DLManagedTensor* (1-D uint8, kDLCUDA, device_id
 * `device`) in *out, for torch.from_dlpack: the consumer's deleter frees the memory. A record
 * never handed to a consumer is freed with bnbf_cuda_paged_free.
 * bnbf_cuda_prefetch: moves the pages of [ptr, ptr + nbytes) to GPU `device` (-1: to host
 * memory) asynchronously on `stream`; a no-op where the device has no concurrent managed
 * access. BNBF_E_ARG if ptr is not managed memory. */
BNBF_API int bnbf_cuda_paged_alloc(int64_t nbytes, int32_t device, void** out);
BNBF_API void bnbf_cuda_paged_free(void* managed);
BNBF_API int bnbf_cuda_prefetch(const void* ptr, int64_t nbytes, int32_t device, void* stream);

/* ---- FusionEmbedding lookup: fused gather + dequantize with new-token routing ----
 * For each of the n ids: id in [0, vocab_size) reads base row id, id in
 * [vocab_size, vocab_size + fusion_vocab_size) reads fusion row id - vocab_size; the row of
 * embed_dim values is written to out + i * embed_dim (element type `dtype`).
 *   bits 0: base is a float table of `dtype`, (vocab_size, embed_dim); absmax/qmap unused.
 *   bits 8: base is uint8 (vocab_size, embed_dim); value = qmap[code] * absmax[row, col/blocksize]
 *           with qmap of 256 floats.
 *   bits 4: base is uint8 (vocab_size, ceil(embed_dim/2)); element 2k in the high nibble of
 *           byte k, 2k+1 in the low nibble; qmap of 16 floats.
 * absmax is float32 (vocab_size, ceil(embed_dim / blocksize)); fusion is (fusion_vocab_size,
 * embed_dim) of `dtype`. CPU: an id out of range returns BNBF_E_INDEX (nothing is read out of
 * bounds). CUDA: checks run without a host sync, so an out-of-range id gets a zero row. */
BNBF_API int bnbf_cpu_fusion_embedding_lookup(const int64_t* ids, int64_t n, const void* base,
                                              int bits, const float* absmax, const float* qmap,
                                              int64_t vocab_size, const void* fusion,
                                              int64_t fusion_vocab_size, int64_t embed_dim,
                                              int64_t blocksize, void* out, int dtype,
                                              int num_threads);
BNBF_API int bnbf_cuda_fusion_embedding_lookup(const int64_t* ids, int64_t n, const void* base,
                                               int bits, const float* absmax, const float* qmap,
                                               int64_t vocab_size, const void* fusion,
                                               int64_t fusion_vocab_size, int64_t embed_dim,
                                               int64_t blocksize, void* out, int dtype,
                                               int device, void* stream);

#endif /* BNBFUSE_H */
