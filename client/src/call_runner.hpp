// Drives calls through attempts: picks a connection, sends, and on failure decides between a
// retry (after a backoff, within the deadline) and completing the call with the error.
#pragma once

#include <atomic>
#include <memory>

#include "backoff.hpp"
#include "call.hpp"
#include "connection_pool.hpp"
#include "hsm/client.hpp"
#include "timer_queue.hpp"

namespace hsm::client {

/// Thread-safe. The retry rules (see client.hpp): a failure is retried when the request never
/// left this process, or when the call is idempotent and the connection was lost or the agent
/// answered hsm_unavailable, overloaded or shutting_down; never past the deadline or
/// RetryPolicy::max_attempts.
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

  /// Starts a call on the calling thread. An asynchronous call also gets a timer that fails it
  /// with timeout at its deadline; a synchronous caller enforces its deadline itself (expire()).
  void start(const std::shared_ptr<Call>& call, bool async);
  /// Fails the call with timeout unless it completed; its answer, if one comes, is dropped.
  void expire(const std::shared_ptr<Call>& call);

  /// From a connection's reader thread: the agent's answer to one attempt.
  void on_answer(const std::shared_ptr<Call>& call, Answer&& answer);
  /// From a connection's reader thread: the connection died with the call pending.
  void on_failure(const std::shared_ptr<Call>& call, Failure&& failure);

 private:
  enum class Thread : std::uint8_t { kCaller, kClient };
  void attempt(const std::shared_ptr<Call>& call, Thread thread);
  void retry_or_finish(const std::shared_ptr<Call>& call, Failure&& failure, Thread thread,
                       Clock::time_point not_before);
  void finish(const std::shared_ptr<Call>& call, Answer&& answer, Thread thread);

  const std::uint32_t max_attempts_;
  const Backoff backoff_;
  std::atomic<bool> closing_{false};
  TimerQueue timer_;
  ConnectionPool pool_;  // declared last: destroyed first (its readers report to the above)
};

}  // namespace hsm::client
