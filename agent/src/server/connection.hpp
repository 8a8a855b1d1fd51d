// Connection: one accepted client socket on the libuv loop. Owns its uv_pipe_t, its bounded
// FrameReader and its outgoing bytes; knows nothing of methods or the HSM. Messages go to the
// ConnectionEvents it was given; answers come back through send().
//
// Lifetime: created by accept(), destroyed in the uv_close callback after close(). The owner is
// told through ConnectionEvents::on_closed before the memory goes away. Its ConnectionOutput is
// shared (workers write answers through it) and outlives it while a call holds it.
// Thread-safety: loop thread only; output() is the part workers may use.
#pragma once

#include <uv.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string_view>

#include "hsm/protocol/codec.hpp"
#include "policy/caller.hpp"
#include "server/connection_output.hpp"
#include "server/memory_budget.hpp"

namespace hsm::agent {

class Connection;

class ConnectionEvents {
 public:
  /// A complete MessagePack message of `bytes` bytes arrived. Called only while the connection
  /// is not paused.
  virtual void on_message(Connection& connection, const msgpack::object& message,
                          std::size_t bytes) = 0;
  /// The stream was abandoned for a protocol violation (bytes, size or limits).
  virtual void on_frame_error(Connection& connection, const protocol::FrameError& error) = 0;
  /// The connection is closing; it must not be used after this returns.
  virtual void on_closed(Connection& connection) = 0;
  /// The connection is about to be closed because its client does not read its answers (the
  /// write buffer limit was reached). For metrics; close() follows.
  virtual void on_slow_reader(Connection& /*connection*/) {}
  /// The connection has bytes to write; the owner calls flush() once per loop iteration.
  virtual void on_output_pending(Connection& connection) = 0;
  /// The memory budget has no room for the connection's next read: it stopped reading. The
  /// owner calls read_again() once bytes were released.
  virtual void on_waiting_for_memory(Connection& connection) = 0;

 protected:
  ~ConnectionEvents() = default;
};

struct ConnectionLimits {
  protocol::Limits frame;
  std::size_t max_write_buffer_bytes = 4 * 1024 * 1024;
};

class Connection {
 public:
  /// Accepts one pending connection from `listener`. Returns nullptr when accept fails.
  static Connection* accept(uv_stream_t* listener, std::uint64_t id, ConnectionEvents& events,
                            const ConnectionLimits& limits);

  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  [[nodiscard]] std::uint64_t id() const noexcept { return id_; }
  [[nodiscard]] const Caller& caller() const noexcept { return caller_; }
  [[nodiscard]] bool closing() const noexcept { return closing_; }
  /// When the last complete message arrived (or the connection was accepted). Bytes that do not
  /// complete a message are no activity: trickling them cannot keep a connection open.
  [[nodiscard]] std::chrono::steady_clock::time_point last_activity() const noexcept {
    return last_activity_;
  }
  /// Since when the read buffer holds the start of a message that is not complete yet, while
  /// reading is not paused by the agent's own in-flight limit (its wait is not the client's
  /// fault); nullopt otherwise. The owner closes connections whose message does not complete
  /// within the read timeout.
  [[nodiscard]] std::optional<std::chrono::steady_clock::time_point> incomplete_since()
      const noexcept {
    if (paused_) return std::nullopt;
    return incomplete_since_;
  }

  /// Charges everything the connection holds (read buffer, answers) to `meter`, and asks
  /// `budget` before every read. Call before start().
  void charge_to(MemoryBudget& budget, std::shared_ptr<MemoryBudget::Meter> meter);
  [[nodiscard]] const std::shared_ptr<MemoryBudget::Meter>& meter() const noexcept {
    return meter_;
  }
  /// Reads again after on_waiting_for_memory(), unless paused or closing meanwhile.
  void read_again();
  /// Reads at most `max_bytes` in all: the connection is closed when it would read more (a
  /// refused caller's one request, answered with why, and nothing else). Call before start().
  void limit_input(std::size_t max_bytes) noexcept { input_limit_ = max_bytes; }
  /// Not reading for want of memory (the owner calls read_again() later).
  [[nodiscard]] bool waiting_for_memory() const noexcept { return waiting_for_memory_; }
  /// Whether the client closed its side, seen without reading (a connection that does not read
  /// never sees its EOF otherwise): one poll(2) that does not block.
  [[nodiscard]] bool peer_hung_up() const;

