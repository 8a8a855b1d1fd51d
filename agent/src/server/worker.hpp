// Worker: one event loop and the connections handed to it at accept (Envoy's worker threads).
// A connection lives on one worker from accept to close; workers share no state on the hot path
// (the policy, the rate limiter and the metrics are thread-safe, and touched once per request).
//
// A request's path: the loop reads and decodes it, checks it (shutdown, policy, audit log, rate
// limit) and makes it a Call. Then either
// - inline: a sign or verify, on a token whose calls take under 500 µs on average, while this
//   worker has no call in the pool: the loop stops at the end of the iteration and the thread
//   that ran it does the token call itself, then runs the loop again. One wake-up per request,
//   like a thread-per-connection server (the floor in docs/performance.md);
// - or in the BlockingPool (a slow token, a long method, a busy connection), whose thread hands
//   the outcome back through the worker's inbox.
// Either way the worker answers it in one place, complete(), on its loop thread: the count of
// calls in flight, metrics, the audit line and the write to the connection.
//
// A hung inline call: while it runs, the loop is not run by anyone. The server's watchdog sees
// it once it has run for 2 ms (inline_call_overstayed()) and has a pool thread run the loop
// (drive()) from then on: the turn (a std::mutex) says which thread runs the loop. The stuck
// thread, when its call returns, hands its outcome in through the inbox and goes back to the
// pool. No call runs inline on that worker until it has returned.
//
// Thread-safety: drive() from any thread (one runs the loop at a time, the holder of the turn);
// the members marked "any thread" from any thread; everything else on the loop thread.
#pragma once

#include <uv.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "config/agent_config.hpp"
#include "log/audit_log.hpp"
#include "metrics/agent_metrics.hpp"
#include "server/blocking_pool.hpp"
#include "server/busy_poll.hpp"
#include "server/call.hpp"
#include "server/connection.hpp"
#include "server/deadline_queue.hpp"
#include "server/memory_budget.hpp"
#include "server/uv_handle.hpp"
#include "service/key_service.hpp"

namespace hsm::agent {

class AccessControl;
class RateLimiter;

/// What every worker shares; all of it thread-safe, and all of it outlives the workers.
struct WorkerContext {
  const AgentConfig& config;
  KeyService& keys;
  AgentMetrics& metrics;
  AccessControl& access;
  AuditLog& audit;
  RateLimiter& rate_limiter;
  MemoryBudget& budget;
  BlockingPool& pool;
  const protocol::CapabilitiesResult& capabilities;  // with the transport's limits
  ConnectionLimits connection_limits;
  /// A connection the server handed over has closed (any worker's thread).
  std::function<void(const Caller& caller, bool admitted)> on_connection_closed;
  /// The worker's loop has ended (after shutdown; its thread).
  std::function<void()> on_loop_ended;
  /// An inline call starts (its thread): the watchdog must be awake.
  std::function<void()> on_inline_call;
};

/// A connection accepted by the server, on its way to a worker.
struct AcceptedConnection {
  int fd = -1;  // the worker owns it from adopt() on
  std::uint64_t id = 0;
  Caller caller;
  std::shared_ptr<MemoryBudget::Meter> meter;  // admitted: charged to its uid
  bool refused = false;  // refused by policy: read its first request only, to answer why
};

class Worker final : public ConnectionEvents {
 public:
  Worker(std::size_t index, WorkerContext& context);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  /// Any thread: runs the loop while this thread holds the turn, and the inline calls it stops
  /// for; returns when the loop has ended, or when another thread took the turn over while this
  /// one was inside a call. Returns at once when another thread holds the turn.
  void drive();

  /// Any thread: the worker takes the connection over (closes `fd` when it cannot).
  void adopt(AcceptedConnection connection);
  /// Any thread: stop reading, answer what is in flight (at most until `drain_deadline`), close.
  void shut_down(SteadyClock::time_point drain_deadline);
  /// Any thread: bytes were released while connections waited for room in the memory budget.
  void memory_released();
  /// Any thread (the watchdog): true, once per call, when an inline call has run for longer than
  /// `overstay`; the caller then has a pool thread drive() the loop.
  [[nodiscard]] bool inline_call_overstayed(SteadyClock::time_point now,
                                            std::chrono::microseconds overstay);
  /// Any thread: how many inline calls started, ever (the watchdog sleeps when it stops moving).
  [[nodiscard]] std::uint64_t inline_calls() const noexcept {
    return inline_calls_.load(std::memory_order_relaxed);
  }
  /// Any thread: whether an inline call runs now.
  [[nodiscard]] bool inline_call_running() const noexcept {
    return inline_since_ns_.load(std::memory_order_seq_cst) > 0;
  }
  /// Any thread: connections on this worker (for placing new ones).
  [[nodiscard]] std::size_t connection_count() const noexcept {
    return connection_count_.load(std::memory_order_relaxed);
  }
  /// Any thread: whether the loop has ended (after shutdown).
  [[nodiscard]] bool loop_ended() const noexcept {
    return loop_ended_.load(std::memory_order_acquire);
  }

