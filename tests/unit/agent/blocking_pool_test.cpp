// BlockingPool: the threads that may block in the token. Real threads, real waits; the bounds are
// counted, never timed, except the idle timeout, which is asked to be short.
#include "server/blocking_pool.hpp"

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <latch>
#include <mutex>
#include <set>
#include <thread>

#include "fixtures/polling.hpp"

namespace {

using hsm::agent::BlockingPool;
using namespace std::chrono_literals;

// Holds every task that enters it until release().
class Gate {
 public:
  void pass() {
    std::unique_lock lock(mutex_);
    ++inside_;
    changed_.notify_all();
    changed_.wait(lock, [&] { return open_; });
    --inside_;
  }
  void release() {
    std::lock_guard lock(mutex_);
    open_ = true;
    changed_.notify_all();
  }
  [[nodiscard]] int inside() {
    std::lock_guard lock(mutex_);
    return inside_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  int inside_ = 0;
  bool open_ = false;
};

}  // namespace

TEST_CASE(
    "BlockingPool starts a thread per concurrent call, up to max_calls, then queues and refuses",
    "[blocking_pool]") {
  BlockingPool pool({.max_calls = 3, .max_queue = 2, .idle_timeout = 30s});
  Gate gate;
  std::atomic<int> done{0};
  for (int i = 0; i < 5; ++i) {
    REQUIRE(pool.submit_call([&] {
      gate.pass();
      ++done;
    }));
  }
  REQUIRE(hsm::test::wait_until([&] { return gate.inside() == 3; }));
  CHECK(pool.threads() == 3);  // no more threads than call slots
  CHECK(pool.running() == 3);
  CHECK_FALSE(pool.submit_call([] {}));  // 3 running, 2 queued: the queue is full
  // A loop drive never waits for a call slot: it gets a thread of its own at once.
  std::latch drove(1);
  pool.submit_drive([&] { drove.count_down(); });
  CHECK(hsm::test::wait_until([&] { return drove.try_wait(); }));
  gate.release();
  REQUIRE(hsm::test::wait_until([&] { return done == 5; }));
  CHECK(hsm::test::wait_until([&] { return pool.running() == 0; }));
}

TEST_CASE("BlockingPool: a call slot taken outside the pool counts, and passes to a queued call",
          "[blocking_pool]") {
  BlockingPool pool({.max_calls = 1, .max_queue = 4, .idle_timeout = 30s});
  REQUIRE(pool.try_take_call_slot());
  CHECK_FALSE(pool.try_take_call_slot());
  std::atomic<bool> ran{false};
  REQUIRE(pool.submit_call([&] { ran = true; }));
  // It waits in the queue, not for a session: nothing runs while the slot is out.
  std::this_thread::sleep_for(20ms);
  CHECK_FALSE(ran);
  pool.give_back_call_slot();
  CHECK(hsm::test::wait_until([&] { return ran.load(); }));
  CHECK(hsm::test::wait_until([&] { return pool.try_take_call_slot(); }));
  pool.give_back_call_slot();
}

TEST_CASE("BlockingPool reuses the thread that went idle last, and idle threads end",
          "[blocking_pool]") {
  BlockingPool pool({.max_calls = 8, .max_queue = 8, .idle_timeout = 200ms});
  std::set<std::thread::id> ran_on;
  std::mutex mutex;
  for (int i = 0; i < 20; ++i) {
    std::latch finished(1);
    REQUIRE(pool.submit_call([&] {
      std::lock_guard lock(mutex);
      ran_on.insert(std::this_thread::get_id());
      finished.count_down();
    }));
    finished.wait();
    REQUIRE(hsm::test::wait_until([&] { return pool.running() == 0; }));
  }
  CHECK(ran_on.size() == 1);  // one warm thread for one caller at a time
  CHECK(pool.threads() == 1);
  CHECK(hsm::test::wait_until([&] { return pool.threads() == 0; }, 5s));
  // And it starts again on demand.
  std::latch again(1);
  REQUIRE(pool.submit_call([&] { again.count_down(); }));
  again.wait();
}

TEST_CASE("BlockingPool::stop drops queued calls and joins", "[blocking_pool]") {
  BlockingPool pool({.max_calls = 1, .max_queue = 4, .idle_timeout = 30s});
  Gate gate;
  std::atomic<int> ran{0};
  REQUIRE(pool.submit_call([&] {
    gate.pass();
    ++ran;
  }));
  REQUIRE(pool.submit_call([&] { ++ran; }));
  REQUIRE(hsm::test::wait_until([&] { return gate.inside() == 1; }));
  std::thread releaser([&] {
    std::this_thread::sleep_for(50ms);
    gate.release();
  });
  pool.stop();  // waits for the running call; the queued one never runs
  releaser.join();
  CHECK(ran == 1);
  CHECK_FALSE(pool.submit_call([] {}));
}
