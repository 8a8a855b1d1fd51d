// ConnectionOutput: the part of a connection that the loop thread shares with the workers: its
// answer bytes not yet written, the one uv_write in progress, and its count of requests in
// flight.
//
// Why it is shared: a worker that finishes a call writes the answer to the socket itself, with a
// non-blocking send(2), so the answer leaves without waiting for the loop thread to wake up, and
// at steady state the loop is not woken at all after a request (docs/performance.md, "the worker
// writes the answer"). The count of requests in flight lives here too because writing an answer
// is what ends a request: the worker decides under the same lock whether reading, paused at the
// in-flight limit, may resume, and wakes the loop only then.
//
// Invariants, all under `mutex_`:
// - Bytes are never reordered or interleaved: a worker writes straight to the socket only when
//   nothing is queued and no uv_write is in progress; otherwise it appends to the queue, which
//   only the loop writes (flush()).
// - close() clears the descriptor before the loop closes it (uv_close), so a worker never writes
//   to a descriptor that was closed and perhaps reused by another connection.
// - At most `max_buffered_bytes` are queued or being written: past that the client does not read
//   its answers, and the connection is closed (slow reader) instead of buffering without bound.
//
// Thread-safety: members marked "loop thread" are called only by the loop thread; the others
// from any thread.
#pragma once

#include <uv.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>

#include "server/memory_budget.hpp"

namespace hsm::agent {

class ConnectionOutput {
 public:
  explicit ConnectionOutput(std::size_t max_buffered_bytes) noexcept
      : max_buffered_bytes_(max_buffered_bytes) {}
  ConnectionOutput(const ConnectionOutput&) = delete;
  ConnectionOutput& operator=(const ConnectionOutput&) = delete;

  /// Loop thread, once the connection is accepted: the socket workers may write to.
  void attach(int fd);
  /// Loop thread: from now on the answers queued or being written are charged to `meter`.
  void charge_to(std::shared_ptr<MemoryBudget::Meter> meter);

  /// Loop thread: queues bytes for the next flush(). False, with nothing queued, when they
  /// would take the buffered bytes past the limit (the client does not read its answers).
  [[nodiscard]] bool queue(std::string_view bytes);

  enum class FlushResult : std::uint8_t {
    kDone,     // nothing left to write
    kWriting,  // a uv_write is in progress; finish_write() is called from its callback
    kFailed,   // the socket failed: close the connection
  };
  /// Loop thread: writes what is queued: uv_try_write, the rest through one uv_write whose
  /// request's `data` is `write_data` and whose callback is `on_write`.
  FlushResult flush(uv_stream_t* stream, void* write_data, uv_write_cb on_write);
  /// Loop thread, from the uv_write callback: frees the request (see flush()) and ends the write.
  /// True when more bytes were queued meanwhile (flush again).
  bool finish_write(uv_write_t* request);

  /// Nothing queued and nothing being written.
  [[nodiscard]] bool idle() const;

  /// Loop thread, before the socket is closed: from now on answers are dropped.
  void close();

  /// Loop thread: a request was handed to a worker. True when the connection now has
  /// `max_in_flight` requests in flight: the caller pauses reading, and the answer that brings
  /// the count back under the limit reports `resume`.
  bool begin_request(std::size_t max_in_flight);
  /// Loop thread: the loop answered a request in flight (deadline, shutdown; the answer was
  /// queue()d). True when reading may resume (see begin_request()).
  bool end_request_on_loop();
  [[nodiscard]] std::size_t in_flight() const;

  /// What a worker's answer leaves for the loop thread to do; nothing, usually.
  struct AfterAnswer {
    bool flush = false;        // bytes are queued that nothing is writing: flush() them
    bool slow_reader = false;  // the buffer limit was reached: close the connection
    bool failed = false;       // the socket failed: close the connection
    bool resume = false;       // reading was paused at the in-flight limit and may resume

    [[nodiscard]] bool loop_needed() const noexcept {
      return flush || slow_reader || failed || resume;
    }
  };
  /// Worker: writes one complete answer (or queues what the socket does not take) and counts
  /// its request out of flight. An answer to a closed connection is dropped.
  AfterAnswer answer_from_worker(std::string_view bytes);

 private:
  [[nodiscard]] std::size_t buffered_locked() const noexcept {
    return queued_.size() + writing_bytes_;
  }
  /// After the queue or the write in progress changed: the charge follows, and a queue that
  /// emptied gives a large buffer back (one slow reader's 4 MiB is not kept for ever).
  void note_buffered_locked() noexcept;

  const std::size_t max_buffered_bytes_;
  mutable std::mutex mutex_;
  int fd_ = -1;  // -1 before attach() and after close()
  std::string queued_;
  std::size_t writing_bytes_ = 0;  // bytes inside the uv_write in progress
  bool write_in_progress_ = false;
  std::size_t in_flight_ = 0;
  std::size_t max_in_flight_ = 0;  // the limit given to the last begin_request()
  bool paused_at_limit_ = false;
  MemoryBudget::Charge charge_;  // the bytes queued or being written
};

}  // namespace hsm::agent
