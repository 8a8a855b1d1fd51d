// BusyPollLoop (server/busy_poll.hpp): data that arrives while the loop polls is read without a
// block; after its budget of idle time the loop blocks; a budget of 0, or a veto from may_poll,
// never polls. A real libuv loop reads a real socket the test writes to from another thread.
#include "server/busy_poll.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <functional>
#include <thread>

#include "server/uv_handle.hpp"

namespace {

using namespace std::chrono_literals;
using hsm::agent::BusyPollLoop;

// A stand-in for the thread's preemption count, which the tests move themselves.
std::atomic<std::uint64_t> fake_preemptions{0};
std::uint64_t read_fake_preemptions() {
  return fake_preemptions.load();
}

// A loop reading one end of a socket pair; each read is progress and stops the run.
struct Reader {
  uv_loop_t loop{};
  int peer = -1;
  hsm::agent::uv::Handle<uv_pipe_t> pipe;
  std::uint64_t reads = 0;
  bool stop = false;

  Reader() {
    REQUIRE(uv_loop_init(&loop) == 0);
    int fds[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
    peer = fds[1];
    pipe = hsm::agent::uv::Handle<uv_pipe_t>(&loop, hsm::agent::uv::init_pipe, "uv_pipe_init");
    REQUIRE(uv_pipe_open(pipe.get(), fds[0]) == 0);
    pipe.get()->data = this;
    REQUIRE(uv_read_start(
                pipe.stream(),
                [](uv_handle_t*, std::size_t, uv_buf_t* buf) {
                  static char storage[256];
                  *buf = uv_buf_init(storage, sizeof(storage));
                },
                [](uv_stream_t* stream, ssize_t nread, const uv_buf_t*) {
                  auto& self = *static_cast<Reader*>(stream->data);
                  if (nread > 0) {
                    ++self.reads;
                    self.stop = true;
                    uv_stop(stream->loop);
                  }
                }) == 0);
  }
  ~Reader() {
    ::close(peer);
    pipe.close();
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);
  }

  // Runs until the first read, with `writer` writing a byte after `delay` (and running
  // `before_write` just before).
  void run_until_read(BusyPollLoop& runner, std::chrono::milliseconds delay, bool may_poll = true,
                      const std::function<void()>& before_write = {}) {
    bool written = false;  // Catch2's assertions are for the test's thread only
    std::thread writer([&] {
      std::this_thread::sleep_for(delay);
      if (before_write) before_write();
      written = ::write(peer, "x", 1) == 1;
    });
    stop = false;
    const std::uint64_t reads_before = reads;
    const int alive =
        runner.run([&] { return stop; }, [&] { return reads; }, [&] { return may_poll; });
    writer.join();
    REQUIRE(written);
    CHECK(alive != 0);
    CHECK(reads == reads_before + 1);
  }
};

}  // namespace

TEST_CASE("busy poll: data that arrives during the poll is read without blocking", "[busy_poll]") {
  Reader reader;
  // A budget far longer than the writer's delay: the whole wait is one poll window.
  BusyPollLoop runner(reader.loop, 10s);
  reader.run_until_read(runner, 20ms);
  CHECK(runner.blocks() == 0);
  CHECK(runner.polls() > 0);
  CHECK(runner.idle_polling() > 0ns);
}

TEST_CASE("busy poll: after its budget of idle time the loop blocks", "[busy_poll]") {
  Reader reader;
  BusyPollLoop runner(reader.loop, 1ms);
  reader.run_until_read(runner, 200ms);
  CHECK(runner.polls() > 0);    // the window opened at the start
  CHECK(runner.blocks() >= 1);  // then it slept until the byte came
  // Polling ended long before the byte came (1 ms budget, 200 ms wait).
  CHECK(runner.idle_polling() < 100ms);
}

TEST_CASE("busy poll: a budget of 0 or a veto from may_poll never polls", "[busy_poll]") {
  Reader reader;
  SECTION("budget 0: uv_run(UV_RUN_DEFAULT) itself") {
    BusyPollLoop runner(reader.loop, 0us);
    reader.run_until_read(runner, 20ms);
    CHECK(runner.polls() == 0);
    CHECK(runner.idle_polling() == 0ns);
  }
  SECTION("may_poll false: every iteration blocks") {
    BusyPollLoop runner(reader.loop, 10s);
    reader.run_until_read(runner, 20ms, false);
    CHECK(runner.polls() == 0);
    CHECK(runner.blocks() >= 1);
  }
}

TEST_CASE("busy poll: the loop's end returns 0 without polling on", "[busy_poll]") {
  uv_loop_t loop{};
  REQUIRE(uv_loop_init(&loop) == 0);
  BusyPollLoop runner(loop, 10s);
  CHECK(runner.run([] { return false; }, [] { return 0; }, [] { return true; }) == 0);
  CHECK(uv_loop_close(&loop) == 0);
}

TEST_CASE("busy poll: a thread preempted between two answers stops polling for a pause",
          "[busy_poll]") {
  Reader reader;
  BusyPollLoop runner(reader.loop, 10s, &read_fake_preemptions, 1h);
  SECTION("not preempted: the next wait polls again") {
    reader.run_until_read(runner, 20ms);
    CHECK(runner.pauses() == 0);
    const auto polls = runner.polls();
    reader.run_until_read(runner, 20ms);
    CHECK(runner.polls() > polls);
    CHECK(runner.blocks() == 0);
  }
  SECTION("preempted: the next wait blocks at once") {
    // The kernel took the core while the first request was on its way.
    reader.run_until_read(runner, 20ms, true, [] { ++fake_preemptions; });
    CHECK(runner.pauses() == 1);
    const auto polls = runner.polls();
    reader.run_until_read(runner, 20ms);
    CHECK(runner.polls() == polls);  // paused ...
    CHECK(runner.blocks() >= 1);     // ... so it slept until the byte came
  }
}
