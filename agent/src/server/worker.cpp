#include "server/worker.hpp"

#include <pthread.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <utility>

#include "policy/access_control.hpp"
#include "policy/rate_limiter.hpp"

namespace hsm::agent {
namespace {

using protocol::ErrorCode;
using protocol::Method;

constexpr std::uint64_t kTickMs = 1000;

// How long a connection being closed after a flush (idle, or a request without a msgid) may keep
// answers the client does not read before it is closed with them unsent. Without a bound, a
// client that never reads would hold its connection, and its buffered answers, for ever.
constexpr auto kCloseFlushLimit = std::chrono::seconds(2);

// After shutdown finishes early (nothing left in flight), connections may take until the drain
// deadline to read their last answers; after the drain deadline this much more, so answers
// written at the deadline reach a client that reads. Then whatever is unsent is dropped.
constexpr auto kFinalFlushGrace = std::chrono::milliseconds(500);

// A caller refused by policy learns why: its first request is answered permission_denied. Until
// then it may send this much, for this long.
constexpr std::size_t kRefusedInputBytes = 4096;
constexpr auto kRefusedWait = std::chrono::seconds(1);

// A sign or verify runs on the loop's thread only while this worker's token calls take less than
// this on average (SoftHSMv2 ES256: ~70 us): a slow token (a network HSM) gains nothing from it,
// and its calls would leave the loop unattended for longer.
constexpr auto kInlineLatencyLimit = std::chrono::microseconds(500);

// Encodes into a buffer reused from answer to answer (one per loop thread): no allocation once
// it has grown.
std::string_view encode(const protocol::Response& response) {
  thread_local msgpack::sbuffer buffer;
  buffer.clear();
  protocol::encode_response(response, buffer);
  return {buffer.data(), buffer.size()};
}

protocol::Error error(ErrorCode code, std::string message) {
  return {code, std::move(message), std::nullopt};
}

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(SteadyClock::now().time_since_epoch())
      .count();
}

std::uint64_t ms_until(SteadyClock::time_point when) {
  const auto now = SteadyClock::now();
  if (when <= now) return 0;
  return static_cast<std::uint64_t>(
      std::chrono::ceil<std::chrono::milliseconds>(when - now).count());
}

Worker& worker_of(const uv_handle_t* handle) {
  return *static_cast<Worker*>(handle->loop->data);
}

}  // namespace

Worker::Worker(std::size_t index, WorkerContext& context)
    : index_(index), context_(context), loop_runner_(loop_, context.config.busy_poll) {
  uv::check(uv_loop_init(&loop_), "uv_loop_init");
  loop_.data = this;
  inbox_async_ = uv::Handle<uv_async_t>(
      &loop_,
      [](uv_loop_t* loop, uv_async_t* async) {
        return uv_async_init(loop, async, [](uv_async_t* a) {
          worker_of(reinterpret_cast<uv_handle_t*>(a)).drain_inbox();
        });
      },
      "uv_async_init");
  deadline_timer_ = uv::Handle<uv_timer_t>(&loop_, uv_timer_init, "uv_timer_init");
  tick_timer_ = uv::Handle<uv_timer_t>(&loop_, uv_timer_init, "uv_timer_init");
  drain_timer_ = uv::Handle<uv_timer_t>(&loop_, uv_timer_init, "uv_timer_init");
  final_flush_timer_ = uv::Handle<uv_timer_t>(&loop_, uv_timer_init, "uv_timer_init");
  flush_check_ = uv::Handle<uv_check_t>(&loop_, uv_check_init, "uv_check_init");
  flush_prepare_ = uv::Handle<uv_prepare_t>(&loop_, uv_prepare_init, "uv_prepare_init");
  uv::check(
      uv_timer_start(
          tick_timer_.get(),
          [](uv_timer_t* timer) { worker_of(reinterpret_cast<uv_handle_t*>(timer)).on_tick(); },
          kTickMs, kTickMs),
      "uv_timer_start");
  // Answers are written once per loop iteration per connection: after the reads of the
  // iteration (check), and before the loop blocks in its poll (prepare), so that what a timer,
  // the inbox or an inline call answered leaves at once rather than with the next event.
  uv::check(uv_check_start(flush_check_.get(),
                           [](uv_check_t* check) {
                             worker_of(reinterpret_cast<uv_handle_t*>(check)).flush_dirty();
                           }),
            "uv_check_start");
  uv::check(uv_prepare_start(flush_prepare_.get(),
                             [](uv_prepare_t* prepare) {
                               worker_of(reinterpret_cast<uv_handle_t*>(prepare)).flush_dirty();
                             }),
            "uv_prepare_start");
}