  // ConnectionEvents (loop thread)
  void on_message(Connection& connection, const msgpack::object& message) override;
  void on_frame_error(Connection& connection, const protocol::FrameError& error) override;
  void on_closing(Connection& connection) override;
  void on_closed(Connection& connection) override;
  void on_slow_reader(Connection& connection) override;
  void on_output_pending(Connection& connection) override;
  void on_waiting_for_memory(Connection& connection) override;

 private:
  // What the inbox carries from other threads to the loop.
  struct Completed {
    std::shared_ptr<Call> call;
    Outcome outcome;
    bool from_pool = false;  // else from an inline call the loop was handed over from
  };

  /// Any thread: queues work for the loop and wakes it. False once the loop is closing.
  bool post(std::function<void()> task);
  bool post_completed(std::shared_ptr<Call> call, Outcome outcome, bool from_pool);
  void drain_inbox();

  void take_connection(AcceptedConnection accepted);
  void answer_refused(Connection& connection, const msgpack::object& message);
  void dispatch(Connection& connection, protocol::Request&& request);
  /// A call was read: counted in flight on its connection and the worker.
  std::shared_ptr<Call> begin_call(Connection& connection, protocol::Request&& request,
                                   SteadyClock::time_point received);
  /// The one place a call is answered: in-flight counts, metrics, audit line, the write. A call
  /// answered already (its deadline passed, shutdown) is not answered again.
  void complete(Call& call, Outcome outcome);
  /// Runs a call in the token, on the calling thread (inline, or a pool thread).
  Outcome run(const Call& call);
  [[nodiscard]] bool runs_inline(const Call& call) const;
  /// Whether the loop may poll instead of sleeping: nothing of this worker's runs in the pool
  /// (its threads need the CPU) and its token calls are fast enough to run inline.
  [[nodiscard]] bool may_busy_poll() const;
  void note_call_latency(SteadyClock::duration elapsed) noexcept;

  /// Runs `action` on each listed connection still open, emptying the list first.
  void for_each_listed(std::vector<std::uint64_t>& ids, void (Connection::*action)());
  void flush_dirty();
  void arm_deadline_timer();
  void expire_deadlines();
  void on_tick();
  void sweep_idle();
  void close_stalled_connections();
  void close_stuck_flushes(SteadyClock::time_point requested_before);
  void resume_memory_waiters();
  void begin_shutdown(SteadyClock::time_point drain_deadline);
  void finish_shutdown();
  void close_handles();

  const std::size_t index_;
  WorkerContext& context_;
  uv_loop_t loop_{};
  std::mutex turn_;            // held by the thread running the loop
  BusyPollLoop loop_runner_;   // runs loop_ for the turn's holder (--busy-poll-us)
  std::uint64_t answers_ = 0;  // calls answered: the progress the runner polls after
  BusyPollLoop::Clock::duration idle_polling_counted_{};  // already added to the metric

  uv::Handle<uv_async_t> inbox_async_;
  uv::Handle<uv_timer_t> deadline_timer_;
  uv::Handle<uv_timer_t> tick_timer_;
  uv::Handle<uv_timer_t> drain_timer_;        // shutdown: the drain deadline
  uv::Handle<uv_timer_t> final_flush_timer_;  // shutdown: bounds the last flush
  uv::Handle<uv_check_t> flush_check_;        // writes what this iteration's reads answered
  uv::Handle<uv_prepare_t> flush_prepare_;    // writes what timers and the inbox answered

  std::mutex inbox_mutex_;
  bool inbox_open_ = true;
  std::vector<std::function<void()>> inbox_;
  std::vector<Completed> completed_;
  bool memory_released_ = false;

  std::unordered_map<std::uint64_t, std::unique_ptr<Connection>> connections_;
  std::atomic<std::size_t> connection_count_{0};
  std::vector<std::uint64_t> dirty_;           // connection ids with answers to write
  std::vector<std::uint64_t> memory_waiters_;  // connection ids
  std::size_t in_flight_ = 0;                  // calls read and not answered
  std::size_t pool_calls_ = 0;                 // of which handed to the pool, not back yet
  DeadlineQueue deadlines_;
  SteadyClock::time_point deadline_timer_due_ = SteadyClock::time_point::max();

  std::shared_ptr<Call> inline_call_;             // read this iteration, run once uv_run returns
  std::atomic<std::int64_t> inline_since_ns_{0};  // >0: an inline call started then; -1: it
                                                  // overstayed and the loop was handed over
  std::atomic<std::uint64_t> inline_calls_{0};
  std::atomic<std::int64_t> call_latency_ns_{0};  // moving average of this worker's sign/verify

  bool shutting_down_ = false;
  bool finished_ = false;
  SteadyClock::time_point drain_deadline_ = SteadyClock::time_point::max();
  std::atomic<bool> loop_ended_{false};
};

}  // namespace hsm::agent
