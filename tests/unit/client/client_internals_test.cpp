// The client's internal pieces: msgid allocation, backoff delays, the timer queue, error codes,
// and the call runner's deadlines and cancellation against a fake agent.
#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <stop_token>
#include <thread>
#include <vector>

#include "backoff.hpp"
#include "call.hpp"
#include "call_runner.hpp"
#include "fake_agent.hpp"
#include "pending_calls.hpp"
#include "timer_queue.hpp"

namespace {

using hsm::client::Clock;
using namespace std::chrono_literals;

std::shared_ptr<hsm::client::Call> make_call() {
  hsm::protocol::Request request;
  request.method = hsm::protocol::Method::kHealth;
  return std::make_shared<hsm::client::FutureCall<bool>>(
      std::move(request), Clock::now() + 1s, true, [](hsm::protocol::Result&&) { return true; });
}

}  // namespace

TEST_CASE("msgids wrap around at 2^32", "[client][internals]") {
  hsm::client::PendingCalls pending(0xFFFFFFFEu);
  auto a = make_call();
  auto b = make_call();
  auto c = make_call();
  CHECK(pending.add(a) == 0xFFFFFFFEu);
  CHECK(pending.add(b) == 0xFFFFFFFFu);
  CHECK(pending.add(c) == 0u);  // wrapped
  CHECK(pending.size() == 3);

  CHECK(pending.take(0xFFFFFFFFu) == b);
  CHECK(pending.take(0xFFFFFFFFu) == nullptr);  // a second answer to the same msgid is dropped
  CHECK(pending.take(12345) == nullptr);        // a msgid never sent
  CHECK(pending.size() == 2);
}

TEST_CASE("a msgid still in flight is skipped and never reused", "[client][internals]") {
  hsm::client::PendingCalls pending(1);
  auto a = make_call();
  auto b = make_call();
  auto c = make_call();
  auto d = make_call();
  CHECK(pending.add(a) == 1u);
  CHECK(pending.add(b) == 2u);
  CHECK(pending.take(1) == a);  // 1 is free again, 2 is in flight
  pending.set_next_msgid(1);    // as if the counter had come all the way around
  CHECK(pending.add(c) == 1u);
  CHECK(pending.add(d) == 3u);  // 2 skipped
  CHECK(pending.take(2) == b);
  CHECK(pending.take(3) == d);

  // Across the wrap: 0xFFFFFFFF and 0 in flight.
  hsm::client::PendingCalls wrapping(0xFFFFFFFFu);
  CHECK(wrapping.add(a) == 0xFFFFFFFFu);
  CHECK(wrapping.add(b) == 0u);
  wrapping.set_next_msgid(0xFFFFFFFFu);
  CHECK(wrapping.add(c) == 1u);
}

TEST_CASE("remove() withdraws a msgid only for its own call", "[client][internals]") {
  hsm::client::PendingCalls pending;
  auto mine = make_call();
  auto other = make_call();
  const auto id = pending.add(mine);
  CHECK_FALSE(pending.remove(id, other.get()));
  CHECK(pending.size() == 1);
  CHECK(pending.remove(id, mine.get()));
  CHECK(pending.size() == 0);
  CHECK(pending.take_all_written().empty());
}

TEST_CASE("take_all_written() leaves the calls still being written to their writers",
          "[client][internals]") {
  hsm::client::PendingCalls pending;
  std::vector<std::shared_ptr<hsm::client::Call>> calls;
  std::vector<std::uint32_t> ids;
  for (int i = 0; i < 5; ++i) {
    calls.push_back(make_call());
    ids.push_back(pending.add(calls.back()));
  }
  CHECK(pending.written(ids[0], calls[0].get()));
  CHECK(pending.written(ids[1], calls[1].get()));
  CHECK(pending.written(ids[3], calls[3].get()));
  CHECK_FALSE(pending.written(ids[2], calls[4].get()));  // not its call
  CHECK_FALSE(pending.written(12345, calls[2].get()));   // a msgid never sent

  const auto taken = pending.take_all_written();
  CHECK(taken.size() == 3);
  CHECK(std::find(taken.begin(), taken.end(), calls[2]) == taken.end());
  CHECK(std::find(taken.begin(), taken.end(), calls[4]) == taken.end());
  CHECK(pending.size() == 2);
  CHECK(pending.holds(ids[2], calls[2].get()));
  CHECK(pending.holds(ids[4], calls[4].get()));

  CHECK(pending.written(ids[2], calls[2].get()));
  CHECK(pending.take_all_written().size() == 1);
  CHECK(pending.take(ids[4]) == calls[4]);
  CHECK(pending.empty());
}

