// ConnectionOutput on a real socket pair: workers write answers straight to the socket, the loop
// writes what is queued through libuv, and whatever the interleaving, every answer reaches the
// peer whole and in the order it was written, nothing is buffered past the limit, and nothing is
// written after close().
#include "server/connection_output.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace hsm::agent {
namespace {

// A socket pair: `ours` is the agent's end (non-blocking, in a uv_pipe_t on `loop`), `peer` the
// client's (blocking).
class SocketPair {
 public:
  explicit SocketPair(int send_buffer_bytes = 0) {
    int fds[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
    ours = fds[0];
    peer = fds[1];
    if (send_buffer_bytes > 0) {
      REQUIRE(::setsockopt(ours, SOL_SOCKET, SO_SNDBUF, &send_buffer_bytes,
                           sizeof(send_buffer_bytes)) == 0);
    }
    REQUIRE(uv_loop_init(&loop) == 0);
    REQUIRE(uv_pipe_init(&loop, &pipe, 0) == 0);
    REQUIRE(uv_pipe_open(&pipe, ours) == 0);  // sets O_NONBLOCK
  }
  ~SocketPair() {
    uv_close(reinterpret_cast<uv_handle_t*>(&pipe), nullptr);  // closes `ours`
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    ::close(peer);
  }
  SocketPair(const SocketPair&) = delete;
  SocketPair& operator=(const SocketPair&) = delete;

  uv_stream_t* stream() { return reinterpret_cast<uv_stream_t*>(&pipe); }

  // Bytes the peer can read now, without waiting.
  std::string read_available() {
    std::string bytes;
    char buffer[65536];
    for (;;) {
      const ssize_t n = ::recv(peer, buffer, sizeof(buffer), MSG_DONTWAIT);
      if (n <= 0) break;
      bytes.append(buffer, static_cast<std::size_t>(n));
    }
    return bytes;
  }

  // Fills our end's send buffer (the peer reads nothing); returns the bytes written.
  std::size_t fill_send_buffer() {
    std::size_t total = 0;
    const std::string chunk(4096, 'x');
    for (;;) {
      const ssize_t n = ::send(ours, chunk.data(), chunk.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n <= 0) break;
      total += static_cast<std::size_t>(n);
    }
    return total;
  }

  uv_loop_t loop{};
  uv_pipe_t pipe{};
  int ours = -1;
  int peer = -1;
};

// The loop side of one flush, as Connection does it: flush, and flush again from the write
// callback while bytes were queued meanwhile, until nothing is left.
struct LoopFlusher {
  ConnectionOutput& output;
  SocketPair& sockets;
  bool failed = false;

