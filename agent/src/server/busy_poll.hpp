// BusyPollLoop: runs a libuv loop like uv_run(UV_RUN_DEFAULT), but after an iteration that made
// progress it keeps polling the loop without blocking (UV_RUN_NOWAIT) for up to a budget of idle
// time before it blocks in the kernel again (UV_RUN_ONCE). The latency mode of issue 21
// (--busy-poll-us; docs/performance.md, "Latency mode"): a request that arrives while the thread
// polls is read at once, without the wake-up of a thread sleeping in epoll_wait on another core
// (~35 µs of the ~40 µs Unix-socket round trip on the VM it was measured on).
//
// The rules: a budget of 0 never polls (exactly uv_run(UV_RUN_DEFAULT)); polling happens only
// while `may_poll()` says no other work needs the CPU; each stretch of idle polling ends at the
// budget, counted from the last progress, and then the loop blocks. And when the thread was
// preempted between two answers (the kernel took its core: every core is busy), it does not
// poll for a pause (common::kPauseAfterPreemption): on a machine without an idle core, each
// microsecond spent polling is taken from signing.
#pragma once

#include <uv.h>

#include <chrono>
#include <cstdint>

#include "hsm/common/preemptions.hpp"

namespace hsm::agent {

class BusyPollLoop {
 public:
  using Clock = std::chrono::steady_clock;
  /// The calling thread's involuntary context switches (tests count their own).
  using Preemptions = std::uint64_t (*)();

  BusyPollLoop(uv_loop_t& loop, std::chrono::microseconds budget,
               Preemptions preemptions = &common::thread_preemptions,
               Clock::duration pause = common::kPauseAfterPreemption)
      : loop_(loop), budget_(budget), preemptions_(preemptions), pause_(pause) {}

  [[nodiscard]] std::chrono::microseconds budget() const noexcept { return budget_; }

  /// Runs the loop until `stopped()` is true after an iteration (the caller's uv_stop()), or the
  /// loop has nothing left to run. `progress()` is a counter that moves when an iteration did
  /// work worth polling after (an answer written); `may_poll()` is false while polling would
  /// take the CPU from other work. Returns what the last uv_run returned (0: the loop ended).
  template <typename Stopped, typename Progress, typename MayPoll>
  int run(Stopped stopped, Progress progress, MayPoll may_poll) {
    if (budget_.count() == 0) return uv_run(&loop_, UV_RUN_DEFAULT);
    // Entered after an answer (an inline call) or at the start: a poll window is open.
    auto last_progress = progress();
    auto window_end = Clock::now() + budget_;
    auto preempted = preemptions_();  // this thread's: run() may run on another one next time
    for (;;) {
      const auto started = Clock::now();
      const bool polling = started < window_end && started >= paused_until_ && may_poll();
      const int alive = uv_run(&loop_, polling ? UV_RUN_NOWAIT : UV_RUN_ONCE);
      const auto now = Clock::now();
      if (polling) {
        ++polls_;
      } else {
        ++blocks_;
      }
      const auto moved = progress();
      if (moved != last_progress) {
        last_progress = moved;
        window_end = now + budget_;
        if (const auto seen = preemptions_(); seen != preempted) {
          preempted = seen;  // the cores are all busy: leave them to work for a while
          paused_until_ = now + pause_;
          ++pauses_;
        }
      } else if (polling) {
        idle_polling_ += now - started;  // what polling cost: time that found nothing
      }
      if (alive == 0 || stopped()) return alive;
    }
  }

  /// Loop iterations run without blocking, and run blocking (UV_RUN_ONCE), since construction.
  [[nodiscard]] std::uint64_t polls() const noexcept { return polls_; }
  [[nodiscard]] std::uint64_t blocks() const noexcept { return blocks_; }
  /// Time spent polling iterations that found nothing to do.
  [[nodiscard]] Clock::duration idle_polling() const noexcept { return idle_polling_; }
  /// Pauses after a preemption.
  [[nodiscard]] std::uint64_t pauses() const noexcept { return pauses_; }

 private:
  uv_loop_t& loop_;
  const std::chrono::microseconds budget_;
  const Preemptions preemptions_;
  const Clock::duration pause_;
  Clock::time_point paused_until_{};
  std::uint64_t pauses_ = 0;
  std::uint64_t polls_ = 0;
  std::uint64_t blocks_ = 0;
  Clock::duration idle_polling_{};
};

}  // namespace hsm::agent
