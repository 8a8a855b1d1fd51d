#include "server/server.hpp"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <utility>

#include "log/audit_log.hpp"
#include "policy/access_control.hpp"
#include "policy/rate_limiter.hpp"

namespace hsm::agent {
namespace {

constexpr std::uint64_t kTickMs = 1000;

// How often free heap pages go back to the system (see heap_trimmer.hpp).
constexpr auto kHeapTrimInterval = std::chrono::seconds(60);

// This many refused callers are read at once for their first request, to tell them why (beyond,
// they are closed unanswered).
constexpr std::size_t kMaxRefusedReading = 64;

// Connections accepted per loop iteration; the next one waits for the following iteration, so
// that a caller connecting in a loop cannot keep the loop from its other work.
constexpr std::size_t kAcceptsPerTurn = 16;

// The watchdog: an inline call that runs this long has its worker's loop handed to a pool
// thread. It looks every tick while inline calls happen, and sleeps after idle_after without.
constexpr auto kInlineOverstay = std::chrono::microseconds(2000);
constexpr std::uint64_t kWatchdogTickMs = 1;
constexpr auto kWatchdogIdleAfter = std::chrono::milliseconds(50);

Server& server_of(const uv_handle_t* handle) {
  return *static_cast<Server*>(handle->loop->data);
}

template <typename T>
uv_handle_t* base(T* handle) {
  return reinterpret_cast<uv_handle_t*>(handle);
}

SharedDirPolicy shared_dir_policy(const AgentConfig& config) {
  return config.shared_socket_dir ? SharedDirPolicy::kAllowMountRoot : SharedDirPolicy::kRefuse;
}

std::size_t worker_count(const AgentConfig& config) {
  if (config.workers != 0) return config.workers;
  return std::max(1U, std::thread::hardware_concurrency());
}

Caller peer_of(int fd) {
  ucred credentials{};
  socklen_t size = sizeof(credentials);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &size) != 0) return {};
  return Caller{credentials.pid, credentials.uid, credentials.gid};
}

}  // namespace

Server::Server(Dependencies deps)
    : deps_(deps),
      capabilities_(deps.keys.capabilities()),
      budget_(deps.config.limits.max_buffered_bytes,
              [this] {
                // Any thread: bytes were released while a connection waited for room.
                for (auto& worker : workers_) worker->memory_released();
              }),
      pool_(BlockingPool::Options{.max_calls = deps.config.hsm.max_sessions,
                                  .max_queue = deps.config.limits.max_queue}) {
  const auto& limits = deps_.config.limits;
  // The transport's limit, which the token side does not know.
  capabilities_.max_message_bytes = limits.max_message_bytes;
  ConnectionLimits connection_limits;
  connection_limits.frame.max_message_bytes = limits.max_message_bytes;
  connection_limits.frame.max_bin_bytes = limits.max_message_bytes;
  connection_limits.max_write_buffer_bytes = limits.max_write_buffer_bytes;
  connection_limits.max_in_flight = limits.max_inflight_per_connection;
  worker_context_ = std::make_unique<WorkerContext>(WorkerContext{
      .config = deps_.config,
      .keys = deps_.keys,
      .metrics = deps_.metrics,
      .access = deps_.access,
      .audit = deps_.audit,
      .rate_limiter = deps_.rate_limiter,
      .budget = budget_,
      .pool = pool_,
      .capabilities = capabilities_,
      .connection_limits = connection_limits,
      .on_connection_closed = [this](const Caller& caller,
                                     bool admitted) { connection_closed(caller, admitted); },
      .on_loop_ended =
          [this] {
            std::lock_guard lock(control_mutex_);
            ++workers_ended_;
            if (control_open_) uv_async_send(control_async_.get());
          },
      .on_inline_call = [this] { wake_watchdog(); },
  });
  uv::check(uv_loop_init(&loop_), "uv_loop_init");
  loop_.data = this;
}

Server::~Server() {
  // Every handle was closed by finish_shutdown() (or by their owners when run() threw); run once
  // more so close callbacks complete.
  workers_.clear();
  close_handles();
  uv_run(&loop_, UV_RUN_NOWAIT);
  if (uv_loop_close(&loop_) != 0) spdlog::debug("event loop closed with handles still open");
}