  void flush() {
    switch (output.flush(sockets.stream(), this, on_write)) {
      case ConnectionOutput::FlushResult::kFailed:
        failed = true;
        break;
      case ConnectionOutput::FlushResult::kWriting:
      case ConnectionOutput::FlushResult::kDone:
        break;
    }
  }
  static void on_write(uv_write_t* request, int status) {
    auto* self = static_cast<LoopFlusher*>(request->data);
    if (status != 0) self->failed = true;
    if (self->output.finish_write(request)) self->flush();
  }
};

// A fixed-size frame naming its source and sequence number, so a reader can tell a whole frame
// from a torn or interleaved one.
constexpr std::size_t kFrameBytes = 96;
std::string frame(int source, int seq) {
  std::string bytes = std::to_string(source) + " " + std::to_string(seq) + " ";
  bytes.resize(kFrameBytes, '.');
  return bytes;
}

int handle_of(SocketPair& sockets) {
  uv_os_fd_t fd = -1;
  REQUIRE(uv_fileno(reinterpret_cast<uv_handle_t*>(&sockets.pipe), &fd) == 0);
  return fd;
}

// A ConnectionOutput attached to the agent's end of a fresh socket pair.
struct AttachedOutput {
  explicit AttachedOutput(std::size_t max_buffered_bytes, int send_buffer_bytes = 0)
      : sockets(send_buffer_bytes), output(max_buffered_bytes) {
    output.attach(handle_of(sockets));
  }
  SocketPair sockets;
  ConnectionOutput output;
};

}  // namespace

TEST_CASE("a worker's answer goes straight to the socket when nothing is queued",
          "[connection_output]") {
  AttachedOutput attached(1 << 20);
  auto& [sockets, output] = attached;
  REQUIRE_FALSE(output.begin_request(16));

  const auto after = output.answer_from_worker("answer-1");
  CHECK_FALSE(after.loop_needed());  // the loop has nothing to do
  CHECK(sockets.read_available() == "answer-1");
  CHECK(output.in_flight() == 0);
  CHECK(output.idle());
}

TEST_CASE("a worker's answer waits behind bytes the loop queued, in order", "[connection_output]") {
  AttachedOutput attached(1 << 20);
  auto& [sockets, output] = attached;
  (void)output.begin_request(16);

  REQUIRE(output.queue("first|"));
  const auto after = output.answer_from_worker("second|");
  // The loop flushes its queue anyway (it scheduled it), so it need not be told.
  CHECK_FALSE(after.loop_needed());
  CHECK(sockets.read_available().empty());  // nothing jumped the queue

  LoopFlusher flusher{output, sockets};
  flusher.flush();
  uv_run(&sockets.loop, UV_RUN_NOWAIT);
  CHECK_FALSE(flusher.failed);
  CHECK(sockets.read_available() == "first|second|");
  CHECK(output.idle());
}

TEST_CASE("an answer the socket takes only in part is finished by the loop, intact",
          "[connection_output]") {
  AttachedOutput attached(8 << 20, 16 * 1024);
  auto& [sockets, output] = attached;
  (void)output.begin_request(16);

  std::string answer(1 << 20, '\0');  // much larger than the socket buffer
  for (std::size_t i = 0; i < answer.size(); ++i) answer[i] = static_cast<char>('a' + i % 26);
  const auto after = output.answer_from_worker(answer);
  REQUIRE(after.flush);  // the rest is queued and nothing writes it: the loop must
  CHECK_FALSE(after.failed);
  CHECK_FALSE(output.idle());

  // The peer reads while the loop writes the rest.
  std::string received;
  std::thread reader([&] {
    char buffer[65536];
    while (received.size() < answer.size()) {
      const ssize_t n = ::recv(sockets.peer, buffer, sizeof(buffer), 0);
      if (n <= 0) break;
      received.append(buffer, static_cast<std::size_t>(n));
    }
  });
  LoopFlusher flusher{output, sockets};
  flusher.flush();
  uv_run(&sockets.loop, UV_RUN_DEFAULT);  // returns once the uv_write completed
  reader.join();
  CHECK_FALSE(flusher.failed);
  CHECK(received == answer);
  CHECK(output.idle());
}

TEST_CASE("answers to a client that does not read stop at the buffer limit",
          "[connection_output]") {
  SocketPair sockets(16 * 1024);
  constexpr std::size_t kLimit = 64 * 1024;
  ConnectionOutput output(kLimit);
  output.attach(handle_of(sockets));
  sockets.fill_send_buffer();

  const std::string answer(1000, 'a');
  std::size_t accepted = 0;
  bool slow_reader = false;
  for (int i = 0; i < 200 && !slow_reader; ++i) {
    (void)output.begin_request(1000);
    const auto after = output.answer_from_worker(answer);
    slow_reader = after.slow_reader;
    if (!slow_reader) ++accepted;
  }
  CHECK(slow_reader);
  CHECK(accepted == kLimit / answer.size());  // exactly up to the limit, not one answer more
  CHECK_FALSE(output.queue(answer));          // the loop's own answers are refused too
}

TEST_CASE("after close() answers are dropped and the descriptor is not written",
          "[connection_output]") {
  AttachedOutput attached(1 << 20);
  auto& [sockets, output] = attached;
  (void)output.begin_request(16);
  output.close();

  const auto after = output.answer_from_worker("late answer");
  CHECK_FALSE(after.loop_needed());
  CHECK(sockets.read_available().empty());
  CHECK(output.in_flight() == 0);  // still counted out
}

TEST_CASE("reading paused at the in-flight limit resumes once, on the answer below it",
          "[connection_output]") {
  AttachedOutput attached(1 << 20);
  auto& [sockets, output] = attached;

  CHECK_FALSE(output.begin_request(2));
  CHECK(output.begin_request(2));  // at the limit: the loop pauses reading
  CHECK(output.in_flight() == 2);

  CHECK(output.answer_from_worker("a").resume);  // below the limit again
  CHECK_FALSE(output.answer_from_worker("b").resume);
  CHECK(output.in_flight() == 0);

  // The same through the loop's own answers (deadline, shutdown).
  (void)output.begin_request(1);
  CHECK(output.end_request_on_loop());
  CHECK_FALSE(output.end_request_on_loop());  // never below zero, never resumed twice
  CHECK(output.in_flight() == 0);
}

TEST_CASE("workers and the loop writing at once never interleave bytes",
          "[connection_output][concurrency]") {
  // Small socket buffer: workers often find it full and leave the rest to the loop, so the
  // direct path, the queued path and partial writes all interleave.
  AttachedOutput attached(64 << 20, 8 * 1024);
  auto& [sockets, output] = attached;

  constexpr int kWorkers = 4;
  constexpr int kAnswersPerWorker = 2000;
  constexpr int kLoopAnswers = 500;
  constexpr int kLoopSource = kWorkers;
  const std::size_t total =
      kFrameBytes * static_cast<std::size_t>(kWorkers * kAnswersPerWorker + kLoopAnswers);
  for (int i = 0; i < kWorkers * kAnswersPerWorker; ++i) (void)output.begin_request(1 << 30);

  // A reader slower than the writers, so the socket buffer is often full.
  std::string received;
  std::thread reader([&] {
    char buffer[1000];
    for (int reads = 1; received.size() < total; ++reads) {
      const ssize_t n = ::recv(sockets.peer, buffer, sizeof(buffer), 0);
      if (n <= 0) break;
      received.append(buffer, static_cast<std::size_t>(n));
      if (reads % 8 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });

  // The loop thread: flushes when a worker asks (an async handle, as the server does), and
  // meanwhile queues and flushes answers of its own. `stop` is sent once every worker is done.
  struct LoopState {
    ConnectionOutput& output;
    LoopFlusher flusher;
    int loop_answers = 0;
    uv_async_t wake{};
    uv_async_t stop{};
    uv_idle_t own_answers{};
  } state{output, LoopFlusher{output, sockets}};
  state.wake.data = state.stop.data = state.own_answers.data = &state;
  REQUIRE(uv_async_init(&sockets.loop, &state.wake, [](uv_async_t* handle) {
            static_cast<LoopState*>(handle->data)->flusher.flush();
          }) == 0);
  REQUIRE(uv_async_init(&sockets.loop, &state.stop, [](uv_async_t* handle) {
            auto* loop_state = static_cast<LoopState*>(handle->data);
            loop_state->flusher.flush();
            uv_close(reinterpret_cast<uv_handle_t*>(&loop_state->wake), nullptr);
            uv_close(reinterpret_cast<uv_handle_t*>(handle), nullptr);
          }) == 0);
  REQUIRE(uv_idle_init(&sockets.loop, &state.own_answers) == 0);
  REQUIRE(uv_idle_start(&state.own_answers, [](uv_idle_t* handle) {
            auto* loop_state = static_cast<LoopState*>(handle->data);
            if (loop_state->loop_answers == kLoopAnswers) {
              uv_close(reinterpret_cast<uv_handle_t*>(handle), nullptr);
              return;
            }
            if (!loop_state->output.queue(frame(kLoopSource, loop_state->loop_answers++))) {
              loop_state->flusher.failed = true;
            }
            loop_state->flusher.flush();
          }) == 0);
  std::thread loop_thread([&] { uv_run(&sockets.loop, UV_RUN_DEFAULT); });

  std::atomic<bool> worker_failed{false};
  std::vector<std::thread> workers;
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&, w] {
      for (int seq = 0; seq < kAnswersPerWorker; ++seq) {
        const auto after = output.answer_from_worker(frame(w, seq));
        if (after.failed || after.slow_reader) worker_failed = true;
        if (after.flush) uv_async_send(&state.wake);
      }
    });
  }
  for (auto& worker : workers) worker.join();
  uv_async_send(&state.stop);  // no worker sends after this
  loop_thread.join();          // returns once every handle closed and every write completed
  reader.join();

  CHECK_FALSE(worker_failed.load());
  CHECK_FALSE(state.flusher.failed);
  CHECK(output.idle());
  CHECK(output.in_flight() == 0);
  REQUIRE(received.size() == total);
  // Every frame whole, and each source's frames in the order it wrote them.
  std::map<int, int> next_seq;
  for (std::size_t offset = 0; offset < received.size(); offset += kFrameBytes) {
    const std::string got = received.substr(offset, kFrameBytes);
    int source = -1;
    int seq = -1;
    REQUIRE(std::sscanf(got.c_str(), "%d %d ", &source, &seq) == 2);
    REQUIRE(got == frame(source, seq));
    REQUIRE(seq == next_seq[source]);
    next_seq[source] = seq + 1;
  }
  CHECK(next_seq[kLoopSource] == kLoopAnswers);
  for (int w = 0; w < kWorkers; ++w) CHECK(next_seq[w] == kAnswersPerWorker);
}

}  // namespace hsm::agent
