// Reading an answer on the thread that waits for it (issue 17) and, optionally, polling for it
// before blocking (issue 21, ClientOptions::busy_poll).
//
// Why poll at all: on a multi-core machine most of a Unix-socket round trip is the kernel waking
// the blocked reader on another core (docs/performance.md, "Latency mode"). A thread that keeps
// asking the socket for a few microseconds after its request left gets the answer without that
// wake-up, at the price of the CPU it spins. Both are bounded here: the spin by a budget, the
// budget by what recent answers took (SpinBudget).
#pragma once

#include <poll.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <semaphore>
#include <span>

#include "hsm/common/preemptions.hpp"
#include "timer_queue.hpp"  // Clock

namespace hsm::client {

/// What one receive() got.
struct Received {
  enum class Kind : std::uint8_t {
    kData,     // `size` bytes (more than 0) are in the buffer
    kEnd,      // the peer closed the stream, or it was shut down
    kNothing,  // nothing arrived until the wait's end
    kFailed,   // recv() or poll() failed with `error` (an errno value)
  };
  Kind kind = Kind::kNothing;
  std::size_t size = 0;
  int error = 0;
};

/// Milliseconds from now until `until`, rounded up, for poll(): 0 when it has passed, at most
/// a minute (a longer wait just looks again).
[[nodiscard]] int poll_timeout_ms(Clock::time_point until) noexcept;

/// What receive() did, for tests and the benchmark: how often it asked the socket without
/// waiting while it polled, and how often it went on to block. `before_block` (tests) runs each
/// time the polling budget is spent, just before the thread blocks.
struct ReceiveProbe {
  std::uint64_t polls = 0;
  std::uint64_t blocks = 0;
  std::function<void()> before_block;
};

/// Reads what `fd` has into `space`. First polls: non-blocking recv() until data comes or `spin`
/// has passed (none with a zero budget). Then blocks until data comes or `until`: in recv() when
/// `until` is Clock::time_point::max() (one system call), in poll() otherwise. EINTR is retried.
Received receive(int fd, std::span<char> space, std::chrono::nanoseconds spin,
                 Clock::time_point until, ReceiveProbe* probe = nullptr) noexcept;

/// The polling budget of a client's synchronous calls: the configured cap while most recent
/// answers came within it, else nothing (a token that answers in 2 ms is not worth 100 us of
/// spinning per call). It keeps a moving average of how many answers came within the cap (each
/// answer moves it by an eighth), and polls while that share is at least a half: one slow answer
/// does not switch polling off, a slow token does within a few calls, and since answers keep
/// being timed while it is off, polling comes back when the token is fast again.
///
/// And at most half the machine's cores (at least one caller) poll at once: callers that spin
/// on every core leave none for the agent and the app, and everybody is slower (measured in
/// docs/performance.md, "Latency mode"). A caller that was preempted while it polled (the
/// kernel took its core: every core is busy) stops everyone's polling for a pause
/// (common::kPauseAfterPreemption), for the same reason. Thread-safe (samples of concurrent callers
/// may overwrite each other, which only makes the average a little coarser).
class SpinBudget {
 public:
  /// The right to poll for one call, and for how long; given back when it goes.
  class Lease {
   public:
    ~Lease() {
      if (owner_ != nullptr) owner_->pollers_.release();
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Lease(Lease&&) = delete;
    Lease& operator=(Lease&&) = delete;
    [[nodiscard]] std::chrono::nanoseconds spin() const noexcept { return spin_; }
    /// The poll is over: when this thread was preempted since the lease began, nobody polls
    /// for a pause (SpinBudget::preempted()). Nothing for a lease without a spin.
    void end_poll() const noexcept;

   private:
    friend class SpinBudget;
    Lease(SpinBudget* owner, std::chrono::nanoseconds spin) noexcept;
    SpinBudget* owner_;
    std::chrono::nanoseconds spin_;
    std::uint64_t preemptions_before_ = 0;  // the thread's count when the lease began
  };

  /// `cap` zero: never polls. `max_pollers`: 0 for half the cores (at least 1).
  explicit SpinBudget(std::chrono::microseconds cap, unsigned max_pollers = 0,
                      Clock::duration pause = common::kPauseAfterPreemption) noexcept;

  /// The budget for the next call: the cap, or nothing while answers are slow or enough
  /// callers poll already.
  [[nodiscard]] Lease lease() noexcept;
  /// How long a call's answer took, from its request leaving to its answer read.
  void record(Clock::duration answer_time) noexcept;
  /// A caller was preempted while it held a lease: nobody polls until the pause has passed.
  void preempted() noexcept;
  /// The share of recent answers that came within the cap, 0 to 1.
  [[nodiscard]] double share_within_cap() const noexcept {
    return static_cast<double>(share_.load(std::memory_order_relaxed)) / kWhole;
  }

 private:
  static constexpr std::int32_t kWhole = 1 << 16;  // fixed point: kWhole is a share of 1
  static constexpr std::ptrdiff_t kMostPollers = 1024;
  const std::chrono::nanoseconds cap_;
  const Clock::duration pause_;
  std::atomic<std::int32_t> share_{kWhole};  // optimistic: the first calls find out
  std::atomic<Clock::rep> paused_until_{0};  // since the clock's epoch
  std::counting_semaphore<kMostPollers> pollers_;
};

}  // namespace hsm::client
