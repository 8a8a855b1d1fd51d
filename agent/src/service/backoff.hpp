// Backoff: the delays between attempts to re-initialise the token (docs/reliability.md).
//
// Capped exponential with jitter: the first attempt after a fault is immediate; attempt n >= 1
// after it waits a delay drawn uniformly from [d/2, d], d = min(max, first * 2^(n-1)). The
// jitter keeps many agents in front of one network HSM from retrying in lockstep after the HSM
// comes back; the cap bounds how long a recovered token stays unused.
//
// Thread-safety: none; one owner (the token supervisor's thread).
#pragma once

#include <chrono>
#include <cstdint>
#include <random>

namespace hsm::agent {

class Backoff {
 public:
  /// `first` and `max` are clamped to at least 1 ms, and `max` to at least `first`.
  Backoff(std::chrono::milliseconds first, std::chrono::milliseconds max, std::uint64_t seed);

  /// The delay before the next attempt, counting that attempt: zero for the first one after
  /// construction or reset().
  [[nodiscard]] std::chrono::milliseconds next();
  /// Starts over: the next attempt is immediate again.
  void reset() noexcept { attempts_ = 0; }
  /// Attempts counted since the last reset.
  [[nodiscard]] unsigned attempts() const noexcept { return attempts_; }
  /// The upper bound of the delay before attempt `n` (0 for n = 0), without jitter.
  [[nodiscard]] std::chrono::milliseconds ceiling(unsigned n) const noexcept;

 private:
  std::chrono::milliseconds first_;
  std::chrono::milliseconds max_;
  unsigned attempts_ = 0;
  std::mt19937_64 random_;
};

}  // namespace hsm::agent
