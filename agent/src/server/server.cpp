#include "server/server.hpp"

#include <openssl/sha.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <csignal>
#include <stdexcept>
#include <utility>

#include "log/audit_log.hpp"
#include "policy/access_control.hpp"
#include "policy/rate_limiter.hpp"
#include "server/socket_path.hpp"

namespace hsm::agent {
namespace {

using protocol::ErrorCode;
using protocol::Method;

constexpr std::uint64_t kTickMs = 1000;

// How often free heap pages go back to the system (see heap_trimmer.hpp).
constexpr auto kHeapTrimInterval = std::chrono::seconds(60);

// How long a connection being closed after a flush (idle, or a request without a msgid) may keep
// answers the client does not read before it is closed with them unsent. Without a bound, a
// client that never reads would hold its connection, and its buffered answers, for ever.
constexpr auto kCloseFlushLimit = std::chrono::seconds(2);

// After shutdown finishes early (nothing left in flight), connections may take until the drain
// deadline to read their last answers; after the drain deadline this much more, so answers
// written at the deadline reach a client that reads. Then whatever is unsent is dropped.
constexpr auto kFinalFlushGrace = std::chrono::milliseconds(500);

// A caller refused by policy learns why: its first request is answered permission_denied. Until
// then it may send this much, for this long; and this many such connections are read at once
// (beyond, they are closed unanswered, as before).
constexpr std::size_t kRefusedInputBytes = 4096;
constexpr auto kRefusedWait = std::chrono::seconds(1);
constexpr std::size_t kMaxRefusedReading = 64;

// Connections accepted per loop iteration; the next one waits for the following iteration, so
// that a caller connecting in a loop cannot keep the loop from reading the others.
constexpr std::size_t kAcceptsPerTurn = 16;

// A sign runs on the thread that read it only while the token's signs take less than this on
// average (SoftHSMv2 ES256: ~70 us): a slow token (a network HSM) gains nothing from it, and its
// calls would have the loop handed over every time.
constexpr auto kInlineSignLatencyLimit = std::chrono::microseconds(500);
// How long an inline call may keep the loop unattended before the watchdog hands the loop to
// another worker (plus up to one tick).
constexpr LoopTurn::Timing kLoopTurnTiming{.overstay = std::chrono::milliseconds(2),
                                           .tick = std::chrono::milliseconds(1),
                                           .idle_after = std::chrono::milliseconds(50)};

template <typename Handle>
uv_handle_t* as_handle(Handle* handle) {
  return reinterpret_cast<uv_handle_t*>(handle);
}

// Encodes into `buffer`, reused from answer to answer: no allocation once it has grown.
std::string_view encode(const protocol::Response& response, msgpack::sbuffer& buffer) {
  buffer.clear();
  protocol::encode_response(response, buffer);
  return {buffer.data(), buffer.size()};
}

// One per worker thread (and one for the loop thread).
thread_local msgpack::sbuffer answer_buffer;

std::string_view encode(const protocol::Response& response) {
  return encode(response, answer_buffer);
}

protocol::Response error_response(std::uint32_t msgid, ErrorCode code, std::string message) {
  return {msgid, protocol::Error{code, std::move(message), std::nullopt}};
}

std::optional<ErrorCode> code_of(const Outcome& outcome) {
  if (const auto* error = std::get_if<protocol::Error>(&outcome)) return error->code;
  return std::nullopt;
}

const std::string* kid_of(const protocol::Request& request) {
  return std::visit(
      [](const auto& params) -> const std::string* {
        if constexpr (requires { params.kid; }) {
          return &params.kid;
        } else {
          return nullptr;
        }
      },
      request.params);
}

// How many signatures a request asks for: what the rate limit counts (one for other methods).
std::size_t signatures_asked(const protocol::Request& request) {
  if (const auto* batch = std::get_if<protocol::SignBatchParams>(&request.params)) {
    return batch->items.size();
  }
  return 1;
}

std::array<std::uint8_t, 32> sha256_of(const protocol::SignInput& input) {
  const auto& bytes = input.digest ? *input.digest : input.data.value();
  std::array<std::uint8_t, 32> digest{};
  SHA256(bytes.data(), bytes.size(), digest.data());
  return digest;
}

// The audit line of a request: what was asked, by whom, and the SHA-256 of what was signed
// (also when the sign was refused: the input was decoded, so an investigator can match it).
AuditRecord audit_record(const protocol::Request& request, const Caller& caller,
                         const Outcome& outcome) {
  AuditRecord record;
  record.method = request.method;
  record.caller = caller;
  record.code = code_of(outcome);
  if (const auto* kid = kid_of(request)) record.kid = *kid;
  if (const auto* result = std::get_if<protocol::Result>(&outcome)) {
    std::visit(
        [&record](const auto& value) {
          if constexpr (requires { value.alg; }) record.alg = value.alg;
        },
        *result);
  }
  if (const auto* sign = std::get_if<protocol::SignParams>(&request.params)) {
    record.input_sha256 = sha256_of(sign->input);
  }
  if (const auto* batch = std::get_if<protocol::SignBatchParams>(&request.params)) {
    const protocol::SignBatchResult* answered = nullptr;
    if (const auto* result = std::get_if<protocol::Result>(&outcome)) {
      answered = std::get_if<protocol::SignBatchResult>(result);
    }
    record.items.reserve(batch->items.size());
    for (std::size_t i = 0; i < batch->items.size(); ++i) {
      AuditBatchItem item{batch->items[i].kid, record.code, sha256_of(batch->items[i].input)};
      if (answered && i < answered->results.size()) {
        if (const auto* error = std::get_if<protocol::Error>(&answered->results[i])) {
          item.code = error->code;
        }
      }
      record.items.push_back(std::move(item));
    }
  }
  return record;
}

AuditRecord audit_record(const Call& call, const Outcome& outcome) {
  return audit_record(call.request, call.caller, outcome);
}

}  // namespace

Server::Server(Dependencies deps)
    : deps_(deps),
      capabilities_(deps.keys.capabilities()),
      budget_(deps.config.limits.max_buffered_bytes, [this] {
        // Any thread: bytes were released while a connection waited for room.
        std::lock_guard lock(memory_async_mutex_);
        if (memory_async_open_) uv_async_send(&memory_async_);
      }) {
  const auto& limits = deps_.config.limits;
  // The transport's limit, which the token side does not know.
  capabilities_.max_message_bytes = limits.max_message_bytes;
  connection_limits_.frame.max_message_bytes = limits.max_message_bytes;
  connection_limits_.frame.max_bin_bytes = limits.max_message_bytes;
  connection_limits_.max_write_buffer_bytes = limits.max_write_buffer_bytes;
  if (uv_loop_init(&loop_) != 0) throw std::runtime_error("cannot initialise the event loop");
  loop_.data = this;
}

Server::~Server() {
  if (workers_) workers_->abandon();
  // Every handle was closed by finish_shutdown(); run once more so close callbacks complete.
  uv_run(&loop_, UV_RUN_NOWAIT);
  if (uv_loop_close(&loop_) != 0) {
    spdlog::debug("event loop closed with handles still open");
  }
}

void Server::run(const std::function<void()>& on_listening,
                 const std::function<void()>& on_reload) {
  on_reload_ = on_reload;

  uv_async_init(&loop_, &completions_async_, [](uv_async_t* async) {
    static_cast<Server*>(async->loop->data)->drain_completions();
  });
  uv_async_init(&loop_, &memory_async_, [](uv_async_t* async) {
    static_cast<Server*>(async->loop->data)->resume_memory_waiters();
  });
  {
    std::lock_guard lock(memory_async_mutex_);
    memory_async_open_ = true;
  }
  deps_.metrics.buffered_bytes_limit.Set(static_cast<double>(budget_.limit()));
  uv_timer_init(&loop_, &deadline_timer_);
  uv_timer_init(&loop_, &drain_timer_);
  uv_timer_init(&loop_, &final_flush_timer_);
  uv_timer_init(&loop_, &tick_timer_);
  uv_timer_start(
      &tick_timer_,
      [](uv_timer_t* timer) {
        auto* self = static_cast<Server*>(timer->loop->data);
        self->deps_.health.heartbeat();
        self->watch_socket();
        self->refusals_.flush_due(SteadyClock::now());
        self->sweep_idle();
        self->close_stalled_connections();
        self->watch_memory();
        // A release can slip between a reader finding no room and its wait being noted: the
        // tick retries whoever still waits.
        self->resume_memory_waiters();
        self->close_stuck_flushes(SteadyClock::now() - kCloseFlushLimit);
      },
      0, kTickMs);
  // Answers are written once per loop iteration per connection: after the reads of the
  // iteration (check), and before the loop blocks in its poll (prepare), so that what a timer or
  // a wake-up answered (deadline_exceeded, shutdown) leaves at once rather than with the next
  // event (issue 15: deadlines were answered on the one-second tick).
  uv_check_init(&loop_, &flush_check_);
  uv_check_start(&flush_check_, [](uv_check_t* check) {
    auto* self = static_cast<Server*>(check->loop->data);
    self->flush_dirty();
    self->resume_accepting();
  });
  uv_prepare_init(&loop_, &flush_prepare_);
  uv_prepare_start(&flush_prepare_, [](uv_prepare_t* prepare) {
    static_cast<Server*>(prepare->loop->data)->flush_dirty();
  });
  for (auto [signal, handle] :
       {std::pair{SIGTERM, &sigterm_}, std::pair{SIGINT, &sigint_}, std::pair{SIGHUP, &sighup_}}) {
    uv_signal_init(&loop_, handle);
    uv_signal_start(
        handle,
        [](uv_signal_t* signal_handle, int signum) {
          static_cast<Server*>(signal_handle->loop->data)->on_signal(signum);
        },
        signal);
  }

  // Two threads more than sessions: one holds the loop turn while `sessions` calls run, and one
  // more is free for the loop while a call runs inline (it holds a session too). Started before
  // the socket exists: a client that finds the socket finds the agent ready.
  workers_ = std::make_unique<WorkerPool>(
      deps_.config.hsm.sessions + 2, deps_.config.hsm.sessions, deps_.config.limits.max_queue,
      [this](const auto& call) { run_on_worker(call); }, [this] { run_loop_turn(); });
  turn_ = std::make_unique<LoopTurn>(kLoopTurnTiming, [this] {
    deps_.metrics.loop_hand_overs_total.Increment();
    spdlog::debug("an inline call overstayed; another worker runs the loop");
    workers_->want_loop_runner();
  });
  try {
    listen(on_listening);
  } catch (...) {
    turn_.reset();
    workers_->stop();  // idle: nothing was submitted
    throw;
  }
  heap_trimmer_ = std::make_unique<HeapTrimmer>(kHeapTrimInterval);
  workers_->want_loop_runner();
  {
    std::unique_lock lock(loop_ended_mutex_);
    loop_ended_cv_.wait(lock, [this] { return loop_ended_; });
  }
  // turn_ lives on (until ~Server): a worker returning from an inline call still uses it.
  if (running_calls_.load() == 0) {
    workers_->stop();
  } else {
    // A worker is stuck inside the token; joining would hang the exit.
    spdlog::warn("{} PKCS#11 calls still running; not waiting for them", running_calls_.load());
    workers_->abandon();
    abandoned_workers_ = true;
  }
}

void Server::run_loop_turn() {
  if (!turn_->try_take()) return;  // someone else runs the loop
  for (;;) {
    uv_run(&loop_, UV_RUN_DEFAULT);
    std::shared_ptr<Call> call = std::move(inline_call_);
    if (!call) {
      // uv_run returns without a call to run only when the loop has ended: every handle closed.
      turn_->release();
      {
        std::lock_guard lock(loop_ended_mutex_);
        loop_ended_ = true;
      }
      loop_ended_cv_.notify_all();
      return;
    }
    const auto ticket = turn_->release_for_inline_call();
    workers_->run_outside_queue();  // it holds a session like a queued call
    run_on_worker(call);
    call.reset();
    workers_->run_outside_queue_done();
    turn_->inline_call_done(ticket);
    // Back to the loop, unless the watchdog handed it over meanwhile (then back to the pool).
    if (!turn_->try_take()) return;
  }
}

namespace {

SharedDirPolicy shared_dir_policy(const AgentConfig& config) {
  return config.shared_socket_dir ? SharedDirPolicy::kAllowMountRoot : SharedDirPolicy::kRefuse;
}

}  // namespace

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
  uv_pipe_init(&loop_, &listener_, 0);
  int rc = 0;
  {
    // No window in which the socket exists with looser permissions than asked for.
    ScopedUmask umask(0177);
    rc = uv_pipe_bind(&listener_, path.c_str());
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
  const int rc = uv_listen(reinterpret_cast<uv_stream_t*>(&listener_), 511,
                           [](uv_stream_t* server, int status) {
                             auto* self = static_cast<Server*>(server->loop->data);
                             if (status < 0) {
                               spdlog::warn("accept failed: {}", uv_strerror(status));
                               return;
                             }
                             self->accept_one();
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
  listener_closing_ = true;
  rebind_after_close_ = bind_again;
  uv_close(as_handle(&listener_), [](uv_handle_t* handle) {
    // listener_ may be initialised again from here on (libuv is done with it).
    auto* self = static_cast<Server*>(handle->loop->data);
    self->listener_closing_ = false;
    if (self->rebind_after_close_) self->rebind_listener();
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
  } catch (const SocketSetupError& e) {
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

void Server::accept_one() {
  // libuv's listener callback accepts until the backlog is empty, and a caller that connects in
  // a loop keeps it from emptying: the loop would read no one else. After kAcceptsPerTurn,
  // leave the next connection pending (libuv stops watching the listener) until the check
  // phase, after this iteration's reads.
  if (accepts_this_turn_ >= kAcceptsPerTurn) {
    accept_deferred_ = true;
    return;
  }
  ++accepts_this_turn_;
  auto* connection = Connection::accept(reinterpret_cast<uv_stream_t*>(&listener_),
                                        next_connection_id_++, *this, connection_limits_);
  if (connection == nullptr) return;
  const Caller& caller = connection->caller();
  std::optional<RefusalReason> refusal;
  const auto same_uid = uid_connections_.find(caller.uid);
  if (shutting_down_) {
    refusal = RefusalReason::kShuttingDown;
  } else if (connections_.size() >= deps_.config.limits.max_connections) {
    refusal = RefusalReason::kMaxConnections;
  } else if (same_uid != uid_connections_.end() &&
             same_uid->second >= deps_.config.limits.max_connections_per_uid) {
    refusal = RefusalReason::kMaxConnectionsPerUid;
  } else if (!deps_.access.admits(caller)) {
    refusal = RefusalReason::kPolicy;
  }
  connections_.emplace(connection->id(), connection);
  if (refusal) {
    // Counted exactly; logged and audited as a summary per uid (a caller connecting in a loop
    // must not drown the audit trail: log/connection_refusals.hpp).
    deps_.metrics.connections_rejected_total.Add({{"reason", std::string(to_string(*refusal))}})
        .Increment();
    refusals_.refused(caller, *refusal, SteadyClock::now());
    if (*refusal == RefusalReason::kPolicy && refused_reading_ < kMaxRefusedReading) {
      // Read its first request, a few KiB at most, for a second at most, to tell it why:
      // "connection reset" would send its operator chasing socket permissions.
      ++refused_reading_;
      connection->refused_since = SteadyClock::now();
      connection->limit_input(kRefusedInputBytes);
      connection->start();
      return;
    }
    connection->close();
    return;
  }
  connection->admitted = true;
  ++uid_connections_[caller.uid];
  connection->charge_to(budget_, MemoryBudget::meter(budget_.account(caller.uid)));
  deps_.metrics.connections_total.Increment();
  deps_.metrics.connections.Increment();
  spdlog::debug("connection {} from pid {} uid {} gid {}", connection->id(), caller.pid, caller.uid,
                caller.gid);
  connection->start();
}

void Server::resume_accepting() {
  accepts_this_turn_ = 0;
  if (!accept_deferred_) return;
  accept_deferred_ = false;
  if (listening_) accept_one();  // takes the pending connection; libuv watches the listener again
}

void Server::on_closed(Connection& connection) {
  connections_.erase(connection.id());
  if (connection.refused_since) --refused_reading_;
  if (connection.admitted) {
    deps_.metrics.connections.Decrement();
    const auto it = uid_connections_.find(connection.caller().uid);
    if (it != uid_connections_.end() && --it->second == 0) uid_connections_.erase(it);
  }
  // The last connection has flushed: nothing left for the final flush bound, so let the loop end.
  if (finished_ && connections_.empty() && !uv_is_closing(as_handle(&final_flush_timer_))) {
    uv_close(as_handle(&final_flush_timer_), nullptr);
  }
}

void Server::on_output_pending(Connection& connection) {
  dirty_.push_back(&connection);
}

void Server::on_slow_reader(Connection& connection) {
  deps_.metrics.connections_closed_slow_reader.Increment();
  spdlog::warn("connection {} closed: its client does not read its answers", connection.id());
}

void Server::flush_dirty() {
  for (auto* connection : dirty_) connection->flush();
  dirty_.clear();
}

void Server::on_waiting_for_memory(Connection& connection) {
  deps_.metrics.memory_budget_waits_total.Increment();
  spdlog::debug("connection {} waits for room in the memory budget ({} of {} bytes held)",
                connection.id(), budget_.used(), budget_.limit());
  memory_waiters_.push_back(connection.id());
  budget_.wait_for_room();
}

void Server::resume_memory_waiters() {
  if (memory_waiters_.empty()) return;
  std::vector<std::uint64_t> waiting;
  waiting.swap(memory_waiters_);
  // Each asks the budget again; one that still finds no room comes back to the list.
  for (const auto id : waiting) {
    const auto it = connections_.find(id);
    if (it != connections_.end()) it->second->read_again();
  }
}

void Server::watch_memory() {
  const std::size_t used = budget_.used();
  deps_.metrics.buffered_bytes.Set(static_cast<double>(used));
  // Large requests freed on the workers leave their pages in glibc's arenas; hand them back now
  // rather than at the next minute's trim (issue 15: RSS comes back after a burst).
  constexpr std::size_t kTrimAfterFreeing = 16 * 1024 * 1024;
  const std::size_t peak = budget_.take_peak();
  if (peak > used + kTrimAfterFreeing && heap_trimmer_) heap_trimmer_->trim_soon();
}

void Server::close_stalled_connections() {
  const auto now = SteadyClock::now();
  const auto cutoff = now - deps_.config.limits.read_timeout;
  std::vector<Connection*> slow;
  std::vector<Connection*> gone;
  for (auto& [id, connection] : connections_) {
    if (connection->closing()) continue;
    // A connection that waits for memory reads nothing, so it would not see its client leave
    // until the read timeout, holding its bytes: look.
    if (connection->waiting_for_memory() && connection->peer_hung_up()) {
      gone.push_back(connection);
      continue;
    }
    if (connection->refused_since && *connection->refused_since < now - kRefusedWait) {
      gone.push_back(connection);  // refused, and sent no request in time
      continue;
    }
    const auto since = connection->incomplete_since();
    if (since && *since < cutoff) slow.push_back(connection);
  }
  for (auto* connection : gone) connection->close();
  for (auto* connection : slow) {
    deps_.metrics.connections_closed_read_timeout.Increment();
    spdlog::warn("connection {} closed: a message did not complete within {}s (uid {})",
                 connection->id(), deps_.config.limits.read_timeout.count(),
                 connection->caller().uid);
    connection->close();
  }
}

void Server::on_frame_error(Connection& connection, const protocol::FrameError& error) {
  deps_.metrics.protocol_errors_total.Add({{"reason", std::string(to_string(error.reason()))}})
      .Increment();
  spdlog::warn("connection {} closed: {}", connection.id(), error.what());
}

void Server::on_message(Connection& connection, const msgpack::object& message, std::size_t bytes) {
  if (connection.refused_since) {
    answer_refused(connection, message);
    return;
  }
  auto decoded = protocol::decode_request(message);
  if (auto* failure = std::get_if<protocol::RequestDecodeError>(&decoded)) {
    if (failure->method && failure->msgid) {
      // A known method with bad params: an ordinary failed request of that method, audited
      // like any failure (no kid: the params did not decode).
      deps_.metrics.request_counter(*failure->method, failure->error.code).Increment();
      AuditRecord record;
      record.method = *failure->method;
      record.code = failure->error.code;
      record.caller = connection.caller();
      deps_.audit.record(record);
    } else {
      deps_.metrics.protocol_errors_total
          .Add({{"reason", std::string(to_string(failure->error.code))}})
          .Increment();
    }
    if (!failure->msgid) {
      spdlog::warn("connection {} closed: {}", connection.id(), failure->error.message);
      connection.close_after_flush();
      return;
    }
    connection.send(encode({*failure->msgid, std::move(failure->error)}));
    return;
  }
  dispatch(connection, std::get<protocol::Request>(std::move(decoded)), bytes);
}

void Server::answer_refused(Connection& connection, const msgpack::object& message) {
  const auto decoded = protocol::decode_request(message);
  std::optional<std::uint32_t> msgid;
  if (const auto* request = std::get_if<protocol::Request>(&decoded)) {
    msgid = request->msgid;
  } else {
    msgid = std::get<protocol::RequestDecodeError>(decoded).msgid;
  }
  if (msgid) {
    const Caller& caller = connection.caller();
    connection.send(
        encode(error_response(*msgid, ErrorCode::kPermissionDenied,
                              "permission denied: the agent's access policy has no rule for uid " +
                                  std::to_string(caller.uid) + " (gid " +
                                  std::to_string(caller.gid) + "); this connection is closed")));
  }
  connection.close_after_flush();
}

void Server::dispatch(Connection& connection, protocol::Request&& request, std::size_t bytes) {
  const auto received = SteadyClock::now();
  if (shutting_down_) {
    answer_now(
        connection, request,
        error_response(request.msgid, ErrorCode::kShuttingDown, "the agent is shutting down"),
        received);
    return;
  }
  if (auto denied = deps_.access.authorize(connection.caller(), request)) {
    answer_now(connection, request, {request.msgid, std::move(*denied)}, received);
    return;
  }
  // Fail closed: no key operation while its audit line may not be written (log/audit_log.hpp).
  if (AuditLog::key_operation(request.method) && deps_.audit.refuses_key_operations()) {
    answer_now(connection, request,
               error_response(request.msgid, ErrorCode::kAuditUnavailable,
                              "the agent's audit log cannot be written; key operations are "
                              "refused until it can (retry later)"),
               received);
    return;
  }
  // After the access check (a denied request uses no tokens), before any work. The limit counts
  // signatures: a batch takes a token per item, and is refused whole when they are not there.
  if (!deps_.rate_limiter.try_acquire(connection.caller().uid, received,
                                      signatures_asked(request))) {
    answer_now(connection, request,
               error_response(request.msgid, ErrorCode::kOverloaded,
                              "rate limit for this caller exceeded; retry later"),
               received);
    return;
  }
  if (request.method == Method::kCapabilities) {
    answer_now(connection, request, {request.msgid, capabilities_}, received);
    return;
  }

  auto call = std::make_shared<Call>();
  call->connection_id = connection.id();
  call->caller = connection.caller();
  call->received = received;
  call->deadline = received + (request.timeout_ms ? std::chrono::milliseconds(*request.timeout_ms)
                                                  : deps_.config.limits.request_timeout);
  call->request = std::move(request);
  call->output = connection.output();
  // The decoded request holds about what its message did, until the call is gone.
  call->charge = MemoryBudget::Charge(connection.meter(), bytes);
  const auto deadline = call->deadline;
  std::weak_ptr<Call> weak = call;
  // Counted in before the worker can answer (and count it out).
  const bool at_limit =
      call->output->begin_request(deps_.config.limits.max_inflight_per_connection);
  const auto in_flight_before = in_flight_.fetch_add(1);
  deps_.metrics.requests_in_flight.Increment();
  if (runs_inline(*call, in_flight_before)) {
    // Run by this thread once this loop iteration ends (run_loop_turn).
    inline_call_ = call;
    uv_stop(&loop_);
  } else if (!workers_->submit(call)) {
    call->output->end_request_on_loop();
    in_flight_.fetch_sub(1);
    deps_.metrics.requests_in_flight.Decrement();
    answer_now(connection, call->request,
               error_response(call->request.msgid, ErrorCode::kOverloaded,
                              "the agent's queue is full; retry later"),
               received);
    return;
  }
  deadlines_.push(deadline, std::move(weak));
  if (deadline < deadline_timer_due_) arm_deadline_timer();
  // Backpressure: read no more until answers drain. An answer that already brought the count
  // back under the limit has left a note for the loop, which resumes after this.
  if (at_limit) connection.pause();
}

void Server::answer_now(Connection& connection, const protocol::Request& request,
                        protocol::Response&& response, SteadyClock::time_point received) {
  std::optional<ErrorCode> code;
  if (const auto* error = std::get_if<protocol::Error>(&response.body)) code = error->code;
  connection.send(encode(response));
  const auto elapsed = std::chrono::duration<double>(SteadyClock::now() - received).count();
  deps_.metrics.request_counter(request.method, code).Increment();
  deps_.metrics.request_histogram(request.method).Observe(elapsed);
  if (AuditLog::audited(request.method, code)) {
    auto record = audit_record(request, connection.caller(), response.body);
    record.duration_seconds = elapsed;
    deps_.audit.record(record);
  }
}

void Server::run_on_worker(const std::shared_ptr<Call>& call) {
  if (!call->begin_running()) return;  // already answered (deadline)
  running_calls_.fetch_add(1, std::memory_order_relaxed);
  deps_.metrics.queue_wait_seconds.Observe(
      std::chrono::duration<double>(SteadyClock::now() - call->received).count());
  Outcome outcome;
  if (SteadyClock::now() >= call->deadline) {
    outcome = protocol::Error{ErrorCode::kDeadlineExceeded, "the request waited past its deadline",
                              std::nullopt};
  } else {
    const auto started = SteadyClock::now();
    outcome = deps_.keys.execute(call->request, call->deadline);
    if (call->request.method == Method::kSign) note_sign_latency(SteadyClock::now() - started);
  }
  if (!call->claim_answer()) {  // the loop answered deadline_exceeded meanwhile
    running_calls_.fetch_sub(1, std::memory_order_relaxed);
    return;
  }
  const auto code = code_of(outcome);
  std::optional<AuditRecord> audit;
  if (AuditLog::audited(call->request.method, code)) audit = audit_record(*call, outcome);
  // Counted and audited before the answer leaves: a client that reads it and asks again finds
  // the first request in /metrics and in the audit log, in order.
  count_answered(*call, code, std::move(audit));
  // The answer leaves from here, without waiting for the loop thread (ConnectionOutput).
  const auto after =
      call->output->answer_from_worker(encode({call->request.msgid, std::move(outcome)}));
  in_flight_.fetch_sub(1);  // after the answer: shutdown closes connections once it reaches 0
  // The loop hears of this answer only when it has something to do: at steady state nothing.
  // shutting_down_ is read after in_flight_ was decremented; begin_shutdown()
  // writes it before reading in_flight_: one of the two sees the other.
  if (after.loop_needed() || shutting_down_.load()) {
    {
      std::lock_guard lock(completions_mutex_);
      completions_.push_back({call->connection_id, after});
    }
    uv_async_send(&completions_async_);
  }
  // Counted until after the send, so shutdown never closes the async handle under us.
  running_calls_.fetch_sub(1, std::memory_order_relaxed);
}

bool Server::runs_inline(const Call& call, std::size_t in_flight_before) const {
  // Only when nothing else is in flight or still inside the token (a call answered at its
  // deadline may be): every other worker is idle, one can take the loop if the call overstays,
  // a session is free, and at most one thread is ever stuck in an inline call.
  return call.request.method == Method::kSign && in_flight_before == 0 && !inline_call_ &&
         running_calls_.load(std::memory_order_relaxed) == 0 &&
         std::chrono::nanoseconds(sign_latency_ns_.load(std::memory_order_relaxed)) <
             kInlineSignLatencyLimit;
}

void Server::note_sign_latency(SteadyClock::duration elapsed) {
  // An exponential moving average over ~8 signs. Workers update it concurrently without a lock:
  // a lost update only delays the average by one sign.
  const auto sample = std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count();
  const auto average = sign_latency_ns_.load(std::memory_order_relaxed);
  sign_latency_ns_.store(average + (sample - average) / 8, std::memory_order_relaxed);
}

void Server::drain_completions() {
  {
    std::lock_guard lock(completions_mutex_);
    completions_spare_.swap(completions_);
  }
  for (const auto& note : completions_spare_) {
    const auto it = connections_.find(note.connection_id);
    if (it == connections_.end()) continue;  // closed meanwhile
    Connection& connection = *it->second;
    if (note.after.failed) {
      connection.close();
    } else if (note.after.slow_reader) {
      connection.close_slow_reader();
    } else {
      if (note.after.flush) connection.schedule_flush();
      if (note.after.resume && !shutting_down_) connection.resume();
    }
  }
  completions_spare_.clear();
  if (shutting_down_ && in_flight_ == 0) finish_shutdown();
}

void Server::count_answered(const Call& call, std::optional<ErrorCode> code,
                            std::optional<AuditRecord> audit) {
  const auto elapsed = std::chrono::duration<double>(SteadyClock::now() - call.received).count();
  deps_.metrics.requests_in_flight.Decrement();
  deps_.metrics.request_counter(call.request.method, code).Increment();
  deps_.metrics.request_histogram(call.request.method).Observe(elapsed);
  if (!audit && code && AuditLog::audited(call.request.method, code)) {
    audit = audit_record(call, protocol::Error{*code, {}, std::nullopt});
  }
  if (audit) {
    audit->duration_seconds = elapsed;
    deps_.audit.record(*audit);
  }
}

void Server::answer_on_loop(Call& call, const protocol::Response& response) {
  std::optional<ErrorCode> code;
  if (const auto* error = std::get_if<protocol::Error>(&response.body)) code = error->code;
  count_answered(call, code, std::nullopt);
  in_flight_.fetch_sub(1);
  const bool may_resume = call.output->end_request_on_loop();
  const auto it = connections_.find(call.connection_id);
  if (it == connections_.end()) return;  // the client left; the answer has nowhere to go
  Connection& connection = *it->second;
  connection.send(encode(response));
  if (may_resume && !shutting_down_) connection.resume();
}

void Server::arm_deadline_timer() {
  if (deadlines_.empty()) {
    uv_timer_stop(&deadline_timer_);
    deadline_timer_due_ = SteadyClock::time_point::max();
    return;
  }
  const auto due = deadlines_.top().deadline;
  const auto now = SteadyClock::now();
  const auto wait = due > now ? std::chrono::ceil<std::chrono::milliseconds>(due - now).count() : 0;
  deadline_timer_due_ = due;
  uv_timer_start(
      &deadline_timer_,
      [](uv_timer_t* timer) { static_cast<Server*>(timer->loop->data)->expire_deadlines(); },
      static_cast<std::uint64_t>(wait), 0);
}

void Server::expire_deadlines() {
  deadline_timer_due_ = SteadyClock::time_point::max();
  const auto now = SteadyClock::now();
  while (!deadlines_.empty() && deadlines_.top().deadline <= now) {
    auto call = deadlines_.pop().call.lock();
    if (!call || !call->claim_answer()) continue;  // answered already
    // Queued calls are dropped unrun (begin_running fails); a running one's result is dropped.
    answer_on_loop(*call, error_response(call->request.msgid, ErrorCode::kDeadlineExceeded,
                                         "no answer from the token within the deadline"));
  }
  arm_deadline_timer();
  if (shutting_down_ && in_flight_ == 0) finish_shutdown();
}

void Server::sweep_idle() {
  const auto idle = deps_.config.limits.idle_timeout;
  if (idle.count() == 0) return;
  const auto cutoff = SteadyClock::now() - idle;
  std::vector<Connection*> idle_connections;
  for (auto& [id, connection] : connections_) {
    if (connection->output()->in_flight() == 0 && connection->last_activity() < cutoff) {
      idle_connections.push_back(connection);
    }
  }
  for (auto* connection : idle_connections) {
    spdlog::debug("connection {} closed after {}s idle", connection->id(), idle.count());
    // Counted once: a connection still flushing is swept again on the next tick.
    if (!connection->closing_after_flush_since()) deps_.metrics.connections_closed_idle.Increment();
    connection->close_after_flush();
  }
}

void Server::close_stuck_flushes(SteadyClock::time_point requested_before) {
  std::vector<Connection*> stuck;
  for (auto& [id, connection] : connections_) {
    const auto since = connection->closing_after_flush_since();
    if (since && *since <= requested_before) stuck.push_back(connection);
  }
  for (auto* connection : stuck) {
    spdlog::debug("connection {} closed with answers unread by the client", connection->id());
    connection->close();
  }
}

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
  spdlog::info("{}: shutting down, draining {} requests (at most {}s)",
               signum == SIGTERM ? "SIGTERM" : "SIGINT", in_flight_.load(),
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
  shutting_down_ = true;
  deps_.health.set_draining();  // /readyz: 503 "draining" from now on
  shutdown_deadline_ = SteadyClock::now() + deps_.config.limits.shutdown_timeout;
  if (listening_) {
    uv_close(as_handle(&listener_), nullptr);
    listening_ = false;
    remove_socket_if_ours(deps_.config.socket_path, socket_file_);
  }
  for (auto& [id, connection] : connections_) connection->pause();
  if (in_flight_ == 0) {
    finish_shutdown();
    return;
  }
  uv_timer_start(
      &drain_timer_,
      [](uv_timer_t* timer) {
        auto* self = static_cast<Server*>(timer->loop->data);
        spdlog::warn("drain deadline passed with {} requests unanswered", self->in_flight_.load());
        self->finish_shutdown();
      },
      static_cast<std::uint64_t>(deps_.config.limits.shutdown_timeout.count()) * 1000, 0);
}

void Server::finish_shutdown() {
  if (finished_) return;
  finished_ = true;
  refusals_.flush_all();  // the counts still pending, before the audit log closes
  // Whatever is still in flight gets a clear answer before its connection closes.
  while (!deadlines_.empty()) {
    auto call = deadlines_.pop().call.lock();
    if (!call || !call->claim_answer()) continue;
    answer_on_loop(*call, error_response(call->request.msgid, ErrorCode::kShuttingDown,
                                         "the agent shut down before answering"));
  }
  std::vector<Connection*> open;
  open.reserve(connections_.size());
  for (auto& [id, connection] : connections_) open.push_back(connection);
  for (auto* connection : open) connection->close_after_flush();
  // A client that never reads would keep its flush, and so the loop, running for ever: at the
  // drain deadline (or shortly after it, when that has passed) every connection still flushing
  // is closed with its answers unsent.
  if (connections_.empty()) {
    uv_close(as_handle(&final_flush_timer_), nullptr);
  } else {
    const auto now = SteadyClock::now();
    const auto until = std::max(shutdown_deadline_, now + kFinalFlushGrace);
    uv_timer_start(
        &final_flush_timer_,
        [](uv_timer_t* timer) {
          auto* self = static_cast<Server*>(timer->loop->data);
          if (!self->connections_.empty()) {
            spdlog::warn("closing {} connections that did not read their last answers",
                         self->connections_.size());
          }
          self->close_stuck_flushes(SteadyClock::time_point::max());
          if (!uv_is_closing(as_handle(timer))) uv_close(as_handle(timer), nullptr);
        },
        static_cast<std::uint64_t>(
            std::chrono::ceil<std::chrono::milliseconds>(until - now).count()),
        0);
  }

  {
    std::lock_guard lock(memory_async_mutex_);
    memory_async_open_ = false;
  }
  uv_close(as_handle(&memory_async_), nullptr);
  // The workers are stopped (or abandoned) by run() once the loop has ended.
  for (auto* handle :
       {as_handle(&completions_async_), as_handle(&deadline_timer_), as_handle(&tick_timer_),
        as_handle(&drain_timer_), as_handle(&flush_check_), as_handle(&flush_prepare_),
        as_handle(&sigterm_), as_handle(&sigint_), as_handle(&sighup_)}) {
    if (!uv_is_closing(handle)) uv_close(handle, nullptr);
  }
  // Connections finish flushing and close; then uv_run returns.
}

}  // namespace hsm::agent
