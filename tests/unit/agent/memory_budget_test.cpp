// MemoryBudget: the read rule (light connections always read; beyond that the limit and each
// uid's fair share), RAII charges from any thread, and the wake-up after a reader waited.
#include "server/memory_budget.hpp"

#include <atomic>
#include <catch2/catch.hpp>
#include <thread>
#include <vector>

namespace hsm::agent {
namespace {

constexpr std::size_t kLight = MemoryBudget::kLightConnectionBytes;
constexpr std::size_t kChunk = 8 * 1024;
constexpr std::size_t kMiB = 1024 * 1024;

TEST_CASE("memory budget: charges add up per connection, per uid and in all, and end with RAII",
          "[memory_budget]") {
  MemoryBudget budget(10 * kMiB, {});
  auto app = budget.account(1001);
  CHECK(budget.account(1001) == app);  // one account per uid
  auto first = MemoryBudget::meter(app);
  auto second = MemoryBudget::meter(app);
  {
    MemoryBudget::Charge a(first, 100);
    MemoryBudget::Charge b(second, 50);
    CHECK(first->bytes() == 100);
    CHECK(app->bytes() == 150);
    CHECK(budget.used() == 150);
    CHECK(budget.active_uids() == 1);
    a.resize(1000);
    CHECK(budget.used() == 1050);
    MemoryBudget::Charge moved = std::move(a);
    CHECK(budget.used() == 1050);  // a move transfers, never charges twice
    moved.resize(10);
    CHECK(first->bytes() == 10);
  }
  CHECK(budget.used() == 0);
  CHECK(app->bytes() == 0);
  CHECK(budget.active_uids() == 0);
  CHECK(budget.take_peak() == 1050);
  CHECK(budget.take_peak() == 0);  // restarted from what is held now
}

TEST_CASE("memory budget: a light connection always reads, whatever others hold",
          "[memory_budget]") {
  MemoryBudget budget(4 * kMiB, {});
  auto hog = MemoryBudget::meter(budget.account(2000));
  MemoryBudget::Charge everything(hog, 4 * kMiB);  // one uid holds the whole budget
  auto app = MemoryBudget::meter(budget.account(1001));
  CHECK(budget.read_room(*app, kChunk) == kChunk);
  MemoryBudget::Charge request(app, kLight - 100);
  CHECK(budget.read_room(*app, kChunk) == 100);  // up to the light size, no more
  request.resize(kLight);
  CHECK(budget.read_room(*app, kChunk) == 0);
  // The hog's own connection is heavy and the budget is full: it waits.
  CHECK(budget.read_room(*hog, kChunk) == 0);
}

TEST_CASE("memory budget: a lone uid may use the whole budget; a second one gets its share",
          "[memory_budget]") {
  MemoryBudget budget(8 * kMiB, {});
  auto big = MemoryBudget::meter(budget.account(1001));
  MemoryBudget::Charge held(big, 5 * kMiB);
  CHECK(budget.read_room(*big, kChunk) == kChunk);  // alone: 8 MiB is its share
  held.resize(8 * kMiB - 100);
  CHECK(budget.read_room(*big, kChunk) == 100);  // never past the limit
  held.resize(6 * kMiB);
  // A second uid arrives: two share the budget, 4 MiB each. The first is over its share and
  // stops growing; the second may take what is left.
  auto other = MemoryBudget::meter(budget.account(1002));
  MemoryBudget::Charge light(other, kLight);  // past the light size: it asks the budget
  CHECK(budget.read_room(*other, kChunk) == kChunk);
  CHECK(budget.read_room(*big, kChunk) == 0);
  light.resize(2 * kMiB - 10);
  CHECK(budget.read_room(*other, kChunk) == 10);  // the limit, not its share, stops it here
  held.resize(3 * kMiB);
  CHECK(budget.read_room(*big, kChunk) == kChunk);  // back under its share
}

TEST_CASE("memory budget: a reader that found no room is woken by the next release, once",
          "[memory_budget]") {
  std::atomic<int> woken{0};
  MemoryBudget budget(1 * kMiB, [&] { ++woken; });
  auto meter = MemoryBudget::meter(budget.account(1001));
  MemoryBudget::Charge held(meter, 1 * kMiB);
  held.resize(kMiB - 1);
  CHECK(woken == 0);  // nobody waited
  budget.wait_for_room();
  // Released on another thread (a worker freeing a call).
  std::thread([&] { held.resize(kMiB / 2); }).join();
  CHECK(woken == 1);
  held.resize(0);
  CHECK(woken == 1);
}

TEST_CASE("memory budget: concurrent charges from many threads balance to zero",
          "[memory_budget][concurrency]") {
  MemoryBudget budget(64 * kMiB, {});
  std::vector<std::shared_ptr<MemoryBudget::Meter>> meters;
  for (uid_t uid = 0; uid < 4; ++uid) meters.push_back(MemoryBudget::meter(budget.account(uid)));
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (std::size_t i = 0; i < 20'000; ++i) {
        MemoryBudget::Charge charge(meters[(t + i) % 4], 1 + (i % 300));
        charge.resize(i % 7);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(budget.used() == 0);
  CHECK(budget.active_uids() == 0);
  for (const auto& meter : meters) CHECK(meter->bytes() == 0);
}

TEST_CASE("memory budget: many distinct uids do not grow the account table for ever",
          "[memory_budget]") {
  MemoryBudget budget(kMiB, {});
  for (uid_t uid = 0; uid < 100'000; ++uid) (void)budget.account(uid);  // each dropped at once
  auto kept = budget.account(7);
  CHECK(kept == budget.account(7));
  CHECK(budget.tracked_uids() <= 1024);
}

}  // namespace
}  // namespace hsm::agent