Worker::~Worker() {
  // The loop has ended (every handle closed) unless the agent exits abandoning it; closing what
  // is left and running once lets the close callbacks free their memory.
  close_handles();
  connections_.clear();
  uv_run(&loop_, UV_RUN_NOWAIT);
  if (uv_loop_close(&loop_) != 0) spdlog::debug("worker {}: loop closed with handles open", index_);
}

// ---- threads ----------------------------------------------------------------------------------

void Worker::drive() {
  std::unique_lock turn(turn_, std::try_to_lock);
  if (!turn.owns_lock()) return;  // another thread runs the loop
  // Named for ps/top -H and profilers; a pool thread that returns to the pool is renamed there.
  const std::string name = "hsm-worker-" + std::to_string(index_);
  pthread_setname_np(pthread_self(), name.c_str());
  for (;;) {
    (void)loop_runner_.run([this] { return inline_call_ != nullptr; }, [this] { return answers_; },
                           [this] { return may_busy_poll(); });
    std::shared_ptr<Call> call = std::move(inline_call_);
    if (!call) {
      // uv_run returns without a call to run only when the loop has ended: every handle closed.
      turn.unlock();
      if (!loop_ended_.exchange(true, std::memory_order_acq_rel)) context_.on_loop_ended();
      return;
    }
    inline_calls_.fetch_add(1, std::memory_order_relaxed);
    inline_since_ns_.store(now_ns(), std::memory_order_seq_cst);
    context_.on_inline_call();  // the watchdog looks from now on
    turn.unlock();
    Outcome outcome = run(*call);
    context_.pool.give_back_call_slot();
    inline_since_ns_.store(0, std::memory_order_seq_cst);
    if (!turn.try_lock()) {
      // The watchdog handed the loop to another thread meanwhile: it answers.
      post_completed(std::move(call), std::move(outcome), false);
      return;
    }
    complete(*call, std::move(outcome));
  }
}

bool Worker::inline_call_overstayed(SteadyClock::time_point now,
                                    std::chrono::microseconds overstay) {
  std::int64_t since = inline_since_ns_.load(std::memory_order_seq_cst);
  if (since <= 0) return false;
  const auto now_count =
      std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()).count();
  if (now_count - since < std::chrono::nanoseconds(overstay).count()) return false;
  // Once per call: the call's own end (a store of 0) or a later call wins over a stale look.
  return inline_since_ns_.compare_exchange_strong(since, -1, std::memory_order_seq_cst);
}

bool Worker::post(std::function<void()> task) {
  {
    std::lock_guard lock(inbox_mutex_);
    if (!inbox_open_) return false;
    inbox_.push_back(std::move(task));
    uv_async_send(inbox_async_.get());  // under the lock: the handle is not closed meanwhile
  }
  return true;
}

bool Worker::post_completed(std::shared_ptr<Call> call, Outcome outcome, bool from_pool) {
  std::lock_guard lock(inbox_mutex_);
  if (!inbox_open_) return false;  // shut down: the call was answered shutting_down
  completed_.push_back({std::move(call), std::move(outcome), from_pool});
  uv_async_send(inbox_async_.get());
  return true;
}

void Worker::memory_released() {
  std::lock_guard lock(inbox_mutex_);
  if (!inbox_open_ || memory_released_) return;
  memory_released_ = true;
  uv_async_send(inbox_async_.get());
}

void Worker::drain_inbox() {
  std::vector<std::function<void()>> tasks;
  std::vector<Completed> completed;
  bool memory_released = false;
  {
    std::lock_guard lock(inbox_mutex_);
    tasks.swap(inbox_);
    completed.swap(completed_);
    memory_released = std::exchange(memory_released_, false);
  }
  for (auto& done : completed) {
    if (done.from_pool) --pool_calls_;
    complete(*done.call, std::move(done.outcome));
  }
  for (auto& task : tasks) task();
  if (memory_released) resume_memory_waiters();
}