void Server::run(const std::function<void()>& on_listening, const std::function<void()>& on_reload,
                 const std::function<void()>& on_accepting,
                 const std::function<void()>& on_draining) {
  on_reload_ = on_reload;
  on_draining_ = on_draining;
  deps_.metrics.buffered_bytes_limit.Set(static_cast<double>(budget_.limit()));
  control_async_ = uv::Handle<uv_async_t>(
      &loop_,
      [](uv_loop_t* loop, uv_async_t* async) {
        return uv_async_init(loop, async, [](uv_async_t* a) { server_of(base(a)).on_control(); });
      },
      "uv_async_init");
  tick_timer_ = uv::Handle<uv_timer_t>(&loop_, uv_timer_init, "uv_timer_init");
  uv::check(uv_timer_start(
                tick_timer_.get(),
                [](uv_timer_t* timer) {
                  auto& self = server_of(base(timer));
                  self.deps_.health.heartbeat();
                  self.watch_socket();
                  self.refusals_.flush_due(SteadyClock::now());
                  self.watch_memory();
                },
                kTickMs, kTickMs),
            "uv_timer_start");
  watchdog_timer_ = uv::Handle<uv_timer_t>(&loop_, uv_timer_init, "uv_timer_init");
  accept_check_ = uv::Handle<uv_check_t>(&loop_, uv_check_init, "uv_check_init");
  uv::check(uv_check_start(accept_check_.get(),
                           [](uv_check_t* check) { server_of(base(check)).resume_accepting(); }),
            "uv_check_start");
  for (auto [signal, handle] :
       {std::pair{SIGTERM, &sigterm_}, std::pair{SIGINT, &sigint_}, std::pair{SIGHUP, &sighup_}}) {
    *handle = uv::Handle<uv_signal_t>(&loop_, uv_signal_init, "uv_signal_init");
    uv::check(uv_signal_start(
                  handle->get(),
                  [](uv_signal_t* signal_handle, int signum) {
                    server_of(base(signal_handle)).on_signal(signum);
                  },
                  signal),
              "uv_signal_start");
  }

  // Started before the socket exists: a client that finds the socket finds the agent ready.
  start_workers();
  try {
    listen(on_listening);
    if (on_accepting) on_accepting();
  } catch (...) {
    begin_shutdown();  // the workers end their loops, and then this one ends
    uv_run(&loop_, UV_RUN_DEFAULT);
    pool_.stop();
    throw;
  }
  heap_trimmer_ = std::make_unique<HeapTrimmer>(kHeapTrimInterval);
  uv_run(&loop_, UV_RUN_DEFAULT);  // until finish_shutdown() closed every handle
  heap_trimmer_.reset();
  if (pool_.running() == 0) {
    pool_.stop();
  } else {
    // A thread is stuck inside the token; joining would hang the exit.
    spdlog::warn("{} PKCS#11 calls still running; not waiting for them", pool_.running());
    pool_.abandon();
    abandoned_threads_ = true;
  }
}

void Server::start_workers() {
  const std::size_t count = worker_count(deps_.config);
  workers_.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    workers_.push_back(std::make_unique<Worker>(i, *worker_context_));
  }
  for (auto& worker : workers_) pool_.submit_drive([w = worker.get()] { w->drive(); });
  spdlog::info("{} worker loops", count);
}

Worker& Server::least_loaded_worker() {
  return **std::min_element(workers_.begin(), workers_.end(), [](const auto& a, const auto& b) {
    return a->connection_count() < b->connection_count();
  });
}

// ---- the socket -------------------------------------------------------------------------------

void Server::listen(const std::function<void()>& on_listening) {
  prepare_socket_path(deps_.config.socket_path, shared_dir_policy(deps_.config));
  bind_listener();
  // Before uv_listen: connect() is refused until then, so whoever can connect (a test, a
  // client) also finds /readyz ready. Should uv_listen fail, the agent exits at once.
  if (on_listening) on_listening();
  start_accepting();
  spdlog::info("listening on {}", deps_.config.socket_path);
}

void Server::bind_listener() {
  const auto& path = deps_.config.socket_path;
  listener_ = uv::Handle<uv_pipe_t>(&loop_, uv::init_pipe, "uv_pipe_init");
  int rc = 0;
  {
    // No window in which the socket exists with looser permissions than asked for.
    ScopedUmask umask(0177);
    rc = uv_pipe_bind(listener_.get(), path.c_str());
  }
  if (rc != 0) {
    close_listener(false);
    throw SocketSetupError("cannot bind socket " + path + ": " + uv_strerror(rc));
  }
  try {
    socket_file_ = secure_bound_socket(path, deps_.config.socket_mode, deps_.config.socket_group);
  } catch (const SocketSetupError&) {
    close_listener(false);
    throw;
  }
}

