// AuditLog: one JSON line per key operation (generate, sign, verify, delete, sign_batch) and
// per denied or failed request of any method, with the caller's pid/uid/gid from SO_PEERCRED.
// For signing it records the SHA-256 of the signed input, never the input itself.
//
// Lines are formatted on the caller's thread and written by spdlog's async logger on a writer
// thread of this object's own, so a slow stdout never stalls the event loop; when its queue
// (64k lines) is full the caller blocks rather than dropping an audit line. spdlog's own
// flush() only queues a flush; flush() and close() here wait until every queued line is
// written (they stop the writer thread, which drains its queue first).
// Thread-safety: every member is safe from any thread. reopen() swaps the sink (SIGHUP, for
// log rotation) without losing lines.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "hsm/protocol/types.hpp"
#include "policy/caller.hpp"

namespace spdlog {
class logger;
namespace details {
class thread_pool;
}
}  // namespace spdlog

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
  /// Reopens the file (after rotation). Keeps the old sink if the new open fails (logged).
  void reopen();
  /// Returns once every line recorded before the call is written to the sink and flushed.
  /// Blocks while the sink blocks (a stdout nobody reads).
  void flush();
  /// As flush(), then stops the writer thread: call before any exit path (SIGTERM drain, a
  /// second SIGTERM's immediate exit, std::_Exit with abandoned workers). Lines recorded after
  /// close() are written synchronously on the caller's thread, so none is lost either.
  /// Idempotent; the destructor calls it.
  void close();

  /// The JSON line for a record (no newline), for tests and for record().
  [[nodiscard]] static std::string format(const AuditRecord& record);

 private:
  void write(const std::string& line);
  /// Stops the writer thread after it has written every queued line. Needs mutex_ held
  /// exclusively. Leaves logger_ null.
  void drain_locked();

  std::string path_;
  // Shared by writers (record), exclusive for swapping the logger (flush, close, reopen), so
  // no line is queued to a writer thread that is being stopped.
  mutable std::shared_mutex mutex_;
  std::shared_ptr<spdlog::details::thread_pool> pool_;  // null once closed
  std::shared_ptr<spdlog::logger> logger_;
};

}  // namespace hsm::agent
