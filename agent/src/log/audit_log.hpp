// AuditLog: one JSON line per key operation (generate, sign, verify, delete, sign_batch) and
// per denied or failed request of any method, with the caller's pid/uid/gid from SO_PEERCRED.
// For signing it records the SHA-256 of the signed input, never the input itself.
//
// Lines are formatted on the caller's thread and appended to a buffer that a writer thread of
// this object's own writes in batches: it wakes when the buffer goes from empty to non-empty,
// lets lines gather for a few milliseconds, and writes them with one write(2). A busy agent
// therefore pays one writer wake-up per batch, not per request (a wake-up per line was a
// context switch on every sign: docs/performance.md), and a slow stdout never stalls the event
// loop. When the buffer holds kMaxPendingBytes the caller blocks rather than dropping an audit
// line. flush() and close() return once every line recorded before them is written.
// Thread-safety: every member is safe from any thread. reopen() swaps the file (SIGHUP, for
// log rotation) without losing or reordering lines.
#pragma once

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "hsm/protocol/types.hpp"
#include "policy/caller.hpp"

namespace hsm::agent {

/// One item of a sign_batch: its kid, its own result, the SHA-256 of its input.
struct AuditBatchItem {
  std::string kid;
  std::optional<protocol::ErrorCode> code;  // nullopt: ok
  std::optional<std::array<std::uint8_t, 32>> input_sha256;
};

struct AuditRecord {
  protocol::Method method = protocol::Method::kCapabilities;
  std::string kid;
  std::string alg;
  std::optional<protocol::ErrorCode> code;  // nullopt: ok
  double duration_seconds = 0;
  Caller caller;
  std::optional<std::array<std::uint8_t, 32>> input_sha256;
  /// sign_batch only: one entry per item, in request order (written as "items").
  std::vector<AuditBatchItem> items;
};

class AuditLog {
 public:
  /// `path` "-" is stdout; else a file opened for append (created 0600). Throws
  /// std::runtime_error naming the path when it cannot be opened.
  explicit AuditLog(std::string path);
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  /// Whether a request of `method` answered with `code` is audited.
  [[nodiscard]] static bool audited(protocol::Method method,
                                    std::optional<protocol::ErrorCode> code) noexcept;

  void record(const AuditRecord& record);
  void record_refused_connection(const Caller& caller);
  /// Reopens the file (after rotation). Keeps the old file if the new open fails (logged).
  void reopen();
  /// Returns once every line recorded before the call is written (write(2) returned).
  /// Blocks while the output blocks (a stdout nobody reads).
  void flush();
  /// As flush(), then stops the writer thread: call before any exit path (SIGTERM drain, a
  /// second SIGTERM's immediate exit, std::_Exit with abandoned workers). Lines recorded after
  /// close() are written synchronously on the caller's thread, so none is lost either.
  /// Idempotent; the destructor calls it.
  void close();

  /// The JSON line for a record (no newline), for tests and for record().
  [[nodiscard]] static std::string format(const AuditRecord& record);

 private:
  static constexpr std::size_t kWakeBytes = 64 * 1024;              // write at once from here
  static constexpr std::size_t kMaxPendingBytes = 4 * 1024 * 1024;  // callers wait from here
  static constexpr std::chrono::milliseconds kBatchWindow{5};       // lines gather this long

  void append(std::string_view line);
  void run_writer();
  /// Writes all of `bytes` to the current output (output_mutex_ held); logs a failure once.
  void write_out(std::string_view bytes);

  std::string path_;
  int fd_ = -1;              // the file, or 1 (stdout, not ours to close); guarded by output_mutex_
  std::mutex output_mutex_;  // one write(2) at a time; reopen() swaps fd_ under it
  bool reported_write_error_ = false;

  std::mutex mutex_;
  std::condition_variable wake_writer_;
  std::condition_variable written_;
  std::string pending_;             // whole lines, each ending in '\n'
  std::uint64_t appended_ = 0;      // lines appended so far
  std::uint64_t written_upto_ = 0;  // lines written so far
  std::uint64_t flush_waiters_ = 0;
  bool stopping_ = false;
  bool closed_ = false;  // after close(): lines are written synchronously
  std::thread writer_;
};

}  // namespace hsm::agent
