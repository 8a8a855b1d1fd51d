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

/// set() once, from any thread; the wait functions from one waiting thread. Whatever the
/// setter wrote before set() is visible to the waiter after a wait that returned true (kSet).
///
/// nudge() wakes the waiter without setting the flag, any number of times, from any thread: a
/// hint to look at some other state (a connection hands its read side to a waiting caller this
/// way, see Connection::await). Only wait_until_set_or_nudged() returns for it; the other waits
/// treat a nudge as a spurious wake-up.
///
/// Why not std::condition_variable: glibc re-locks the mutex after a wake-up as if it were
/// contended, so every unlock that follows is one more futex system call; and why not a
/// timed std::binary_semaphore: libstdc++ 12 waits for those by sleeping in growing steps
/// (up to 64 ms) instead of blocking in the kernel.
class CompletionFlag {
 public:
  using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC, as FUTEX_WAIT_BITSET expects

  enum class Wake : std::uint8_t { kSet, kNudged, kTimedOut };

  void set() noexcept {
    if ((state_.exchange(kDone, std::memory_order_acq_rel) & kSleeping) != 0) {
      wake();
    }
  }

  void nudge() noexcept {
    if ((state_.fetch_or(kNudged, std::memory_order_acq_rel) & kSleeping) != 0) {
      wake();
    }
  }

  [[nodiscard]] bool is_set() const noexcept {
    return (state_.load(std::memory_order_acquire) & kDone) != 0;
  }

  /// True once set(); false when `deadline` passed first.
  [[nodiscard]] bool wait_until(Clock::time_point deadline) noexcept {
    return wait(&deadline, false) == Wake::kSet;
  }
  /// Blocks until set().
  void wait() noexcept { (void)wait(nullptr, false); }
  /// Returns at set(), at a nudge() (each nudge is reported once) or at `deadline`; kSet wins
  /// when several apply.
  [[nodiscard]] Wake wait_until_set_or_nudged(Clock::time_point deadline) noexcept {
    return wait(&deadline, true);
  }

 private:
  // Bits of the futex word. kDone is final: set() stores it alone (dropping the others).
  static constexpr std::uint32_t kSleeping = 1;  // the waiter is (about to be) in the kernel
  static constexpr std::uint32_t kDone = 2;
  static constexpr std::uint32_t kNudged = 4;

  void wake() noexcept {
    ::syscall(SYS_futex, &state_, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
  }

  Wake finish_wait(Wake wake) noexcept {
    // The waiter leaves: a later set() or nudge() need not enter the kernel.
    state_.fetch_and(~kSleeping, std::memory_order_acq_rel);
    return is_set() ? Wake::kSet : wake;
  }

  Wake wait(const Clock::time_point* deadline, bool return_on_nudge) noexcept {
    for (;;) {
      std::uint32_t state = state_.load(std::memory_order_acquire);
      if ((state & kDone) != 0) {
        return Wake::kSet;
      }
      if ((state & kNudged) != 0) {
        state_.fetch_and(~kNudged, std::memory_order_acq_rel);
        if (return_on_nudge) {
          return finish_wait(Wake::kNudged);
        }
        continue;
      }
      if (state != kSleeping &&
          !state_.compare_exchange_weak(state, kSleeping, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
        continue;  // set() or nudge() (or a spurious failure) came in between: look again
      }
      timespec until{};
      if (deadline != nullptr) {
        const auto since_epoch = deadline->time_since_epoch();
        if (Clock::now() >= *deadline) {
          return finish_wait(Wake::kTimedOut);
        }
        const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(since_epoch);
        until.tv_sec = static_cast<std::time_t>(seconds.count());
        until.tv_nsec = static_cast<long>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(since_epoch - seconds).count());
      }
      // Sleeps only while the word is exactly kSleeping; set() and nudge() change it before
      // waking us, so a wake-up cannot be missed. EINTR, EAGAIN and spurious wake-ups loop.
      const long rc =
          ::syscall(SYS_futex, &state_, FUTEX_WAIT_BITSET_PRIVATE, kSleeping,
                    deadline != nullptr ? &until : nullptr, nullptr, FUTEX_BITSET_MATCH_ANY);
      if (rc != 0 && errno == ETIMEDOUT) {
        return finish_wait(Wake::kTimedOut);
      }
    }
  }

  static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
  std::atomic<std::uint32_t> state_{0};  // the futex word: kSleeping | kDone | kNudged
};

}  // namespace hsm::client
