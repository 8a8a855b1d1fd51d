// The one backoff: immediate at attempt 0, then doubling within [d/2, d], capped, jittered.
#include "hsm/common/backoff.hpp"

#include <catch2/catch.hpp>
#include <set>

using hsm::common::Backoff;
using namespace std::chrono_literals;

TEST_CASE("backoff: immediate, then doubling within [d/2, d], capped at the maximum", "[backoff]") {
  const Backoff backoff(100ms, 1000ms);
  CHECK(backoff.ceiling(0) == 0ms);
  CHECK(backoff.delay(0) == 0ms);
  const std::chrono::nanoseconds ceilings[] = {100ms, 200ms, 400ms, 800ms, 1000ms, 1000ms};
  for (std::uint32_t attempt = 1; attempt <= 6; ++attempt) {
    CHECK(backoff.ceiling(attempt) == ceilings[attempt - 1]);
    for (int draw = 0; draw < 50; ++draw) {
      const auto delay = backoff.delay(attempt);
      CHECK(delay >= ceilings[attempt - 1] / 2);
      CHECK(delay <= ceilings[attempt - 1]);
    }
  }
  // Far past the cap, the doubling neither overflows nor exceeds it.
  CHECK(backoff.ceiling(10'000) == 1000ms);
  CHECK(backoff.ceiling(UINT32_MAX) == 1000ms);
  CHECK(backoff.delay(UINT32_MAX) <= 1000ms);
}

TEST_CASE("backoff: the jitter spreads parties apart", "[backoff]") {
  // Many clients (or agents) that failed at the same moment do not retry in lockstep.
  const Backoff backoff(1000ms, 1000ms);
  std::set<std::chrono::nanoseconds::rep> delays;
  for (int i = 0; i < 20; ++i) delays.insert(backoff.delay(1).count());
  CHECK(delays.size() > 1);
}

TEST_CASE("backoff: a maximum below the first delay is raised to it", "[backoff]") {
  const Backoff backoff(50ms, 10ms);
  CHECK(backoff.ceiling(1) == 50ms);
  CHECK(backoff.ceiling(3) == 50ms);
}
