// Connection: one accepted client socket on a worker's event loop. Owns its pipe, its bounded
// FrameReader and its unsent answers; knows nothing of methods or the HSM. Messages go to the
// ConnectionEvents it was given; answers come back through send(), and leave once per loop
// iteration (flush()).
//
// Lifetime: owned by its worker. close() closes the pipe; once libuv's close callback has run
// (after every other callback of the pipe, cancelled writes included), ConnectionEvents::
// on_closed() is told, and the worker destroys the connection then.
// Thread-safety: none; its worker's loop thread only.
#pragma once

#include <uv.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "hsm/protocol/codec.hpp"
#include "policy/caller.hpp"
#include "server/memory_budget.hpp"
#include "server/uv_handle.hpp"

namespace hsm::agent {

class Connection;

class ConnectionEvents {
 public:
  /// A complete MessagePack message arrived (its bytes' charge: Connection::take_message_charge).
  /// Called only while the connection is not paused.
  virtual void on_message(Connection& connection, const msgpack::object& message) = 0;
  /// The stream was abandoned for a protocol violation (bytes, size or limits).
  virtual void on_frame_error(Connection& connection, const protocol::FrameError& error) = 0;
  /// The connection is closing (its socket is closed now): counted out at once, so a client
  /// that sees its connection end finds it gone from the gauges too.
  virtual void on_closing(Connection& connection) = 0;
  /// libuv is done with the closed pipe (after every callback of it): the owner may destroy the
  /// connection now.
  virtual void on_closed(Connection& connection) = 0;
  /// The connection is about to be closed because its client does not read its answers (the
  /// write buffer limit was reached). For metrics; close() follows.
  virtual void on_slow_reader(Connection& connection) = 0;
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
  std::size_t max_in_flight = 256;  // requests read and not yet answered
};

class Connection {
 public:
  /// Takes over `fd`, an accepted Unix socket, on `loop`; throws uv::Error (and closes `fd`)
  /// when libuv refuses it.
  Connection(uv_loop_t* loop, int fd, std::uint64_t id, Caller caller, ConnectionEvents& events,
             const ConnectionLimits& limits);
  ~Connection() = default;
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
    if (paused_at_limit_) return std::nullopt;
    return incomplete_since_;
  }

  /// Charges everything the connection holds (read buffer, answers) to `meter`, and asks
  /// `budget` before every read. Call before start().
  void charge_to(MemoryBudget& budget, std::shared_ptr<MemoryBudget::Meter> meter);
  [[nodiscard]] const std::shared_ptr<MemoryBudget::Meter>& meter() const noexcept {
    return meter_;
  }
  /// During ConnectionEvents::on_message: the charge for the message's bytes, for the call made
  /// of it to hold (the bytes it decoded into stay charged until the call is gone).
  [[nodiscard]] MemoryBudget::Charge take_message_charge() noexcept {
    return std::move(message_charge_);
  }
  /// Reads at most `max_bytes` in all: the connection is closed when it would read more (a
  /// refused caller's one request, answered with why, and nothing else). Call before start().
  void limit_input(std::size_t max_bytes) noexcept { input_limit_ = max_bytes; }
  /// Starts reading. Closes the connection when libuv refuses.
  void start();
  /// Reads again after on_waiting_for_memory(), unless stopped meanwhile.
  void read_again();
  /// Not reading for want of memory (the owner calls read_again() later).
  [[nodiscard]] bool waiting_for_memory() const noexcept { return waiting_for_memory_; }
  /// Whether the client closed its side, seen without reading (a connection that does not read
  /// never sees its EOF otherwise): one poll(2) that does not block.
  [[nodiscard]] bool peer_hung_up() const;

  /// A request was read and is now in flight. At the in-flight limit, reading pauses until
  /// end_request() brings the count under it.
  void begin_request();
  /// A request in flight was answered (its answer is send()-ed by the caller).
  void end_request();
  [[nodiscard]] std::size_t in_flight() const noexcept { return in_flight_; }
  /// Stops reading for good (shutdown): answers still go out.
  void stop_reading();

  /// Queues the bytes of one or more encoded answers for the next flush(). Closes the
  /// connection when the reader is too slow (more than max_write_buffer_bytes would be queued).
  void send(std::string_view bytes);
  /// Writes what is queued: uv_try_write first, the rest through one uv_write.
  void flush();
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

  /// Whether the owner admitted it (counted in the connections gauge).
  bool admitted = false;
  /// When the owner refused it by policy but reads its first request to answer why (nullopt:
  /// not refused).
  std::optional<std::chrono::steady_clock::time_point> refused_since;

 private:
  static void on_alloc(uv_handle_t* handle, std::size_t suggested, uv_buf_t* buf);
  static void on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf);
  static void on_write(uv_write_t* req, int status);
  static void on_shutdown(uv_shutdown_t* req, int status);
  [[nodiscard]] bool wants_to_read() const noexcept {
    return !closing_ && !close_when_flushed_ && !paused_at_limit_ && !stopped_ &&
           !waiting_for_memory_;
  }
  void update_reading();
  void deliver_messages();
  /// The read buffer's bytes, charged to the meter; and whether a message is incomplete.
  void note_buffered();
  /// The unsent answers' bytes, charged to the meter; an emptied queue gives a large buffer back.
  void note_queued();

  uv::Handle<uv_pipe_t> pipe_;  // pipe_->data == this
  std::uint64_t id_;
  Caller caller_;
  ConnectionEvents& events_;
  ConnectionLimits limits_;
  protocol::FrameReader reader_;
  std::chrono::steady_clock::time_point last_activity_;
  MemoryBudget* budget_ = nullptr;
  std::shared_ptr<MemoryBudget::Meter> meter_;
  MemoryBudget::Charge read_charge_;
  MemoryBudget::Charge output_charge_;
  MemoryBudget::Charge message_charge_;  // the message being delivered (take_message_charge())
  std::optional<std::chrono::steady_clock::time_point> incomplete_since_;
  std::size_t input_limit_ = 0;  // 0: none
  std::size_t input_read_ = 0;
  std::size_t in_flight_ = 0;
  std::string queued_;             // answers not yet handed to the socket
  std::size_t writing_bytes_ = 0;  // inside the uv_write in progress
  bool write_in_progress_ = false;
  bool flush_scheduled_ = false;
  bool delivering_ = false;  // inside deliver_messages()
  bool started_ = false;
  bool reading_ = false;
  bool paused_at_limit_ = false;
  bool stopped_ = false;
  bool waiting_for_memory_ = false;
  bool closing_ = false;
  bool close_when_flushed_ = false;
  bool shutdown_sent_ = false;
  std::chrono::steady_clock::time_point close_requested_at_;
};

}  // namespace hsm::agent
