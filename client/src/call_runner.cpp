#include "call_runner.hpp"

#include <algorithm>
#include <string>
#include <utility>

namespace hsm::client {
namespace {

/// Agent error codes that say "not now" rather than "no": the same request may succeed later.
bool is_transient(const std::string& code) {
  using protocol::ErrorCode;
  for (ErrorCode transient : {ErrorCode::kHsmUnavailable, ErrorCode::kOverloaded,
                              ErrorCode::kShuttingDown, ErrorCode::kAuditUnavailable}) {
    if (code == protocol::to_string(transient)) {
      return true;
    }
  }
  return false;
}

protocol::Limits response_limits(const ClientOptions& options) {
  protocol::Limits limits;
  limits.max_message_bytes = options.max_response_bytes;
  limits.max_bin_bytes = options.max_response_bytes;
  // list_keys and get_jwks answers grow with the number of keys; the byte cap bounds them.
  limits.max_array_items = 1u << 20;
  return limits;
}

}  // namespace

CallRunner::CallRunner(const ClientOptions& options)
    : max_attempts_(std::max<std::uint32_t>(options.retry.max_attempts, 1)),
      backoff_(options.retry),
      pool_(ConnectionSettings{options.socket_path, response_limits(options),
                               options.max_request_bytes},
            options.connections, options.retry, *this) {}

CallRunner::~CallRunner() {
  closing_.store(true, std::memory_order_release);
  // Readers fail their pending calls (no retry: closing_ is set) and are joined; then the
  // timer thread stops, and the retries it still held complete as abandoned.
  pool_.close();
  timer_.stop();
}

void CallRunner::start(const std::shared_ptr<Call>& call) {
  std::weak_ptr<Call> weak = call;
  auto handle = timer_.schedule(call->deadline(), [this, weak] {
    if (auto expiring = weak.lock()) {
      expire(expiring);
    }
  });
  if (handle) {
    call->set_deadline_timer(*handle);
  }
  (void)attempt(call, Thread::kCaller);
}

void CallRunner::run(const std::shared_ptr<Call>& call, CompletionFlag& done) {
  const std::optional<OwnAnswer> own = attempt(call, Thread::kCaller, ReadBy::kSender);
  // Not in flight on a connection after the first attempt: it completed already, or a retry
  // will carry it (read by that connection's reader thread).
  const bool completed =
      own ? own->connection->await(call, done, own->msgid) : done.wait_until(call->deadline());
  if (!completed) {
    expire(call);
  }
}

void CallRunner::expire(const std::shared_ptr<Call>& call) {
  if (!call->finish(Error(std::string(kTimeout),
                          "no answer within the call's timeout (the agent may be overloaded "
                          "or the HSM slow)"))) {
    return;
  }
  if (auto handle = call->take_deadline_timer()) {
    timer_.cancel(*handle);
  }
  if (auto in_flight = call->take_in_flight()) {
    if (auto connection = in_flight->connection.lock()) {
      connection->forget(in_flight->msgid, call.get());
    }
  }
}

std::optional<CallRunner::OwnAnswer> CallRunner::attempt(const std::shared_ptr<Call>& call,
                                                         Thread thread, ReadBy read_by) {
  if (call->finished()) {
    return std::nullopt;  // timed out while waiting for this retry
  }
  if (closing_.load(std::memory_order_acquire)) {
    finish(call, Error(std::string(kConnectionFailed), "the client is closed"), thread);
    return std::nullopt;
  }
  call->begin_attempt();
  // A connection can die while idle (the agent restarted) without its reader having noticed
  // yet; a request that then fails before any byte left is sent on a fresh connection at once.
  // That is reconnecting, not retrying: it does not count as an attempt.
  constexpr int kStaleConnectionRetries = 1;
  for (int stale = 0;; ++stale) {
    auto acquired = pool_.acquire();
    if (auto* unavailable = std::get_if<ConnectionPool::Unavailable>(&acquired)) {
      retry_or_finish(call, {std::move(unavailable->error), Delivery::kNotSent}, thread,
                      unavailable->retry_at);
      return std::nullopt;
    }
    auto& connection = std::get<std::shared_ptr<Connection>>(acquired);
    auto sent = connection->send(call, read_by);
    if (const auto* in_flight = std::get_if<Connection::Sent>(&sent)) {
      if (read_by == ReadBy::kSender) {
        return OwnAnswer{std::move(connection), in_flight->msgid};
      }
      return std::nullopt;
    }
    auto& failure = std::get<Failure>(sent);
    const bool stale_connection =
        failure.delivery == Delivery::kNotSent && failure.error.code() == kConnectionFailed;
    if (!stale_connection || stale >= kStaleConnectionRetries) {
      retry_or_finish(call, std::move(failure), thread, Clock::time_point{});
      return std::nullopt;
    }
  }
}

void CallRunner::on_answer(const std::shared_ptr<Call>& call, Answer&& answer,
                           ReportingThread thread) {
  if (auto* error = std::get_if<Error>(&answer);
      error != nullptr && call->idempotent() && is_transient(error->code())) {
    retry_or_finish(call, {std::move(*error), Delivery::kMaybeSent}, thread, {});
    return;
  }
  finish(call, std::move(answer), thread);
}

void CallRunner::on_failure(const std::shared_ptr<Call>& call, Failure&& failure,
                            ReportingThread thread) {
  retry_or_finish(call, std::move(failure), thread, {});
}

void CallRunner::retry_or_finish(const std::shared_ptr<Call>& call, Failure&& failure,
                                 Thread thread, Clock::time_point not_before) {
  const std::string& code = failure.error.code();
  // A request that never left may be sent again whatever it does; one that may have reached
  // the agent only if doing it twice is harmless (never generate_key or delete_key).
  const bool may_repeat = failure.delivery == Delivery::kNotSent || call->idempotent();
  const bool retryable = (code == kConnectionFailed || is_transient(code)) && may_repeat;
  if (!retryable || call->attempts() >= max_attempts_ || closing_.load(std::memory_order_acquire)) {
    finish(call, std::move(failure.error), thread);
    return;
  }
  const auto at = std::max(Clock::now() + backoff_.delay(call->attempts()), not_before);
  if (at >= call->deadline()) {  // the retry could not finish in time: report the cause now
    finish(call, std::move(failure.error), thread);
    return;
  }
  auto scheduled = timer_.schedule(at, [this, call] { (void)attempt(call, Thread::kClient); });
  if (!scheduled) {
    finish(call, std::move(failure.error), thread);
  }
}

void CallRunner::finish(const std::shared_ptr<Call>& call, Answer&& answer, Thread thread) {
  if (thread == Thread::kCaller && call->completes_on_client_thread()) {
    // A callback never runs on the thread that made the call (it may hold locks the callback
    // takes); hand it to the timer thread.
    auto shared_answer = std::make_shared<Answer>(std::move(answer));
    auto handed_over = timer_.schedule(Clock::now(), [this, call, shared_answer] {
      finish(call, std::move(*shared_answer), Thread::kClient);
    });
    if (handed_over) {
      return;
    }
    answer = std::move(*shared_answer);  // the timer is stopped (closing): complete here
  }
  if (!call->finish(std::move(answer))) {
    return;
  }
  if (auto handle = call->take_deadline_timer()) {
    timer_.cancel(*handle);
  }
}

}  // namespace hsm::client