void Server::start_accepting() {
  const int rc = uv_listen(listener_.stream(), 511, [](uv_stream_t* server, int status) {
    if (status < 0) {
      spdlog::warn("accept failed: {}", uv_strerror(status));
      return;
    }
    server_of(base(server)).accept_one();
  });
  if (rc != 0) {
    throw SocketSetupError("cannot listen on " + deps_.config.socket_path + ": " + uv_strerror(rc));
  }
  listening_ = true;
}

void Server::watch_socket() {
  // One lstat a second. Before the first bind, during shutdown and while a close for a new bind
  // is on its way, there is nothing to watch.
  if (shutting_down_ || listener_closing_ || socket_file_ == SocketFile{}) return;
  const auto state = inspect_socket_path(deps_.config.socket_path, socket_file_);
  if (listening_ && state.ours) return;
  if (!listening_) {  // an earlier attempt to bind again failed: try again
    rebind_listener();
    return;
  }
  // Clients that connect to the path no longer reach this listener. A file someone put there is
  // left alone (it may be evidence, and it is not ours to delete); once the path is free, the
  // old listener is closed and a new one bound at the path.
  report_socket_problem(state.problem);
  if (state.free) close_listener(true);
}

void Server::close_listener(bool bind_again) {
  listening_ = false;
  if (!listener_) return;
  listener_closing_ = true;
  rebind_after_close_ = bind_again;
  listener_.close([this] {
    listener_closing_ = false;
    if (rebind_after_close_) rebind_listener();
  });
}

void Server::rebind_listener() {
  if (shutting_down_) return;
  const auto& path = deps_.config.socket_path;
  const auto state = inspect_socket_path(path, socket_file_);
  if (!state.free) {
    report_socket_problem(state.problem);
    return;
  }
  try {
    // Only where it is still safe: the directory passes the start-up check again, and bind()
    // fails rather than replace anything that appeared meanwhile.
    check_socket_directory(path, shared_dir_policy(deps_.config));
    bind_listener();
  } catch (const std::exception& e) {
    report_socket_problem(state.problem + "; not bound again: " + e.what());
    return;
  }
  try {
    start_accepting();
  } catch (const SocketSetupError& e) {
    remove_socket_if_ours(path, socket_file_);
    close_listener(false);
    report_socket_problem(state.problem + "; not bound again: " + e.what());
    return;
  }
  spdlog::warn("socket {} bound again: new connections reach the agent", path);
  socket_problem_.reset();
  deps_.health.set_socket_problem(std::nullopt);
}

void Server::report_socket_problem(const std::string& problem) {
  if (socket_problem_ == problem) return;  // logged once, not once a tick
  socket_problem_ = problem;
  const std::string reason = "socket " + deps_.config.socket_path + " " + problem;
  spdlog::error("{}", reason);
  deps_.health.set_socket_problem(reason);
}

// ---- admission --------------------------------------------------------------------------------

