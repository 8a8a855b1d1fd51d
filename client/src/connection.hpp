// One pipelined connection to the agent: a writer side shared by every calling thread, and a
// read side held by one thread at a time: a synchronous caller reading its own answer (and any
// others that arrive meanwhile), or the connection's reader thread for everything else.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "call.hpp"
#include "completion_flag.hpp"
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

/// Who reads the answer to a request that send() writes.
enum class ReadBy : std::uint8_t {
  kAnyone,  // whoever holds the read side; the reader thread is woken when nobody does
  kSender,  // the sending thread itself: it calls await() right after a successful send()
};

/// Thread-safety: send(), forget(), await() and close() may be called from any thread;
/// read_loop() runs on the connection's own reader thread, which holds a shared_ptr to the
/// connection for as long as it runs (so the connection is never destroyed under it).
///
/// Every call handed to send() that send() accepts (returns Sent for) is reported exactly once
/// to the CallRunner: its answer through on_answer(), or on_failure() when the connection dies
/// first (connection_failed, promptly: the reading thread sees the socket close, and the reader
/// thread watches for a hang-up even while it does not read). Answers to msgids no longer
/// pending (their call timed out) are dropped. The thread that reports is the one holding the
/// read side: the reader thread, or a synchronous caller in await() (ReportingThread::kCaller,
/// so callbacks are handed to a client thread).
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  /// Throws Error(connection_failed) when the reader thread's wake-up descriptor cannot be made.
  Connection(UniqueFd fd, const ConnectionSettings& settings, CallRunner& runner);
  ~Connection() = default;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  Connection(Connection&&) = delete;
  Connection& operator=(Connection&&) = delete;

  /// False once the connection failed or was closed; the pool then opens a new one.
  [[nodiscard]] bool usable() const noexcept { return !broken_.load(std::memory_order_acquire); }

  /// The call is in flight under `msgid`: the runner will hear about it.
  struct Sent {
    std::uint32_t msgid = 0;
  };
  /// Writes the call's request (with a fresh msgid and the time left until its deadline).
  /// Sent: the call is in flight, and the runner will hear about it. A Failure: the call is not
  /// on this connection any more and the caller decides what happens to it. Blocks at most
  /// until the call's deadline when the socket buffer is full. With ReadBy::kSender the calling
  /// thread must call await() for the call next (nobody else may read its answer otherwise).
  [[nodiscard]] std::variant<Sent, Failure> send(const std::shared_ptr<Call>& call, ReadBy read_by);

  /// For a synchronous call sent with ReadBy::kSender under `msgid`: blocks until `done` is set
  /// (true) or the call's deadline passes (false; the caller then expires the call). While it
  /// waits, the calling thread reads the connection itself whenever nobody else does, and
  /// hands the answers of other calls to their owners; it lets the read side go as soon as its
  /// own answer is in, or at its deadline, to a waiting caller or the reader thread.
  [[nodiscard]] bool await(const std::shared_ptr<Call>& call, CompletionFlag& done,
                           std::uint32_t msgid);

  /// Withdraws the call waiting under `msgid` (it timed out); its answer will be dropped.
  /// True when it was still pending here.
  bool forget(std::uint32_t msgid, const Call* call);

  /// Shuts the socket down: the thread holding the read side fails every pending call, and the
  /// reader thread ends.
  void close() noexcept;

  /// The reader thread's body. Returns when the socket is closed or fails, or the agent sends
  /// bytes that break the protocol (then the connection is closed: the stream cannot be
  /// trusted any more), whoever was reading at the time.
  void read_loop() noexcept;

 private:
  enum class ChunkRead : std::uint8_t {
    kBytes,    // bytes were added to frames_
    kNothing,  // nothing to read now (EAGAIN, EINTR): try again
    kEnd,      // the stream ended or failed; `reason` says why, unless it was a clean end
  };
  /// One recv() into frames_ (the read side's holder only). Throws protocol::FrameError when
  /// an answer would exceed the response limit.
  ChunkRead read_chunk(int recv_flags, std::optional<Error>& reason);
  enum class WriteStatus : std::uint8_t { kDone, kNothingWritten, kPartlyWritten };
  struct WriteResult {
    WriteStatus status = WriteStatus::kDone;
    std::optional<Error> error;
    bool breaks_connection = false;  // the socket failed, or a request was cut in the middle
  };
  /// Who holds the read side (see the invariants at the top of connection.cpp).
  enum class ReadSide : std::uint8_t { kNobody, kThread, kCaller };
  /// A synchronous caller in await(): lives on its stack.
  struct Waiter {
    std::shared_ptr<Call> call;  // keeps `done` (a member of the call) alive for a nudge
    CompletionFlag* done = nullptr;
    std::uint32_t msgid = 0;
  };
  /// Whom to wake after the read side changed hands; delivered without the mutex held.
  struct Handoff {
    std::shared_ptr<Call> nudged_call;  // keeps `nudge` alive until it is delivered
    CompletionFlag* nudge = nullptr;
    bool wake_reader_thread = false;
  };
  enum class LeadEnd : std::uint8_t { kAnswered, kDeadline, kEnded };

  WriteResult write_all(const char* data, std::size_t size, Clock::time_point deadline);
  /// Hands the answer in `message` to its call's owner; returns that call (nullptr: dropped).
  const Call* dispatch(const msgpack::object& message, ReportingThread thread);
  /// Reads and dispatches as the caller `me` until its own answer was dispatched, its deadline
  /// passed or the connection ended. The caller holds the read side; the mutex is not held.
  LeadEnd lead(const Waiter& me, Clock::time_point deadline) noexcept;
  /// The reader thread: waits until it holds the read side (true) or the connection ended.
  bool wait_for_read_side() noexcept;
  /// The reader thread, holding the read side: reads until the read side went to a caller
  /// (true) or the connection ended (false).
  bool read_for_others() noexcept;
  /// The holder of the read side lets it go. The mutex must be held.
  [[nodiscard]] Handoff pass_read_side_locked();
  /// Hands the read side to the oldest follower whose call is still pending here, if any.
  [[nodiscard]] std::optional<Handoff> offer_to_follower_locked();
  /// `me` leaves await(): no longer a follower, and the read side passed on if it holds it.
  [[nodiscard]] Handoff leave_locked(const Waiter& me);
  void deliver(Handoff&& handoff) noexcept;
  void wake_reader_thread() noexcept;
  void drain_wake_fd() noexcept;
  /// The connection is over: every pending call fails with `reason` (none: the agent closed
  /// it), except those whose requests are still being written (their writers fail them). Only
  /// the holder of the read side calls it.
  void end(std::optional<Error> reason, ReportingThread thread) noexcept;
  void mark_broken() noexcept;

  UniqueFd fd_;
  UniqueFd wake_fd_;  // eventfd: wakes the reader thread while it waits for the read side
  const ConnectionSettings settings_;
  CallRunner& runner_;
  std::atomic<bool> broken_{false};

  std::mutex mutex_;
  PendingCalls pending_;                  // guarded by mutex_
  ReadSide reader_ = ReadSide::kNobody;   // guarded by mutex_
  const Waiter* leader_ = nullptr;        // guarded by mutex_: the holder when reader_ is kCaller
  std::vector<const Waiter*> followers_;  // guarded by mutex_: callers waiting, oldest first
  std::optional<Error> end_reason_;       // guarded by mutex_: set by end(): why it ended
  bool hangup_seen_ = false;              // guarded by mutex_: the reader thread saw the hang-up
  // guarded by mutex_: the reader thread holds the read side with nothing only it would read,
  // and waits in poll() (not recv()); a caller may take the read side from it then.
  bool thread_idle_ = false;

  // Bytes received and not yet dispatched. Used only by the holder of the read side; the read
  // side changes hands under mutex_, which orders one holder's use before the next one's.
  protocol::FrameReader frames_;

  // One writer at a time, so requests are never interleaved on the stream. Timed: a caller
  // stops waiting for its turn at its deadline.
  DeadlineMutex write_mutex_;
};

}  // namespace hsm::client
