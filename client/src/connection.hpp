// One pipelined connection to the agent: requests written by the calling threads (one at a
// time), answers read by the connection's own reader thread and matched to their calls by msgid.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "call.hpp"
#include "hsm/protocol/codec.hpp"
#include "pending_calls.hpp"
#include "unix_socket.hpp"

namespace hsm::client {

struct ConnectionSettings {
  std::string socket_path;
  protocol::Limits response_limits;   // what the reader accepts from the agent
  std::size_t max_request_bytes = 0;  // what send() refuses to write
};

/// How an attempt that send() accepted ended: the agent's answer, or an Error when the
/// connection was lost under it (connection_failed or protocol_error). Called on the reader
/// thread, exactly once per accepted attempt that was not forgotten first.
using AttemptEnded = std::function<void(const std::shared_ptr<Call>&, Answer&&)>;

/// Thread-safe: send(), forget() and close() may be called from any thread; read_loop() runs on
/// the connection's reader thread (started by the pool), which holds a shared_ptr to the
/// connection for as long as it runs. Answers to msgids no longer pending (their call timed out
/// or was cancelled) are dropped.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  /// `attempt_ended` must outlive the connection's reader thread.
  Connection(UniqueFd fd, const ConnectionSettings& settings, const AttemptEnded& attempt_ended);
  ~Connection() = default;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  Connection(Connection&&) = delete;
  Connection& operator=(Connection&&) = delete;

  /// False once the connection failed or was closed; the pool then opens a new one.
  [[nodiscard]] bool usable() const noexcept { return !broken_.load(std::memory_order_acquire); }

  /// Writes the call's request (with a fresh msgid and the time left until its deadline).
  /// nullopt: the call is in flight, and attempt_ended will hear about it (unless the call is
  /// forgotten first). A Failure: the call is not on this connection any more and the caller
  /// decides what happens to it. Blocks at most until the call's deadline when another writer
  /// holds the socket or its buffer is full.
  [[nodiscard]] std::optional<Failure> send(const std::shared_ptr<Call>& call);

  /// Withdraws the call waiting under `msgid` (it timed out or was cancelled); its answer will
  /// be dropped. True when it was still pending here.
  bool forget(std::uint32_t msgid, const Call* call);

  /// Calls waiting for their answer here (tests check that none is left behind).
  [[nodiscard]] std::size_t pending_calls();

  /// Shuts the socket down: the reader thread fails every pending call and returns.
  void close() noexcept;

  /// The reader thread's body: reads and dispatches answers until the socket is closed or
  /// fails, or the agent sends bytes that break the protocol (then the connection is closed:
  /// the stream cannot be trusted any more); then fails what is still pending.
  void read_loop() noexcept;

 private:
  enum class WriteStatus : std::uint8_t { kDone, kNothingWritten, kPartlyWritten };
  struct WriteResult {
    WriteStatus status = WriteStatus::kDone;
    std::optional<Error> error;
    bool breaks_connection = false;  // the socket failed, or a request was cut in the middle
  };

  WriteResult write_all(const char* data, std::size_t size, Clock::time_point deadline);
  /// Hands the answer in `message` to its call's owner, or drops it.
  void dispatch(const msgpack::object& message);
  /// The connection is over: every pending call fails with `reason` (none: the agent closed
  /// it), except those whose requests are still being written (their writers fail them).
  void end(std::optional<Error> reason) noexcept;
  void mark_broken() noexcept;

  UniqueFd fd_;
  const ConnectionSettings settings_;
  const AttemptEnded& attempt_ended_;
  std::atomic<bool> broken_{false};

  std::mutex mutex_;
  PendingCalls pending_;             // guarded by mutex_
  std::optional<Error> end_reason_;  // guarded by mutex_: set by end(): why it ended

  protocol::FrameReader frames_;  // the reader thread's alone

  // One writer at a time, so requests are never interleaved on the stream. Timed: a caller
  // stops waiting for its turn at its deadline.
  std::timed_mutex write_mutex_;
};

}  // namespace hsm::client