void Worker::adopt(AcceptedConnection connection) {
  connection_count_.fetch_add(1, std::memory_order_relaxed);
  const int fd = connection.fd;
  const Caller caller = connection.caller;
  const bool admitted = !connection.refused;
  if (!post([this, connection = std::move(connection)]() mutable {
        take_connection(std::move(connection));
      })) {
    ::close(fd);
    connection_count_.fetch_sub(1, std::memory_order_relaxed);
    context_.on_connection_closed(caller, admitted);
  }
}

void Worker::shut_down(SteadyClock::time_point drain_deadline) {
  (void)post([this, drain_deadline] { begin_shutdown(drain_deadline); });
}

// ---- connections ------------------------------------------------------------------------------

void Worker::take_connection(AcceptedConnection accepted) {
  std::unique_ptr<Connection> connection;
  try {
    connection = std::make_unique<Connection>(&loop_, accepted.fd, accepted.id, accepted.caller,
                                              *this, context_.connection_limits);
  } catch (const uv::Error& e) {
    spdlog::warn("connection {} dropped: {}", accepted.id, e.what());
    connection_count_.fetch_sub(1, std::memory_order_relaxed);
    context_.on_connection_closed(accepted.caller, !accepted.refused);
    return;
  }
  Connection& added = *connection;
  connections_.emplace(accepted.id, std::move(connection));
  if (accepted.refused) {
    added.refused_since = SteadyClock::now();
    added.limit_input(kRefusedInputBytes);
  } else {
    added.admitted = true;
    added.charge_to(context_.budget, std::move(accepted.meter));
  }
  if (shutting_down_) {
    added.close();
    return;
  }
  added.start();
}

void Worker::on_closing(Connection& connection) {
  context_.on_connection_closed(connection.caller(), connection.admitted);
  connection_count_.fetch_sub(1, std::memory_order_relaxed);
}

void Worker::on_closed(Connection& connection) {
  connections_.erase(connection.id());  // destroys it
  // The last connection has flushed: nothing left for the final flush bound, so let the loop end.
  if (finished_ && connections_.empty()) final_flush_timer_.close();
}

void Worker::on_output_pending(Connection& connection) {
  dirty_.push_back(connection.id());
}

void Worker::for_each_listed(std::vector<std::uint64_t>& ids, void (Connection::*action)()) {
  if (ids.empty()) return;
  std::vector<std::uint64_t> taken;
  taken.swap(ids);  // the action may list a connection again
  for (const auto id : taken) {
    const auto it = connections_.find(id);
    if (it != connections_.end()) ((*it->second).*action)();  // closed meanwhile: gone
  }
  taken.clear();
  if (ids.empty()) ids.swap(taken);  // keep the capacity
}

void Worker::flush_dirty() {
  for_each_listed(dirty_, &Connection::flush);
}

void Worker::on_slow_reader(Connection& connection) {
  context_.metrics.connections_closed_slow_reader.Increment();
  spdlog::warn("connection {} closed: its client does not read its answers", connection.id());
}

void Worker::on_waiting_for_memory(Connection& connection) {
  context_.metrics.memory_budget_waits_total.Increment();
  spdlog::debug("connection {} waits for room in the memory budget ({} of {} bytes held)",
                connection.id(), context_.budget.used(), context_.budget.limit());
  memory_waiters_.push_back(connection.id());
  context_.budget.wait_for_room();
}

void Worker::resume_memory_waiters() {
  // Each asks the budget again; one that still finds no room comes back to the list.
  for_each_listed(memory_waiters_, &Connection::read_again);
}

void Worker::on_frame_error(Connection& connection, const protocol::FrameError& error) {
  context_.metrics.protocol_errors_total.Add({{"reason", std::string(to_string(error.reason()))}})
      .Increment();
  spdlog::warn("connection {} closed: {}", connection.id(), error.what());
}

// ---- requests ---------------------------------------------------------------------------------