void Server::accept_one() {
  // libuv's listener callback accepts until the backlog is empty, and a caller that connects in
  // a loop keeps it from emptying. After kAcceptsPerTurn, leave the next connection pending
  // (libuv stops watching the listener) until the check phase of this iteration.
  if (accepts_this_turn_ >= kAcceptsPerTurn) {
    accept_deferred_ = true;
    return;
  }
  ++accepts_this_turn_;
  uv::Handle<uv_pipe_t> client;
  try {
    client = uv::Handle<uv_pipe_t>(&loop_, uv::init_pipe, "uv_pipe_init");
  } catch (const uv::Error& e) {
    spdlog::warn("accept: {}", e.what());
    return;
  }
  if (uv_accept(listener_.stream(), client.stream()) != 0) return;
  uv_os_fd_t fd = -1;
  if (uv_fileno(client.base(), &fd) != 0) return;
  const Caller caller = peer_of(fd);

  std::optional<RefusalReason> refusal;
  bool read_refused = false;
  {
    std::lock_guard lock(admission_mutex_);
    const auto same_uid = uid_connections_.find(caller.uid);
    if (shutting_down_) {
      refusal = RefusalReason::kShuttingDown;
    } else if (open_connections_ >= deps_.config.limits.max_connections) {
      refusal = RefusalReason::kMaxConnections;
    } else if (same_uid != uid_connections_.end() &&
               same_uid->second >= deps_.config.limits.max_connections_per_uid) {
      refusal = RefusalReason::kMaxConnectionsPerUid;
    } else if (!deps_.access.admits(caller)) {
      refusal = RefusalReason::kPolicy;
      // Read its first request, a few KiB at most, for a second at most, to tell it why:
      // "connection reset" would send its operator chasing socket permissions.
      read_refused = refused_reading_ < kMaxRefusedReading;
      if (read_refused) ++refused_reading_;
    }
    if (!refusal) ++uid_connections_[caller.uid];
    if (!refusal || read_refused) ++open_connections_;
  }
  if (refusal) {
    // Counted exactly; logged and audited as a summary per uid (a caller connecting in a loop
    // must not drown the audit trail: log/connection_refusals.hpp).
    deps_.metrics.connections_rejected_total.Add({{"reason", std::string(to_string(*refusal))}})
        .Increment();
    refusals_.refused(caller, *refusal, SteadyClock::now());
    if (!read_refused) return;  // `client` closes it
  } else {
    deps_.metrics.connections_total.Increment();
    deps_.metrics.connections.Increment();
  }
  // The worker's loop takes the socket over: its own descriptor, this loop's handle closes.
  const int handed = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (handed < 0) {
    spdlog::warn("accept: cannot hand the connection to a worker: {}", std::strerror(errno));
    connection_closed(caller, !refusal);
    return;
  }
  AcceptedConnection accepted{.fd = handed, .id = next_connection_id_++, .caller = caller};
  if (refusal) {
    accepted.refused = true;
  } else {
    accepted.meter = MemoryBudget::meter(budget_.account(caller.uid));
    spdlog::debug("connection {} from pid {} uid {} gid {}", accepted.id, caller.pid, caller.uid,
                  caller.gid);
  }
  least_loaded_worker().adopt(std::move(accepted));
}

void Server::resume_accepting() {
  accepts_this_turn_ = 0;
  if (!accept_deferred_) return;
  accept_deferred_ = false;
  if (listening_) accept_one();  // takes the pending connection; libuv watches the listener again
}

void Server::connection_closed(const Caller& caller, bool admitted) {
  std::lock_guard lock(admission_mutex_);
  if (open_connections_ > 0) --open_connections_;
  if (!admitted) {
    if (refused_reading_ > 0) --refused_reading_;
    return;
  }
  deps_.metrics.connections.Decrement();
  const auto it = uid_connections_.find(caller.uid);
  if (it != uid_connections_.end() && --it->second == 0) uid_connections_.erase(it);
}

void Server::watch_memory() {
  const std::size_t used = budget_.used();
  deps_.metrics.buffered_bytes.Set(static_cast<double>(used));
  // Large requests freed on the workers leave their pages in glibc's arenas; hand them back now
  // rather than at the next minute's trim (issue 15: RSS comes back after a burst).
  // And once more when the burst is over: what was freed after the last trim (less than 16 MiB
  // of requests, but heap pages of their buffers and decoded copies too) would otherwise wait
  // for the minute's trim.
  constexpr std::size_t kTrimAfterFreeing = 16 * 1024 * 1024;
  constexpr std::size_t kBurstOver = 1024 * 1024;
  trim_level_ = std::max(trim_level_, budget_.take_peak());
  const bool freed_burst = trim_level_ > used + kTrimAfterFreeing;
  const bool burst_over = trimmed_in_burst_ && used < kBurstOver;
  if ((freed_burst || burst_over) && heap_trimmer_) {
    heap_trimmer_->trim_soon();
    trim_level_ = used;
    trimmed_in_burst_ = !burst_over;
  }
}

// ---- the watchdog -----------------------------------------------------------------------------

void Server::wake_watchdog() {
  // Read-only at steady state (no cache line bouncing between the workers); seq_cst pairs with
  // watch_inline_calls() going to sleep: one of the two sees the other.
  if (watchdog_awake_.load(std::memory_order_seq_cst)) return;
  if (watchdog_awake_.exchange(true, std::memory_order_seq_cst)) return;
  std::lock_guard lock(control_mutex_);
  watchdog_wanted_ = true;
  if (control_open_) uv_async_send(control_async_.get());
}

