// Call: one decoded request on its way through a worker, from the read to its answer. It is
// created, answered and counted on its worker's loop thread (Worker::complete, the one place a
// call is answered); the thread that runs it in the token (the loop's own, or a pool thread)
// only reads the request and hands an Outcome back.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>

#include "hsm/protocol/types.hpp"
#include "log/audit_log.hpp"
#include "policy/caller.hpp"
#include "server/memory_budget.hpp"
#include "service/key_service.hpp"

namespace hsm::agent {

using SteadyClock = std::chrono::steady_clock;

struct Call {
  std::uint64_t connection_id = 0;
  protocol::Request request;
  Caller caller;
  SteadyClock::time_point received;
  SteadyClock::time_point deadline;
  MemoryBudget::Charge charge;  // the request's bytes, until the call is gone
  bool answered = false;        // loop thread only: by its result, its deadline or shutdown
};

/// The error code of an outcome; nullopt for a result.
[[nodiscard]] std::optional<protocol::ErrorCode> code_of(const Outcome& outcome);

/// The audit line of a call: what was asked, by whom, and the SHA-256 of what was signed (also
/// when the sign was refused: the input was decoded, so an investigator can match it).
[[nodiscard]] AuditRecord audit_record(const protocol::Request& request, const Caller& caller,
                                       const Outcome& outcome);

/// How many signatures a request asks for: what the rate limit counts (one for other methods).
[[nodiscard]] std::size_t signatures_asked(const protocol::Request& request);

}  // namespace hsm::agent