TEST_CASE("the client's backoff takes RetryPolicy's bounds", "[client][internals]") {
  hsm::RetryPolicy policy;
  policy.initial_backoff = 10ms;
  policy.max_backoff = 100ms;
  const hsm::client::Backoff backoff(policy);
  CHECK(backoff.ceiling(1) == 10ms);
  CHECK(backoff.ceiling(5) == 100ms);
  policy.initial_backoff = 0ms;  // clamped: retries are never back to back
  CHECK(hsm::client::Backoff(policy).ceiling(1) == 100us);
}

TEST_CASE("the timer queue runs tasks in time order and can cancel them", "[client][internals]") {
  hsm::client::TimerQueue timers;
  std::mutex mutex;
  std::vector<int> order;
  std::promise<void> last;
  const auto now = Clock::now();
  auto record = [&](int value) {
    return [&, value] {
      std::lock_guard lock(mutex);
      order.push_back(value);
    };
  };
  REQUIRE(timers.schedule(now + 30ms, record(3)));
  REQUIRE(timers.schedule(now + 10ms, record(1)));
  auto cancelled = timers.schedule(now + 20ms, record(99));
  REQUIRE(cancelled);
  REQUIRE(timers.schedule(now + 20ms, record(2)));
  REQUIRE(timers.schedule(now + 40ms, [&] { last.set_value(); }));
  CHECK(timers.cancel(*cancelled));
  CHECK_FALSE(timers.cancel(*cancelled));
  last.get_future().get();
  std::lock_guard lock(mutex);
  CHECK(order == std::vector<int>{1, 2, 3});
}

TEST_CASE("a stopped timer queue refuses tasks and destroys those it held", "[client][internals]") {
  auto timers = std::make_unique<hsm::client::TimerQueue>();
  auto witness = std::make_shared<int>(0);
  std::atomic<bool> ran{false};
  REQUIRE(timers->schedule(Clock::now() + 1h, [witness, &ran] { ran = true; }));
  CHECK(witness.use_count() == 2);
  timers->stop();
  CHECK(witness.use_count() == 1);  // destroyed without running
  CHECK_FALSE(ran);
  CHECK_FALSE(timers->schedule(Clock::now(), [] {}));
}

TEST_CASE("a call completes once and a dropped call reports connection_failed",
          "[client][internals]") {
  hsm::protocol::Request request;
  request.method = hsm::protocol::Method::kHealth;
  auto call = std::make_shared<hsm::client::FutureCall<bool>>(
      request, Clock::now() + 1s, true, [](hsm::protocol::Result&&) { return true; });
  auto future = call->future();
  CHECK(call->finish(hsm::protocol::Result{hsm::protocol::VerifyResult{true}}));
  CHECK_FALSE(call->finish(hsm::Error("timeout", "late")));
  CHECK(future.get());

  auto dropped = std::make_shared<hsm::client::FutureCall<bool>>(
      request, Clock::now() + 1s, true, [](hsm::protocol::Result&&) { return true; });
  auto dropped_future = dropped->future();
  dropped.reset();
  try {
    (void)dropped_future.get();
    FAIL("expected an hsm::Error");
  } catch (const hsm::Error& error) {
    CHECK(error.code() == hsm::kConnectionFailed);
  }
}

