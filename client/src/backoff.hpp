// The client's retry and reconnect delays: hsm::common::Backoff (the one formula, shared with
// the agent) with the bounds of RetryPolicy.
#pragma once

#include <algorithm>
#include <chrono>

#include "hsm/client.hpp"
#include "hsm/common/backoff.hpp"

namespace hsm::client {

/// RetryPolicy's delays: initial_backoff (at least 100 us) doubling up to max_backoff, each
/// drawn from the upper half. Thread-safe.
class Backoff final : public common::Backoff {
 public:
  explicit Backoff(const RetryPolicy& policy) noexcept
      : common::Backoff(std::max<std::chrono::nanoseconds>(policy.initial_backoff,
                                                           std::chrono::microseconds{100}),
                        policy.max_backoff) {}
};

}  // namespace hsm::client
