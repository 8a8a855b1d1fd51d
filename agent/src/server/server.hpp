// Server: the agent's event loop. Listens on the Unix socket, turns messages into calls,
// answers what needs no token on the loop, hands the rest to the worker pool, enforces the
// bounds (connections, in-flight per connection, queue, deadlines, idle time), writes answers
// once per loop iteration per connection, and shuts down gracefully on SIGTERM/SIGINT.
//
// Thread-safety: run() blocks its caller until the loop ends. The loop is run by one worker at a
// time, whichever holds the LoopTurn ("the loop thread" below is that worker). A sign that
// arrives while nothing else is in flight, on a token that signs fast, is run by the thread that
// read it, after it gives the turn up (loop_turn.hpp: a watchdog hands the turn over if the call
// overstays). A worker writes its answer through the connection's ConnectionOutput and counts it
// (metrics, audit, in_flight_); it tells the loop about it, through the completion queue (a mutex
// and a uv_async_t), only when the loop has something to do (flush the rest, resume reading,
// close, finish shutting down).
#pragma once

#include <uv.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "config/agent_config.hpp"
#include "log/audit_log.hpp"
#include "log/connection_refusals.hpp"
#include "metrics/agent_metrics.hpp"
#include "metrics/health_state.hpp"
#include "server/call.hpp"
#include "server/connection.hpp"
#include "server/deadline_queue.hpp"
#include "server/heap_trimmer.hpp"
#include "server/loop_turn.hpp"
#include "server/memory_budget.hpp"
#include "server/socket_path.hpp"
#include "server/worker_pool.hpp"
#include "service/key_service.hpp"

namespace hsm::agent {

class AccessControl;
class RateLimiter;

class Server final : public ConnectionEvents {
 public:
  /// Everything the server works with; all must outlive it.
  struct Dependencies {
    const AgentConfig& config;
    KeyService& keys;
    AgentMetrics& metrics;
    HealthState& health;
    AccessControl& access;
    AuditLog& audit;
    RateLimiter& rate_limiter;
  };

  explicit Server(Dependencies deps);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  /// Binds the socket (throws SocketSetupError), then runs the loop until shutdown completes.
  /// `on_listening` is called just before the socket starts accepting connections (so a client
  /// that can connect finds it done: readiness). `on_reload` runs on SIGHUP, on a thread of
  /// libuv's pool, never on the loop (it reads files: a slow one must not stop the agent
  /// answering); never two at once, and SIGHUPs that arrive meanwhile make one more run after it.
  void run(const std::function<void()>& on_listening, const std::function<void()>& on_reload);

  // ConnectionEvents (loop thread)
  void on_message(Connection& connection, const msgpack::object& message,
                  std::size_t bytes) override;
  void on_frame_error(Connection& connection, const protocol::FrameError& error) override;
  /// A connection refused by policy sent its first message: answers permission_denied, naming
  /// the uid, and closes.
  void answer_refused(Connection& connection, const msgpack::object& message);
  void on_closed(Connection& connection) override;
  void on_output_pending(Connection& connection) override;
  void on_slow_reader(Connection& connection) override;
  void on_waiting_for_memory(Connection& connection) override;

 private:
  // What a worker's answer left for the loop to do on its connection.
  struct Completion {
    std::uint64_t connection_id = 0;
    ConnectionOutput::AfterAnswer after;
  };

  void listen(const std::function<void()>& on_listening);
  /// Binds listener_ at the socket path and applies its mode and group; on failure closes it
  /// and throws SocketSetupError.
  void bind_listener();
  void start_accepting();
  /// On the tick: while the path still names our socket, nothing; else not ready with the
  /// reason, and a new listener once the path is free (issue 15, item 9).
  void watch_socket();
  void rebind_listener();
  /// Closes listener_ (not for shutdown); with `bind_again`, binds a new one once it is closed.
  void close_listener(bool bind_again);
  void report_socket_problem(const std::string& problem);
  void request_reload();
  void accept_one();
  /// The check phase of each loop iteration: accepts again after accept_one() deferred.
  void resume_accepting();
  void dispatch(Connection& connection, protocol::Request&& request, std::size_t bytes);
  void answer_now(Connection& connection, const protocol::Request& request,
                  protocol::Response&& response, SteadyClock::time_point received);
  /// The loop answers a call in flight instead of its worker (deadline, shutdown).
  void answer_on_loop(Call& call, const protocol::Response& response);
  /// Metrics and audit line of an answered call, before its answer is written; loop or worker
  /// thread. The caller decrements in_flight_ once the answer is written.
  void count_answered(const Call& call, std::optional<protocol::ErrorCode> code,
                      std::optional<AuditRecord> audit);
  void run_on_worker(const std::shared_ptr<Call>& call);
  /// Whether `call` (counted in already) runs on the thread that read it; see loop_turn.hpp.
  [[nodiscard]] bool runs_inline(const Call& call, std::size_t in_flight_before) const;
  /// A worker's loop duty: takes the turn if free and runs the loop, and the calls it gives the
  /// turn up for, until the loop ends or another worker holds the turn.
  void run_loop_turn();
  void note_sign_latency(SteadyClock::duration elapsed);
  void drain_completions();
  void expire_deadlines();
  void arm_deadline_timer();
  void sweep_idle();
  /// On the tick, closes the connections that stalled: an incomplete message older than
  /// --read-timeout, a refused caller that sent no request in time, a client that hung up while
  /// its connection waited for memory (it reads nothing, so it would not see the EOF).
  void close_stalled_connections();
  /// Connections that stopped reading for want of memory read again (they ask the budget anew).
  void resume_memory_waiters();
  /// Samples the budget for /metrics; after a burst was freed, has the heap trimmed soon.
  void watch_memory();
  void close_stuck_flushes(SteadyClock::time_point requested_before);
  void flush_dirty();
  void begin_shutdown();
  void finish_shutdown();
  void on_signal(int signum);