  /// Starts reading. Returns false (and closes) when libuv refuses.
  bool start();
  /// Stops delivering messages (backpressure); bytes already buffered wait.
  void pause();
  /// Delivers buffered messages, then resumes reading.
  void resume();
  [[nodiscard]] bool paused() const noexcept { return paused_; }

  /// Queues bytes of one or more encoded responses. Closes the connection when the reader is
  /// too slow (more than max_write_buffer_bytes would be queued).
  void send(std::string_view bytes);
  /// Asks the owner for a flush() in this loop iteration (once, however often it is asked).
  void schedule_flush();
  /// Writes what is queued (by send() or by a worker): uv_try_write first, the rest through one
  /// uv_write.
  void flush();
  /// The client does not read its answers: tells the owner (on_slow_reader) and closes.
  void close_slow_reader();
  /// Flushes queued answers, then shuts the write side and closes. Idempotent. A client that
  /// never reads can keep that flush from finishing: the owner bounds it with close() (see
  /// closing_after_flush_since()).
  void close_after_flush();
  /// When close_after_flush() was first asked for; nullopt while it was not, or once closed.
  [[nodiscard]] std::optional<std::chrono::steady_clock::time_point> closing_after_flush_since()
      const noexcept {
    if (closing_ || !close_when_flushed_) return std::nullopt;
    return close_requested_at_;
  }
  /// Closes now; queued answers are dropped. Idempotent.
  void close();

  /// The outgoing side and the count of requests in flight, shared with the workers.
  [[nodiscard]] const std::shared_ptr<ConnectionOutput>& output() const noexcept { return output_; }
  /// Whether the owner admitted it (counted in the connections gauge).
  bool admitted = false;
  /// When the owner refused it by policy but reads its first request to answer why (nullopt:
  /// not refused).
  std::optional<std::chrono::steady_clock::time_point> refused_since;

 private:
  Connection(std::uint64_t id, ConnectionEvents& events, const ConnectionLimits& limits);
  ~Connection() = default;

  static void on_alloc(uv_handle_t* handle, std::size_t suggested, uv_buf_t* buf);
  static void on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf);
  static void on_write(uv_write_t* req, int status);
  static void on_shutdown(uv_shutdown_t* req, int status);
  static void on_close(uv_handle_t* handle);
  void deliver_messages();
  void read_peer_credentials();
  /// The read buffer's bytes, charged to the meter; and whether a message is incomplete.
  void note_buffered();

  uv_pipe_t pipe_{};  // pipe_.data == this
  std::uint64_t id_;
  ConnectionEvents& events_;
  ConnectionLimits limits_;
  protocol::FrameReader reader_;
  Caller caller_;
  std::chrono::steady_clock::time_point last_activity_;
  std::shared_ptr<ConnectionOutput> output_;
  MemoryBudget* budget_ = nullptr;
  std::shared_ptr<MemoryBudget::Meter> meter_;
  MemoryBudget::Charge read_charge_;
  std::optional<std::chrono::steady_clock::time_point> incomplete_since_;
  bool waiting_for_memory_ = false;
  std::size_t input_limit_ = 0;  // 0: none
  std::size_t input_read_ = 0;
  bool flush_scheduled_ = false;
  bool paused_ = false;
  bool reading_ = false;
  bool closing_ = false;
  bool close_when_flushed_ = false;
  std::chrono::steady_clock::time_point close_requested_at_;
};

}  // namespace hsm::agent
