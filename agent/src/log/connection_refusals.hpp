// ConnectionRefusals: the log and audit lines of connections refused at accept, summarised per
// uid so that a caller connecting and closing in a loop cannot drown the audit trail or the
// logs (docs/security.md "Refused callers"). The counter per reason
// (hsm_agent_connections_rejected_total) is the server's and stays exact; this decides only
// which lines are written.
//
// Per refused uid: the first refusal is written at once (a warning, and for a policy refusal an
// audit line); later ones at most once per kInterval, each line carrying how many connections
// it stands for. flush_due(), called by a timer, writes the counts left pending for a whole
// interval; flush_all() writes every pending count (before an exit). The table holds only uids
// refused within the last interval or with a pending count, at most kMaxUids of them: the
// refusals of further uids are summarised together, in one line per interval marked as such.
//
// Not thread-safe: the event loop's (accept and its timer).
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <unordered_map>

#include "policy/caller.hpp"

namespace hsm::agent {

class AuditLog;

/// Why a connection was refused at accept: the `reason` label values of
/// hsm_agent_connections_rejected_total, in kConnectionRejectReasons' order.
enum class RefusalReason : std::uint8_t {
  kMaxConnections,
  kMaxConnectionsPerUid,
  kPolicy,
  kShuttingDown
};
/// The label value: "max_connections", "max_connections_per_uid", "policy", "shutting_down".
[[nodiscard]] std::string_view to_string(RefusalReason reason) noexcept;

class ConnectionRefusals {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::seconds kInterval{1};
  static constexpr std::size_t kMaxUids = 1024;

  /// `audit` must outlive this object.
  explicit ConnectionRefusals(AuditLog& audit) : audit_(audit) {}

  void refused(const Caller& caller, RefusalReason reason, Clock::time_point now);
  /// Writes the summaries whose last line is at least kInterval old, and forgets the uids that
  /// have nothing pending.
  void flush_due(Clock::time_point now);
  /// Writes every pending summary.
  void flush_all();

  /// Uids summarised one by one now (for tests).
  [[nodiscard]] std::size_t tracked_uids() const noexcept { return by_uid_.size(); }

 private:
  struct Summary {
    Caller last;                            // the most recent refused caller it counts
    std::array<std::uint64_t, 4> counts{};  // one per RefusalReason  // pending, by RefusalReason
    std::optional<Clock::time_point> last_line;
  };

  void write(Summary& summary, bool other_uids, Clock::time_point now);

  AuditLog& audit_;
  std::unordered_map<uid_t, Summary> by_uid_;
  Summary other_uids_;  // refusals of uids beyond kMaxUids, together
};

}  // namespace hsm::agent
