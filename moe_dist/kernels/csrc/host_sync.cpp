// Flags in memory shared by the processes of one host, for moe_dist/parallel/host_exchange.py:
// a release store after a rank wrote its message, an acquire wait before its peers read it.
// (Python has no atomics; torch's copies between these calls are ordered by them on any CPU.)
//
// A waiter spins briefly, then yields its core for up to kYieldS (a peer on its own core is
// usually that close: a futex wake-up costs tens of microseconds more on a VM), then sleeps on
// the flag with a futex (Linux), which the storer wakes: a peer far behind (a checkpoint, an
// evaluation) or ranks that outnumber cores do not keep a core spinning.
#include <algorithm>
#include <chrono>
#include <climits>
#include <thread>

#include "kernels.h"

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#endif

namespace {

constexpr double kYieldS = 0.002;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The futex word is the flag's low 32 bits (little-endian: its first 4 bytes); sequence numbers
// stay far below 2^31.
inline int* futex_word(const int64_t* flag) { return reinterpret_cast<int*>(const_cast<int64_t*>(flag)); }

// Sleep until the flag's low word differs from `seen`, a wake, or `seconds`.
inline void sleep_on(const int64_t* flag, int64_t seen, double seconds) {
#ifdef __linux__
  timespec ts{static_cast<time_t>(seconds), static_cast<long>((seconds - static_cast<time_t>(seconds)) * 1e9)};
  syscall(SYS_futex, futex_word(flag), FUTEX_WAIT, static_cast<int>(seen), &ts, nullptr, 0);
#else
  (void)flag, (void)seen, (void)seconds;
  std::this_thread::yield();
#endif
}

}  // namespace

void flag_store(const at::Tensor& flags, int64_t index, int64_t value) {
  int64_t* flag = flags.data_ptr<int64_t>() + index;
  __atomic_store_n(flag, value, __ATOMIC_RELEASE);
#ifdef __linux__
  syscall(SYS_futex, futex_word(flag), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
#endif
}

// Wait until flags[first + r * stride] >= value for every r < count except `skip`. Returns -1,
// or the first r still short after `timeout_s`. Called without the GIL, so the rank's
// heartbeat thread keeps running while it waits.
int64_t flags_wait(const at::Tensor& flags, int64_t first, int64_t stride, int64_t count, int64_t skip, int64_t value,
                   double timeout_s) {
  const int64_t* p = flags.data_ptr<int64_t>();
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < count; ++r) {
    if (r == skip) continue;
    const int64_t* f = p + first + r * stride;
    for (int spins = 0; spins < 2048 && __atomic_load_n(f, __ATOMIC_ACQUIRE) < value; ++spins) cpu_relax();
    for (int64_t seen; (seen = __atomic_load_n(f, __ATOMIC_ACQUIRE)) < value;) {
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (waited >= timeout_s) return r;
      if (waited < kYieldS) {
        std::this_thread::yield();
      } else {
        sleep_on(f, seen, std::min(timeout_s - waited, 0.01));
      }
    }
  }
  return -1;
}