 public:
  /// True when shutdown left workers inside hung PKCS#11 calls: the token must not be
  /// finalised under them, and the process should exit without destructors.
  [[nodiscard]] bool abandoned_workers() const noexcept { return abandoned_workers_; }

 private:
  Dependencies deps_;
  protocol::CapabilitiesResult capabilities_;  // answered on the loop, without the token
  ConnectionLimits connection_limits_;
  uv_loop_t loop_{};
  uv_pipe_t listener_{};
  uv_async_t completions_async_{};
  uv_async_t memory_async_{};  // bytes were released while a connection waited for room
  uv_timer_t deadline_timer_{};
  uv_timer_t tick_timer_{};
  uv_timer_t drain_timer_{};
  uv_timer_t final_flush_timer_{};  // bounds the last flush after shutdown (see finish_shutdown)
  uv_check_t flush_check_{};        // writes what reads in this iteration answered
  uv_prepare_t flush_prepare_{};    // writes what timers and wake-ups answered, before the poll
                                    // blocks (a deadline's answer would wait for the next tick)
  uv_signal_t sigterm_{}, sigint_{}, sighup_{};
  std::function<void()> on_reload_;

  std::unordered_map<std::uint64_t, Connection*> connections_;
  ConnectionRefusals refusals_{deps_.audit};  // log and audit lines of refused connections
  std::size_t accepts_this_turn_ = 0;         // accepts in this loop iteration
  bool accept_deferred_ = false;              // a connection left pending until the check phase
  std::uint64_t next_connection_id_ = 1;
  std::vector<Connection*> dirty_;
  std::unordered_map<uid_t, std::size_t> uid_connections_;  // admitted connections per uid
  std::size_t refused_reading_ = 0;  // refused connections read for their first request

  MemoryBudget budget_;
  std::vector<std::uint64_t> memory_waiters_;  // connection ids
  std::mutex memory_async_mutex_;              // workers signal memory_async_ only while open
  bool memory_async_open_ = false;
  std::atomic<std::size_t> in_flight_{0};  // decremented by workers too

  DeadlineQueue deadlines_;
  SteadyClock::time_point deadline_timer_due_ = SteadyClock::time_point::max();

  std::mutex completions_mutex_;
  std::vector<Completion> completions_;
  std::vector<Completion> completions_spare_;  // swapped in, to keep the capacity

  std::atomic<std::size_t> running_calls_{0};
  std::shared_ptr<Call> inline_call_;  // read this loop iteration, to run when uv_run returns
  std::atomic<std::int64_t> sign_latency_ns_{0};  // moving average of the token's signs
  std::mutex loop_ended_mutex_;
  std::condition_variable loop_ended_cv_;
  bool loop_ended_ = false;
  bool listening_ = false;
  bool listener_closing_ = false;  // uv_close's callback has not run yet (close_listener)
  bool rebind_after_close_ = false;
  SocketFile socket_file_;  // the file bind made: what the socket path should name
  std::optional<std::string> socket_problem_;  // as reported to HealthState; nullopt: none
  uv_work_t reload_work_{};
  bool reload_running_ = false;
  bool reload_again_ = false;               // SIGHUP while reloading: once more afterwards
  std::atomic<bool> shutting_down_{false};  // read by workers
  SteadyClock::time_point shutdown_deadline_ = SteadyClock::time_point::max();
  bool finished_ = false;
  bool abandoned_workers_ = false;
  std::unique_ptr<WorkerPool> workers_;
  std::unique_ptr<LoopTurn> turn_;             // declared after workers_: its watchdog stops first
  std::unique_ptr<HeapTrimmer> heap_trimmer_;  // started by run()
};

}  // namespace hsm::agent
