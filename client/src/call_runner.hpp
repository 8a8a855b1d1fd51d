// Drives calls through attempts: picks a connection, sends, and on failure decides between a
// retry (after a backoff, within the deadline) and completing the call with the error. Enforces
// deadlines (timer thread) and cancellation (the call's stop_token).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <stop_token>

#include "backoff.hpp"
#include "call.hpp"
#include "connection_pool.hpp"
#include "hsm/client.hpp"
#include "poll_then_block.hpp"
#include "timer_queue.hpp"

namespace hsm::client {

/// Thread-safe. The retry rules (see client.hpp): a failure is retried when the request never
/// left this process, or when the call is idempotent and the connection was lost or the agent
/// answered hsm_unavailable, overloaded, shutting_down or audit_unavailable; never past the
/// deadline or RetryPolicy::max_attempts, and never once the call completed (timed out or
/// cancelled).
///
/// Owns the timer and the pool; the pool's connections report each attempt's end through the
/// function the runner hands the pool (they know nothing of the runner).
class CallRunner {
 public:
  explicit CallRunner(const ClientOptions& options);
  /// Closes the connections (failing what is in flight) and stops the timer thread; every call
  /// has completed when it returns.
  ~CallRunner();
  CallRunner(const CallRunner&) = delete;
  CallRunner& operator=(const CallRunner&) = delete;
  CallRunner(CallRunner&&) = delete;
  CallRunner& operator=(CallRunner&&) = delete;

  /// Starts a call from the calling thread: a timer that fails it with timeout at its deadline,
  /// a watch on `stop` that cancels it, and its first attempt. Returns at once (a synchronous
  /// caller then waits on its SyncCall). A callback call never completes on this thread.
  void start(const std::shared_ptr<Call>& call, const std::stop_token& stop);

  /// After start(), on the thread that started a synchronous call: reads the answer here when
  /// nobody else is reading its connection (no thread wake-up between the answer and its
  /// caller), polling first for the budget ClientOptions::busy_poll allows. Returns when the
  /// call's answer is in, or when it cannot be read here (another thread reads the connection,
  /// the call moved on to a retry, its deadline passed); the caller then waits on the call.
  void read_answer_here(const std::shared_ptr<Call>& call);

  /// Where a call stands on its connections, for tests: calls waiting for an answer.
  [[nodiscard]] std::size_t pending_calls() { return pool_.pending_calls(); }
  /// Synchronous calls whose caller held the read turn of their connection (for tests).
  [[nodiscard]] std::uint64_t caller_reads() const noexcept {
    return caller_reads_.load(std::memory_order_relaxed);
  }

 private:
  /// An attempt that failed before anything was sent, and when a retry may start.
  struct NotSent {
    Failure failure;
    Clock::time_point not_before;
  };
  /// One attempt: picks a connection and sends. nullopt: in flight (its connection reports
  /// its end) or already completed.
  /// `caller_reads`: the first attempt of a synchronous call, sent from its caller's thread.
  std::optional<NotSent> attempt(const std::shared_ptr<Call>& call, bool caller_reads = false);
  /// From a connection's reader thread: the attempt's answer, or the connection lost.
  void attempt_ended(const std::shared_ptr<Call>& call, Answer&& answer);
  /// The same, read by a synchronous caller: a callback call's goes to the timer thread.
  void attempt_ended_on_caller(const std::shared_ptr<Call>& call, Answer&& answer);
  void retry_or_finish(const std::shared_ptr<Call>& call, Failure&& failure,
                       Clock::time_point not_before);
  /// Completes the call unless it completed already; withdraws its deadline timer, and with
  /// `withdraw_request` its pending entry (a timeout or a cancellation: its answer is dropped).
  void finish(const std::shared_ptr<Call>& call, Answer&& answer, bool withdraw_request = false);
  /// From a thread that is not the client's (a stop requested): a callback call's completion
  /// goes to the timer thread.
  void finish_from_caller(const std::shared_ptr<Call>& call, Error&& error);

  const std::uint32_t max_attempts_;
  const Backoff backoff_;
  std::atomic<bool> closing_{false};
  SpinBudget spin_;
  std::atomic<std::uint64_t> caller_reads_{0};
  const AttemptEnded deliver_on_caller_;
  TimerQueue timer_;
  ConnectionPool pool_;  // declared last: destroyed first (its readers report to the above)
};

}  // namespace hsm::client
