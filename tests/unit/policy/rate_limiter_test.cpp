// RateLimiter: per-uid token buckets driven by simulated time (now is passed in; no sleeping).
#include "policy/rate_limiter.hpp"

#include <catch2/catch.hpp>
#include <chrono>
#include <limits>
#include <stdexcept>

namespace hsm::agent {
namespace {

using namespace std::chrono_literals;
using Clock = RateLimiter::Clock;

const Clock::time_point kStart = Clock::time_point{} + 1000h;

/// How many of `attempts` requests from `uid` at `now` pass.
int passed(RateLimiter& limiter, uid_t uid, Clock::time_point now, int attempts) {
  int count = 0;
  for (int i = 0; i < attempts; ++i) count += limiter.try_acquire(uid, now) ? 1 : 0;
  return count;
}

TEST_CASE("off by default: a rate of 0 lets everything through and tracks no one") {
  RateLimiter limiter(AccessConfig{});
  CHECK_FALSE(limiter.enabled());
  CHECK(passed(limiter, 1000, kStart, 100000) == 100000);
  CHECK(limiter.tracked_callers() == 0);
}

TEST_CASE("burst: a new caller gets `burst` requests at once, then is refused") {
  RateLimiter limiter(10, 25);
  CHECK(limiter.enabled());
  CHECK(limiter.burst() == 25);
  CHECK(passed(limiter, 1000, kStart, 100) == 25);
  CHECK_FALSE(limiter.try_acquire(1000, kStart));
}

TEST_CASE("burst defaults to twice the rate, and at least 1") {
  CHECK(RateLimiter(10, 0).burst() == 20);
  CHECK(RateLimiter(0.2, 0).burst() == 1);
  AccessConfig config;
  config.rate_limit_per_second = 50;
  RateLimiter limiter(config);
  CHECK(limiter.rate() == 50);
  CHECK(passed(limiter, 1, kStart, 1000) == 100);
}

TEST_CASE("refill: tokens come back at the rate, and never beyond the burst") {
  RateLimiter limiter(10, 5);  // one token per 100 ms
  REQUIRE(passed(limiter, 1000, kStart, 5) == 5);
  CHECK_FALSE(limiter.try_acquire(1000, kStart));
  CHECK_FALSE(limiter.try_acquire(1000, kStart + 99ms));
  CHECK(limiter.try_acquire(1000, kStart + 100ms));
  CHECK_FALSE(limiter.try_acquire(1000, kStart + 100ms));
  CHECK(passed(limiter, 1000, kStart + 350ms, 10) == 2);  // 250 ms more: two tokens
  // A long idle time refills to the burst, no more.
  CHECK(passed(limiter, 1000, kStart + 1h, 100) == 5);
}

TEST_CASE("a steady caller at the rate is never refused; above it, it gets the rate") {
  RateLimiter limiter(100, 1);  // exactly one request per 10 ms
  auto now = kStart;
  int granted = 0;
  for (int i = 0; i < 1000; ++i, now += 10ms) granted += limiter.try_acquire(7, now) ? 1 : 0;
  CHECK(granted == 1000);
  // Twice the rate for 10 s: about half pass (the rate's 1000 plus nothing saved up).
  granted = 0;
  for (int i = 0; i < 2000; ++i, now += 5ms) granted += limiter.try_acquire(7, now) ? 1 : 0;
  CHECK(granted == 1000);
}

TEST_CASE("fairness: a noisy uid cannot drain a quiet uid's bucket") {
  RateLimiter limiter(10, 20);
  const uid_t noisy = 10001;
  const uid_t quiet = 10002;
  auto now = kStart;
  // The noisy caller hammers for 10 simulated seconds, 1000 requests a second; halfway through
  // the quiet caller asks for its whole burst at once.
  int noisy_granted = 0;
  int quiet_granted = 0;
  for (int i = 0; i < 10000; ++i, now += 1ms) {
    noisy_granted += limiter.try_acquire(noisy, now) ? 1 : 0;
    if (i == 5000) quiet_granted = passed(limiter, quiet, now, 20);
  }
  CHECK(quiet_granted == 20);
  // The noisy caller got its burst plus the rate (one token per 100 ms), nothing more.
  CHECK(noisy_granted == 20 + 99);
  // Afterwards the quiet caller refills on its own schedule; the noisy one is still empty.
  CHECK(passed(limiter, quiet, now, 100) == 20);
  CHECK(passed(limiter, noisy, now, 100) <= 1);
  CHECK(limiter.tracked_callers() == 2);
}

TEST_CASE("a clock reading from the past mints no tokens") {
  RateLimiter limiter(1, 2);
  REQUIRE(passed(limiter, 1, kStart + 10s, 2) == 2);
  CHECK_FALSE(limiter.try_acquire(1, kStart));
  CHECK_FALSE(limiter.try_acquire(1, kStart + 10s));
  CHECK(limiter.try_acquire(1, kStart + 11s));
}

TEST_CASE("bounded memory: full buckets make room; busy ones never lose their debt") {
  RateLimiter limiter(1, 2, /*max_callers=*/3);
  // Three callers drain their buckets.
  for (uid_t uid = 1; uid <= 3; ++uid) REQUIRE(passed(limiter, uid, kStart, 2) == 2);
  CHECK(limiter.tracked_callers() == 3);
  // A fourth is refused while all three are still refilling (fail closed)...
  CHECK_FALSE(limiter.try_acquire(4, kStart + 500ms));
  CHECK(limiter.tracked_callers() == 3);
  // ...and a drained caller cannot shed its debt by pushing itself out.
  CHECK_FALSE(limiter.try_acquire(1, kStart + 500ms));
  // Once buckets have refilled (2 s) they are dropped and the newcomer fits.
  CHECK(limiter.try_acquire(4, kStart + 3s));
  CHECK(limiter.tracked_callers() <= 3);
  // Dropping a full bucket changed nothing: caller 1 still gets exactly its burst.
  CHECK(passed(limiter, 1, kStart + 3s, 10) == 2);
  CHECK(limiter.tracked_callers() <= 3);
}

TEST_CASE("many distinct uids never grow the table beyond its cap") {
  RateLimiter limiter(1000, 1, /*max_callers=*/64);
  auto now = kStart;
  for (uid_t uid = 0; uid < 10000; ++uid, now += 1ms) {
    (void)limiter.try_acquire(uid, now);
    REQUIRE(limiter.tracked_callers() <= 64);
  }
}

TEST_CASE("a request for n signatures takes n tokens, all of them or none") {
  RateLimiter limiter(10, 5);  // one token per 100 ms
  CHECK(limiter.try_acquire(1000, kStart, 3));
  // Two tokens left: a batch of three is refused whole and takes nothing.
  CHECK_FALSE(limiter.try_acquire(1000, kStart, 3));
  CHECK(limiter.try_acquire(1000, kStart, 2));
  CHECK_FALSE(limiter.try_acquire(1000, kStart));
  // 300 ms later three tokens came back: exactly a batch of three.
  CHECK_FALSE(limiter.try_acquire(1000, kStart + 299ms, 3));
  CHECK(limiter.try_acquire(1000, kStart + 300ms, 3));
  CHECK_FALSE(limiter.try_acquire(1000, kStart + 300ms));
}

TEST_CASE("a request for more signatures than the burst never passes, and takes nothing") {
  RateLimiter limiter(5, 5);
  CHECK_FALSE(limiter.try_acquire(1000, kStart, 256));
  CHECK_FALSE(limiter.try_acquire(1000, kStart + 1h, 6));
  CHECK(passed(limiter, 1000, kStart + 1h, 10) == 5);
  CHECK(limiter.try_acquire(1000, kStart + 2h, 0));  // 0 counts as one
  CHECK(passed(limiter, 1000, kStart + 2h, 10) == 4);
}

TEST_CASE("invalid settings are refused with the flag's name") {
  CHECK_THROWS_WITH(RateLimiter(-1, 0), Catch::Contains("--rate-limit"));
  CHECK_THROWS_WITH(RateLimiter(std::numeric_limits<double>::infinity(), 0),
                    Catch::Contains("--rate-limit"));
  CHECK_THROWS_WITH(RateLimiter(std::numeric_limits<double>::quiet_NaN(), 0),
                    Catch::Contains("--rate-limit"));
  CHECK_THROWS_WITH(RateLimiter(10, -2), Catch::Contains("--rate-burst"));
  CHECK_THROWS_WITH(RateLimiter(10, 0.5), Catch::Contains("--rate-burst must be at least 1"));
  CHECK_THROWS_AS(RateLimiter(10, 2, 0), std::invalid_argument);
}

}  // namespace
}  // namespace hsm::agent
