// DeadlineQueue: earliest deadline first, and the entries of answered calls do not pile up:
// the queue stays proportional to the calls still held, however many were answered.
#include "server/deadline_queue.hpp"

#include <catch2/catch.hpp>
#include <chrono>
#include <memory>
#include <vector>

namespace hsm::agent {
namespace {

using namespace std::chrono_literals;

std::shared_ptr<Call> call_with_msgid(std::uint32_t msgid) {
  auto call = std::make_shared<Call>();
  call->request.msgid = msgid;
  return call;
}

TEST_CASE("deadline queue: earliest deadline first", "[deadline_queue]") {
  const auto t0 = SteadyClock::now();
  DeadlineQueue queue;
  std::vector<std::shared_ptr<Call>> held;
  for (const int offset_ms : {30, 10, 50, 20, 40}) {
    held.push_back(call_with_msgid(static_cast<std::uint32_t>(offset_ms)));
    queue.push(t0 + std::chrono::milliseconds(offset_ms), held.back());
  }
  std::vector<std::uint32_t> order;
  while (!queue.empty()) {
    const auto deadline = queue.top().deadline;
    auto entry = queue.pop();
    CHECK(entry.deadline == deadline);
    order.push_back(entry.call.lock()->request.msgid);
  }
  CHECK(order == std::vector<std::uint32_t>{10, 20, 30, 40, 50});
}

TEST_CASE("deadline queue: answered calls' entries are dropped, held ones kept",
          "[deadline_queue]") {
  const auto t0 = SteadyClock::now();
  DeadlineQueue queue;
  std::vector<std::shared_ptr<Call>> held;
  std::size_t largest = 0;
  for (std::uint32_t i = 0; i < 100'000; ++i) {
    auto call = call_with_msgid(i);
    queue.push(t0 + 5s + std::chrono::microseconds(i), call);
    // One call in a thousand is still queued or running; the others were answered at once.
    if (i % 1000 == 0) held.push_back(std::move(call));
    largest = std::max(largest, queue.size());
  }
  // Without dropping, 100,000 entries; with it, bounded by twice the floor or the live calls.
  CHECK(largest <= 2 * DeadlineQueue::kCompactFloor);

  queue.drop_answered();
  REQUIRE(queue.size() == held.size());
  std::uint32_t expected = 0;
  while (!queue.empty()) {
    auto call = queue.pop().call.lock();
    REQUIRE(call != nullptr);
    CHECK(call->request.msgid == expected);
    expected += 1000;
  }
}

}  // namespace
}  // namespace hsm::agent
