// Backoff: capped exponential delays with jitter, for the client's call retries and reconnects
// and the agent's token re-initialisation (docs/reliability.md).
//
// Attempt n >= 1 waits a delay drawn uniformly from [d/2, d], d = min(max, first * 2^(n-1));
// attempt 0 waits nothing. The random half spreads out parties that failed at the same moment
// (clients after an agent restart, agents after a network HSM came back), so they do not all
// come back in lockstep; the cap bounds how long a recovered peer stays unused.
//
// Thread-safe: the bounds are immutable and each thread draws from its own generator.
#pragma once

#include <chrono>
#include <cstdint>

namespace hsm::common {

class Backoff {
 public:
  /// `max` is raised to `first` when below it; callers clamp `first` to their own minimum.
  Backoff(std::chrono::nanoseconds first, std::chrono::nanoseconds max) noexcept;

  /// The delay before attempt `attempt`, jitter included.
  [[nodiscard]] std::chrono::nanoseconds delay(std::uint32_t attempt) const;
  /// The upper bound d of delay(attempt), without jitter (0 for attempt 0).
  [[nodiscard]] std::chrono::nanoseconds ceiling(std::uint32_t attempt) const noexcept;

 private:
  std::chrono::nanoseconds first_;
  std::chrono::nanoseconds max_;
};

}  // namespace hsm::common
