#include "runtime.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <vector>

#include "bnbfuse.h"

namespace bnbf {

// ---- thread pool ------------------------------------------------------------------------
namespace {

// Workers, and the caller waiting for them, spin for a short while (kSpinIterations pauses:
// 0.1-0.15 ms on Zen 4, about twice that where a pause is slower, as on Intel since Skylake)
// before they sleep on a condition variable. Waking a sleeping thread
// takes a futex wake-up and, on a VM, often an inter-processor interrupt to an idle vCPU:
// measured at about 75 us per parallel call on a 2-vCPU KVM guest, more than the kernel of a
// 64k-element tensor takes, so that 2 threads stepped a model of such tensors slower than 1.
// An optimizer step calls the kernels once per parameter, back to back: a worker that has
// just finished is then still spinning when the next call comes.
constexpr int kSpinIterations = 4000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class ThreadPool {
 public:
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  // Only one job at a time; a concurrent caller (another Python thread) runs serially.
  bool try_run(int nworkers, const std::function<void(int)>& task) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    ensure_workers(nworkers);
    {
      // Workers read the generation, task_ and active_ together under mu_ (loop()); the
      // atomic generation only ends their spin.
      std::lock_guard<std::mutex> lk(mu_);
      task_ = &task;
      active_ = nworkers;
      pending_.store(nworkers, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    task(0);
    for (int i = 0; i < kSpinIterations && pending_.load(std::memory_order_acquire) != 0; ++i)
      cpu_relax();
    if (pending_.load(std::memory_order_acquire) != 0) {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    std::lock_guard<std::mutex> lk(mu_);
    task_ = nullptr;
    return true;
  }

 private:
  void ensure_workers(int nworkers) {
    while ((int)workers_.size() < nworkers) {
      int id = (int)workers_.size() + 1;  // worker ids start at 1; the caller is 0
      workers_.emplace_back([this, id] { loop(id); });
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = generation_.load(std::memory_order_acquire);
      for (int i = 0; i < kSpinIterations && g == seen; ++i) {
        cpu_relax();
        g = generation_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      const std::function<void(int)>* task;
      {
        // The generation and the job's fields together, under the lock: an inactive worker
        // may be a job behind, and the next job's caller may be writing them meanwhile.
        std::lock_guard<std::mutex> lk(mu_);
        seen = generation_.load(std::memory_order_relaxed);
        if (stop_) return;
        if (id > active_) continue;
        task = task_;
      }
      (*task)(id);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        // under the lock: the caller checks pending_ under it before it sleeps
        std::lock_guard<std::mutex> lk(mu_);
        done_cv_.notify_one();
      }
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  int active_ = 0;
  bool stop_ = false;
};

// A forked child has only the thread that called fork(): the parent's workers (and any
// lock they held) do not exist in it, so the child drops the pool, leaking it on purpose,
// and builds a fresh one at its next parallel kernel, as torch's own pool does.
std::atomic<ThreadPool*> g_pool{nullptr};

void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }

ThreadPool& pool() {
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
  ThreadPool* p = g_pool.load(std::memory_order_acquire);
  if (!p) {
    // leaked on purpose too: no join at exit
    auto* fresh = new ThreadPool();
    if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
      p = fresh;
    } else {
      delete fresh;  // another thread won; it has no workers yet
    }
  }
  return *p;
}

}  // namespace

void parallel_for(int64_t n, int64_t grain, int num_threads,
                  const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  int64_t chunks = (n + grain - 1) / grain;
  int nt = (int)std::min<int64_t>(std::max(num_threads, 1), chunks);
  nt = std::min(nt, 256);
  if (nt <= 1) {
    fn(0, n);
    return;
  }
  // Split the grains as evenly as possible between nt threads.
  auto range = [=](int t, int64_t* b, int64_t* e) {
    int64_t g0 = chunks * t / nt, g1 = chunks * (t + 1) / nt;
    *b = std::min(n, g0 * grain);
    *e = std::min(n, g1 * grain);
  };
  std::function<void(int)> task = [&](int t) {
    int64_t b, e;
    range(t, &b, &e);
    if (b < e) fn(b, e);
  };
  if (!pool().try_run(nt - 1, task)) fn(0, n);
}

// ---- instruction set ----------------------------------------------------------------------
static Isa detect_cpu_isa() {
#if defined(BNBF_X86)
  __builtin_cpu_init();
#if defined(BNBF_HAVE_avx512vbmi)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::avx512vbmi;
#endif
#if defined(BNBF_HAVE_avx512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx512;
#endif
#if defined(BNBF_HAVE_avx2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::avx2;
#endif
#endif
  return Isa::generic;
}

static constexpr Isa kIsas[] = {Isa::generic, Isa::avx2, Isa::avx512, Isa::avx512vbmi};

// The best ISA of this CPU and build, capped by BNBFUSE_CPU_ISA (a name of kIsas) if set:
// a way to compare paths, or to step around one.
static Isa detect_isa() {
  const Isa best = detect_cpu_isa();
  const char* cap = std::getenv("BNBFUSE_CPU_ISA");
  if (cap && *cap)
    for (Isa isa : kIsas)
      if (std::strcmp(cap, isa_name(isa)) == 0 && (int)isa < (int)best) return isa;
  return best;
}

static std::atomic<int> g_isa{-1};

Isa active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = (int)detect_isa();
    g_isa.store(v);
  }
  return (Isa)v;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512vbmi: return "avx512vbmi";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

bool force_isa(const char* name) {
  Isa best = detect_cpu_isa();
  if (name == nullptr) {
    best = detect_isa();
    g_isa.store((int)best);
    return true;
  }
  for (Isa isa : kIsas) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      if ((int)isa > (int)best) return false;  // not supported by this CPU or build
      g_isa.store((int)isa);
      return true;
    }
  }
  return false;
}

}  // namespace bnbf

BNBF_API const char* bnbf_cpu_isa(void) { return bnbf::isa_name(bnbf::active_isa()); }
BNBF_API const char* bnbf_cpu_isas_compiled(void) { return BNBF_ISA_LIST; }
BNBF_API int bnbf_cpu_force_isa(const char* isa) {
  return bnbf::force_isa(isa) ? BNBF_OK
                              : bnbf::fail(BNBF_E_UNSUPPORTED, "ISA '%s' not available", isa);
}