void Server::watch_inline_calls() {
  const auto now = SteadyClock::now();
  std::uint64_t calls = 0;
  for (auto& worker : workers_) {
    calls += worker->inline_calls();
    if (worker->inline_call_overstayed(now, kInlineOverstay)) {
      deps_.metrics.loop_hand_overs_total.Increment();
      spdlog::debug("an inline call overstayed; a pool thread runs the loop");
      pool_.submit_drive([w = worker.get()] { w->drive(); });
    }
  }
  if (calls != inline_calls_seen_) {
    inline_calls_seen_ = calls;
    inline_calls_moved_ = now;
    return;
  }
  if (now - inline_calls_moved_ < kWatchdogIdleAfter) return;
  // Asleep until the next inline call; unless one started while going to sleep.
  uv_timer_stop(watchdog_timer_.get());
  watchdog_awake_.store(false, std::memory_order_seq_cst);
  for (auto& worker : workers_) {
    if (worker->inline_call_running()) {
      wake_watchdog();
      return;
    }
  }
}

void Server::on_control() {
  bool start_watchdog = false;
  bool workers_ended = false;
  {
    std::lock_guard lock(control_mutex_);
    start_watchdog = std::exchange(watchdog_wanted_, false);
    workers_ended = workers_ended_ == workers_.size();
  }
  if (start_watchdog && watchdog_timer_) {
    inline_calls_moved_ = SteadyClock::now();
    uv_timer_start(
        watchdog_timer_.get(),
        [](uv_timer_t* timer) { server_of(base(timer)).watch_inline_calls(); }, kWatchdogTickMs,
        kWatchdogTickMs);
  }
  if (shutting_down_ && workers_ended) finish_shutdown();
}

// ---- signals and shutdown ---------------------------------------------------------------------

void Server::on_signal(int signum) {
  if (signum == SIGHUP) {
    spdlog::info("SIGHUP: reloading");
    request_reload();
    return;
  }
  if (shutting_down_) {
    // A second SIGTERM/SIGINT: the operator wants out now.
    spdlog::warn("second termination signal: exiting at once");
    remove_socket_if_ours(deps_.config.socket_path, socket_file_);
    refusals_.flush_all();
    deps_.audit.close();  // every audit line recorded so far is written
    spdlog::shutdown();
    std::_Exit(1);
  }
  spdlog::info("{}: shutting down, draining requests in flight (at most {}s)",
               signum == SIGTERM ? "SIGTERM" : "SIGINT",
               deps_.config.limits.shutdown_timeout.count());
  begin_shutdown();
}

void Server::request_reload() {
  if (!on_reload_) return;
  if (reload_running_) {
    reload_again_ = true;
    return;
  }
  reload_running_ = true;
  // The loop keeps running until the reload is done, so shutdown waits for it; what it reads is
  // opened without blocking (the policy), so it cannot hang.
  uv_queue_work(
      &loop_, &reload_work_,
      [](uv_work_t* work) {
        try {
          static_cast<Server*>(work->loop->data)->on_reload_();
        } catch (const std::exception& e) {
          spdlog::error("reload failed: {}", e.what());
        }
      },
      [](uv_work_t* work, int) {
        auto* self = static_cast<Server*>(work->loop->data);
        self->reload_running_ = false;
        if (std::exchange(self->reload_again_, false) && !self->shutting_down_) {
          self->request_reload();
        }
      });
}

void Server::begin_shutdown() {
  if (shutting_down_) return;
  {
    std::lock_guard lock(admission_mutex_);
    shutting_down_ = true;
  }
  deps_.health.set_draining();  // /readyz: 503 "draining" from now on
  if (on_draining_) on_draining_();
  if (listening_ || listener_) {
    listening_ = false;
    listener_.close();
    remove_socket_if_ours(deps_.config.socket_path, socket_file_);
  }
  const auto drain_deadline = SteadyClock::now() + deps_.config.limits.shutdown_timeout;
  for (auto& worker : workers_) worker->shut_down(drain_deadline);
  // Each worker answers or gives up on what it has in flight, flushes and ends its loop; the
  // last one to end finishes the shutdown (on_control). The watchdog goes on meanwhile: a loop
  // whose thread is stuck in an inline call is still handed over, and drains.
}

void Server::finish_shutdown() {
  if (finished_) return;
  finished_ = true;
  refusals_.flush_all();  // the counts still pending, before the audit log closes
  close_handles();
}

void Server::close_handles() {
  listener_.close();
  accept_check_.close();
  tick_timer_.close();
  watchdog_timer_.close();
  {
    // Every worker's loop has ended (or never ran): none sends to it any more.
    std::lock_guard lock(control_mutex_);
    control_open_ = false;
    control_async_.close();
  }
  sigterm_.close();
  sigint_.close();
  sighup_.close();
}

}  // namespace hsm::agent
