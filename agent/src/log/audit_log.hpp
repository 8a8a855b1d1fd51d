// AuditLog: one JSON line per key operation (generate, sign, verify, delete, sign_batch), per
// denied or failed request of any method, and per summary of connections refused by the policy
// (log/connection_refusals.hpp), with the caller's pid/uid/gid from SO_PEERCRED. For signing it
// records the SHA-256 of the signed input, never the input itself.
//
// Lines are formatted on the caller's thread and appended to a bounded buffer that a writer
// thread of this object's own writes in batches: it wakes when the buffer goes from empty to
// non-empty, lets lines gather for a few milliseconds, and writes them with one write(2). A busy
// agent therefore pays one writer wake-up per batch, not per request (a wake-up per line was a
// context switch on every sign: docs/performance.md).
//
// Nothing here makes a caller wait for the output: record() appends to the buffer and returns.
// When the buffer already holds max_pending_bytes (the output is slower than the lines, or it
// fails) the line is dropped and counted (hsm_agent_audit_dropped_lines_total).
//
// Failing closed, as Vault's audit devices do (docs/security.md "The audit log"): from a failed
// write, or a dropped line, until the next write that succeeds, the log is *failing*:
// refuses_key_operations() is true (unless AuditOptions::fail_open), /readyz says why (through
// HealthState) and hsm_agent_audit_failing is 1. The lines a write could not take stay in the
// buffer, ahead of later ones, and the writer tries again every retry_interval.
//
// Whole lines only: the output ends at a line boundary after every attempt. When a write took
// part of a line (a disk that filled up in the middle of a batch), a regular file is cut back
// with ftruncate to the end of its last whole line, and the cut line is written again, whole,
// by the next attempt. An output that cannot be cut (a pipe, a terminal) gets the rest of that
// line first on the next attempt, so the line is completed and never joined to another one.
//
// Thread-safety: every member is safe from any thread. reopen() has the writer swap the file
// (SIGHUP, for log rotation) right after the lines recorded before it, without losing or
// reordering lines.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "hsm/protocol/types.hpp"
#include "metrics/agent_metrics.hpp"
#include "metrics/health_state.hpp"
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

struct AuditOptions {
  /// --audit-fail-open: key operations go on while the log is failing (its lines may be lost,
  /// and are counted). Default: they are refused (audit_unavailable).
  bool fail_open = false;
  /// Bytes of lines waiting for the writer (those a failed write left included); a line that
  /// does not fit is dropped. 4 MiB: ~12000 sign lines, a fraction of a second at full speed.
  std::size_t max_pending_bytes = std::size_t{4} * 1024 * 1024;
  /// Pause between a failed write and the next attempt.
  std::chrono::milliseconds retry_interval{500};
};

class AuditLog {
 public:
  /// `path` "-" is stdout; else a file opened for append (created 0600). Throws
  /// std::runtime_error naming the path when it cannot be opened. `metrics` and `health` must
  /// outlive this object.
  AuditLog(std::string path, AuditOptions options, AgentMetrics& metrics, HealthState& health);
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  /// The methods whose every request is audited, and which are refused while the log fails:
  /// generate_key, sign, verify, delete_key, sign_batch.
  [[nodiscard]] static bool key_operation(protocol::Method method) noexcept;
  /// Whether a request of `method` answered with `code` is audited: key operations, and every
  /// denied or failed request.
  [[nodiscard]] static bool audited(protocol::Method method,
                                    std::optional<protocol::ErrorCode> code) noexcept;

  /// True while key operations must be refused: the log is failing and the agent fails closed.
  /// Lock-free (the event loop asks for every key operation).
  [[nodiscard]] bool refuses_key_operations() const noexcept {
    return refusing_.load(std::memory_order_acquire);
  }

  /// Never waits for the output (see the top of this file).
  void record(const AuditRecord& record);
  /// A `connection_refused` line standing for `count` connections of `caller`'s uid refused by
  /// the policy since that uid's previous line; `other_uids`: for uids beyond those summarised
  /// one by one (then `caller` is the last of them).
  void record_refused_connections(const Caller& caller, std::uint64_t count, bool other_uids);
  /// Reopens the file (after rotation): the writer writes the lines recorded before this call
  /// to the old file, then opens the path again. Keeps the old file if the open fails (logged).
  /// Does not wait.
  void reopen();
  /// Returns once every line recorded before the call is written (write(2) returned), or at
  /// once while the log is failing (the writer keeps those lines and tries again). Blocks while
  /// the output blocks (a stdout nobody reads): not for the event loop.
  void flush();
  /// Stops the writer after one more attempt at everything recorded: call before any exit path
  /// (SIGTERM drain, a second SIGTERM's immediate exit, std::_Exit with abandoned workers).
  /// Lines that attempt cannot write are dropped, counted and logged, so a full disk does not
  /// hold up the exit. Lines recorded after close() are written synchronously on the caller's
  /// thread. Idempotent; the destructor calls it.
  void close();

  /// The JSON line for a record (no newline), for tests and for record().
  [[nodiscard]] static std::string format(const AuditRecord& record);

 private:
  static constexpr std::size_t kWakeBytes = 64 * 1024;         // write at once from here
  static constexpr std::chrono::milliseconds kBatchWindow{5};  // lines gather this long

  void append(std::string&& line);
  void run_writer();

  // The output: the writer thread's, or (after close()) the caller's; output_mutex_ held.
  struct Written {
    std::size_t whole_bytes = 0;  // of the lines given: in the output now, whole lines only
    bool complete = false;        // every byte written, a cut line completed before
    int error = 0;                // the errno of the write that failed (0: no progress)
  };
  /// Writes `lines` (whole lines) after completing a cut line, if any; the output ends at a
  /// line boundary whatever happens (see the top of this file).
  Written write_lines(std::string_view lines);
  /// write(2) until all of `bytes` is written or a write fails (counted); returns bytes written.
  std::size_t write_some(std::string_view bytes, int& error);
  /// After close(): writes `lines` now; those it cannot write are dropped and counted.
  void write_synchronously(std::string_view lines);
  void reopen_output();

  // The failing state; mutex_ held.
  void set_failing(const std::string& problem);
  void set_writable();
  void drop(std::uint64_t lines);

  std::string path_;
  AuditOptions options_;
  AgentMetrics& metrics_;
  HealthState& health_;

  std::mutex output_mutex_;
  int fd_ = -1;  // the file, or 1 (stdout, not ours to close); guarded by output_mutex_
  bool truncatable_ = false;  // a regular file: a cut line is truncated away
  std::string torn_tail_;     // the rest of a line cut on an output that cannot be truncated

  std::mutex mutex_;
  std::condition_variable wake_writer_;
  std::condition_variable written_;
  std::string pending_;                   // whole lines, each ending in '\n'
  std::size_t in_flight_bytes_ = 0;       // taken by the writer, not yet written
  std::optional<std::size_t> reopen_at_;  // bytes of pending_ that belong to the old file
  std::uint64_t appended_ = 0;            // lines appended so far
  std::uint64_t written_upto_ = 0;        // lines written so far
  std::uint64_t flush_waiters_ = 0;
  bool failing_ = false;
  bool retry_ = false;  // the last write failed: try again after retry_interval
  std::uint64_t dropped_while_failing_ = 0;
  std::atomic<bool> refusing_{false};
  bool stopping_ = false;
  bool closed_ = false;  // after close(): lines are written synchronously
  std::thread writer_;
};

}  // namespace hsm::agent
