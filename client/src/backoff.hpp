// Capped exponential backoff with jitter, shared by call retries and reconnects.
#pragma once

#include <chrono>
#include <cstdint>

#include "hsm/client.hpp"

namespace hsm::client {

/// Delays of RetryPolicy: the n-th delay (n >= 1) is drawn uniformly from [d/2, d] where
/// d = min(max_backoff, initial_backoff * 2^(n-1)). The random half spreads out clients that
/// failed at the same moment (an agent restart), so they do not all come back in lockstep.
/// Thread-safe (each thread draws from its own generator).
class Backoff {
 public:
  explicit Backoff(const RetryPolicy& policy) noexcept;

  [[nodiscard]] std::chrono::nanoseconds delay(std::uint32_t attempt) const;
  /// The upper bound d of delay(attempt), without jitter.
  [[nodiscard]] std::chrono::nanoseconds ceiling(std::uint32_t attempt) const noexcept;

 private:
  std::chrono::nanoseconds initial_;
  std::chrono::nanoseconds max_;
};

}  // namespace hsm::client