void Worker::on_message(Connection& connection, const msgpack::object& message) {
  if (connection.refused_since) {
    answer_refused(connection, message);
    return;
  }
  auto decoded = protocol::decode_request(message);
  if (auto* failure = std::get_if<protocol::RequestDecodeError>(&decoded)) {
    if (failure->method && failure->msgid) {
      // A known method with bad params: an ordinary failed request of that method, audited
      // like any failure (no kid: the params did not decode).
      context_.metrics.request_counter(*failure->method, failure->error.code).Increment();
      AuditRecord record;
      record.method = *failure->method;
      record.code = failure->error.code;
      record.caller = connection.caller();
      context_.audit.record(record);
    } else {
      context_.metrics.protocol_errors_total
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
  dispatch(connection, std::get<protocol::Request>(std::move(decoded)));
}

void Worker::answer_refused(Connection& connection, const msgpack::object& message) {
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
        encode({*msgid, error(ErrorCode::kPermissionDenied,
                              "permission denied: the agent's access policy has no rule for uid " +
                                  std::to_string(caller.uid) + " (gid " +
                                  std::to_string(caller.gid) + "); this connection is closed")}));
  }
  connection.close_after_flush();
}

std::shared_ptr<Call> Worker::begin_call(Connection& connection, protocol::Request&& request,
                                         SteadyClock::time_point received) {
  auto call = std::make_shared<Call>();
  call->connection_id = connection.id();
  call->caller = connection.caller();
  call->received = received;
  call->deadline = received + (request.timeout_ms ? std::chrono::milliseconds(*request.timeout_ms)
                                                  : context_.config.limits.request_timeout);
  call->request = std::move(request);
  // The decoded request holds about what its message did, until the call is gone.
  call->charge = connection.take_message_charge();
  connection.begin_request();
  ++in_flight_;
  context_.metrics.requests_in_flight.Increment();
  return call;
}

void Worker::dispatch(Connection& connection, protocol::Request&& request) {
  const auto call = begin_call(connection, std::move(request), SteadyClock::now());
  const Caller& caller = call->caller;
  const Method method = call->request.method;
  if (shutting_down_) {
    complete(*call, error(ErrorCode::kShuttingDown, "the agent is shutting down"));
    return;
  }
  if (auto denied = context_.access.authorize(caller, call->request)) {
    complete(*call, std::move(*denied));
    return;
  }
  // Fail closed: no key operation while its audit line may not be written (log/audit_log.hpp).
  if (AuditLog::key_operation(method) && context_.audit.refuses_key_operations()) {
    complete(*call, error(ErrorCode::kAuditUnavailable,
                          "the agent's audit log cannot be written; key operations are refused "
                          "until it can (retry later)"));
    return;
  }
  // After the access check (a denied request uses no tokens), before any work. The limit counts
  // signatures: a batch takes a token per item, and is refused whole when they are not there.
  if (!context_.rate_limiter.try_acquire(caller.uid, call->received,
                                         signatures_asked(call->request))) {
    complete(*call,
             error(ErrorCode::kOverloaded, "rate limit for this caller exceeded; retry later"));
    return;
  }
  // Answered here, the one place, without the token: it describes the agent as it is.
  if (method == Method::kCapabilities) {
    complete(*call, context_.capabilities);
    return;
  }
  if (runs_inline(*call) && context_.pool.try_take_call_slot()) {
    inline_call_ = call;  // run by drive() once this loop iteration ends
    uv_stop(&loop_);
  } else if (context_.pool.submit_call([this, call] {
               Outcome outcome = run(*call);
               post_completed(call, std::move(outcome), true);
             })) {
    ++pool_calls_;
  } else {
    complete(*call, error(ErrorCode::kOverloaded, "the agent's queue is full; retry later"));
    return;
  }
  deadlines_.push(call->deadline, call);
  if (call->deadline < deadline_timer_due_) arm_deadline_timer();
}

bool Worker::runs_inline(const Call& call) const {
  const Method method = call.request.method;
  return (method == Method::kSign || method == Method::kVerify) && !inline_call_ &&
         pool_calls_ == 0 && inline_since_ns_.load(std::memory_order_relaxed) == 0 &&
         std::chrono::nanoseconds(call_latency_ns_.load(std::memory_order_relaxed)) <
             kInlineLatencyLimit;
}

bool Worker::may_busy_poll() const {
  return pool_calls_ == 0 && !shutting_down_ &&
         std::chrono::nanoseconds(call_latency_ns_.load(std::memory_order_relaxed)) <
             kInlineLatencyLimit;
}

