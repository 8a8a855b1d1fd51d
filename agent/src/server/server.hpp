// Server: the agent's front door and its threads. On its own event loop (the thread that calls
// run()) it listens on the Unix socket, admits or refuses each connection (limits, policy), and
// hands each admitted one to the worker with the fewest connections (worker.hpp), where it lives
// until it closes. It also owns the signals (SIGTERM/SIGINT drain and stop, SIGHUP reloads), the
// socket's health (rebinding a removed socket), the memory budget's gauge and trims, and the
// watchdog that hands a worker's loop to a pool thread when an inline call overstays.
//
// Threads: this one; one per worker loop (--workers, the number of cores by default), each a
// BlockingPool thread driving its worker; and pool threads for the token calls the workers do
// not run inline, as many as run at once (up to --max-sessions).
//
// Thread-safety: run() blocks its caller until shutdown completes; nothing else is public.
#pragma once

#include <uv.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "config/agent_config.hpp"
#include "log/audit_log.hpp"
#include "log/connection_refusals.hpp"
#include "metrics/agent_metrics.hpp"
#include "metrics/health_state.hpp"
#include "server/blocking_pool.hpp"
#include "server/heap_trimmer.hpp"
#include "server/memory_budget.hpp"
#include "server/socket_path.hpp"
#include "server/uv_handle.hpp"
#include "server/worker.hpp"
#include "service/key_service.hpp"

namespace hsm::agent {

class AccessControl;
class RateLimiter;

class Server {
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

  /// Binds the socket (throws SocketSetupError), then runs until shutdown completes.
  /// `on_listening` is called just before the socket starts accepting connections (so a client
  /// that can connect finds it done: readiness). `on_reload` runs on SIGHUP, on a thread of
  /// libuv's pool, never on the loop (it reads files: a slow one must not stop the agent
  /// answering); never two at once, and SIGHUPs that arrive meanwhile make one more run after it.
  /// `on_accepting` runs once the socket accepts connections, `on_draining` when SIGTERM/SIGINT
  /// starts the drain, both on the loop (systemd's READY=1 and STOPPING=1).
  void run(const std::function<void()>& on_listening, const std::function<void()>& on_reload,
           const std::function<void()>& on_accepting = {},
           const std::function<void()>& on_draining = {});

  /// True when shutdown left threads inside hung PKCS#11 calls: the token must not be finalised
  /// under them, and the process should exit without destructors.
  [[nodiscard]] bool abandoned_threads() const noexcept { return abandoned_threads_; }

 private:
  void start_workers();
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
  void accept_one();
  /// The check phase of each loop iteration: accepts again after accept_one() deferred.
  void resume_accepting();
  [[nodiscard]] Worker& least_loaded_worker();
  /// Any thread: a connection handed to a worker closed.
  void connection_closed(const Caller& caller, bool admitted);
  /// Samples the budget for /metrics; after a burst was freed, has the heap trimmed soon.
  void watch_memory();
  /// Any thread: an inline call starts; wakes the watchdog when it sleeps.
  void wake_watchdog();
  void watch_inline_calls();
  void on_control();
  void on_signal(int signum);
  void request_reload();
  void begin_shutdown();
  void finish_shutdown();
  /// Closes every handle of the main loop (idempotent): then uv_run returns.
  void close_handles();

  Dependencies deps_;
  protocol::CapabilitiesResult capabilities_;  // the token's, with the transport's limits
  uv_loop_t loop_{};
  std::function<void()> on_reload_;
  std::function<void()> on_draining_;

  MemoryBudget budget_;
  BlockingPool pool_;
  std::unique_ptr<WorkerContext> worker_context_;
  std::vector<std::unique_ptr<Worker>> workers_;

  uv::Handle<uv_pipe_t> listener_;
  uv::Handle<uv_check_t> accept_check_;
  uv::Handle<uv_timer_t> tick_timer_;
  uv::Handle<uv_timer_t> watchdog_timer_;
  uv::Handle<uv_async_t> control_async_;  // workers ended; the watchdog is wanted
  uv::Handle<uv_signal_t> sigterm_, sigint_, sighup_;

  // Admission, shared with the workers' threads (they report closes).
  std::mutex admission_mutex_;
  std::size_t open_connections_ = 0;  // handed to workers and not closed, admitted or not
  std::size_t refused_reading_ = 0;   // refused connections read for their first request
  std::unordered_map<uid_t, std::size_t> uid_connections_;  // admitted, per uid

  ConnectionRefusals refusals_{deps_.audit};  // log and audit lines of refused connections
  std::size_t accepts_this_turn_ = 0;         // accepts in this loop iteration
  bool accept_deferred_ = false;              // a connection left pending until the check phase
  std::uint64_t next_connection_id_ = 1;

  std::atomic<bool> watchdog_awake_{false};
  std::uint64_t inline_calls_seen_ = 0;
  SteadyClock::time_point inline_calls_moved_;
  // What other threads tell this loop through control_async_; sent only while open.
  std::mutex control_mutex_;
  bool control_open_ = true;
  bool watchdog_wanted_ = false;
  std::size_t workers_ended_ = 0;

  bool listening_ = false;
  bool listener_closing_ = false;  // uv_close's callback has not run yet (close_listener)
  bool rebind_after_close_ = false;
  SocketFile socket_file_;  // the file bind made: what the socket path should name
  std::optional<std::string> socket_problem_;  // as reported to HealthState; nullopt: none
  uv_work_t reload_work_{};
  bool reload_running_ = false;
  bool reload_again_ = false;  // SIGHUP while reloading: once more afterwards
  bool shutting_down_ = false;
  bool finished_ = false;
  bool abandoned_threads_ = false;
  std::unique_ptr<HeapTrimmer> heap_trimmer_;  // started by run()
  std::size_t trim_level_ = 0;                 // the most the budget held since the last trim
  bool trimmed_in_burst_ = false;              // trimmed during a burst that has not ended yet
};

}  // namespace hsm::agent
