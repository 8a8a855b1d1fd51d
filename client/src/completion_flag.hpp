// A one-shot "done" flag one thread can wait on with a deadline: an atomic word and a Linux
// futex, so a synchronous call costs one wake-up system call on each side, and none when the
// answer is in before the caller sleeps.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <ctime>

namespace hsm::client {

/// set() once, from any thread; wait_until()/wait() from one waiting thread. Whatever the
/// setter wrote before set() is visible to the waiter after a wait that returned true.
///
/// Why not std::condition_variable: glibc re-locks the mutex after a wake-up as if it were
/// contended, so every unlock that follows is one more futex system call; and why not a
/// timed std::binary_semaphore: libstdc++ 12 waits for those by sleeping in growing steps
/// (up to 64 ms) instead of blocking in the kernel.
class CompletionFlag {
 public:
  using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC, as FUTEX_WAIT_BITSET expects

  void set() noexcept {
    if (state_.exchange(kDone, std::memory_order_acq_rel) == kSleeping) {
      ::syscall(SYS_futex, &state_, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
    }
  }

  [[nodiscard]] bool is_set() const noexcept {
    return state_.load(std::memory_order_acquire) == kDone;
  }

  /// True once set(); false when `deadline` passed first.
  [[nodiscard]] bool wait_until(Clock::time_point deadline) noexcept { return wait(&deadline); }
  /// Blocks until set().
  void wait() noexcept { (void)wait(nullptr); }

 private:
  static constexpr std::uint32_t kPending = 0;
  static constexpr std::uint32_t kSleeping = 1;  // a waiter is (about to be) in the kernel
  static constexpr std::uint32_t kDone = 2;

  bool wait(const Clock::time_point* deadline) noexcept {
    for (;;) {
      std::uint32_t state = state_.load(std::memory_order_acquire);
      if (state == kDone) {
        return true;
      }
      if (state == kPending &&
          !state_.compare_exchange_weak(state, kSleeping, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
        continue;  // set() (or a spurious failure) came in between: look again
      }
      timespec until{};
      if (deadline != nullptr) {
        const auto since_epoch = deadline->time_since_epoch();
        if (Clock::now() >= *deadline) {
          return is_set();
        }
        const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(since_epoch);
        until.tv_sec = static_cast<std::time_t>(seconds.count());
        until.tv_nsec = static_cast<long>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(since_epoch - seconds).count());
      }
      // Sleeps only while the word still says kSleeping; set() changes it before waking us,
      // so a wake-up cannot be missed. EINTR, EAGAIN and spurious wake-ups loop.
      const long rc =
          ::syscall(SYS_futex, &state_, FUTEX_WAIT_BITSET_PRIVATE, kSleeping,
                    deadline != nullptr ? &until : nullptr, nullptr, FUTEX_BITSET_MATCH_ANY);
      if (rc != 0 && errno == ETIMEDOUT) {
        return is_set();
      }
    }
  }

  static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
  std::atomic<std::uint32_t> state_{kPending};  // the futex word
};

}  // namespace hsm::client
