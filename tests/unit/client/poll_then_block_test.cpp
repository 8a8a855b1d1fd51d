// The client's read primitive (receive(): poll with non-blocking recv() for a budget, then
// block) and its adaptive budget (SpinBudget), on a real socket pair. No timing assertions: what
// is checked is which path the bytes took (the probe's counters), not how fast.
#include "poll_then_block.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <catch2/catch.hpp>
#include <chrono>
#include <string>
#include <string_view>
#include <thread>

#include "hsm/common/file_descriptor.hpp"

namespace {

using hsm::client::Clock;
using hsm::client::receive;
using hsm::client::Received;
using hsm::client::ReceiveProbe;
using hsm::client::SpinBudget;
using namespace std::chrono_literals;

struct SocketPair {
  hsm::common::FileDescriptor reader;
  hsm::common::FileDescriptor writer;
  SocketPair() {
    std::array<int, 2> fds{};
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds.data()) == 0);
    reader = hsm::common::FileDescriptor(fds[0]);
    writer = hsm::common::FileDescriptor(fds[1]);
  }
  void write(std::string_view bytes) const {
    REQUIRE(::send(writer.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL) ==
            static_cast<ssize_t>(bytes.size()));
  }
};

std::string text(const std::array<char, 64>& buffer, const Received& got) {
  return {buffer.data(), got.size};
}

}  // namespace

TEST_CASE("receive() returns bytes that arrive while it polls, without blocking",
          "[client][poll_then_block]") {
  SocketPair sockets;
  std::array<char, 64> buffer{};
  ReceiveProbe probe;
  // The writer waits until the reader is polling; the budget is far longer than that can take.
  std::thread writer([&] {
    std::this_thread::sleep_for(20ms);
    sockets.write("answer");
  });
  const Received got = receive(sockets.reader.get(), buffer, 60s, Clock::now() + 60s, &probe);
  writer.join();
  REQUIRE(got.kind == Received::Kind::kData);
  CHECK(text(buffer, got) == "answer");
  CHECK(probe.polls > 1);    // it asked again and again ...
  CHECK(probe.blocks == 0);  // ... and never went to sleep
}

TEST_CASE("receive() blocks once its polling budget is spent, and returns what comes then",
          "[client][poll_then_block]") {
  SocketPair sockets;
  std::array<char, 64> buffer{};
  ReceiveProbe probe;
  std::uint64_t polls_before_blocking = 0;
  probe.before_block = [&] {
    polls_before_blocking = probe.polls;
    sockets.write("late");  // arrives only once the thread has given up polling
  };
  SECTION("blocking in poll() until a deadline") {
    const Received got = receive(sockets.reader.get(), buffer, 200us, Clock::now() + 60s, &probe);
    REQUIRE(got.kind == Received::Kind::kData);
    CHECK(text(buffer, got) == "late");
  }
  SECTION("blocking in recv() without one") {
    const Received got =
        receive(sockets.reader.get(), buffer, 200us, Clock::time_point::max(), &probe);
    REQUIRE(got.kind == Received::Kind::kData);
    CHECK(text(buffer, got) == "late");
  }
  CHECK(polls_before_blocking >= 1);
  CHECK(probe.polls == polls_before_blocking);  // no polling after the budget
  CHECK(probe.blocks == 1);
}

TEST_CASE("receive() with a zero budget never polls", "[client][poll_then_block]") {
  SocketPair sockets;
  std::array<char, 64> buffer{};
  ReceiveProbe probe;
  sockets.write("ready");
  const Received got = receive(sockets.reader.get(), buffer, 0ns, Clock::now() + 60s, &probe);
  REQUIRE(got.kind == Received::Kind::kData);
  CHECK(text(buffer, got) == "ready");
  CHECK(probe.polls == 0);
  CHECK(probe.blocks == 1);
}

