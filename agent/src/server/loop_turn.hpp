// LoopTurn: which thread runs the event loop now, and the watchdog that keeps it running.
//
// A libuv loop may be run by any thread, one at a time. The agent's loop is run by whichever
// worker holds the turn. When the agent is otherwise idle and a signing request arrives on a
// token that signs fast, the thread that read it gives the turn up, leaves uv_run, signs and
// answers, and takes the turn back: one thread wake-up per signature instead of two, the hand-off
// to a worker being the most expensive step left on the agent's side (docs/performance.md).
//
// What the worker pool is for (a hung token call stops one thread, never the loop) is kept by
// the watchdog. While a call runs inline with nobody holding the turn, it looks every `tick`;
// once the call has run for `overstay`, it calls `hand_over` (the server asks an idle worker to
// take the turn), once per inline call. The loop is then unattended for at most overstay + tick:
// deadlines, other connections, shutdown and the health heartbeat go on while the token hangs.
// With no inline call for `idle_after`, the watchdog sleeps until the next one.
//
// Thread-safety: every member may be called from any thread. Taking the turn (acquire) and
// giving it up (release) order the loop's state between the threads that run it in turn.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

namespace hsm::agent {

class LoopTurn {
 public:
  struct Timing {
    std::chrono::microseconds overstay{2000};
    std::chrono::microseconds tick{1000};
    std::chrono::milliseconds idle_after{50};
  };

  LoopTurn(Timing timing, std::function<void()> hand_over);
  ~LoopTurn();  // stops and joins the watchdog
  LoopTurn(const LoopTurn&) = delete;
  LoopTurn& operator=(const LoopTurn&) = delete;

  /// Takes the turn if nobody holds it. The winner may run the loop until it gives it up.
  [[nodiscard]] bool try_take() noexcept;
  /// The holder gives the turn up to run one call inline; the watchdog starts timing it.
  /// Returns the call's ticket for inline_call_done().
  [[nodiscard]] std::int64_t release_for_inline_call() noexcept;
  /// The inline call with this ticket returned (the caller then tries to take the turn back).
  /// A call that returns after a later one started leaves the later one timed.
  void inline_call_done(std::int64_t ticket) noexcept;
  /// The holder gives the turn up for good (the loop ended).
  void release() noexcept;

  [[nodiscard]] bool held() const noexcept { return held_.load(std::memory_order_acquire); }
  /// How many inline calls overstayed and had the turn handed over.
  [[nodiscard]] std::uint64_t hand_overs() const noexcept { return hand_overs_.load(); }

 private:
  void watch();

  const Timing timing_;
  const std::function<void()> hand_over_;
  std::atomic<bool> held_{false};
  std::atomic<std::int64_t> inline_since_ns_{0};  // 0: no inline call; else its ticket
  std::atomic<std::int64_t> last_ticket_{0};      // written only by the turn's holder
  std::atomic<std::uint64_t> hand_overs_{0};

  std::mutex mutex_;  // the watchdog's sleep
  std::condition_variable wake_;
  std::atomic<bool> asleep_{false};  // the watchdog waits for an inline call (no ticks)
  bool stopping_ = false;
  std::thread watchdog_;
};

}  // namespace hsm::agent
