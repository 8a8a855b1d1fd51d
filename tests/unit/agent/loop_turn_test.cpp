// LoopTurn: one holder at a time, and the watchdog hands the turn over once per inline call
// that overstays, also after it went to sleep, and never for a call that returned. Timings are
// chosen so that a loaded machine can only make a test wait longer, not fail: the negative cases
// use an overstay far beyond any scheduling delay.
#include "server/loop_turn.hpp"

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <thread>
#include <vector>

#include "fixtures/polling.hpp"

namespace hsm::agent {
namespace {

using namespace std::chrono_literals;
using hsm::test::wait_until;

struct CountingTurn {
  explicit CountingTurn(LoopTurn::Timing timing)
      : turn(timing, [this] { handed_over.fetch_add(1); }) {}
  std::atomic<int> handed_over{0};
  LoopTurn turn;
};

constexpr LoopTurn::Timing kQuick{.overstay = 1ms, .tick = 1ms, .idle_after = 50ms};
constexpr LoopTurn::Timing kPatient{.overstay = 2s, .tick = 1ms, .idle_after = 50ms};

TEST_CASE("loop turn: one holder at a time", "[loop_turn]") {
  CountingTurn counting(kPatient);
  auto& turn = counting.turn;
  CHECK_FALSE(turn.held());
  REQUIRE(turn.try_take());
  CHECK(turn.held());
  CHECK_FALSE(turn.try_take());
  turn.release();
  CHECK_FALSE(turn.held());
  REQUIRE(turn.try_take());
  const auto ticket = turn.release_for_inline_call();
  CHECK_FALSE(turn.held());  // the inline call runs with nobody on the loop
  CHECK(turn.try_take());
  turn.inline_call_done(ticket);
  CHECK(counting.handed_over == 0);
}

TEST_CASE("loop turn: an inline call that overstays is handed over, once", "[loop_turn]") {
  CountingTurn counting(kQuick);
  auto& turn = counting.turn;
  REQUIRE(turn.try_take());
  const auto ticket = turn.release_for_inline_call();
  REQUIRE(wait_until([&] { return counting.handed_over == 1; }, 5s));
  CHECK(turn.hand_overs() == 1);
  // Another worker takes the turn; the call is still running: no second hand-over.
  REQUIRE(turn.try_take());
  std::this_thread::sleep_for(30ms);
  CHECK(counting.handed_over == 1);
  turn.inline_call_done(ticket);

  // The next inline call that overstays is handed over in its turn.
  const auto second = turn.release_for_inline_call();
  REQUIRE(wait_until([&] { return counting.handed_over == 2; }, 5s));
  turn.inline_call_done(second);
}

TEST_CASE("loop turn: a call that returned in time is not handed over", "[loop_turn]") {
  CountingTurn counting(kPatient);
  auto& turn = counting.turn;
  for (int i = 0; i < 100; ++i) {
    REQUIRE(turn.try_take());
    const auto ticket = turn.release_for_inline_call();
    turn.inline_call_done(ticket);
  }
  std::this_thread::sleep_for(50ms);
  CHECK(counting.handed_over == 0);
}

TEST_CASE("loop turn: a sleeping watchdog wakes for the next inline call", "[loop_turn]") {
  CountingTurn counting({.overstay = 1ms, .tick = 1ms, .idle_after = 1ms});
  auto& turn = counting.turn;
  for (int round = 1; round <= 3; ++round) {
    std::this_thread::sleep_for(30ms);  // long past idle_after: the watchdog is asleep
    REQUIRE(turn.try_take());
    const auto ticket = turn.release_for_inline_call();
    REQUIRE(wait_until([&] { return counting.handed_over == round; }, 5s));
    turn.inline_call_done(ticket);
  }
}

TEST_CASE("loop turn: an older call returning late leaves the newer one timed", "[loop_turn]") {
  CountingTurn counting(kQuick);
  auto& turn = counting.turn;
  REQUIRE(turn.try_take());
  const auto stuck = turn.release_for_inline_call();
  REQUIRE(wait_until([&] { return counting.handed_over == 1; }, 5s));
  REQUIRE(turn.try_take());  // the worker it was handed to
  const auto newer = turn.release_for_inline_call();
  turn.inline_call_done(stuck);  // the first call finally returns
  // The newer call still runs, so it is still watched, and handed over in its turn.
  REQUIRE(wait_until([&] { return counting.handed_over == 2; }, 5s));
  turn.inline_call_done(newer);
}

TEST_CASE("loop turn: threads racing for the turn never hold it together",
          "[loop_turn][concurrency]") {
  CountingTurn counting(kPatient);
  auto& turn = counting.turn;
  std::atomic<int> holders{0};
  std::atomic<bool> overlap{false};
  long shared_counter = 0;  // touched only by the holder: a race here is a TSan report
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20000; ++i) {
        if (!turn.try_take()) continue;
        if (holders.fetch_add(1) != 0) overlap = true;
        ++shared_counter;
        holders.fetch_sub(1);
        if (i % 2 == 0) {
          turn.inline_call_done(turn.release_for_inline_call());
        } else {
          turn.release();
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK_FALSE(overlap);
  CHECK(shared_counter > 0);
}

}  // namespace
}  // namespace hsm::agent