TEST_CASE("receive() reports nothing at its deadline, the end of the stream, and failures",
          "[client][poll_then_block]") {
  SocketPair sockets;
  std::array<char, 64> buffer{};
  SECTION("nothing until the deadline") {
    ReceiveProbe probe;
    const Received got = receive(sockets.reader.get(), buffer, 100us, Clock::now() + 20ms, &probe);
    CHECK(got.kind == Received::Kind::kNothing);
    CHECK(probe.blocks == 1);
  }
  SECTION("the peer closes while it polls") {
    sockets.writer = hsm::common::FileDescriptor{};
    CHECK(receive(sockets.reader.get(), buffer, 60s, Clock::now() + 60s).kind ==
          Received::Kind::kEnd);
  }
  SECTION("the peer closes while it blocks") {
    ReceiveProbe probe;
    probe.before_block = [&] { sockets.writer = hsm::common::FileDescriptor{}; };
    CHECK(receive(sockets.reader.get(), buffer, 0ns, Clock::now() + 60s, &probe).kind ==
          Received::Kind::kEnd);
  }
  SECTION("bytes still buffered come out before the end") {
    sockets.write("last words");
    sockets.writer = hsm::common::FileDescriptor{};
    const Received got = receive(sockets.reader.get(), buffer, 0ns, Clock::now() + 60s);
    REQUIRE(got.kind == Received::Kind::kData);
    CHECK(text(buffer, got) == "last words");
    CHECK(receive(sockets.reader.get(), buffer, 0ns, Clock::now() + 60s).kind ==
          Received::Kind::kEnd);
  }
  SECTION("a descriptor that is not a socket") {
    const Received got = receive(-1, buffer, 100us, Clock::now() + 60s);
    CHECK(got.kind == Received::Kind::kFailed);
    CHECK(got.error == EBADF);
  }
}

TEST_CASE("the polling budget follows what answers take, never above its cap",
          "[client][poll_then_block]") {
  SECTION("a zero cap never polls") {
    SpinBudget budget(0us);
    CHECK(budget.lease().spin() == 0ns);
    budget.record(1us);
    CHECK(budget.lease().spin() == 0ns);
  }
  SECTION("fast answers keep the cap; a slow token switches polling off, and back on") {
    SpinBudget budget(100us);
    CHECK(budget.lease().spin() == 100us);  // no sample yet: the first calls find out
    for (int i = 0; i < 20; ++i) budget.record(20us);
    CHECK(budget.lease().spin() == 100us);
    budget.record(2ms);  // one slow answer does not switch it off ...
    CHECK(budget.lease().spin() == 100us);
    for (int i = 0; i < 20; ++i) budget.record(2ms);  // ... a slow token does
    CHECK(budget.share_within_cap() < 0.5);
    CHECK(budget.lease().spin() == 0ns);
    for (int i = 0; i < 60; ++i) budget.record(20us);  // samples go on while it is off
    CHECK(budget.lease().spin() == 100us);
  }
  SECTION("no more callers poll at once than allowed; a lease given back frees its place") {
    SpinBudget budget(100us, 2);
    {
      const SpinBudget::Lease first = budget.lease();
      const SpinBudget::Lease second = budget.lease();
      const SpinBudget::Lease third = budget.lease();
      CHECK(first.spin() == 100us);
      CHECK(second.spin() == 100us);
      CHECK(third.spin() == 0ns);  // waits for its answer without polling
    }
    const SpinBudget::Lease again = budget.lease();
    CHECK(again.spin() == 100us);
  }
  SECTION("a caller preempted while it polled stops everyone's polling for a pause") {
    SpinBudget paused(100us, 2, 1h);
    CHECK(paused.lease().spin() == 100us);
    paused.preempted();
    CHECK(paused.lease().spin() == 0ns);
    SpinBudget resumed(100us, 2, 0ns);
    resumed.preempted();
    CHECK(resumed.lease().spin() == 100us);  // a pause of 0 is over at once
  }
}