Outcome Worker::run(const Call& call) {
  // From the read to the start of its token work: 0 for an inline call, the time in the pool's
  // queue for the others.
  context_.metrics.queue_wait_seconds.Observe(
      std::chrono::duration<double>(SteadyClock::now() - call.received).count());
  if (SteadyClock::now() >= call.deadline) {
    return error(ErrorCode::kDeadlineExceeded, "the request waited past its deadline");
  }
  const auto started = SteadyClock::now();
  Outcome outcome = context_.keys.execute(call.request, call.deadline);
  const Method method = call.request.method;
  if (method == Method::kSign || method == Method::kVerify) {
    note_call_latency(SteadyClock::now() - started);
  }
  return outcome;
}

void Worker::note_call_latency(SteadyClock::duration elapsed) noexcept {
  // An exponential moving average over ~8 calls. The loop's thread and pool threads update it
  // without a lock: a lost update only delays the average by one call.
  const auto sample = std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count();
  const auto average = call_latency_ns_.load(std::memory_order_relaxed);
  call_latency_ns_.store(average + (sample - average) / 8, std::memory_order_relaxed);
}

void Worker::complete(Call& call, Outcome outcome) {
  if (call.answered) return;  // answered at its deadline or at shutdown; the late result goes
  call.answered = true;
  ++answers_;
  const auto code = code_of(outcome);
  const Method method = call.request.method;
  const auto elapsed = std::chrono::duration<double>(SteadyClock::now() - call.received).count();
  // Counted and audited before the answer leaves: a client that reads it and asks again finds
  // the first request in /metrics and in the audit log, in order.
  context_.metrics.requests_in_flight.Decrement();
  context_.metrics.request_counter(method, code).Increment();
  context_.metrics.observe_request(method, elapsed);
  if (AuditLog::audited(method, code)) {
    auto record = audit_record(call.request, call.caller, outcome);
    record.duration_seconds = elapsed;
    context_.audit.record(record);
  }
  --in_flight_;
  const auto it = connections_.find(call.connection_id);
  if (it != connections_.end()) {
    Connection& connection = *it->second;
    connection.send(encode({call.request.msgid, std::move(outcome)}));
    connection.end_request();
  }
  if (shutting_down_ && in_flight_ == 0) finish_shutdown();
}

// ---- deadlines and the tick -------------------------------------------------------------------

void Worker::arm_deadline_timer() {
  if (deadlines_.empty()) {
    uv_timer_stop(deadline_timer_.get());
    deadline_timer_due_ = SteadyClock::time_point::max();
    return;
  }
  deadline_timer_due_ = deadlines_.top().deadline;
  uv_timer_start(
      deadline_timer_.get(),
      [](uv_timer_t* timer) {
        worker_of(reinterpret_cast<uv_handle_t*>(timer)).expire_deadlines();
      },
      ms_until(deadline_timer_due_), 0);
}

void Worker::expire_deadlines() {
  deadline_timer_due_ = SteadyClock::time_point::max();
  const auto now = SteadyClock::now();
  while (!deadlines_.empty() && deadlines_.top().deadline <= now) {
    auto call = deadlines_.pop().call.lock();
    if (!call) continue;  // answered and gone
    // A queued call is answered now and not run (the pool thread sees its deadline passed);
    // a running one's result is dropped when it comes.
    complete(*call,
             error(ErrorCode::kDeadlineExceeded, "no answer from the token within the deadline"));
  }
  if (!finished_) arm_deadline_timer();
}

void Worker::on_tick() {
  if (const auto polled = loop_runner_.idle_polling(); polled != idle_polling_counted_) {
    context_.metrics.busy_poll_seconds.Increment(
        std::chrono::duration<double>(polled - idle_polling_counted_).count());
    idle_polling_counted_ = polled;
  }
  sweep_idle();
  close_stalled_connections();
  // A release can slip between a reader finding no room and its wait being noted: the tick
  // retries whoever still waits.
  resume_memory_waiters();
  close_stuck_flushes(SteadyClock::now() - kCloseFlushLimit);
}

void Worker::sweep_idle() {
  const auto idle = context_.config.limits.idle_timeout;
  if (idle.count() == 0) return;
  const auto cutoff = SteadyClock::now() - idle;
  std::vector<Connection*> idle_connections;
  for (auto& [id, connection] : connections_) {
    if (!connection->closing() && connection->in_flight() == 0 &&
        connection->last_activity() < cutoff) {
      idle_connections.push_back(connection.get());
    }
  }
  for (auto* connection : idle_connections) {
    // Counted once: a connection still flushing is swept again on the next tick.
    if (connection->closing_after_flush_since()) continue;
    spdlog::debug("connection {} closed after {}s idle", connection->id(), idle.count());
    context_.metrics.connections_closed_idle.Increment();
    connection->close_after_flush();
  }
}

