#include "call_runner.hpp"

#include <algorithm>
#include <string>
#include <utility>

namespace hsm::client {
namespace {

/// Agent error codes that say "not now" rather than "no": the same request may succeed later.
bool is_transient(Errc code) {
  return code == Errc::kHsmUnavailable || code == Errc::kOverloaded ||
         code == Errc::kShuttingDown || code == Errc::kAuditUnavailable;
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
      spin_(options.busy_poll.value_or(std::chrono::microseconds::zero())),
      deliver_on_caller_([this](const std::shared_ptr<Call>& call, Answer&& answer) {
        attempt_ended_on_caller(call, std::move(answer));
      }),
      pool_(ConnectionSettings{options.socket_path, response_limits(options),
                               options.max_request_bytes},
            options.connections, options.retry,
            [this](const std::shared_ptr<Call>& call, Answer&& answer) {
              attempt_ended(call, std::move(answer));
            }) {}

CallRunner::~CallRunner() {
  closing_.store(true, std::memory_order_release);
  // Readers fail their pending calls (no retry: closing_ is set) and are joined; then the
  // timer thread stops, and the retries it still held complete as abandoned.
  pool_.close();
  timer_.stop();
}

void CallRunner::start(const std::shared_ptr<Call>& call, const std::stop_token& stop) {
  std::weak_ptr<Call> weak = call;
  auto handle = timer_.schedule(call->deadline(), [this, weak] {
    if (auto expiring = weak.lock()) {
      finish(expiring,
             Error(Errc::kTimeout,
                   "no answer within the call's timeout (the agent may be overloaded or the HSM "
                   "slow)"),
             true);
    }
  });
  if (handle) {
    call->set_deadline_timer(*handle);
  }
  if (stop.stop_possible()) {
    // Runs at once, here, when the stop was requested already; a callback call's cancellation
    // then completes on the timer thread, so look at the token, not at the call.
    call->watch_stop(stop, [this, weak] {
      if (auto cancelled = weak.lock()) {
        finish_from_caller(cancelled, Error(Errc::kCancelled, "the call was cancelled"));
      }
    });
    if (stop.stop_requested()) {
      return;  // nothing is sent for a call stopped before it started
    }
  }
  if (auto not_sent = attempt(call, call->caller_waits())) {
    if (call->completes_on_client_thread()) {
      // A callback never runs on the thread that made the call (it may hold locks the
      // callback takes): decide on the timer thread.
      auto decided = timer_.schedule(Clock::now(), [this, call, not_sent = *not_sent]() mutable {
        retry_or_finish(call, std::move(not_sent.failure), not_sent.not_before);
      });
      if (decided) {
        return;
      }
    }
    retry_or_finish(call, std::move(not_sent->failure), not_sent->not_before);
  }
}

void CallRunner::read_answer_here(const std::shared_ptr<Call>& call) {
  const auto in_flight = call->in_flight();
  if (!in_flight) {
    return;
  }
  const auto connection = in_flight->connection.lock();
  if (!connection) {
    return;
  }
  const auto started = Clock::now();
  const SpinBudget::Lease polling = spin_.lease();
  if (!connection->read_until_answered(*call, in_flight->msgid, polling.spin(),
                                       deliver_on_caller_)) {
    return;  // another thread reads the connection: it wakes the caller
  }
  polling.end_poll();
  caller_reads_.fetch_add(1, std::memory_order_relaxed);
  if (call->finished()) {
    spin_.record(Clock::now() - started);
  }
}

std::optional<CallRunner::NotSent> CallRunner::attempt(const std::shared_ptr<Call>& call,
                                                       bool caller_reads) {
  if (call->finished()) {
    return std::nullopt;  // timed out or cancelled while waiting for this attempt
  }
  if (closing_.load(std::memory_order_acquire)) {
    return NotSent{{Error(Errc::kConnectionFailed, "the client is closed"), Delivery::kNotSent},
                   {}};
  }
  call->begin_attempt();
  // A connection can die while idle (the agent restarted) without its reader having noticed
  // yet; a request that then fails before any byte left is sent on a fresh connection at once.
  // That is reconnecting, not retrying: it does not count as an attempt.
  constexpr int kStaleConnectionRetries = 1;
  for (int stale = 0;; ++stale) {
    auto acquired = pool_.acquire();
    if (auto* unavailable = std::get_if<ConnectionPool::Unavailable>(&acquired)) {
      return NotSent{{std::move(unavailable->error), Delivery::kNotSent}, unavailable->retry_at};
    }
    auto& connection = std::get<std::shared_ptr<Connection>>(acquired);
    std::optional<Failure> failure = connection->send(call, caller_reads);
    if (!failure) {
      return std::nullopt;
    }
    const bool stale_connection =
        failure->delivery == Delivery::kNotSent && failure->error.errc() == Errc::kConnectionFailed;
    if (!stale_connection || stale >= kStaleConnectionRetries) {
      if (failure->delivery == Delivery::kNotSent) {
        return NotSent{std::move(*failure), {}};
      }
      retry_or_finish(call, std::move(*failure), {});  // cut in the middle of its request
      return std::nullopt;
    }
  }
}

void CallRunner::attempt_ended(const std::shared_ptr<Call>& call, Answer&& answer) {
  if (auto* error = std::get_if<Error>(&answer)) {
    retry_or_finish(call, {std::move(*error), Delivery::kMaybeSent}, {});
    return;
  }
  finish(call, std::move(answer));
}

void CallRunner::attempt_ended_on_caller(const std::shared_ptr<Call>& call, Answer&& answer) {
  if (call->completes_on_client_thread()) {
    // A callback never runs on a thread that made a call (client.hpp). A copy goes to the
    // timer thread, so the answer is still here if that thread has stopped (closing).
    if (timer_.schedule(Clock::now(), [this, call, answer]() mutable {
          attempt_ended(call, std::move(answer));
        })) {
      return;
    }
  }
  attempt_ended(call, std::move(answer));
}

void CallRunner::retry_or_finish(const std::shared_ptr<Call>& call, Failure&& failure,
                                 Clock::time_point not_before) {
  const Errc code = failure.error.errc();
  // A request that never left may be sent again whatever it does; one that may have reached
  // the agent only if doing it twice is harmless (never generate_key or delete_key).
  const bool may_repeat = failure.delivery == Delivery::kNotSent || call->idempotent();
  const bool retryable = (code == Errc::kConnectionFailed || is_transient(code)) && may_repeat;
  if (!retryable || call->attempts() >= max_attempts_ || closing_.load(std::memory_order_acquire)) {
    finish(call, std::move(failure.error));
    return;
  }
  const auto at = std::max(Clock::now() + backoff_.delay(call->attempts()), not_before);
  if (at >= call->deadline()) {  // the retry could not finish in time: report the cause now
    finish(call, std::move(failure.error));
    return;
  }
  auto scheduled = timer_.schedule(at, [this, call] {
    if (auto not_sent = attempt(call)) {
      retry_or_finish(call, std::move(not_sent->failure), not_sent->not_before);
    }
  });
  if (!scheduled) {
    finish(call, std::move(failure.error));
  }
}

void CallRunner::finish(const std::shared_ptr<Call>& call, Answer&& answer, bool withdraw_request) {
  if (call->finished()) {
    return;
  }
  // The request is withdrawn before the caller hears the outcome, so that a caller woken by a
  // timeout or a cancellation finds no entry of its call left on the connection. A reader that
  // took the entry first answers the call itself, and whichever finish() comes first wins.
  if (withdraw_request) {
    if (auto in_flight = call->take_in_flight()) {
      if (auto connection = in_flight->connection.lock()) {
        connection->forget(in_flight->msgid, call.get());
      }
    }
  }
  if (!call->finish(std::move(answer))) {
    return;
  }
  if (auto handle = call->take_deadline_timer()) {
    timer_.cancel(*handle);
  }
}

void CallRunner::finish_from_caller(const std::shared_ptr<Call>& call, Error&& error) {
  if (call->finished()) {
    return;
  }
  if (call->completes_on_client_thread()) {
    auto handed_over = timer_.schedule(
        Clock::now(), [this, call, error]() mutable { finish(call, std::move(error), true); });
    if (handed_over) {
      return;
    }
  }
  finish(call, std::move(error), true);
}

}  // namespace hsm::client
