#include "log/connection_refusals.hpp"

#include <spdlog/spdlog.h>

#include <numeric>
#include <string>

#include "log/audit_log.hpp"
#include "metrics/agent_metrics.hpp"

namespace hsm::agent {
namespace {

static_assert(kConnectionRejectReasons.size() == 4);
static_assert(kConnectionRejectReasons[static_cast<std::size_t>(RefusalReason::kMaxConnections)] ==
              "max_connections");
static_assert(
    kConnectionRejectReasons[static_cast<std::size_t>(RefusalReason::kMaxConnectionsPerUid)] ==
    "max_connections_per_uid");
static_assert(kConnectionRejectReasons[static_cast<std::size_t>(RefusalReason::kPolicy)] ==
              "policy");
static_assert(kConnectionRejectReasons[static_cast<std::size_t>(RefusalReason::kShuttingDown)] ==
              "shutting_down");

}  // namespace

std::string_view to_string(RefusalReason reason) noexcept {
  return kConnectionRejectReasons.at(static_cast<std::size_t>(reason));
}

void ConnectionRefusals::refused(const Caller& caller, RefusalReason reason,
                                 Clock::time_point now) {
  auto it = by_uid_.find(caller.uid);
  if (it == by_uid_.end() && by_uid_.size() < kMaxUids) {
    it = by_uid_.emplace(caller.uid, Summary{}).first;
  }
  const bool other_uids = it == by_uid_.end();
  Summary& summary = other_uids ? other_uids_ : it->second;
  summary.last = caller;
  ++summary.counts.at(static_cast<std::size_t>(reason));
  // The first refusal at once, then at most one line per interval.
  if (!summary.last_line || now - *summary.last_line >= kInterval) {
    write(summary, other_uids, now);
  }
}

void ConnectionRefusals::flush_due(Clock::time_point now) {
  const auto due = [&](const Summary& summary) {
    return !summary.last_line || now - *summary.last_line >= kInterval;
  };
  for (auto it = by_uid_.begin(); it != by_uid_.end();) {
    Summary& summary = it->second;
    const bool pending =
        std::accumulate(summary.counts.begin(), summary.counts.end(), std::uint64_t{0}) > 0;
    if (!due(summary)) {
      ++it;
    } else if (pending) {
      write(summary, false, now);
      ++it;
    } else {
      it = by_uid_.erase(it);  // quiet for an interval: its next refusal is a first one again
    }
  }
  if (due(other_uids_)) write(other_uids_, true, now);
}

void ConnectionRefusals::flush_all() {
  const auto now = Clock::now();
  for (auto& [uid, summary] : by_uid_) write(summary, false, now);
  write(other_uids_, true, now);
}

void ConnectionRefusals::write(Summary& summary, bool other_uids, Clock::time_point now) {
  const std::uint64_t total =
      std::accumulate(summary.counts.begin(), summary.counts.end(), std::uint64_t{0});
  if (total == 0) return;
  std::string reasons;
  for (std::size_t i = 0; i < summary.counts.size(); ++i) {
    if (summary.counts.at(i) == 0) continue;
    if (!reasons.empty()) reasons += ", ";
    reasons += kConnectionRejectReasons.at(i);
  }
  const Caller& last = summary.last;
  if (other_uids) {
    spdlog::warn(
        "connection refused ({}): {} connections of uids beyond the {} summarised one by one, "
        "the last from pid {} uid {} gid {}",
        reasons, total, kMaxUids, last.pid, last.uid, last.gid);
  } else if (total == 1) {
    spdlog::warn("connection refused ({}): pid {} uid {} gid {}", reasons, last.pid, last.uid,
                 last.gid);
  } else {
    spdlog::warn(
        "connection refused ({}): pid {} uid {} gid {} ({} connections of this uid refused since "
        "its previous line)",
        reasons, last.pid, last.uid, last.gid, total);
  }
  const auto policy = summary.counts.at(static_cast<std::size_t>(RefusalReason::kPolicy));
  if (policy > 0) audit_.record_refused_connections(last, policy, other_uids);
  summary.counts = {};
  summary.last_line = now;
}

}  // namespace hsm::agent