TEST_CASE("every error code has one name and back", "[client][internals]") {
  for (int value = 0; value < static_cast<int>(hsm::Errc::kUnknown); ++value) {
    const auto code = static_cast<hsm::Errc>(value);
    const std::string_view name = hsm::to_string(code);
    CHECK_FALSE(name.empty());
    CHECK(hsm::errc_from_string(name) == code);
    const hsm::Error error(code, "m");
    CHECK(error.errc() == code);
    CHECK(error.code() == name);
    CHECK(hsm::Error(std::string(name), "m").errc() == code);
  }
  // Every protocol code, by the protocol's own names.
  for (const auto code : hsm::protocol::all_error_codes()) {
    CHECK(hsm::to_string(hsm::errc_from_string(hsm::protocol::to_string(code))) ==
          hsm::protocol::to_string(code));
  }
  CHECK(hsm::to_string(hsm::Errc::kNotFound) == "not_found");
  CHECK(hsm::to_string(hsm::Errc::kCancelled) == hsm::kCancelled);
  CHECK(hsm::to_string(hsm::Errc::kJoseBadSignature) == "jose_bad_signature");
  const hsm::Error newer("quota_exceeded", "from a newer agent");
  CHECK(newer.errc() == hsm::Errc::kUnknown);
  CHECK(newer.code() == "quota_exceeded");
}

namespace {

/// A runner on a fake agent that never answers: every call stays pending until it ends.
struct SilentAgentRunner {
  hsm::test::FakeAgent agent{[](const auto&, const auto&) {}};
  hsm::ClientOptions options = [this] {
    hsm::ClientOptions o;
    o.socket_path = agent.socket_path();
    return o;
  }();
  hsm::client::CallRunner runner{options};

  std::shared_ptr<hsm::client::SyncCall<bool>> make_sync(Clock::duration timeout) {
    hsm::protocol::Request request;
    request.method = hsm::protocol::Method::kHealth;
    return std::make_shared<hsm::client::SyncCall<bool>>(
        std::move(request), Clock::now() + timeout, true,
        [](hsm::protocol::Result&&) { return true; });
  }
};

}  // namespace

TEST_CASE("a cancelled call leaves no pending entry behind", "[client][internals]") {
  SilentAgentRunner fixture;
  std::stop_source stop;
  auto call = fixture.make_sync(10s);
  fixture.runner.start(call, stop.get_token());
  REQUIRE(fixture.runner.pending_calls() == 1);
  stop.request_stop();
  auto outcome = call->take();
  REQUIRE_FALSE(outcome.ok());
  CHECK(outcome.error().errc() == hsm::Errc::kCancelled);
  CHECK(fixture.runner.pending_calls() == 0);
  CHECK(fixture.agent.count(hsm::protocol::Method::kHealth) <= 1);
}

TEST_CASE("the runner makes no attempt for a call stopped before it starts",
          "[client][internals]") {
  SilentAgentRunner fixture;
  std::stop_source stop;
  stop.request_stop();
  auto call = fixture.make_sync(10s);
  fixture.runner.start(call, stop.get_token());
  auto outcome = call->take();
  REQUIRE_FALSE(outcome.ok());
  CHECK(outcome.error().errc() == hsm::Errc::kCancelled);
  CHECK(fixture.runner.pending_calls() == 0);
  CHECK(call->attempts() == 0);
}

TEST_CASE("a call past its deadline times out and leaves no pending entry", "[client][internals]") {
  SilentAgentRunner fixture;
  auto call = fixture.make_sync(50ms);
  fixture.runner.start(call, {});
  auto outcome = call->take();
  REQUIRE_FALSE(outcome.ok());
  CHECK(outcome.error().errc() == hsm::Errc::kTimeout);
  CHECK(fixture.runner.pending_calls() == 0);
}

TEST_CASE("a lone synchronous caller reads its own answers, without waking the reader thread",
          "[client][internals]") {
  hsm::test::FakeAgent agent;  // answers every request at once
  hsm::ClientOptions options;
  options.socket_path = agent.socket_path();
  hsm::client::CallRunner runner{options};
  constexpr int kCalls = 20;
  for (int i = 0; i < kCalls; ++i) {
    hsm::protocol::Request request;
    request.method = hsm::protocol::Method::kHealth;
    auto call = std::make_shared<hsm::client::SyncCall<bool>>(
        std::move(request), Clock::now() + 10s, true, [](hsm::protocol::Result&&) { return true; });
    runner.start(call, {});
    runner.read_answer_here(call);
    CHECK(call->take().ok());
  }
  // Nothing wakes the reader thread while only this caller sends, so the caller finds the read
  // turn free every time. The reader thread starting up with the first call may take that one.
  CHECK(runner.caller_reads() >= kCalls - 1);
  CHECK(runner.pending_calls() == 0);
}
