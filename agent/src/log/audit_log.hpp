// AuditLog: one JSON line per key operation (generate, sign, verify, delete, sign_batch) and
// per denied or failed request of any method, with the caller's pid/uid/gid from SO_PEERCRED.
// For signing it records the SHA-256 of the signed input, never the input itself.
//
// Lines are formatted on the caller's thread and written by spdlog's async logger on its own
// thread, so a slow stdout never stalls the event loop; when its queue (64k lines) is full the
// caller blocks rather than dropping an audit line.
// Thread-safety: every member is safe from any thread. reopen() swaps the sink (SIGHUP, for
// log rotation) without losing lines.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "hsm/protocol/types.hpp"
#include "policy/caller.hpp"

namespace spdlog {
class logger;
}

namespace hsm::agent {

struct AuditRecord {
  protocol::Method method = protocol::Method::kCapabilities;
  std::string kid;
  std::string alg;
  std::optional<protocol::ErrorCode> code;  // nullopt: ok
  double duration_seconds = 0;
  Caller caller;
  std::optional<std::array<std::uint8_t, 32>> input_sha256;
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
  /// Writes out every queued line.
  void flush();

  /// The JSON line for a record (no newline), for tests and for record().
  [[nodiscard]] static std::string format(const AuditRecord& record);

 private:
  [[nodiscard]] std::shared_ptr<spdlog::logger> current() const;
  void write(const std::string& line);

  std::string path_;
  mutable std::mutex mutex_;
  std::shared_ptr<spdlog::logger> logger_;
};

}  // namespace hsm::agent
