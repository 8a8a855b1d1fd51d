// One pipelined connection to the agent: requests written by the calling threads (one at a
// time), answers read by the connection's own reader thread or by a synchronous caller waiting
// for its own answer, and matched to their calls by msgid.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
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
/// connection was lost under it (connection_failed or protocol_error). Called on whichever
/// thread read the answer, exactly once per accepted attempt that was not forgotten first.
using AttemptEnded = std::function<void(const std::shared_ptr<Call>&, Answer&&)>;

/// Thread-safe: send(), forget(), read_until_answered() and close() may be called from any
/// thread; read_loop() runs on the connection's reader thread (started by the pool), which holds
/// a shared_ptr to the connection for as long as it runs. Answers to msgids no longer pending
/// (their call timed out or was cancelled) are dropped.
///
/// Who reads the socket: one thread at a time holds the read turn (guarded by mutex_). The
/// reader thread takes it whenever answers are awaited and nobody reads; it gives it back and
/// sleeps when none are. A synchronous caller that finds the turn free takes it and reads until
/// its own answer is in, so the common case (one caller waiting on an idle connection) needs no
/// thread wake-up at all; the reader thread then never runs. A caller that finds the turn taken
/// waits to be woken, as every asynchronous call does.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  /// `attempt_ended` must outlive the connection's reader thread; it hears the answers the
  /// reader thread reads.
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
  /// holds the socket or its buffer is full. `caller_reads`: the sending thread will read the
  /// answer itself (read_until_answered()), so the reader thread is not woken for it.
  [[nodiscard]] std::optional<Failure> send(const std::shared_ptr<Call>& call,
                                            bool caller_reads = false);

  /// On a synchronous caller's thread, after send(call, true) gave it `msgid` here (the call's
  /// InFlight): when no other thread is reading
  /// this connection, reads it here until the call's answer is in (or its entry left: timed
  /// out, cancelled, the connection ended, the deadline passed), polling for up to `spin`
  /// before it blocks. Every answer read on the way goes to `deliver`. False when another
  /// thread holds the read turn: the caller waits to be woken instead.
  bool read_until_answered(const Call& call, std::uint32_t msgid, std::chrono::nanoseconds spin,
                           const AttemptEnded& deliver);

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

  enum class Reader : std::uint8_t { kNobody, kReaderThread, kCaller };

  WriteResult write_all(const char* data, std::size_t size, Clock::time_point deadline);
  /// With the read turn: reads once (polling for `spin`, then blocking until `until`) and hands
  /// every complete answer to `deliver`. False when the stream ended (end() has run).
  bool read_some(const AttemptEnded& deliver, std::chrono::nanoseconds spin,
                 Clock::time_point until);
  /// Hands the answer in `message` to its call's owner through `deliver`, or drops it.
  void dispatch(const msgpack::object& message, const AttemptEnded& deliver);
  /// Someone must read: answers are awaited, or the stream must be read to its end. mutex_ held.
  [[nodiscard]] bool must_read_locked() const noexcept { return !pending_.empty() || !usable(); }
  /// Gives the read turn back, waking the reader thread when reading must go on.
  void hand_back_read_turn() noexcept;
  /// The connection is over: every pending call fails with `reason` (none: the agent closed
  /// it), except those whose requests are still being written (their writers fail them).
  void end(std::optional<Error> reason, const AttemptEnded& deliver) noexcept;
  void mark_broken() noexcept;

  UniqueFd fd_;
  const ConnectionSettings settings_;
  const AttemptEnded& attempt_ended_;
  std::atomic<bool> broken_{false};

  std::mutex mutex_;
  PendingCalls pending_;                   // guarded by mutex_
  std::optional<Error> end_reason_;        // guarded by mutex_: set by end(): why it ended
  Reader reader_ = Reader::kNobody;        // guarded by mutex_: who holds the read turn
  std::condition_variable reader_wanted_;  // the reader thread waits here for its turn

  protocol::FrameReader frames_;  // whoever holds the read turn

  // One writer at a time, so requests are never interleaved on the stream. Timed: a caller
  // stops waiting for its turn at its deadline.
  std::timed_mutex write_mutex_;
};

}  // namespace hsm::client
