// Drives calls through attempts: picks a connection, sends, and on failure decides between a
// retry (after a backoff, within the deadline) and completing the call with the error.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>

#include "backoff.hpp"
#include "call.hpp"
#include "connection_pool.hpp"
#include "hsm/client.hpp"
#include "timer_queue.hpp"

namespace hsm::client {

/// Thread-safe. The retry rules (see client.hpp): a failure is retried when the request never
/// left this process, or when the call is idempotent and the connection was lost or the agent
/// answered hsm_unavailable, overloaded, shutting_down or audit_unavailable; never past the
/// deadline or RetryPolicy::max_attempts.
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

  /// Starts an asynchronous call on the calling thread, with a timer that fails it with
  /// timeout at its deadline.
  void start(const std::shared_ptr<Call>& call);
  /// Runs a synchronous call on the calling thread: starts it, then blocks until `done` (the
  /// call's completion flag) is set or the call's deadline passes, and then expires it. The
  /// deadline is enforced on the caller's own thread (no timer round trip), and the caller
  /// reads its own answer from the connection when no other thread reads it
  /// (Connection::await).
  void run(const std::shared_ptr<Call>& call, CompletionFlag& done);
  /// Fails the call with timeout unless it completed; its answer, if one comes, is dropped.
  void expire(const std::shared_ptr<Call>& call);

  /// From the thread reading a connection: the agent's answer to one attempt.
  void on_answer(const std::shared_ptr<Call>& call, Answer&& answer, ReportingThread thread);
  /// From the thread reading a connection: the connection died with the call pending.
  void on_failure(const std::shared_ptr<Call>& call, Failure&& failure, ReportingThread thread);

 private:
  using Thread = ReportingThread;
  /// Where a synchronous call's first attempt waits for the answer its caller reads.
  struct OwnAnswer {
    std::shared_ptr<Connection> connection;
    std::uint32_t msgid = 0;
  };
  /// One attempt: picks a connection and sends. With ReadBy::kSender (the caller's own first
  /// attempt of a synchronous call) returns where the call is in flight, for await().
  std::optional<OwnAnswer> attempt(const std::shared_ptr<Call>& call, Thread thread,
                                   ReadBy read_by = ReadBy::kAnyone);
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
