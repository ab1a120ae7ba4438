// Flags in memory shared by the processes of one host, for moe_dist/parallel/host_exchange.py:
// a release store after a rank wrote its message, an acquire wait before its peers read it.
// (Python has no atomics; torch's copies between these calls are ordered by them on any CPU.)
#include <chrono>
#include <thread>

#include "kernels.h"

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace

void flag_store(const at::Tensor& flags, int64_t index, int64_t value) {
  __atomic_store_n(flags.data_ptr<int64_t>() + index, value, __ATOMIC_RELEASE);
}

// Wait until flags[first + r * stride] >= value for every r < count except `skip`: spin a
// little (the peer is usually microseconds away), then yield the core (ranks may outnumber
// cores). Returns -1, or the first r still short after `timeout_s`. Called without the GIL, so
// the rank's heartbeat thread keeps running while it waits.
int64_t flags_wait(const at::Tensor& flags, int64_t first, int64_t stride, int64_t count, int64_t skip, int64_t value,
                   double timeout_s) {
  const int64_t* p = flags.data_ptr<int64_t>();
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < count; ++r) {
    if (r == skip) continue;
    const int64_t* f = p + first + r * stride;
    for (uint64_t spins = 0; __atomic_load_n(f, __ATOMIC_ACQUIRE) < value; ++spins) {
      if (spins < 4096) {
        cpu_relax();
        continue;
      }
      std::this_thread::yield();
      if ((spins & 1023) == 0 &&
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > timeout_s) {
        return r;
      }
    }
  }
  return -1;
}
