// One pipelined connection to the agent: a writer side shared by every calling thread and a
// reader thread that matches answers to calls by msgid.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "call.hpp"
#include "deadline_mutex.hpp"
#include "hsm/protocol/codec.hpp"
#include "pending_calls.hpp"
#include "unix_socket.hpp"

namespace hsm::client {

class CallRunner;

struct ConnectionSettings {
  std::string socket_path;
  protocol::Limits response_limits;   // what the reader accepts from the agent
  std::size_t max_request_bytes = 0;  // what send() refuses to write
};

/// Thread-safety: send(), forget() and close() may be called from any thread; read_loop() runs
/// on the connection's own reader thread, which holds a shared_ptr to the connection for as
/// long as it runs (so the connection is never destroyed under it).
///
/// Every call handed to send() that send() accepts (returns nullopt for) is reported exactly
/// once to the CallRunner: its answer through on_answer(), or on_failure() when the connection
/// dies first (connection_failed, promptly: the reader sees the socket close). Answers to msgids
/// no longer pending (their call timed out) are dropped.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(UniqueFd fd, const ConnectionSettings& settings, CallRunner& runner);
  ~Connection() = default;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  Connection(Connection&&) = delete;
  Connection& operator=(Connection&&) = delete;

  /// False once the connection failed or was closed; the pool then opens a new one.
  [[nodiscard]] bool usable() const noexcept { return !broken_.load(std::memory_order_acquire); }

  /// Writes the call's request (with a fresh msgid and the time left until its deadline).
  /// nullopt: the call is in flight, and the runner will hear about it. A Failure: the call is
  /// not on this connection any more and the caller decides what happens to it. Blocks at most
  /// until the call's deadline when the socket buffer is full.
  [[nodiscard]] std::optional<Failure> send(const std::shared_ptr<Call>& call);

  /// Withdraws the call waiting under `msgid` (it timed out); its answer will be dropped.
  /// True when it was still pending here.
  bool forget(std::uint32_t msgid, const Call* call);

  /// Shuts the socket down: the reader thread fails every pending call and ends.
  void close() noexcept;

  /// The reader thread's body. Returns when the socket is closed or fails, or the agent sends
  /// bytes that break the protocol (then the connection is closed: the stream cannot be
  /// trusted any more).
  void read_loop() noexcept;

 private:
  enum class WriteStatus : std::uint8_t { kDone, kNothingWritten, kPartlyWritten };
  struct WriteResult {
    WriteStatus status = WriteStatus::kDone;
    std::optional<Error> error;
    bool breaks_connection = false;  // the socket failed, or a request was cut in the middle
  };
  WriteResult write_all(const char* data, std::size_t size, Clock::time_point deadline);
  void dispatch(const msgpack::object& message);
  void mark_broken() noexcept;

  UniqueFd fd_;
  const ConnectionSettings settings_;
  CallRunner& runner_;
  std::atomic<bool> broken_{false};

  std::mutex pending_mutex_;
  PendingCalls pending_;  // guarded by pending_mutex_

  // One writer at a time, so requests are never interleaved on the stream. Timed: a caller
  // stops waiting for its turn at its deadline.
  DeadlineMutex write_mutex_;
};

}  // namespace hsm::client