void Worker::close_stalled_connections() {
  const auto now = SteadyClock::now();
  const auto cutoff = now - context_.config.limits.read_timeout;
  std::vector<Connection*> gone;
  std::vector<Connection*> slow;
  for (auto& [id, connection] : connections_) {
    if (connection->closing()) continue;
    // A connection that waits for memory reads nothing, so it would not see its client leave
    // until the read timeout, holding its bytes: look.
    if (connection->waiting_for_memory() && connection->peer_hung_up()) {
      gone.push_back(connection.get());
      continue;
    }
    if (connection->refused_since && *connection->refused_since < now - kRefusedWait) {
      gone.push_back(connection.get());  // refused, and sent no request in time
      continue;
    }
    const auto since = connection->incomplete_since();
    if (since && *since < cutoff) slow.push_back(connection.get());
  }
  for (auto* connection : gone) connection->close();
  for (auto* connection : slow) {
    context_.metrics.connections_closed_read_timeout.Increment();
    spdlog::warn("connection {} closed: a message did not complete within {}s (uid {})",
                 connection->id(), context_.config.limits.read_timeout.count(),
                 connection->caller().uid);
    connection->close();
  }
}

void Worker::close_stuck_flushes(SteadyClock::time_point requested_before) {
  std::vector<Connection*> stuck;
  for (auto& [id, connection] : connections_) {
    const auto since = connection->closing_after_flush_since();
    if (since && *since <= requested_before) stuck.push_back(connection.get());
  }
  for (auto* connection : stuck) {
    spdlog::debug("connection {} closed with answers unread by the client", connection->id());
    connection->close();
  }
}

// ---- shutdown ---------------------------------------------------------------------------------

void Worker::begin_shutdown(SteadyClock::time_point drain_deadline) {
  if (shutting_down_) return;
  shutting_down_ = true;
  drain_deadline_ = drain_deadline;
  for (auto& [id, connection] : connections_) connection->stop_reading();
  if (in_flight_ == 0) {
    finish_shutdown();
    return;
  }
  uv_timer_start(
      drain_timer_.get(),
      [](uv_timer_t* timer) {
        auto& self = worker_of(reinterpret_cast<uv_handle_t*>(timer));
        spdlog::warn("drain deadline passed with {} requests unanswered", self.in_flight_);
        self.finish_shutdown();
      },
      ms_until(drain_deadline), 0);
}

void Worker::finish_shutdown() {
  if (finished_) return;
  finished_ = true;
  // Whatever is still in flight gets a clear answer before its connection closes.
  while (!deadlines_.empty()) {
    auto call = deadlines_.pop().call.lock();
    if (call)
      complete(*call, error(ErrorCode::kShuttingDown, "the agent shut down before answering"));
  }
  std::vector<Connection*> open;
  open.reserve(connections_.size());
  for (auto& [id, connection] : connections_) open.push_back(connection.get());
  for (auto* connection : open) connection->close_after_flush();
  close_handles();
  // A client that never reads would keep its flush, and so the loop, running for ever: at the
  // drain deadline (or shortly after it, when that has passed) every connection still flushing
  // is closed with its answers unsent.
  if (connections_.empty()) {
    final_flush_timer_.close();
    return;
  }
  const auto until = std::max(drain_deadline_, SteadyClock::now() + kFinalFlushGrace);
  uv_timer_start(
      final_flush_timer_.get(),
      [](uv_timer_t* timer) {
        auto& self = worker_of(reinterpret_cast<uv_handle_t*>(timer));
        if (!self.connections_.empty()) {
          spdlog::warn("closing {} connections that did not read their last answers",
                       self.connections_.size());
        }
        self.close_stuck_flushes(SteadyClock::time_point::max());
        self.final_flush_timer_.close();
      },
      ms_until(until), 0);
}

void Worker::close_handles() {
  {
    std::lock_guard lock(inbox_mutex_);
    inbox_open_ = false;
    inbox_async_.close();
  }
  deadline_timer_.close();
  tick_timer_.close();
  drain_timer_.close();
  flush_check_.close();
  flush_prepare_.close();
  // final_flush_timer_ is closed by finish_shutdown() once the connections have flushed.
}

}  // namespace hsm::agent
