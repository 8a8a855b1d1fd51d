// The re-initialisation backoff: immediate first attempt, doubling, capped, jittered, reset.
#include "service/backoff.hpp"

#include <catch2/catch.hpp>

using hsm::agent::Backoff;
using std::chrono::milliseconds;

TEST_CASE("backoff: immediate, then doubling within [d/2, d], capped at the maximum", "[backoff]") {
  Backoff backoff(milliseconds{100}, milliseconds{1000}, 42);
  CHECK(backoff.next() == milliseconds{0});
  const milliseconds ceilings[] = {milliseconds{100}, milliseconds{200},  milliseconds{400},
                                   milliseconds{800}, milliseconds{1000}, milliseconds{1000}};
  for (const milliseconds ceiling : ceilings) {
    const milliseconds delay = backoff.next();
    CHECK(delay >= ceiling / 2);
    CHECK(delay <= ceiling);
  }
  CHECK(backoff.attempts() == 7);
  // Far past the cap, the doubling neither overflows nor exceeds it.
  for (int i = 0; i < 200; ++i) CHECK(backoff.next() <= milliseconds{1000});
  CHECK(backoff.ceiling(10'000) == milliseconds{1000});
}

TEST_CASE("backoff: reset makes the next attempt immediate again", "[backoff]") {
  Backoff backoff(milliseconds{50}, milliseconds{400}, 7);
  (void)backoff.next();
  (void)backoff.next();
  (void)backoff.next();
  backoff.reset();
  CHECK(backoff.attempts() == 0);
  CHECK(backoff.next() == milliseconds{0});
  CHECK(backoff.ceiling(1) == milliseconds{50});
}

TEST_CASE("backoff: the jitter spreads agents apart", "[backoff]") {
  // Two agents with different seeds do not retry in lockstep.
  Backoff a(milliseconds{1000}, milliseconds{1000}, 1);
  Backoff b(milliseconds{1000}, milliseconds{1000}, 2);
  (void)a.next();
  (void)b.next();
  int different = 0;
  for (int i = 0; i < 20; ++i) different += a.next() != b.next() ? 1 : 0;
  CHECK(different > 0);
}

TEST_CASE("backoff: nonsense bounds are clamped", "[backoff]") {
  Backoff backoff(milliseconds{0}, milliseconds{0}, 3);
  (void)backoff.next();
  const milliseconds delay = backoff.next();
  CHECK(delay >= milliseconds{0});
  CHECK(delay <= milliseconds{1});
}
